"""Training-step benchmark: somelvlm vs transformers' InstructBLIP with the same weights and step.

    python benchmarks/bench_train.py                                # tiny and mid on the CPU
    python benchmarks/bench_train.py --presets vicuna7b --device cuda

One step = forward + backward + AdamW update of LAVIS's trainable set (query tokens, ln_vision,
Q-Former, projection; ViT and LLM frozen and in eval mode), labels masked the LAVIS way (queries,
instruction and padding -100). Both sides get the same weights (ours exported with
`save_pretrained(format="hf")`, loaded with `InstructBlipForConditionalGeneration.from_pretrained`)
and the same synthetic batch (HF's post_layernorm gets LAVIS's ln_vision eps); their losses before
training (eval mode, no dropout) are printed to show that both compute the same thing. The logits
agree exactly; the losses differ by about log(1 + 1/vocab) because transformers' LLM has one more
class, the `<image>` placeholder token (a zero row: logit 0), inside its softmax.
On CUDA the frozen parts are bf16, the trainable ones fp32, under bf16 autocast (as the trainer).

Each measurement runs in its own process, so peak memory is per implementation: the peak
resident set (VmHWM, reset before the timed steps) on CPU, `max_memory_allocated` on CUDA.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from somelvlm import SoMeLVLM, SoMeLVLMConfig
from somelvlm.config import LLMConfig, QFormerConfig, VisionConfig

PRESETS = {
    "tiny": SoMeLVLMConfig.preset("tiny"),
    # full Q-Former and ViT width, 4 ViT blocks, a 1024-wide 4-layer LLaMA with Vicuna's vocabulary
    "mid": SoMeLVLMConfig(vision=VisionConfig(depth=4), qformer=QFormerConfig(),
                          llm=LLMConfig(hidden=1024, layers=4, heads=16, kv_heads=16, intermediate=2816)),
    "vicuna7b": SoMeLVLMConfig.preset("vicuna7b"),
}
BATCH = {"tiny": 8, "mid": 2, "vicuna7b": 8}
STEPS = {"tiny": 10, "mid": 2, "vicuna7b": 5}  # timed steps per round (keeps a CPU run of mid under a minute)
PROMPT_LEN, ANSWER_LEN, QFORMER_LEN = 48, 24, 32


# ------------------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------------------
def make_batch(cfg: SoMeLVLMConfig, batch_size: int) -> dict[str, torch.Tensor]:
    """Seeded synthetic batch in our layout: varying lengths, right padding, LAVIS labels."""
    g = torch.Generator().manual_seed(0)
    S, pad = cfg.vision.image_size, cfg.llm.pad_id
    L = PROMPT_LEN + ANSWER_LEN
    ids = torch.full((batch_size, L), pad)
    mask = torch.zeros(batch_size, L, dtype=torch.long)
    labels = torch.full((batch_size, L), -100)
    for b in range(batch_size):
        p = PROMPT_LEN - int(torch.randint(0, PROMPT_LEN // 2, (1,), generator=g))
        a = ANSWER_LEN - int(torch.randint(0, ANSWER_LEN // 2, (1,), generator=g))
        row = torch.randint(3, pad, (p + a,), generator=g)
        row[0], row[-1] = 2, 2  # leading </s> (LAVIS bos) and the answer's </s>
        ids[b, : p + a], mask[b, : p + a] = row, 1
        labels[b, p: p + a] = row[p:]
    q_ids = torch.randint(1000, 30000, (batch_size, QFORMER_LEN), generator=g)
    q_ids[:, 0], q_ids[:, -1] = 101, 102
    return {"pixel_values": torch.randn(batch_size, 3, S, S, generator=g), "input_ids": ids, "attention_mask": mask,
            "labels": labels, "qformer_input_ids": q_ids, "qformer_attention_mask": torch.ones_like(q_ids)}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed_steps(step, device: torch.device, args: argparse.Namespace) -> dict:
    """Seconds per step (best of `repeats` rounds of `steps`) and peak bytes during the timed steps."""
    for _ in range(args.warmup):
        step()
    reset_peak(device)
    best = math.inf
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - t0) / args.steps)
    return {"s_per_step": best, "peak": peak_bytes(device)}


@torch.no_grad()
def eval_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], amp) -> float:
    """The loss without dropout, before training: both implementations must agree on it."""
    model.eval()
    with amp:
        return model(**batch).loss.item()


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    """The trainer's optimizer: LAVIS's groups (no decay on 1-D parameters and biases)."""
    from somelvlm.train.trainer import param_groups

    return torch.optim.AdamW(param_groups(model, 0.05), lr=1e-5, betas=(0.9, 0.999), fused=True)


# ------------------------------------------------------------------------------------------------
# The two implementations (each in its own process)
# ------------------------------------------------------------------------------------------------
def build_ours(preset: str, device: torch.device) -> SoMeLVLM:
    with device:
        model = SoMeLVLM.from_config(PRESETS[preset], seed=0)
    return model.to_dtype(torch.bfloat16) if device.type == "cuda" else model


def run_ours(preset: str, device: torch.device, args: argparse.Namespace) -> dict:
    from somelvlm.train.trainer import freeze_unused

    model = build_ours(preset, device)
    model.apply_freeze_policy()
    freeze_unused(model)
    opt = adamw(model)
    batch = {k: v.to(device) for k, v in make_batch(model.config, args.batch_size).items()}
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    loss = eval_loss(model, batch, amp)
    model.train()  # frozen ViT and LLM stay in eval mode

    def step() -> float:
        with amp:
            loss = model(**batch, return_logits=False).loss  # as the trainer: LM head on labelled rows only
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return {"loss": loss, **timed_steps(step, device, args)}


def run_hf(preset: str, device: torch.device, args: argparse.Namespace) -> dict:
    from transformers import InstructBlipForConditionalGeneration

    cfg = PRESETS[preset]
    model = InstructBlipForConditionalGeneration.from_pretrained(args.hf_dir, dtype=torch.float32)
    model.vision_model.post_layernorm.eps = cfg.ln_vision_eps  # LAVIS's ln_vision eps (HF stores the ViT's)
    last = cfg.qformer.layers - 1
    dead = (f"qformer.encoder.layer.{last}.intermediate.", f"qformer.encoder.layer.{last}.output.")
    for n, p in model.named_parameters():
        train = n.startswith(("qformer.", "query_tokens", "language_projection.", "vision_model.post_layernorm."))
        train = train and not n.startswith(dead)  # never used by the loss (as in ours)
        p.requires_grad_(train)
        if not train and device.type == "cuda":
            p.data = p.data.to(torch.bfloat16)  # frozen parts bf16, trainable ones fp32, as ours
    model.to(device)
    opt = adamw(model)
    batch_size = args.batch_size
    ours = make_batch(cfg, batch_size)
    Q = cfg.qformer.num_queries
    image_token = model.config.image_token_index
    batch = {  # transformers 5: Q <image> placeholders in front of the text, labels -100 there
        "pixel_values": ours["pixel_values"],
        "input_ids": torch.cat([torch.full((batch_size, Q), image_token), ours["input_ids"]], 1),
        "attention_mask": torch.cat([torch.ones(batch_size, Q, dtype=torch.long), ours["attention_mask"]], 1),
        "labels": torch.cat([torch.full((batch_size, Q), -100), ours["labels"]], 1),
        "qformer_input_ids": ours["qformer_input_ids"],
        "qformer_attention_mask": ours["qformer_attention_mask"],
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    loss = eval_loss(model, batch, amp)
    model.train()
    model.vision_model.eval()  # frozen parts in eval mode, as LAVIS
    model.language_model.eval()

    def step() -> float:
        with amp:
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return {"loss": loss, **timed_steps(step, device, args)}


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------
def measure(impl: str, preset: str, hf_dir: str, args: argparse.Namespace, batch_size: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, __file__, "--worker", impl, "--presets", preset, "--hf-dir", hf_dir,
               "--device", args.device, "--batch-size", str(batch_size), "--warmup", str(args.warmup),
               "--steps", str(args.steps or STEPS[preset]), "--repeats", str(args.repeats),
               "--threads", str(args.threads), "--result", out.name]
        subprocess.run(cmd, check=True)
        return json.loads(Path(out.name).read_text())


def export_hf(preset: str, device: torch.device, folder: str) -> None:
    model = build_ours(preset, device)
    model.save_pretrained(folder, format="hf", force=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "mid"], choices=sorted(PRESETS))
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batch-size", type=int, help="samples per step (default per preset: %s)" % BATCH)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--steps", type=int, help="timed steps per round (default per preset: %s)" % STEPS)
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds; the fastest counts")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--worker", choices=("ours", "hf"), help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.worker:
        run = run_ours if args.worker == "ours" else run_hf
        res = run(args.presets[0], device, args)
        Path(args.result).write_text(json.dumps(res))
        return

    unit = "GPU memory (max allocated)" if device.type == "cuda" else "peak RSS"
    rows = []
    for preset in args.presets:
        bs = args.batch_size or BATCH[preset]
        with tempfile.TemporaryDirectory() as tmp:
            export_hf(preset, device, os.path.join(tmp, "hf"))
            ours = measure("ours", preset, os.path.join(tmp, "hf"), args, bs)
            hf = measure("hf", preset, os.path.join(tmp, "hf"), args, bs)
        rows.append((preset, bs, ours, hf))

    threads = torch.get_num_threads() if device.type == "cpu" else None
    where = f"CPU, {threads} threads" if threads else torch.cuda.get_device_name(device)
    print(f"\nTraining step (fwd + bwd + AdamW, LAVIS trainable set), {where}, torch {torch.__version__}; "
          f"per preset the best of {args.repeats} rounds of timed steps after {args.warmup} warm-up\n")
    print(f"| preset | batch | ours samples/s | HF samples/s | speed ours/HF | ours {unit} | HF {unit} "
          f"| memory ours/HF | loss before training ours / HF |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset, bs, o, h in rows:
        so, sh = bs / o["s_per_step"], bs / h["s_per_step"]
        print(f"| {preset} | {bs} | {so:.2f} | {sh:.2f} | {so / sh:.2f}x | {o['peak'] / 2**20:,.0f} MiB "
              f"| {h['peak'] / 2**20:,.0f} MiB | {o['peak'] / h['peak']:.2f} | {o['loss']:.5f} / {h['loss']:.5f} |")


if __name__ == "__main__":
    main()
