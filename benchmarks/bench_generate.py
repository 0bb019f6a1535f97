"""Generation speed and memory, somelvlm vs transformers' InstructBLIP on the same weights.

Workloads (greedy, a fixed number of new tokens, no early stop):
  single  one image + one prompt
  multi   one image x N SoMeData prompts (a post asked several questions)
For `multi`, transformers gets the batch the way its processor builds it (the image repeated per
prompt); somelvlm is measured both the same way ("per-prompt images") and with encode-once.

    python benchmarks/bench_generate.py --preset mid --dtype fp32
    python benchmarks/bench_generate.py --preset vicuna7b --dtype bf16 --device cuda

Each measurement runs in its own process (peak memory = that process's max RSS, or
torch.cuda.max_memory_allocated on GPU); times are medians of --repeats runs after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, peak_memory_bytes, random_model, run_worker, somedata_prompts, timed  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def prepare(args: argparse.Namespace, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    model = random_model(args.preset, DTYPES[args.dtype], args.device, work)
    model.save_pretrained(work / "ours", force=True)
    model.save_pretrained(work / "hf", format="hf", force=True)


def worker(args: argparse.Namespace) -> dict:
    from somelvlm import SoMeLVLM, SoMeLVLMProcessor
    from somelvlm.processing import SAMPLE_IMAGE, asset_path

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = args.device, DTYPES[args.dtype]
    proc = SoMeLVLMProcessor.from_pretrained(args.work / "ours")
    n = 1 if args.workload == "single" else args.prompts
    prompts = somedata_prompts(n)
    pixels = proc.images([str(asset_path(SAMPLE_IMAGE))]).to(device)
    gen = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    if args.impl == "hf":
        from transformers import InstructBlipForConditionalGeneration

        hf = InstructBlipForConditionalGeneration.from_pretrained(args.work / "hf", dtype=dtype).to(device).eval()
        q_ids, q_mask = proc.qformer_text(prompts)
        ids, mask = proc.prompts(prompts, side="left")
        Q, image_token = hf.config.num_query_tokens, hf.config.image_token_index
        batch = dict(
            pixel_values=pixels.expand(n, -1, -1, -1).to(dtype), qformer_input_ids=q_ids.to(device),
            qformer_attention_mask=q_mask.to(device),
            input_ids=torch.cat([torch.full((n, Q), image_token), ids], 1).to(device),
            attention_mask=torch.cat([torch.ones(n, Q, dtype=torch.long), mask], 1).to(device))

        def run():
            with torch.inference_mode():
                return hf.generate(**batch, do_sample=False, num_beams=1, pad_token_id=proc.llm_tokenizer.pad_id,
                                   eos_token_id=2, **gen)
    else:
        ours = SoMeLVLM.from_pretrained(args.work / "ours", dtype=dtype, device=device)
        images = pixels if args.impl == "ours" else pixels.expand(n, -1, -1, -1)

        def run():
            return ours.generate(images, prompts, num_beams=1, repetition_penalty=1.0, **gen)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds, _ = timed(run, args.repeats, device)
    return {"seconds": seconds, "peak_bytes": peak_memory_bytes(device), "prompts": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mid", help="tiny | mid | vicuna7b | 7b-layersN")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per answer (greedy)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per image in the multi workload")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the two model copies (default: temp)")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    ap.add_argument("--worker", dest="impl", choices=["ours", "ours-per-prompt", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--workload", choices=["single", "multi"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.impl:
        print(json.dumps(worker(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        if not ((work / "ours" / "config.json").is_file() and (work / "hf" / "config.json").is_file()):
            prepare(args, work)
        common = ["--preset", args.preset, "--dtype", args.dtype, "--device", args.device, "--tokens",
                  str(args.tokens), "--prompts", str(args.prompts), "--repeats", str(args.repeats), "--threads",
                  str(args.threads), "--work", str(work)]
        res = {}
        for workload in ("single", "multi"):
            impls = ["hf", "ours"] + (["ours-per-prompt"] if workload == "multi" else [])
            for impl in impls:
                res[(workload, impl)] = run_worker(Path(__file__), common + ["--worker", impl, "--workload", workload])
                print(f"{workload:6} {impl:16} {res[(workload, impl)]}", file=sys.stderr)
    rows = []
    for workload in ("single", "multi"):
        hf = res[(workload, "hf")]
        for impl in [k[1] for k in res if k[0] == workload]:
            r = res[(workload, impl)]
            label = {"hf": "transformers InstructBLIP", "ours": "somelvlm" + (" (encode once)" if workload == "multi" else ""),
                     "ours-per-prompt": "somelvlm (per-prompt images)"}[impl]
            tput = r["prompts"] * args.tokens / r["seconds"]
            rows.append([f"{workload} ({r['prompts']} prompt{'s' * (r['prompts'] > 1)})", label, f"{r['seconds']:.3f}",
                         f"{tput:.1f}", f"{r['peak_bytes'] / 2**20:,.0f}",
                         f"{r['seconds'] / hf['seconds']:.2f}x", f"{hf['seconds'] / r['seconds']:.2f}x"])
    title = (f"preset `{args.preset}`, {args.dtype}, {args.device}, greedy {args.tokens} new tokens, "
             f"torch {torch.__version__}")
    print(title)
    print(markdown_table(["workload", "implementation", "time (s)", "tokens/s", "peak memory (MiB)",
                          "time vs HF", "throughput vs HF"], rows))
    if args.out:
        args.out.write_text(json.dumps({"title": title, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
