"""`somelvlm serve` and `somelvlm demo`: parsing only; the work is in `app` and `demo`.

FastAPI/uvicorn and Gradio are optional extras, imported when their command runs."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

DEFAULT_MODEL_NAME = "somelvlm"


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="a somelvlm model folder, or 'tiny' (built-in, random weights)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default: as stored")
    p.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)


def _load_model(args: argparse.Namespace) -> Any:
    import torch

    from ..model import SoMeLVLM

    return SoMeLVLM.load(args.model, dtype=args.dtype,
                         device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _missing_extra(extra: str, e: ImportError) -> SystemExit:
    return SystemExit(f"error: `somelvlm {extra}` needs the [{extra}] extra: pip install 'somelvlm[{extra}]' ({e})")


# ------------------------------------------------------------------------------------------------
# serve
# ------------------------------------------------------------------------------------------------
def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with dynamic batching",
                       description="Serve POST /v1/chat/completions, GET /v1/models, GET /health and GET /metrics. "
                                   "Requests arriving within --batch-window-ms with equal decoding options share "
                                   "one generate call; images are encoded once (features cache).")
    _add_model_arguments(p)
    p.add_argument("--served-model-name", default=None,
                   help=f"the model id clients send and /v1/models lists (default: {DEFAULT_MODEL_NAME!r})")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $SOMELVLM_API_KEY)")
    p.add_argument("--images-root", type=Path, default=None, help="allow local image paths under this folder")
    p.add_argument("--allow-remote-images", action="store_true", help="allow http(s) image URLs")
    p.add_argument("--max-image-mb", type=_positive(float), default=20.0, help="image size cap in MiB (default 20)")
    p.add_argument("--max-image-pixels", type=_positive(int), default=40_000_000,
                   help="pixel cap checked before decoding (decompression bombs; default 40M)")
    p.add_argument("--image-timeout", type=_positive(float), default=10.0, help="seconds to fetch a remote image")
    p.add_argument("--max-batch", type=_positive(int), default=32, help="most requests in one batch (default 32)")
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="how long the first request of a batch waits for company (default 10 ms)")
    p.add_argument("--features-cache", type=_positive(int), default=256,
                   help="image features kept for repeated images (entries, default 256)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    build_server(args).run()
    return 0


def build_server(args: argparse.Namespace) -> Any:
    """The `uvicorn.Server` that `somelvlm serve ARGS` runs (its model loaded); `.run()` serves."""
    if args.batch_window_ms < 0:
        raise ValueError("--batch-window-ms must be >= 0")
    if args.images_root is not None and not args.images_root.is_dir():
        raise ValueError(f"--images-root {args.images_root} is not a folder")
    try:
        import uvicorn

        from .app import ServerConfig, create_app
    except ImportError as e:
        raise _missing_extra("serve", e) from None
    from ..options import GenerationOptions
    from .images import ImagePolicy

    model = _load_model(args)
    defaults = GenerationOptions() if args.model in (None, "tiny") else GenerationOptions.load(args.model)
    config = ServerConfig(
        model_name=args.served_model_name or DEFAULT_MODEL_NAME,
        api_key=args.api_key or os.environ.get("SOMELVLM_API_KEY") or None,
        images=ImagePolicy(images_root=args.images_root, allow_remote=args.allow_remote_images,
                           max_bytes=int(args.max_image_mb * 1024 * 1024), max_pixels=args.max_image_pixels,
                           timeout=args.image_timeout),
        defaults=defaults, max_batch=args.max_batch, batch_window_s=args.batch_window_ms / 1000,
        features_cache=args.features_cache)
    return uvicorn.Server(uvicorn.Config(create_app(model, config), host=args.host, port=args.port,
                                         log_level=args.log_level))


# ------------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------------
def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="Gradio demo page (optional image, SoMeData task templates, streaming)",
                       description="A browser demo: upload an image (optional), type a post or pick a SoMeData "
                                   "task template, watch the answer stream in.")
    _add_model_arguments(p)
    p.set_defaults(port=7860)
    p.add_argument("--share", action="store_true", help="ask Gradio for a public share link (needs internet)")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    try:
        from .demo import build_demo
    except ImportError as e:
        raise _missing_extra("demo", e) from None
    demo = build_demo(_load_model(args), random_weights=args.model in (None, "tiny"))
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True)
    return 0
