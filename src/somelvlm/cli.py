"""`somelvlm` command line: convert | generate | eval | finetune. Parsing only; work is in the library."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence


def _config_arg(value: str | None):
    from .config import SoMeLVLMConfig

    if value is None:
        return None
    if Path(value).is_file():
        return SoMeLVLMConfig.load(value)
    return SoMeLVLMConfig.preset(value)


# ------------------------------------------------------------------------------------------------
# convert
# ------------------------------------------------------------------------------------------------
def add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert released LAVIS / HF weights into a somelvlm folder (or export to HF / LAVIS)",
        description="Sources: the released LAVIS files (--lavis-checkpoint, --vit, --llm), a Hugging Face "
                    "InstructBLIP folder (--from-hf) or a somelvlm folder (--model). Targets (--to): somelvlm "
                    "(default), hf, lavis.")
    src = p.add_argument_group("source")
    src.add_argument("--lavis-checkpoint", type=Path, help="LAVIS checkpoint.pth (Q-Former, query tokens, ln_vision, llm_proj)")
    src.add_argument("--vit", type=Path, help="LAVIS eva_vit_g.pth")
    src.add_argument("--llm", type=Path, help="Hugging Face LLaMA/Vicuna folder (weights + tokenizer.model)")
    src.add_argument("--from-hf", type=Path, metavar="DIR", help="a transformers InstructBLIP folder")
    src.add_argument("--model", type=Path, metavar="DIR", help="a somelvlm model folder")
    p.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
    p.add_argument("--to", choices=("somelvlm", "hf", "lavis"), default="somelvlm", help="output format")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="weight dtype (default: bf16 for LAVIS sources, unchanged otherwise)")
    p.add_argument("--qformer-tokenizer", type=Path, metavar="DIR", help="folder with bert-base-uncased vocab.txt "
                   "(default: the copy shipped with somelvlm)")
    p.add_argument("--config", help="architecture: a preset name or a somelvlm config.json (default: vicuna7b)")
    p.add_argument("--lavis-eps", action="store_true",
                   help="with --from-hf: use LAVIS's ln_vision eps 1e-5 instead of the HF vision eps")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from .model import SoMeLVLM

    lavis = [args.lavis_checkpoint, args.vit, args.llm]
    sources = sum([any(x is not None for x in lavis), args.from_hf is not None, args.model is not None])
    if sources != 1:
        raise SystemExit("give exactly one source: --lavis-checkpoint/--vit/--llm, --from-hf, or --model")
    if args.out.exists() and not args.force:
        raise SystemExit(f"{args.out} already exists; use --force to overwrite it")
    if any(x is not None for x in lavis):
        if any(x is None for x in lavis):
            raise SystemExit("the LAVIS source needs all of --lavis-checkpoint, --vit and --llm")
        if args.to == "somelvlm":
            from .convert import convert_lavis

            summary = convert_lavis(args.lavis_checkpoint, args.vit, args.llm, args.out, dtype=args.dtype or "bf16",
                                    qformer_tokenizer=args.qformer_tokenizer, config=_config_arg(args.config),
                                    force=args.force, progress=not args.no_progress)
            print(summary)
            return 0
        model = SoMeLVLM.from_lavis(args.lavis_checkpoint, args.vit, args.llm, qformer_tokenizer=args.qformer_tokenizer,
                                    config=_config_arg(args.config), dtype=args.dtype or "fp32")
    elif args.from_hf is not None:
        model = SoMeLVLM.from_hf(args.from_hf, dtype=args.dtype, ln_vision_eps=1e-5 if args.lavis_eps else None)
    else:
        model = SoMeLVLM.from_pretrained(args.model, dtype=args.dtype)
    model.save_pretrained(args.out, format=args.to, force=args.force)
    if args.to == "somelvlm":
        from .convert import verify_folder

        params = verify_folder(args.out)
        print(f"wrote {args.out} ({params['total']:,} parameters)")
    else:
        print(f"wrote {args.out} ({args.to} format)")
    return 0


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="somelvlm", description="SoMeLVLM / InstructBLIP-Vicuna in plain PyTorch")
    parser.add_argument("--version", action="version", version=f"somelvlm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_convert(sub)
    for extra in _extra_commands():
        extra(sub)
    return parser


def _extra_commands():
    from importlib import import_module

    for module in ("somelvlm.generation_cli", "somelvlm.evaluate.cli", "somelvlm.train"):
        try:
            mod = import_module(module)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("somelvlm"):
                continue
            raise
        yield mod.add_parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
