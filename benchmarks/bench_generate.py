"""Generation speed and memory, somelvlm vs transformers' InstructBLIP on the same weights.

Suites (`--suite`, several allowed):
  greedy  a fixed number of new tokens (no early stop), workloads
            single  one image + one prompt
            multi   one image x N SoMeData prompts (a post asked several questions)
          For `multi`, transformers gets the batch the way its processor builds it (the image repeated
          per prompt); somelvlm is measured both the same way ("per-prompt images") and encode-once.
  beam    LAVIS's default decoding (5 beams, repetition penalty 1.5) forced to --short and --long new
          tokens: single greedy/beam and multi beam, plus the cost of one decode step
          ((long - short) / (long - short tokens)).
  tasks   task-list throughput, somelvlm only: --tasks prompts of one image, greedy, answers ending
          at mixed lengths (the eos row of the random LLM is tilted so that some answers end early),
          static batches of --batch-size (`generate` per chunk) vs continuous batching
          (`scheduler.answer_stream`, up to --batch-size in flight).

    python benchmarks/bench_generate.py --preset mid --dtype fp32
    python benchmarks/bench_generate.py --preset mid --suite beam --suite tasks --repeats 1
    python benchmarks/bench_generate.py --preset vicuna7b --dtype bf16 --device cuda

Each measurement runs in its own process (peak memory = that process's max RSS, or
torch.cuda.max_memory_allocated on GPU); times are medians of --repeats runs after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
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


def hf_generate(hf, proc, pixels: torch.Tensor, prompts: list[str], **gen) -> torch.Tensor:
    """transformers' InstructBLIP `generate` on one image (`pixels [1,3,S,S]`) and `prompts`, the batch
    built as its processor does (the image repeated per prompt, `<image>` tokens before the text)."""
    n, device = len(prompts), pixels.device
    q_ids, q_mask = proc.qformer_text(prompts)
    ids, mask = proc.prompts(prompts, side="left")
    Q, image_token = hf.config.num_query_tokens, hf.config.image_token_index
    batch = dict(
        pixel_values=pixels.expand(n, -1, -1, -1).to(hf.dtype), qformer_input_ids=q_ids.to(device),
        qformer_attention_mask=q_mask.to(device),
        input_ids=torch.cat([torch.full((n, Q), image_token), ids], 1).to(device),
        attention_mask=torch.cat([torch.ones(n, Q, dtype=torch.long), mask], 1).to(device))
    with torch.inference_mode():
        return hf.generate(**batch, do_sample=False, pad_token_id=proc.llm_tokenizer.pad_id, eos_token_id=2, **gen)


def measure(run, args: argparse.Namespace) -> float:
    """Median of --repeats timed calls after a warm-up; --repeats 0: one cold call (slow workloads)."""
    if args.repeats:
        return timed(run, args.repeats, args.device)[0]
    t = time.perf_counter()
    run()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def tilt_eos(model, prompts: list[str], strength: float) -> None:
    """Point the LLM's eos row at the mean last hidden state of `prompts`, scaled so that eos is
    about `strength` x the top logit there: answers then end after mixed numbers of tokens."""
    from somelvlm.generation import features_for, llm_generate_inputs
    from somelvlm.processing import SAMPLE_IMAGE, asset_path

    with torch.inference_mode():
        E, M = llm_generate_inputs(model, features_for(model, str(asset_path(SAMPLE_IMAGE)), len(prompts)), prompts)
        h = model.llm.model(inputs_embeds=E, attention_mask=M).last_hidden_state[:, -1].float()
        top = model.llm.lm_head(h.to(E.dtype)).float().max(-1).values.mean()
        hbar = h.mean(0)
        model.llm.lm_head.weight[model.config.llm.eos_id] = (hbar / (hbar @ hbar) * top * strength).to(E.dtype)


def task_prompts(n: int) -> list[str]:
    base = somedata_prompts(64)
    return [f"{base[i % len(base)]} (post {i})" for i in range(n)]


def tasks_worker(args: argparse.Namespace, ours, pixels) -> dict:
    from somelvlm.generation import encode_images
    from somelvlm.options import GenerationOptions
    from somelvlm.scheduler import Request, answer_stream

    prompts = task_prompts(args.tasks)
    tilt_eos(ours, prompts[:16], args.eos_strength)
    opts = GenerationOptions(num_beams=1, max_new_tokens=args.tokens)
    feats = encode_images(ours, pixels)
    answers: list = []

    def run():
        answers.clear()
        if args.impl == "static":
            for i in range(0, len(prompts), args.batch_size):
                part = prompts[i:i + args.batch_size]
                answers.extend(ours.generate(feats.select([0] * len(part)), part, options=opts))
        else:
            got = dict(answer_stream(ours, (Request(i, p, feats, opts) for i, p in enumerate(prompts)),
                                     max_batch=args.batch_size))
            answers.extend(got[i][0] for i in range(len(prompts)))

    seconds = measure(run, args)
    empty = sum(not a for a in answers)  # answers that ended at once (eos first)
    return {"seconds": seconds, "peak_bytes": peak_memory_bytes(args.device), "prompts": len(prompts),
            "answers": answers, "empty": empty}


def worker(args: argparse.Namespace) -> dict:
    from somelvlm import SoMeLVLM, SoMeLVLMProcessor
    from somelvlm.processing import SAMPLE_IMAGE, asset_path

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = args.device, DTYPES[args.dtype]
    proc = SoMeLVLMProcessor.from_pretrained(args.work / "ours")
    pixels = proc.images([str(asset_path(SAMPLE_IMAGE))]).to(device)
    if args.impl in ("static", "continuous"):
        return tasks_worker(args, SoMeLVLM.from_pretrained(args.work / "ours", dtype=dtype, device=device), pixels)
    n = 1 if args.workload == "single" else args.prompts
    prompts = somedata_prompts(n)
    beams, penalty = (5, 1.5) if args.decoding == "beam5" else (1, 1.0)
    gen = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, num_beams=beams, repetition_penalty=penalty)
    if args.impl == "hf":
        from transformers import InstructBlipForConditionalGeneration

        hf = InstructBlipForConditionalGeneration.from_pretrained(args.work / "hf", dtype=dtype).to(device).eval()

        def run():
            return hf_generate(hf, proc, pixels, prompts, **gen)
    else:
        ours = SoMeLVLM.from_pretrained(args.work / "ours", dtype=dtype, device=device)
        images = pixels if args.impl == "ours" else pixels.expand(n, -1, -1, -1)

        def run():
            return ours.generate(images, prompts, **gen)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds = measure(run, args)
    return {"seconds": seconds, "peak_bytes": peak_memory_bytes(device), "prompts": n}


def greedy_suite(args, call) -> tuple[str, list[str], list[list]]:
    res = {}
    for workload in ("single", "multi"):
        impls = ["hf", "ours"] + (["ours-per-prompt"] if workload == "multi" else [])
        for impl in impls:
            res[(workload, impl)] = call(impl, workload, "greedy", args.tokens)
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
    title = f"greedy, {args.tokens} new tokens"
    return title, ["workload", "implementation", "time (s)", "tokens/s", "peak memory (MiB)", "time vs HF",
                   "throughput vs HF"], rows


def beam_suite(args, call) -> tuple[str, list[str], list[list]]:
    short, long = args.short, args.long
    cases = [("single", "greedy", short), ("single", "beam5", short), ("multi", "beam5", short),
             ("multi", "beam5", long)]
    res = {(c, impl): call(impl, *c) for c in cases for impl in ("hf", "ours")}
    rows = []
    for c in cases:
        ours, hf = res[(c, "ours")]["seconds"], res[(c, "hf")]["seconds"]
        n = res[(c, "ours")]["prompts"]
        rows.append([f"{n} prompt{'s' * (n > 1)}, {c[1]}, {c[2]} tokens", f"{ours:.2f}", f"{hf:.2f}", f"{ours / hf:.2f}x"])
    step = [(res[(("multi", "beam5", long), i)]["seconds"] - res[(("multi", "beam5", short), i)]["seconds"])
            / (long - short) for i in ("ours", "hf")]
    rows.append([f"{args.prompts} prompts, beam5, per decode step", f"{step[0]:.3f}", f"{step[1]:.3f}",
                 f"**{step[0] / step[1]:.2f}x**"])
    return "LAVIS decoding (beam5 = 5 beams, repetition penalty 1.5)", ["workload", "somelvlm (s)",
                                                                       "transformers (s)", "time ratio"], rows


def tasks_suite(args, call) -> tuple[str, list[str], list[list]]:
    res = {impl: call(impl, "tasks", "greedy", args.tokens) for impl in ("static", "continuous")}
    same = sum(a == b for a, b in zip(res["static"]["answers"], res["continuous"]["answers"]))
    rows = []
    for impl, r in res.items():
        rows.append([impl, f"{r['seconds']:.1f}", f"{r['prompts'] / r['seconds']:.2f}",
                     f"{res['static']['seconds'] / r['seconds']:.2f}x"])
    r = res["static"]
    title = (f"{r['prompts']} tasks, greedy, batch {args.batch_size}, at most {args.tokens} new tokens, "
             f"{r['empty']} answers empty (eos first); identical answers: {same}/{r['prompts']}")
    return title, ["batching", "time (s)", "rows/s", "rows/s vs static"], rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mid", help="tiny | mid | vicuna7b | 7b-layersN")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--suite", action="append", choices=["greedy", "beam", "tasks"],
                    help="what to measure (repeatable; default: greedy)")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per answer (greedy; tasks: the maximum)")
    ap.add_argument("--short", type=int, default=8, help="beam suite: the short answer length")
    ap.add_argument("--long", type=int, default=32, help="beam suite: the long answer length")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per image in the multi workload")
    ap.add_argument("--tasks", type=int, default=200, help="tasks suite: number of tasks")
    ap.add_argument("--batch-size", type=int, default=8, help="tasks suite: prompts per batch / in flight")
    ap.add_argument("--eos-strength", type=float, default=0.95, help="tasks suite: eos tilt (mixes lengths)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after a warm-up (0: one cold run)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the two model copies (default: temp)")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    ap.add_argument("--worker", dest="impl", choices=["ours", "ours-per-prompt", "hf", "static", "continuous"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--workload", choices=["single", "multi", "tasks"], help=argparse.SUPPRESS)
    ap.add_argument("--decoding", choices=["greedy", "beam5"], default="greedy", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.impl:
        print(json.dumps(worker(args)))
        return
    suites = {"greedy": greedy_suite, "beam": beam_suite, "tasks": tasks_suite}
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        if not ((work / "ours" / "config.json").is_file() and (work / "hf" / "config.json").is_file()):
            prepare(args, work)
        common = ["--preset", args.preset, "--dtype", args.dtype, "--device", args.device, "--prompts",
                  str(args.prompts), "--repeats", str(args.repeats), "--threads", str(args.threads), "--work",
                  str(work), "--tasks", str(args.tasks), "--batch-size", str(args.batch_size),
                  "--eos-strength", str(args.eos_strength)]

        def call(impl: str, workload: str, decoding: str, tokens: int) -> dict:
            r = run_worker(Path(__file__), common + ["--worker", impl, "--workload", workload, "--decoding",
                                                     decoding, "--tokens", str(tokens)])
            print(f"{workload:6} {decoding:6} {tokens:4} {impl:16} {r['seconds']:.3f} s", file=sys.stderr)
            return r

        for name in args.suite or ["greedy"]:
            title, headers, rows = suites[name](args, call)
            title = f"preset `{args.preset}`, {args.dtype}, {args.device}, torch {torch.__version__}: {title}"
            print(title)
            print(markdown_table(headers, rows))
            out.append({"title": title, "headers": headers, "rows": rows})
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
