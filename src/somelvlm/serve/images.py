"""Images of a request: where they may come from, how big they may be, and decoding them safely.

`data:` URLs are always accepted; local files only under `images_root`; `http(s)` URLs only with
`allow_remote`, read with a timeout and a byte cap. Every image is checked against a byte cap and
a pixel cap (checked from the header, before decoding: a decompression bomb is never expanded)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..processing import load_image
from .errors import RequestError

PARAM = "messages"


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from and how large they may be."""

    images_root: Path | None = None
    allow_remote: bool = False
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000  # ~6300 x 6300; PIL's own bomb limit is 89M
    timeout: float = 10.0


@dataclass(frozen=True)
class RequestImage:
    """A decoded RGB image and the SHA-256 of its bytes (the features-cache key)."""

    key: str
    image: Image.Image


def load_request_image(url: str, policy: ImagePolicy) -> RequestImage:
    """Bytes of an `image_url` (data, file path or http(s)) decoded under `policy`; RequestError if not allowed."""
    data = read_image_bytes(url, policy)
    return RequestImage(hashlib.sha256(data).hexdigest(), decode_image(data, policy))


def read_image_bytes(url: str, policy: ImagePolicy) -> bytes:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "data":
        data = _data_url(url)
    elif scheme in ("http", "https"):
        data = _remote(url, policy)
    elif scheme in ("", "file"):
        data = _local(url, policy)
    else:
        raise RequestError(f"image_url scheme {scheme!r} is not supported (use data:, http(s) or a file path)",
                           param=PARAM, code="invalid_image_url")
    if len(data) > policy.max_bytes:
        raise _too_large(len(data), policy)
    return data


def _too_large(size: int | str, policy: ImagePolicy) -> RequestError:
    return RequestError(f"image is too large: {size} bytes (the limit is {policy.max_bytes})",
                        status=413, param=PARAM, code="image_too_large")


def _data_url(url: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.lower().endswith(";base64"):
        raise RequestError("data URL must look like data:image/png;base64,<data>", param=PARAM,
                           code="invalid_image_url")
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"image data URL is not valid base64 ({e})", param=PARAM, code="invalid_base64") from None


def _local(url: str, policy: ImagePolicy) -> bytes:
    if policy.images_root is None:
        raise RequestError("local image paths are disabled (start the server with --images-root DIR)",
                           status=403, param=PARAM, code="local_images_disabled")
    path_text = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if url.lower().startswith("file:") else url
    root = policy.images_root.resolve()
    path = (root / path_text).resolve()
    if not path.is_relative_to(root):
        raise RequestError(f"image path {path_text!r} is outside --images-root", status=403, param=PARAM,
                           code="image_path_forbidden")
    if not path.is_file():
        raise RequestError(f"image not found under --images-root: {path_text}", status=404, param=PARAM,
                           code="image_not_found")
    if path.stat().st_size > policy.max_bytes:
        raise _too_large(path.stat().st_size, policy)
    return path.read_bytes()


def _remote(url: str, policy: ImagePolicy) -> bytes:
    if not policy.allow_remote:
        raise RequestError("remote images are disabled (start the server with --allow-remote-images)",
                           status=403, param=PARAM, code="remote_images_disabled")
    try:
        with urllib.request.urlopen(url, timeout=policy.timeout) as response:
            size = response.headers.get("Content-Length")
            if size is not None and size.isdigit() and int(size) > policy.max_bytes:
                raise _too_large(size, policy)
            data = response.read(policy.max_bytes + 1)
    except RequestError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise RequestError(f"cannot fetch image {url}: {reason}", param=PARAM, code="image_fetch_failed") from None
    if len(data) > policy.max_bytes:
        raise _too_large(f"more than {policy.max_bytes}", policy)
    return data


def decode_image(data: bytes, policy: ImagePolicy) -> Image.Image:
    """Decode to RGB; the pixel cap is checked from the header before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > policy.max_pixels:
                raise RequestError(f"image has {w}x{h} pixels, over the limit of {policy.max_pixels} "
                                   "(decompression bomb?)", status=413, param=PARAM, code="image_too_many_pixels")
            img.load()
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RequestError(f"image rejected as a decompression bomb: {e}", status=413, param=PARAM,
                           code="image_too_many_pixels") from None
    except Exception as e:  # PIL raises many types for corrupt data
        raise RequestError(f"cannot decode image: {e}", param=PARAM, code="invalid_image") from None
    return load_image(img)
