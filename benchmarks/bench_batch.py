"""Batch-job throughput (`generate --input`): 1 process, 2 `accelerate launch` processes, 2 Ray actors.

    python benchmarks/bench_batch.py --tasks 200 --images 50 --max-new-tokens 8

Every engine answers the same task file with the built-in tiny model (greedy, fixed new tokens);
rows/s counts the whole command (imports, model load, reading, image decoding, answering, merge).
The single-process breakdown shows where the time goes: model load, image decode+preprocess, the
vision tower, and decoding. Outputs are checked to be identical across engines.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

BIN = Path(sys.executable).parent


def make_tasks(root: Path, n: int, n_images: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(root / f"im{i}.jpg")
    path = root / "tasks.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": f"Question {i} about this post?",
                                        "image": f"im{i % n_images}.jpg"}) + "\n" for i in range(n)))
    return path


def timed_run(cmd: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def breakdown(tasks: Path, opts: dict) -> dict:
    """Where one process spends its time (in-process, after imports)."""
    import torch

    from somelvlm import SoMeLVLM
    from somelvlm.options import GenerationOptions
    from somelvlm.tasks import answer_tasks, read_tasks

    t0 = time.perf_counter()
    model = SoMeLVLM.from_config("tiny")
    t1 = time.perf_counter()
    todo = read_tasks(tasks)
    images = list(dict.fromkeys(t.image for t in todo))
    proc = model.require_processor()
    pixels = proc.images([str(p) for p in images])
    t2 = time.perf_counter()
    with torch.inference_mode():
        model.encode_images(pixels)
    t3 = time.perf_counter()
    answer_tasks(model, todo, GenerationOptions(**opts), lambda t, a: None, lambda t, e: None, 8,
                 images={p: pixels[i] for i, p in enumerate(images)})
    t4 = time.perf_counter()
    return {"load": t1 - t0, "decode images": t2 - t1, "vision": t3 - t2, "answer (vision+LLM)": t4 - t3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    args = ap.parse_args()
    opts = {"num_beams": 1, "max_new_tokens": args.max_new_tokens, "min_new_tokens": args.max_new_tokens}
    flags = ["--num-beams", "1", "--max-new-tokens", str(args.max_new_tokens), "--no-progress"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tasks = make_tasks(root, args.tasks, args.images)
        env = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        one = timed_run([sys.executable, "-m", "somelvlm", "generate", "--input", str(tasks),
                         "--output", str(root / "one.jsonl"), *flags], env)
        rows.append(("1 process", one))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        two = timed_run([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                         "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
                         "-m", "somelvlm.generate", "--input", str(tasks), "--output", str(root / "acc.jsonl"),
                         *flags], env)
        rows.append(("2 accelerate processes", two))
        code = ("import ray, sys; from pathlib import Path; from somelvlm.engines.ray import answer_dataset; "
                "from somelvlm.tasks.job import JobSpec; from somelvlm.options import GenerationOptions; "
                "ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False); "
                f"answer_dataset(JobSpec(Path({str(tasks)!r}), Path({str(root / 'ray.jsonl')!r}), "
                f"options=GenerationOptions(num_beams=1, max_new_tokens={args.max_new_tokens})), actors=2, "
                "cpus_per_actor=0.5, rows_per_batch=32)")
        rows.append(("2 Ray actors", timed_run([sys.executable, "-c", code], env)))
        results = [{json.loads(line)["id"]: json.loads(line)["answer"] for line in (root / f).read_text().splitlines()}
                   for f in ("one.jsonl", "acc.jsonl", "ray.jsonl")]
        same = results[0] == results[1] == results[2]
        split = breakdown(tasks, opts)
    print(f"{args.tasks} tasks over {args.images} images (640x480 JPEG), tiny model, greedy, "
          f"{args.max_new_tokens} new tokens; identical answers across engines: {same}\n")
    print("| engine | wall s | rows/s |\n|---|---:|---:|")
    for name, secs in rows:
        print(f"| {name} | {secs:.1f} | {args.tasks / secs:.1f} |")
    print("\n| 1 process, in-process breakdown | s |\n|---|---:|")
    for name, secs in split.items():
        print(f"| {name} | {secs:.2f} |")


if __name__ == "__main__":
    main()
