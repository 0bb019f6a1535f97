"""Options and start-up of `somelvlm serve` and `somelvlm demo` (registered by `somelvlm.cli`, which
adds the model options and loads the model). FastAPI/uvicorn and Gradio are optional extras,
imported when their command runs."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..options import GenerationOptions
from .images import ImagePolicy

DEFAULT_MODEL_NAME = "somelvlm"
SERVE_DESCRIPTION = (
    "Serve POST /v1/chat/completions (OpenAI's API), GET /v1/models, GET /health and GET /metrics on "
    "--host:--port.\nRequests arriving within --batch-window-ms with equal decoding options share one "
    "generate call;\nimages are encoded once (features cache). Options a request leaves out keep the model "
    "folder's\ngeneration_config.json (LAVIS's defaults).")
DEMO_DESCRIPTION = ("A browser demo: an image (optional), a post or a SoMeData task template, the answer "
                    "streaming in,\nand the parsed label for classification tasks.")


def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _add_address(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=port, help=f"port (default: {port})")


def _missing_extra(command: str, e: ImportError) -> SystemExit:
    return SystemExit(f"somelvlm {command}: error: this command needs the [{command}] extra: "
                      f"pip install 'somelvlm[{command}]' ({e})")


# ------------------------------------------------------------------------------------------------
# serve
# ------------------------------------------------------------------------------------------------
def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    _add_address(p, 8000)
    g = p.add_argument_group("server")
    g.add_argument("--served-model-name", default=DEFAULT_MODEL_NAME,
                   help="the model id clients send and /v1/models lists (default: somelvlm)")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $SOMELVLM_API_KEY)")
    g.add_argument("--images-root", type=Path, default=None, help="allow local image paths under this folder")
    g.add_argument("--allow-remote-images", action="store_true", help="allow http(s) image URLs")
    g.add_argument("--max-image-mb", type=_positive(float), default=20.0, help="image size cap in MiB (default: 20)")
    g.add_argument("--max-image-pixels", type=_positive(int), default=40_000_000,
                   help="pixel cap, checked before decoding (decompression bombs) (default: 40000000)")
    g.add_argument("--image-timeout", type=_positive(float), default=10.0,
                   help="seconds to fetch a remote image (default: 10)")
    g.add_argument("--max-batch", type=_positive(int), default=32, help="most requests in one batch (default: 32)")
    g.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="how long the first request of a batch waits for company (default: 10)")
    g.add_argument("--features-cache", type=_positive(int), default=256,
                   help="image features kept for repeated images, in entries (default: 256)")
    g.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="server log level (default: info)")


def check_serve_arguments(args: argparse.Namespace) -> None:
    """What can be checked before the model loads (ValueError: one line)."""
    if args.batch_window_ms < 0:
        raise ValueError(f"--batch-window-ms must be >= 0, got {args.batch_window_ms}")
    if args.images_root is not None and not args.images_root.is_dir():
        raise ValueError(f"--images-root {args.images_root} is not a folder")
    folder = Path(str(args.model))
    if folder.is_dir():
        GenerationOptions.load(folder).validate()


def build_server(args: argparse.Namespace, model: Any) -> Any:
    """The `uvicorn.Server` of `somelvlm serve ARGS` around a loaded `model`; `.run()` serves."""
    try:
        import uvicorn

        from .app import ServerConfig, create_app
    except ImportError as e:
        raise _missing_extra("serve", e) from None
    folder = Path(str(args.model))
    config = ServerConfig(
        model_name=args.served_model_name,
        api_key=args.api_key or os.environ.get("SOMELVLM_API_KEY") or None,
        images=ImagePolicy(images_root=args.images_root, allow_remote=args.allow_remote_images,
                           max_bytes=int(args.max_image_mb * 1024 * 1024), max_pixels=args.max_image_pixels,
                           timeout=args.image_timeout),
        defaults=GenerationOptions.load(folder) if folder.is_dir() else GenerationOptions(),
        max_batch=args.max_batch, batch_window_s=args.batch_window_ms / 1000, features_cache=args.features_cache)
    return uvicorn.Server(uvicorn.Config(create_app(model, config), host=args.host, port=args.port,
                                         log_level=args.log_level))


# ------------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------------
def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    _add_address(p, 7860)
    p.add_argument("--share", action="store_true", help="ask Gradio for a public share link (needs internet)")


def check_demo_arguments(args: argparse.Namespace) -> None:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")


def launch_demo(args: argparse.Namespace, model: Any) -> None:
    """Serve the Gradio page until interrupted."""
    try:
        from .demo import build_demo
    except ImportError as e:
        raise _missing_extra("demo", e) from None
    demo = build_demo(model, random_weights=args.model in (None, "tiny"))
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True)
