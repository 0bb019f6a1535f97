"""GPU check in one command: the released 7B dims with random bf16 weights, in one process.

Reports (a markdown table, and JSON with --out):
  decode        greedy decode tokens/s at batch 1 and 32 (eager, and compiled with CUDA graphs at
                batch 1) vs the HBM roofline: batch x bandwidth / LLM weight bytes
  vit           ViT-g (+ ln_vision) images/s at batch 64
  vs-hf         somelvlm vs transformers' InstructBLIP (same weights, exported with format="hf")
                time ratios: 1 prompt greedy, 8 prompts greedy, 8 prompts beam 5 (LAVIS decoding)
  agreement     bf16 vs fp32 (same bf16-rounded weights) greedy tokens on 32 prompts

    bash benchmarks/gpu_check.sh                  # GPU, vicuna7b, bf16 (about 5-8 min on one H200)
    bash benchmarks/gpu_check.sh --dry-run        # CPU, tiny preset: checks the script end to end

Random weights give near-flat next-token distributions, so bf16/fp32 agreement here is a lower
bound (near-ties flip easily); the other rows do not depend on the values.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import hf_generate  # noqa: E402
from common import markdown_table, random_model, somedata_prompts  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds(fn, device: str, repeats: int = 3) -> float:
    """Median wall time of `repeats` calls after a warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def prompts_for(n: int) -> list[str]:
    base = somedata_prompts(64)
    return [base[i % len(base)] for i in range(n)]


def decode_rows(model, pixels, device: str, tokens: int, bandwidth: float, compile_b1: bool) -> list[list]:
    """Per-step decode time = (time(tokens) - time(1 token)) / (tokens - 1), greedy, forced length."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.llm.parameters())
    rows = []
    cases = [(1, False), (32, False)] + ([(1, True)] if compile_b1 else [])
    for batch, compiled in cases:
        prompts = prompts_for(batch)

        def run(n, compiled=compiled):
            os.environ["SOMELVLM_COMPILE"] = "1" if compiled else "0"  # read by each new LlamaDecoder
            return model.generate(pixels, prompts, num_beams=1, repetition_penalty=1.0, max_new_tokens=n,
                                  min_new_tokens=n)

        step = (seconds(lambda: run(tokens), device) - seconds(lambda: run(1), device)) / (tokens - 1)
        roof = batch * bandwidth / weight_bytes
        os.environ.pop("SOMELVLM_COMPILE", None)
        rows.append([f"decode, batch {batch}{', compiled' if compiled else ''}", f"{batch / step:,.1f} tok/s",
                     f"roofline {roof:,.1f} tok/s", f"{batch / step / roof:.0%} of roofline"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny preset, few tokens: check the script")
    ap.add_argument("--preset", default=None, help="default: vicuna7b (dry run: tiny)")
    ap.add_argument("--device", default=None, help="default: cuda (dry run: cpu)")
    ap.add_argument("--bandwidth-gbs", type=float, default=4800.0, help="HBM bandwidth, GB/s (H200: 4800)")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per answer (default 32; dry run 4)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled decode row")
    ap.add_argument("--work", type=Path, default=None, help="folder for the transformers export (default: temp)")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = ap.parse_args()
    preset = args.preset or ("tiny" if args.dry_run else "vicuna7b")
    device = args.device or ("cpu" if args.dry_run else "cuda")
    tokens = args.tokens or (4 if args.dry_run else 32)
    t0 = time.perf_counter()
    rows: list[list] = []

    def report(row: list) -> None:
        rows.append(row)
        print(f"[{time.perf_counter() - t0:6.0f} s] " + " | ".join(map(str, row)), file=sys.stderr, flush=True)

    from somelvlm.processing import SAMPLE_IMAGE, asset_path

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        fp32 = random_model(preset, torch.float32, device, work)
        with torch.no_grad():  # bf16-representable values: fp32 and bf16 models hold the same weights
            for p in fp32.parameters():
                p.copy_(p.bfloat16().float())
        model = copy.deepcopy(fp32).to_dtype(torch.bfloat16)
        proc = model.processor
        pixels = proc.images([str(asset_path(SAMPLE_IMAGE))]).to(device)
        report(["setup", preset, device, f"LLM weights {sum(p.numel() * 2 for p in model.llm.parameters()) / 1e9:.2f} GB bf16"])

        for row in decode_rows(model, pixels, device, tokens, args.bandwidth_gbs * 1e9, not args.no_compile):
            report(row)

        images = torch.randn(64, 3, proc.image_size, proc.image_size, device=device)
        with torch.inference_mode():
            t = seconds(lambda: model.encode_image(images), device)
        report(["ViT-g + ln_vision, batch 64", f"{64 / t:,.1f} images/s", f"{t * 1000:.0f} ms per batch", ""])

        agree_prompts = prompts_for(32)
        gen = dict(num_beams=1, max_new_tokens=tokens, min_new_tokens=tokens)
        a = model.generate(pixels, agree_prompts, **gen)
        b = fp32.generate(pixels, agree_prompts, **gen)
        del fp32
        same = sum(x == y for x, y in zip(a, b))
        report(["bf16 vs fp32 greedy answers", f"{same}/32 identical", f"{tokens} tokens each",
                "random weights: near-flat logits, a lower bound"])

        from transformers import InstructBlipForConditionalGeneration

        model.save_pretrained(work / "hf", format="hf", force=True)
        hf = InstructBlipForConditionalGeneration.from_pretrained(work / "hf", dtype=torch.bfloat16).to(device).eval()
        for label, n, beams, penalty in [("1 prompt, greedy", 1, 1, 1.0), ("8 prompts, greedy", 8, 1, 1.0),
                                         ("8 prompts, beam 5", 8, 5, 1.5)]:
            prompts = prompts_for(n)
            kw = dict(num_beams=beams, repetition_penalty=penalty, max_new_tokens=tokens, min_new_tokens=tokens)
            ours = seconds(lambda: model.generate(pixels, prompts, **kw), device)
            theirs = seconds(lambda: hf_generate(hf, proc, pixels, prompts, **kw), device)
            report([f"vs transformers: {label}", f"{ours:.3f} s", f"{theirs:.3f} s", f"{ours / theirs:.2f}x time"])

    title = (f"gpu_check: preset {preset}, bf16, {device} "
             f"({torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'}), torch {torch.__version__}, "
             f"{tokens} new tokens, {time.perf_counter() - t0:.0f} s")
    print(title)
    print(markdown_table(["check", "value", "reference", "ratio"], rows))
    if args.out:
        args.out.write_text(json.dumps({"title": title, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
