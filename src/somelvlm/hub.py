"""Where model files come from: local paths, Hugging Face Hub ids, URLs.

Nothing here downloads unless the user named a Hub id (`owner/name`, optionally `@revision`) or a
URL. Hub ids are resolved with `huggingface_hub.snapshot_download` (the user's cache, `HF_HUB_OFFLINE`,
tokens from the usual places), fetching only the files the recognised layout needs. URLs (LAVIS's
`eva_vit_g.pth`) are fetched into the somelvlm cache with a progress bar and an atomic rename.

Layouts (`detect_format`):
- "somelvlm": our model folder (config.json with model_type "somelvlm");
- "hf": a transformers InstructBLIP folder (model_type "instructblip");
- "lavis": the released SoMeLVLM repo (`Lishi0905/SoMeLVLM`): `checkpoint.pth` beside a LLaMA
  folder (config.json with model_type "llama", shards, tokenizer.model).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from .config import read_json

log = logging.getLogger("somelvlm")

LAVIS_VIT_URL = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/eva_vit_g.pth"
RELEASED_REPO = "Lishi0905/SoMeLVLM"
LAVIS_CHECKPOINT = "checkpoint.pth"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
SMALL_FILES = ["*.json", "*.model", "qformer_tokenizer/*"]
WEIGHTS = {"somelvlm": ["*.safetensors"], "hf": ["*.safetensors"], "lavis": [LAVIS_CHECKPOINT]}


def is_hub_id(spec: str | Path) -> bool:
    """`owner/name[@revision]` that is not an existing local path."""
    return isinstance(spec, str) and not os.path.exists(spec) and bool(_HUB_ID.match(spec))


def split_revision(spec: str) -> tuple[str, str | None]:
    repo, _, revision = spec.partition("@")
    return repo, revision or None


FORMATS = {"somelvlm": "somelvlm", "instructblip": "hf", "llama": "lavis"}  # config.json model_type -> format


def detect_format(folder: Path, have_checkpoint: bool | None = None) -> str | None:
    """"somelvlm", "hf", "lavis" (see module doc) or None. A LLaMA folder is "lavis" only with its
    checkpoint.pth (`have_checkpoint=None`: look for it; a Hub snapshot of the small files passes True)."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    data = read_json(path, "model config")
    kind = FORMATS.get(data.get("model_type")) if isinstance(data, dict) else None
    if kind == "lavis" and not (have_checkpoint or (folder / LAVIS_CHECKPOINT).is_file()):
        return None
    return kind


def snapshot(spec: str, allow_patterns: list[str] | None, what: str) -> Path:
    """Download (or find in the cache) the files of Hub repo `spec` matching `allow_patterns`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo, revision = split_revision(spec)
    at = f" at revision {revision!r}" if revision else ""
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=allow_patterns))
    except RevisionNotFoundError:
        raise FileNotFoundError(f"Hub repo {repo!r} has no revision {revision!r}") from None
    except GatedRepoError:
        raise FileNotFoundError(f"Hub repo {repo!r} is gated: accept its terms on the Hub and log in "
                                "(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"Hub repo {repo!r} not found (or private: log in with `hf auth login` or "
                                f"set HF_TOKEN); looked for {what}") from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(f"Hub repo {repo!r}{at} is not in the local Hugging Face cache and the Hub "
                                f"cannot be reached (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}); "
                                f"looked for {what}") from None
    except (HfHubHTTPError, OSError) as e:
        raise FileNotFoundError(f"Hub repo {repo!r}{at}: cannot download {what}: {e}") from None


def resolve_model(spec: str | Path) -> tuple[Path, str]:
    """A local folder or Hub id -> `(folder, format)`; a Hub repo gets only what its format needs."""
    if not is_hub_id(spec):
        folder = Path(spec)
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder not found: {spec} (a somelvlm folder, an HF InstructBLIP "
                                    "folder, a Hub id 'owner/name[@revision]', or 'tiny')")
        kind = detect_format(folder)
        if kind is None:
            raise ValueError(f"{folder}: not a model folder somelvlm knows (no config.json with model_type "
                             "'somelvlm' or 'instructblip', and no checkpoint.pth beside a LLaMA config.json)")
        return folder, kind
    folder = snapshot(str(spec), SMALL_FILES, "config.json")
    kind = detect_format(folder, have_checkpoint=True)
    if kind is None:
        raise ValueError(f"Hub repo {spec!r}: no config.json with model_type somelvlm, instructblip or llama "
                         "(the released SoMeLVLM layout)")
    patterns = list(WEIGHTS[kind])
    if kind == "lavis":  # the LLM's shards, in the format its index names
        patterns.append("*.bin" if (folder / "pytorch_model.bin.index.json").is_file()
                        and not (folder / "model.safetensors.index.json").is_file() else "*.safetensors")
    folder = snapshot(str(spec), SMALL_FILES + patterns, " and ".join(patterns))
    if kind == "lavis" and not any(folder.glob(patterns[-1])):
        folder = snapshot(str(spec), SMALL_FILES + [LAVIS_CHECKPOINT, "*.bin"], "the LLM's weights")
    return folder, kind


def resolve_folder(spec: str | Path, what: str) -> Path:
    """A local folder, or the full snapshot of Hub repo `spec`."""
    if is_hub_id(spec):
        return snapshot(str(spec), None, what)
    if not Path(spec).is_dir():
        raise FileNotFoundError(f"{what} not found: {spec} (a local folder or a Hub id 'owner/name[@revision]')")
    return Path(spec)


def resolve_file(spec: str | Path, what: str) -> Path:
    """A local file, or a `file://` / `http(s)://` URL (fetched into the cache once)."""
    text = str(spec)
    if re.match(r"^(https?|file)://", text):
        return fetch_url(text)
    if Path(text).is_file():
        return Path(text)
    raise FileNotFoundError(f"{what} not found: {spec} (a local file or a URL)")


def resolve_vit(vit: str | Path | None) -> Path:
    """The ViT file `eva_vit_g.pth`: a path or URL; None means LAVIS's URL, fetched once into the cache."""
    if vit is None:
        log.info("no ViT file given: using LAVIS's eva_vit_g.pth from %s (cached in %s)", LAVIS_VIT_URL, cache_dir())
    return resolve_file(vit or LAVIS_VIT_URL, "ViT weights")


# ------------------------------------------------------------------------------------------------
# URLs
# ------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """`$SOMELVLM_CACHE`, else `$XDG_CACHE_HOME/somelvlm`, else `~/.cache/somelvlm`."""
    if os.environ.get("SOMELVLM_CACHE"):
        return Path(os.environ["SOMELVLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "somelvlm"


def fetch_url(url: str, progress: bool = True) -> Path:
    """Download `url` into `cache_dir()/<url hash>/` once (a progress bar; a `.part` file renamed at the end, so an
    interrupted download leaves no half file under the final name); later calls reuse it."""
    from tqdm.auto import tqdm

    name = Path(urllib.parse.urlparse(url).path).name or "download"
    target = cache_dir() / hashlib.sha256(url.encode()).hexdigest()[:16] / name  # one folder per URL
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s into %s", url, target)
    fd, part = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url) as resp:
            size = resp.headers.get("Content-Length")
            with tqdm(total=int(size) if size else None, unit="B", unit_scale=True, desc=name,
                      disable=not progress) as bar:
                while block := resp.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(part, 0o666 & ~umask)  # mkstemp makes 0600 files
        os.replace(part, target)
    except BaseException as e:
        Path(part).unlink(missing_ok=True)
        if isinstance(e, (OSError, ValueError)):
            raise FileNotFoundError(f"cannot fetch {url}: {e}") from None
        raise
    return target

