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
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default=None,
                   help="stored dtype. LAVIS sources: auto (default) keeps LAVIS's exact values (LLM and ViT "
                        "linears fp16, the rest fp32), bf16/fp16 cast the big parts, keeping the connection "
                        "module fp32; other sources: unchanged unless given")
    p.add_argument("--qformer-tokenizer", type=Path, metavar="DIR", help="folder with bert-base-uncased vocab.txt "
                   "(default: the copy shipped with somelvlm)")
    p.add_argument("--config", help="architecture: a preset name or a somelvlm config.json (default: vicuna7b)")
    p.add_argument("--lavis-eps", action="store_true",
                   help="with --from-hf: use LAVIS's ln_vision eps 1e-5 instead of the HF vision eps")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_convert)


def _model_dtype(dtype: str | None) -> str | None:
    return None if dtype == "auto" else dtype


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

            summary = convert_lavis(args.lavis_checkpoint, args.vit, args.llm, args.out, dtype=args.dtype or "auto",
                                    qformer_tokenizer=args.qformer_tokenizer, config=_config_arg(args.config),
                                    force=args.force, progress=not args.no_progress)
            print(summary)
            return 0
        model = SoMeLVLM.from_lavis(args.lavis_checkpoint, args.vit, args.llm, qformer_tokenizer=args.qformer_tokenizer,
                                    config=_config_arg(args.config), dtype=_model_dtype(args.dtype) or "fp32")
    elif args.from_hf is not None:
        model = SoMeLVLM.from_hf(args.from_hf, dtype=_model_dtype(args.dtype),
                                 ln_vision_eps=1e-5 if args.lavis_eps else None)
    else:
        model = SoMeLVLM.from_pretrained(args.model, dtype=_model_dtype(args.dtype))
    model.save_pretrained(args.out, format=args.to, force=args.force)
    if args.to == "somelvlm":
        from .convert import verify_folder

        params = verify_folder(args.out)
        print(f"wrote {args.out} ({params['total']:,} parameters)")
    else:
        print(f"wrote {args.out} ({args.to} format)")
    return 0


# ------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------
def add_generation_options(p: argparse.ArgumentParser) -> None:
    """LAVIS's decoding options (defaults: 5 beams, max_length 256, repetition penalty 1.5, ...)."""
    g = p.add_argument_group("decoding (LAVIS defaults)")
    g.add_argument("--num-beams", type=int, default=5)
    g.add_argument("--max-length", type=int, default=256,
                   help="LAVIS max_length: counts a dummy start token, so at most max_length-1 new tokens")
    g.add_argument("--max-new-tokens", type=int, default=None, help="overrides --max-length")
    g.add_argument("--min-length", type=int, default=1, help="LAVIS min_length (counts the dummy start token)")
    g.add_argument("--repetition-penalty", type=float, default=1.5)
    g.add_argument("--length-penalty", type=float, default=1.0)
    g.add_argument("--do-sample", action="store_true", help="nucleus sampling (beam sampling when --num-beams > 1)")
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")


def generation_kwargs(args: argparse.Namespace) -> dict:
    return dict(num_beams=args.num_beams, max_length=args.max_length, max_new_tokens=args.max_new_tokens,
                min_length=args.min_length, repetition_penalty=args.repetition_penalty,
                length_penalty=args.length_penalty, do_sample=args.do_sample, top_p=args.top_p,
                temperature=args.temperature, seed=args.seed)


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="a somelvlm model folder, or 'tiny' (built-in, random weights)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default: as stored")
    p.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda if available)")


def load_model_from_args(args: argparse.Namespace):
    import torch

    from .model import SoMeLVLM

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return SoMeLVLM.load(args.model, dtype=args.dtype, device=device)


DEMO_PROMPT = "Describe this social-media image in one sentence."


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer prompts about images",
                       description="One answer: --image IMG --prompt TEXT. A file of tasks: --input tasks.jsonl "
                                   "--output answers.jsonl (lines of {id, image, prompt} or SoMeData's "
                                   "{text_input, image}); resumable. Without arguments, the built-in tiny "
                                   "model answers a question about a bundled photo.")
    add_model_options(p)
    p.add_argument("--image", help="image file (default with --model tiny: a bundled sample photo)")
    p.add_argument("--prompt", help="the instruction / question")
    p.add_argument("--stream", action="store_true", help="print the answer as it is produced (greedy)")
    p.add_argument("--input", type=Path, help="tasks file (JSONL or a JSON list)")
    p.add_argument("--output", type=Path, help="answers file (JSONL; appended, resumable)")
    p.add_argument("--images-root", type=Path, help="folder the tasks' image names are relative to")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--no-progress", action="store_true")
    add_generation_options(p)
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from .processing import SAMPLE_IMAGE, asset_path

    if (args.input is None) != (args.output is None):
        raise SystemExit("--input and --output go together")
    if args.input is not None and (args.image or args.prompt):
        raise SystemExit("use either --input/--output or --image/--prompt")
    if args.batch_size < 1:
        raise SystemExit("--batch-size must be at least 1")
    kwargs = generation_kwargs(args)
    model = load_model_from_args(args)
    if args.input is not None:
        from .batch import answer_tasks

        res = answer_tasks(model, args.input, args.output, images_root=args.images_root,
                           batch_size=args.batch_size, progress=not args.no_progress, **kwargs)
        rate = res.answered / res.seconds if res.seconds else 0.0
        print(f"answered {res.answered}, already done {res.skipped}, failed {len(res.failures)} "
              f"({rate:.2f} items/s) -> {args.output}", file=sys.stderr)
        return 0 if res.ok else 1
    image = args.image
    if image is None:
        if args.model not in (None, "tiny"):
            raise SystemExit("--image is required (or --input/--output)")
        image = str(asset_path(SAMPLE_IMAGE))
    prompt = args.prompt if args.prompt is not None else DEMO_PROMPT
    if args.stream:
        if args.num_beams != 1:
            print("note: streaming decodes greedily (--num-beams 1)", file=sys.stderr)
        kwargs["num_beams"] = 1
        for piece in model.generate_stream(image, prompt, **kwargs):
            print(piece, end="", flush=True)
        print()
    else:
        print(model.generate(image, [prompt], **kwargs)[0])
    return 0


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__, train
    from .evaluate import cli as evaluate_cli
    from .serve import cli as serve_cli

    parser = argparse.ArgumentParser(prog="somelvlm", description="SoMeLVLM / InstructBLIP-Vicuna in plain PyTorch")
    parser.add_argument("--version", action="version", version=f"somelvlm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_convert(sub)
    add_generate(sub)
    evaluate_cli.add_parser(sub)
    train.add_parser(sub)
    serve_cli.add_serve(sub)
    serve_cli.add_demo(sub)
    return parser


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
