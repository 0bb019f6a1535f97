from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# Tiny models gain nothing from intra-op threads, and OpenMP spin-waiting makes them 50x slower
# when the machine is busy; one thread keeps the suite fast and steady on 2-core CI machines.
torch.set_num_threads(int(os.environ.get("SOMELVLM_TEST_THREADS", "1")))

SHARED = Path(os.environ.get("SOMELVLM_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared (test assets); the caller skips when it is absent."""
    return SHARED.joinpath(*parts)


def require_shared(*parts: str) -> Path:
    p = shared_path(*parts)
    if not p.exists():
        pytest.skip(f"test asset {p} is absent (set SOMELVLM_SHARED to the shared/ folder)")
    return p


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def hf_ref():
    """A tiny random HF InstructBLIP whose values are representable in the released formats."""
    from reference import hf_tiny_instructblip, round_like_released, set_pad_rows

    model = hf_tiny_instructblip(seed=0)
    set_pad_rows(model)  # the [PAD] rows are stored like the rest of the LLM: fp16
    round_like_released(model)
    return model


@pytest.fixture(scope="session")
def lavis_files(hf_ref, tmp_path_factory):
    from reference import write_lavis_files

    return write_lavis_files(hf_ref, tmp_path_factory.mktemp("lavis"))


@pytest.fixture(scope="session")
def tiny_cfg():
    from reference import tiny_config

    return tiny_config(ln_vision_eps=1e-6)  # HF's post_layernorm uses the vision eps


@pytest.fixture(scope="session")
def loaded(lavis_files, tiny_cfg):
    from somelvlm import SoMeLVLM

    return SoMeLVLM.from_lavis(config=tiny_cfg, **lavis_files)


def write_images(root: Path, names: tuple[str, ...], shape: tuple[int, int], seed: int,
                 broken: tuple[str, bytes]) -> Path:
    """Random RGB images `names` of `shape` (H, W) in a new folder `root`, plus one broken file."""
    import numpy as np
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(root / name)
    (root / broken[0]).write_bytes(broken[1])
    return root
