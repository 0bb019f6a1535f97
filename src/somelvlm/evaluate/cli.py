"""`somelvlm eval`: score existing predictions, or run a model over SoMeData task files.

    somelvlm eval --data FILE_OR_DIR --predictions PRED.jsonl --out report.json
    somelvlm eval --model DIR --data FILE_OR_DIR --images-root DIR --out report.json [--mode rank]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

# CLI flag -> `model.generate` keyword; only flags that are given are passed on.
GENERATE_OPTIONS: dict[str, tuple[str, type]] = {
    "--num-beams": ("num_beams", int),
    "--max-new-tokens": ("max_new_tokens", int),
    "--min-length": ("min_length", int),
    "--repetition-penalty": ("repetition_penalty", float),
    "--length-penalty": ("length_penalty", float),
}


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


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `eval` options to `parser`."""
    parser.add_argument("--data", required=True, help="a SoMeData JSON task file, or a folder of them")
    parser.add_argument("--out", required=True, help="report JSON path (a Markdown twin .md is written next to it)")
    parser.add_argument("--predictions",
                        help="JSONL predictions: scored as is when no --model is given; with --model, "
                             "where answers are appended (and resumed from). Default with a model: "
                             "<out stem>.predictions.jsonl")
    parser.add_argument("--model", help="model folder (SoMeLVLM.from_pretrained), or 'tiny' for random "
                                        "weights; the default without --predictions is 'tiny'")
    parser.add_argument("--images-root", help="folder the samples' image names are relative to "
                                              "(default: the data file's folder)")
    parser.add_argument("--mode", choices=["generate", "rank"], default="generate",
                        help="rank: answer classification prompts by ranking their options")
    parser.add_argument("--batch-size", type=_positive_int, default=8,
                        help="distinct images per encode call and prompts per generate call")
    parser.add_argument("--limit", type=_positive_int, help="evaluate only the first N samples of each file")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="model dtype (default: as stored)")
    parser.add_argument("--device", help="model device (default: cuda when available, else cpu)")
    for flag, (_, kind) in GENERATE_OPTIONS.items():
        parser.add_argument(flag, type=kind, help="passed to model.generate")
    parser.add_argument("--generate-kwargs", type=_json_object, default={},
                        help='extra model.generate keywords as JSON, e.g. \'{"top_p": 0.9}\'')
    parser.add_argument("--judge", help="MODULE:FUNCTION, a judge(prompt, prediction, reference) -> float "
                                        "averaged over generation samples")
    parser.add_argument("--force", action="store_true",
                        help="resume predictions written with another model or other decoding options")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the `eval` subcommand on an argparse subparsers object."""
    parser = subparsers.add_parser("eval", help="evaluate on SoMeData task files",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Execute `somelvlm eval`; returns the exit code (1 with a message on bad input)."""
    try:
        report = _score_only(args) if args.predictions and not args.model else _run_model(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"somelvlm eval: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}: {_summary(report)}", file=sys.stderr)
    return 0


def _score_only(args: argparse.Namespace) -> dict:
    from .runner import score, write_report

    report = score(args.data, args.predictions, limit=args.limit, judge=_load_judge(args.judge))
    write_report(report, args.out)
    return report


def _run_model(args: argparse.Namespace) -> dict:
    from .runner import evaluate

    out = Path(args.out)
    if not Path(args.data).exists():
        raise FileNotFoundError(f"data file not found: {args.data}")
    judge = _load_judge(args.judge)
    kwargs = {key: getattr(args, flag[2:].replace("-", "_")) for flag, (key, _) in GENERATE_OPTIONS.items()}
    kwargs = {k: v for k, v in kwargs.items() if v is not None} | args.generate_kwargs
    return evaluate(_load_model(args), args.data, args.images_root, out.parent, mode=args.mode,
                    batch_size=args.batch_size, generate_kwargs=kwargs, limit=args.limit,
                    predictions_path=args.predictions or out.with_name(f"{out.stem}.predictions.jsonl"),
                    report_path=out, judge=judge, progress=not args.no_progress, model_spec=args.model,
                    force=args.force)


def _load_model(args: argparse.Namespace) -> Any:
    from somelvlm.cli import load_model_from_args

    return load_model_from_args(args)


def _load_judge(spec: str | None) -> Any:
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


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: the `eval` options without the subcommand name."""
    parser = configure(argparse.ArgumentParser(prog="somelvlm eval", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
