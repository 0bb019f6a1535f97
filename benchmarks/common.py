"""Shared pieces of the benchmarks: model presets, building same-weights folders, worker processes."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from somelvlm import SoMeLVLM, SoMeLVLMConfig, SoMeLVLMProcessor
from somelvlm.config import LLMConfig, QFormerConfig, VisionConfig

HERE = Path(__file__).resolve().parent


def preset(name: str) -> SoMeLVLMConfig:
    """`tiny`; `mid` (full Q-Former, ViT-g width with 8 blocks, a 1024-wide 8-layer LLaMA with the
    real 32001 vocab: runs on 2 CPU cores); `vicuna7b` (the released dims, for GPUs)."""
    if name in ("tiny", "vicuna7b"):
        return SoMeLVLMConfig.preset(name)
    if name == "mid":
        return SoMeLVLMConfig(vision=VisionConfig(depth=8), qformer=QFormerConfig(),
                              llm=LLMConfig(hidden=1024, layers=8, heads=8, kv_heads=8, intermediate=2816))
    if name.startswith("7b-layers"):  # vicuna7b dims with fewer LLM layers, e.g. 7b-layers4
        cfg = SoMeLVLMConfig.preset("vicuna7b")
        import dataclasses

        return cfg.replace(llm=dataclasses.replace(cfg.llm, layers=int(name.removeprefix("7b-layers"))))
    raise ValueError(f"unknown benchmark preset {name!r}")


def padded_tokenizer(folder: Path, pieces: int) -> Path:
    """The bundled tiny SentencePiece model grown to `pieces` pieces with unused entries, standing in
    for LLaMA's 32000-piece tokenizer (which cannot be redistributed) so that vocab sizes are real."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    from somelvlm.processing import BUNDLED_TINY_SPM, asset_path

    proto = pb.ModelProto()
    proto.ParseFromString(asset_path(BUNDLED_TINY_SPM).read_bytes())
    for i in range(pieces - len(proto.pieces)):
        p = proto.pieces.add()
        p.piece, p.score, p.type = f"<unused_{i}>", -1e9, pb.ModelProto.SentencePiece.UNUSED
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tokenizer.model"
    path.write_bytes(proto.SerializeToString())
    return path


def processor_for(cfg: SoMeLVLMConfig, folder: Path) -> SoMeLVLMProcessor:
    from somelvlm.processing import LlamaTokenizer, QFormerTokenizer

    if cfg.llm.vocab_size == 2001:
        return SoMeLVLMProcessor.tiny(cfg.vision.image_size)
    tok = LlamaTokenizer(padded_tokenizer(folder, cfg.llm.vocab_size - 1))
    return SoMeLVLMProcessor(tok, QFormerTokenizer(), image_size=cfg.vision.image_size)


def random_model(name: str, dtype: torch.dtype, device: str = "cpu", work: Path | None = None) -> SoMeLVLM:
    """Random weights for `name`, built straight on `device` in `dtype` (fast even at 7B)."""
    cfg = preset(name)
    torch.manual_seed(0)
    proc = processor_for(cfg, (work or Path(".")) / "tokenizer")
    with torch.device(device):
        model = SoMeLVLM(cfg, proc).eval()
    return model.to_dtype(dtype)


def proc_status(key: str) -> int:
    """A byte count from /proc/self/status (VmRSS: now, VmHWM: peak). Unlike ru_maxrss, VmHWM is not
    inherited from the parent process across fork/exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak_rss() -> None:
    """Make VmHWM start from the current RSS (Linux: writing 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return proc_status("VmHWM")


def timed(fn: Callable[[], Any], repeats: int, device: str) -> tuple[float, Any]:
    """Median wall time of `repeats` calls after one warm-up call."""
    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    result = fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def run_worker(script: Path, args: list[str], timeout: float = 3600) -> dict:
    """Run `script --worker ...` in a fresh process and parse its last stdout line as JSON."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def somedata_prompts(n: int) -> list[str]:
    """`n` real SoMeData prompts when shared/ is beside the checkout, else built-in look-alikes."""
    folder = Path(os.environ.get("SOMELVLM_SHARED", HERE.parents[1] / "shared")) / "somedata" / "in_domain"
    prompts: list[str] = []
    if folder.is_dir():
        for f in sorted(folder.glob("*_test.json")):
            prompts.append(json.loads(f.read_text())[0]["text_input"])
    fallback = [
        "This image is associated with the following caption: 'so happy today'. What sentiment does this "
        "combination convey? Available answers: [positive, neutral, negative].",
        "Does this meme show any hate speech? Choices: [true, false]",
        "Is the user likely to be male or female? Pick your answer from [male, female].",
        "What ideology does the politician belong to? Select your answer from [left, right].",
        "Is this news true or false? Choices: [true, false]",
        "Which hashtag best encapsulates the essence of this post? Choices: [#travel, #food, #art, #music]",
        "What field does the user belong to? Explain it in one sentence.",
        "What's the personality of this user according to the post? Explain it in one sentence.",
    ]
    prompts += fallback
    return prompts[:n]


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
