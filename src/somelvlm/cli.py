"""`somelvlm` command line: convert | generate | eval | finetune.

One style for every subcommand: `add_<command>(subparsers)` declares its options (each help text
shows its default), `run_<command>(args)` checks the inputs it can check without a model, then
loads what it needs and calls the library. `main` turns a user error into one line,
`somelvlm <command>: error: <message>`, and exit code 1 (argparse usage errors exit 2).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__, train
from .config import SoMeLVLMConfig
from .devices import resolve_device
from .engines import cli as engines_cli
from .generation import streaming_note
from .hub import LAVIS_CHECKPOINT, resolve_model
from .console import run_command, setup_logging
from .model import SoMeLVLM
from .options import GenerationOptions
from .processing import SAMPLE_IMAGE, asset_path
from .serve import cli as serve_cli

log = logging.getLogger("somelvlm")

DEMO_PROMPT = "Describe this social-media image in one sentence."
DEMO_MAX_NEW_TOKENS = 20  # the tiny demo's answer is random text anyway: keep it short

DECODING_HELP = {
    "num_beams": "beams of the beam search (1: greedy or sampling)",
    "max_length": "LAVIS max_length: counts a dummy start token, so at most max_length-1 new tokens",
    "min_length": "LAVIS min_length (counts the dummy start token)",
    "max_new_tokens": "maximum new tokens; overrides --max-length",
    "min_new_tokens": "minimum new tokens; overrides --min-length",
    "repetition_penalty": "LAVIS/transformers 4.33 repetition penalty (1: off)",
    "length_penalty": "beam score = log-prob / length ** length_penalty",
    "do_sample": "nucleus sampling (beam sampling when --num-beams > 1); temperature 0 means greedy",
    "top_p": "sampling: keep the smallest set of tokens whose probability reaches top_p",
    "top_k": "sampling: keep the top_k most likely tokens (0: off)",
    "temperature": "sampling temperature (0: greedy)",
    "seed": "random seed for sampling",
}


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks."""


# ------------------------------------------------------------------------------------------------
# Shared option groups
# ------------------------------------------------------------------------------------------------
def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny",
                   help="a somelvlm model folder, an HF InstructBLIP folder, the released SoMeLVLM layout, a Hub "
                        "id of any of them (owner/name[@revision]), or 'tiny' (built-in, random weights) "
                        "(default: tiny)")
    g.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="compute dtype (default: fp32 on CPU; on GPU fp16, the connection module fp32)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when usable, else cpu)")
    g.add_argument("--device-map", choices=("auto", "balanced", "balanced_low_0", "sequential"), default=None,
                   help="spread the model over all visible GPUs (and CPU memory) with accelerate, instead of "
                        "--device")


def add_decoding_options(p: argparse.ArgumentParser) -> None:
    """One flag per `GenerationOptions` field (but `num_return_sequences`); a flag not given leaves
    the model folder's `generation_config.json` (LAVIS's defaults) in force."""
    g = p.add_argument_group("decoding (default: the model folder's generation_config.json, i.e. LAVIS's)")
    defaults = GenerationOptions()
    for name, help in DECODING_HELP.items():
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        shown = "" if default is None else f" (default: {default})"
        if isinstance(default, bool):
            g.add_argument(flag, dest=name, action="store_true", default=argparse.SUPPRESS, help=help + shown)
        else:
            kind = float if isinstance(default, float) else int
            g.add_argument(flag, dest=name, type=kind, default=argparse.SUPPRESS, metavar=name.split("_")[-1].upper(),
                           help=help + shown)


def decoding_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding flags that were given, checked against LAVIS's defaults before any model loads."""
    given = {k: getattr(args, k) for k in DECODING_HELP if hasattr(args, k)}
    folder = Path(str(getattr(args, "model", None)))  # a local folder's stored defaults, checked too
    (GenerationOptions.load(folder) if folder.is_dir() else GenerationOptions()).replace(**given).validate()
    return given


def load_model(args: argparse.Namespace) -> SoMeLVLM:
    """The model `--model/--dtype/--device` name (the device is checked first)."""
    if getattr(args, "device_map", None) is not None:
        if args.device is not None:
            raise ValueError("give --device or --device-map, not both")
        return SoMeLVLM.load(args.model, dtype=args.dtype, device_map=args.device_map)
    return SoMeLVLM.load(args.model, dtype=args.dtype, device=resolve_device(args.device))


def require_file(path: str | Path | None, what: str) -> None:
    if path is not None and not Path(path).exists():
        raise FileNotFoundError(f"{what} not found: {path}")


def _config_arg(value: str | None) -> SoMeLVLMConfig | None:
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
        formatter_class=Formatter,
        description="Sources: the released LAVIS files (--lavis-checkpoint, --vit, --llm), a Hugging Face "
                    "InstructBLIP folder (--from-hf) or a somelvlm folder (--model). Targets (--to): somelvlm "
                    "(default), hf, lavis.")
    src = p.add_argument_group("source")
    src.add_argument("--lavis-checkpoint", action="append", metavar="FILE",
                     help="LAVIS checkpoint.pth (Q-Former, query tokens, ln_vision, llm_proj); repeat to layer "
                          "checkpoints (base first, e.g. InstructBLIP's, then SoMeLVLM's): later files win per key")
    src.add_argument("--vit", metavar="PATH_OR_URL",
                     help="LAVIS eva_vit_g.pth: a file or URL (default: LAVIS's URL, fetched once into the cache)")
    src.add_argument("--llm", metavar="DIR_OR_ID", help="Hugging Face LLaMA/Vicuna folder or Hub id (weights + "
                     "tokenizer.model; default: the folder of the last --lavis-checkpoint)")
    src.add_argument("--from-hub", metavar="ID", help="the released SoMeLVLM repo (checkpoint.pth beside the Vicuna "
                     "folder), e.g. Lishi0905/SoMeLVLM[@revision]; --lavis-checkpoint then adds a base under it")
    src.add_argument("--from-hf", metavar="DIR_OR_ID", help="a transformers InstructBLIP folder or Hub id")
    src.add_argument("--model", metavar="DIR_OR_ID", help="a somelvlm model folder or Hub id")
    p.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
    p.add_argument("--to", choices=("somelvlm", "hf", "lavis"), default="somelvlm", help="output format (default: somelvlm)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default=None,
                   help="stored dtype. LAVIS sources: auto (default) keeps LAVIS's exact values (LLM and ViT "
                        "linears fp16, the rest fp32), bf16/fp16 cast the big parts, keeping the connection "
                        "module fp32; other sources: fp32 unless given")
    p.add_argument("--qformer-tokenizer", type=Path, metavar="DIR", help="folder with bert-base-uncased vocab.txt "
                   "(default: the copy shipped with somelvlm)")
    p.add_argument("--config", help="architecture: a preset name or a somelvlm config.json (default: vicuna7b)")
    p.add_argument("--lavis-eps", action="store_true",
                   help="with --from-hf: use LAVIS's ln_vision eps 1e-5 instead of the HF vision eps")
    p.add_argument("--strict", action="store_true",
                   help="LAVIS sources: a ViT key the model lacks is an error (default: ignored, as LAVIS does)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_convert)


def _model_dtype(dtype: str | None) -> str | None:
    return None if dtype == "auto" else dtype


def run_convert(args: argparse.Namespace) -> int:
    from .convert import convert_lavis, verify_folder

    checkpoints = list(args.lavis_checkpoint or [])
    lavis = bool(checkpoints) or args.from_hub is not None or args.vit is not None or args.llm is not None
    sources = sum([lavis, args.from_hf is not None, args.model is not None])
    if sources != 1:
        raise ValueError("give exactly one source: --from-hub, --lavis-checkpoint/--vit/--llm, --from-hf, or --model")
    if args.out.exists() and not args.force:
        raise FileExistsError(f"{args.out} already exists; use --force to overwrite it")
    if lavis:
        llm = args.llm
        if args.from_hub is not None:
            folder, kind = resolve_model(args.from_hub)
            if kind != "lavis":
                raise ValueError(f"{args.from_hub} is a {kind} folder, not the released SoMeLVLM layout; use "
                                 f"--{'model' if kind == 'somelvlm' else 'from-hf'} {args.from_hub}")
            checkpoints.append(str(folder / LAVIS_CHECKPOINT))
            llm = llm or folder
        if not checkpoints:
            raise ValueError("the LAVIS source needs --lavis-checkpoint (or --from-hub)")
        llm = llm or Path(checkpoints[-1]).parent
        if args.to == "somelvlm":
            summary = convert_lavis(checkpoints, args.vit, llm, args.out, dtype=args.dtype or "auto",
                                    qformer_tokenizer=args.qformer_tokenizer, config=_config_arg(args.config),
                                    force=args.force, progress=not args.no_progress, strict=args.strict)
            print(summary)
            return 0
        model = SoMeLVLM.from_lavis(checkpoints, args.vit, llm, qformer_tokenizer=args.qformer_tokenizer,
                                    config=_config_arg(args.config), dtype=_model_dtype(args.dtype) or "fp32",
                                    strict=args.strict)
    elif args.from_hf is not None:
        model = SoMeLVLM.from_hf(args.from_hf, dtype=_model_dtype(args.dtype) or "fp32",
                                 ln_vision_eps=1e-5 if args.lavis_eps else None)
    else:
        model = SoMeLVLM.from_pretrained(args.model, dtype=_model_dtype(args.dtype) or "fp32")
    model.save_pretrained(args.out, format=args.to, force=args.force)
    if args.to == "somelvlm":
        params = verify_folder(args.out)
        print(f"wrote {args.out} ({params['total']:,} parameters)")
    else:
        print(f"wrote {args.out} ({args.to} format)")
    return 0


# ------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------
def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer prompts about images", formatter_class=Formatter,
                       description="One answer: --image IMG --prompt TEXT. A file of tasks: --input tasks.jsonl "
                                   "--output answers.jsonl (lines of {id, image, prompt} or SoMeData's "
                                   "{text_input, image}); resumable. Without arguments, the built-in tiny "
                                   "model answers a question about a bundled photo (a short random answer).")
    add_model_options(p)
    p.add_argument("--image", help="image file; without it the post is text only (without --image and "
                                   "--prompt, --model tiny runs a demo on a bundled photo)")
    p.add_argument("--prompt", help="the instruction / question (with the post's text)")
    p.add_argument("--stream", action="store_true",
                   help="print the answer as it is produced; decodes one sequence (greedy, or sampling "
                        "with --do-sample): --num-beams must be 1 or left out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    engines_cli.add_arguments(p)
    add_decoding_options(p)
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    if (args.input is None) != (args.output is None):
        raise ValueError("--input and --output go together")
    if args.input is not None and (args.image or args.prompt):
        raise ValueError("use either --input/--output or --image/--prompt")
    overrides = decoding_overrides(args)
    if args.input is not None:
        return engines_cli.run(args, overrides, lambda device: load_model(  # device: this process's
            args if device is None or args.device_map else argparse.Namespace(**{**vars(args), "device": str(device)})))
    demo = args.image is None and args.prompt is None and args.model in (None, "tiny")
    if args.image is None and args.prompt is None and not demo:
        raise ValueError("--prompt is required (with --image for a post with an image), or --input/--output")
    image = str(asset_path(SAMPLE_IMAGE)) if demo else args.image  # None: a text-only post
    require_file(image, "image")
    prompt = args.prompt if args.prompt is not None else DEMO_PROMPT
    if args.stream:
        overrides.setdefault("num_beams", 1)
        note = streaming_note(GenerationOptions().replace(**overrides))
        if note:
            raise ValueError(f"--stream: {note}: use --num-beams 1 or drop --stream")
    if demo:
        overrides.setdefault("max_new_tokens", DEMO_MAX_NEW_TOKENS)
        print(f"demo: photo {image}\ndemo: prompt {prompt!r}", file=sys.stderr)
    model = load_model(args)
    if args.stream:
        for piece in model.generate_stream(image, prompt, **overrides):
            print(piece, end="", flush=True)
        print()
    else:
        print(model.generate(image, [prompt], **overrides)[0])
    return 0


# ------------------------------------------------------------------------------------------------
# eval
# ------------------------------------------------------------------------------------------------
EVAL_DESCRIPTION = """Score existing predictions, or run a model over SoMeData task files:

    somelvlm eval --data FILE_OR_DIR --predictions PRED.jsonl --out report.json
    somelvlm eval --model DIR --data FILE_OR_DIR --images-root DIR --out report.json [--mode rank]
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate on SoMeData task files", description=EVAL_DESCRIPTION,
                       formatter_class=Formatter)
    p.add_argument("--data", required=True, help="a SoMeData JSON task file, or a folder of them")
    p.add_argument("--out", required=True, help="report JSON path (a Markdown twin .md is written next to it)")
    p.add_argument("--predictions",
                   help="JSONL predictions: scored as is when no --model is given; with --model, where answers "
                        "are appended (and resumed from) (default with a model: <out stem>.predictions.jsonl)")
    add_model_options(p)
    p.set_defaults(model=None)  # without --model and --predictions: the tiny model
    p.add_argument("--images-root", help="folder the samples' image names are relative to "
                                         "(default: the data file's folder)")
    p.add_argument("--mode", choices=["generate", "rank"], default="generate",
                   help="rank: answer classification prompts by ranking their options (default: generate)")
    p.add_argument("--batch-size", type=_positive_int, default=8,
                   help="distinct images per vision call and prompts decoded at once: a finished answer's place "
                        "goes to the next prompt (default: 8)")
    p.add_argument("--limit", type=_positive_int, help="evaluate only the first N samples of each file")
    p.add_argument("--num-workers", type=int, default=None,
                   help="processes that decode images ahead of the model (default: 2 on a GPU, else 0)")
    add_decoding_options(p)
    p.add_argument("--generate-kwargs", type=_json_object, default={},
                   help='more decoding options as JSON, e.g. \'{"top_p": 0.9}\' (names as in --help)')
    p.add_argument("--force", action="store_true",
                   help="resume predictions written with another model or other decoding options")
    p.add_argument("--judge", help="MODULE:FUNCTION, a judge(prompt, prediction, reference) -> float "
                                   "averaged over generation samples")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from .evaluate.runner import evaluate, score, write_report

    require_file(args.data, "data file")
    judge = _load_judge(args.judge)
    out = Path(args.out)
    if args.predictions and not args.model:
        require_file(args.predictions, "predictions file")
        report = score(args.data, args.predictions, limit=args.limit, judge=judge)
        write_report(report, out)
    else:
        require_file(args.images_root, "images folder")
        if args.num_workers is not None and args.num_workers < 0:
            raise ValueError("--num-workers must be >= 0")
        overrides = decoding_overrides(args) | _checked_kwargs(args.generate_kwargs)
        args.model = args.model or "tiny"
        report = evaluate(load_model(args), args.data, args.images_root, out.parent, mode=args.mode,
                          batch_size=args.batch_size, generate_kwargs=overrides, limit=args.limit,
                          predictions_path=args.predictions or out.with_name(f"{out.stem}.predictions.jsonl"),
                          report_path=out, judge=judge, progress=not args.no_progress, model_spec=args.model,
                          force=args.force, num_workers=args.num_workers)
    print(f"wrote {out} and {out.with_suffix('.md')}: {_summary(report)}", file=sys.stderr)
    return 0


def _checked_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`--generate-kwargs` entries, each a known decoding option of the right type."""
    GenerationOptions.from_dict(kwargs, "--generate-kwargs")
    return dict(kwargs)


def _load_judge(spec: str | None) -> Callable[[str, str, str], float] | None:
    if spec is None:
        return None
    module, sep, name = spec.partition(":")
    if not sep:
        raise ValueError(f"--judge must look like MODULE:FUNCTION, got {spec!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot load judge {spec!r}: {err}") from None


def _summary(report: dict) -> str:
    if "files" in report:
        return f"{len(report['files'])} files, {report['n']} samples, {report['failed']} failed"
    if report["task"] == "classification":
        return f"Acc {_pct(report['acc'])}, Acc* {_pct(report['acc_star'])} (n={report['n']})"
    return f"BLEU {_pct(report['bleu'])}, ROUGE-L {_pct(report['rouge_l'])} (n={report['n']})"


def _pct(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.2f}"


# ------------------------------------------------------------------------------------------------
# serve / demo (options and work in somelvlm.serve)
# ------------------------------------------------------------------------------------------------
def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with dynamic batching", formatter_class=Formatter,
                       description=serve_cli.SERVE_DESCRIPTION)
    add_model_options(p)
    serve_cli.add_serve_arguments(p)
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    serve_cli.check_serve_arguments(args)
    serve_cli.build_server(args, load_model(args)).run()
    return 0


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="Gradio demo page (optional image, SoMeData task templates, streaming)",
                       formatter_class=Formatter, description=serve_cli.DEMO_DESCRIPTION)
    add_model_options(p)
    serve_cli.add_demo_arguments(p)
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    serve_cli.check_demo_arguments(args)
    serve_cli.launch_demo(args, load_model(args))
    return 0


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="somelvlm", description="SoMeLVLM / InstructBLIP-Vicuna in plain PyTorch")
    parser.add_argument("--version", action="version", version=f"somelvlm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_convert(sub)
    add_generate(sub)
    add_eval(sub)
    train.add_parser(sub)
    add_serve(sub)
    add_demo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_command(args.func, args, f"somelvlm {args.command}")


if __name__ == "__main__":
    sys.exit(main())
