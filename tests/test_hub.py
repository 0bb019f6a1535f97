"""Hub ids and URLs (issue 10, section 1), against a local stand-in: a Hugging Face cache laid out
exactly as `huggingface_hub` writes it (blobs + snapshot symlinks + refs), with HF_HUB_OFFLINE=1, and
a `file://` URL for the ViT. Everything runs in subprocesses, since huggingface_hub reads its
environment at import time."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from somelvlm.processing import SAMPLE_IMAGE, asset_path

COMMIT_MAIN, COMMIT_V1 = "a" * 40, "b" * 40


def add_snapshot(cache: Path, repo_id: str, files: dict[str, Path], commit: str, ref: str) -> None:
    """One commit of `repo_id` in a huggingface_hub cache: content-addressed blobs, relative symlinks."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for rel, src in files.items():
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)


def tree(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def hub(lavis_files, loaded, tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    folder = root / "somelvlm"
    loaded.save_pretrained(folder)
    orig = loaded.query_tokens.detach().clone()
    with torch.no_grad():
        loaded.query_tokens.add_(1)
    try:
        loaded.save_pretrained(root / "somelvlm-v1")
    finally:
        with torch.no_grad():
            loaded.query_tokens.copy_(orig)
    add_snapshot(cache, "someone/tiny-somelvlm", tree(folder), COMMIT_MAIN, "main")
    add_snapshot(cache, "someone/tiny-somelvlm", tree(root / "somelvlm-v1"), COMMIT_V1, "v1")
    # the released layout: checkpoint.pth beside the Vicuna folder's files
    released = {"checkpoint.pth": lavis_files["checkpoint"], **tree(lavis_files["llm"])}
    add_snapshot(cache, "Lishi0905/SoMeLVLM", released, COMMIT_MAIN, "main")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "SOMELVLM_CACHE": str(root / "ours")}
    env.pop("HF_HOME", None)
    return dict(env=env, root=root, vit=lavis_files["vit"], loaded=loaded)


def run(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=300)


def test_from_pretrained_by_id_and_revision(hub):
    code = textwrap.dedent("""
        import torch
        from somelvlm import SoMeLVLM
        from somelvlm.config import SoMeLVLMConfig
        main = SoMeLVLM.from_pretrained("someone/tiny-somelvlm")
        v1 = SoMeLVLM.from_pretrained("someone/tiny-somelvlm@v1")
        assert torch.equal(v1.query_tokens, main.query_tokens + 1)
        torch.save(main.state_dict(), "main.pt")
        cfg = SoMeLVLMConfig.from_dict({"vision": {"image_size": 56, "patch_size": 14, "width": 48, "depth": 2,
            "heads": 4, "mlp_dim": 128}, "qformer": {"hidden": 64, "layers": 4, "heads": 4, "ffn": 128,
            "num_queries": 8}, "ln_vision_eps": 1e-6})
        released = SoMeLVLM.from_pretrained("Lishi0905/SoMeLVLM", vit=VIT_URL, config=cfg)
        torch.save(released.state_dict(), "released.pt")
        via_lavis = SoMeLVLM.from_lavis(checkpoint=released_ckpt(), vit=VIT_URL, llm="Lishi0905/SoMeLVLM", config=cfg)
        assert all(torch.equal(a, b) for a, b in zip(via_lavis.state_dict().values(), released.state_dict().values()))
        print("ok")
    """)
    prelude = textwrap.dedent(f"""
        VIT_URL = {hub['vit'].as_uri()!r}
        def released_ckpt():
            from huggingface_hub import snapshot_download
            return snapshot_download("Lishi0905/SoMeLVLM") + "/checkpoint.pth"
    """)
    r = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=hub["env"],
                       cwd=hub["root"], timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
    want = hub["loaded"].state_dict()
    for name in ("main.pt", "released.pt"):
        got = torch.load(hub["root"] / name, weights_only=True)
        for k, v in want.items():
            assert torch.equal(got[k], v), (name, k)
    fetched = list((hub["root"] / "ours").rglob("eva_vit_g.pth"))  # fetched once, into our cache
    assert len(fetched) == 1 and fetched[0].read_bytes() == hub["vit"].read_bytes()
    assert not list((hub["root"] / "ours").rglob("*.part"))


def test_cli_generate_and_convert_from_hub(hub, tmp_path):
    env = hub["env"]
    r = run(env, sys.executable, "-m", "somelvlm", "generate", "--model", "someone/tiny-somelvlm@v1", "--image",
            str(asset_path(SAMPLE_IMAGE)), "--prompt", "hi", "--max-new-tokens", "2", "--num-beams", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "converted"
    r = run(env, sys.executable, "-m", "somelvlm", "convert", "--from-hub", "Lishi0905/SoMeLVLM", "--vit",
            hub["vit"].as_uri(), "--out", str(out), "--config", "tiny", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    from somelvlm import SoMeLVLM

    m = SoMeLVLM.from_pretrained(out)
    ref = hub["loaded"].state_dict()
    for k, v in m.state_dict().items():  # the default conversion is lossless
        assert torch.equal(v, ref[k]), k


@pytest.mark.parametrize("args,needles", [
    (["generate", "--model", "nobody/missing", "--prompt", "hi", "--image", "IMG"],
     ["'nobody/missing'", "not in the local Hugging Face cache", "HF_HUB_OFFLINE=1", "config.json"]),
    (["generate", "--model", "someone/tiny-somelvlm@v9", "--prompt", "hi", "--image", "IMG"],
     ["'someone/tiny-somelvlm'", "revision 'v9'"]),
    (["convert", "--from-hub", "Lishi0905/SoMeLVLM", "--vit", "file:///nonexistent/eva_vit_g.pth", "--out", "OUT",
      "--config", "tiny"], ["cannot fetch file:///nonexistent/eva_vit_g.pth"]),
])
def test_missing_repo_revision_or_url_is_one_clear_line(hub, tmp_path, args, needles):
    args = [str(asset_path(SAMPLE_IMAGE)) if a == "IMG" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    r = run(hub["env"], sys.executable, "-m", "somelvlm", *args)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    line = [x for x in r.stderr.splitlines() if x.startswith("somelvlm") and ": error: " in x]
    assert len(line) == 1, r.stderr
    for n in needles:
        assert n in line[0], (n, line[0])
    assert not (tmp_path / "out").exists()
