"""Serving throughput and latency: `somelvlm serve` with dynamic batching vs answering one at a time.

The same N chat requests (SoMeData-style prompts about a few images, greedy, a fixed answer
length) are sent by 1, 8 and 32 concurrent clients to a real server on 127.0.0.1, and once to a
server that answers one request at a time (`--max-batch 1`, one client). Reports requests/s,
p50/p95 latency and the mean batch size the server formed (from /metrics).

    python benchmarks/bench_serve.py                    # tiny model, 64 requests
    python benchmarks/bench_serve.py --preset mid --requests 32 --max-tokens 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import markdown_table, random_model, somedata_prompts  # noqa: E402
from serve_helpers import ServerProcess, data_url, png_bytes  # noqa: E402


def requests_for(n: int, images: int, max_tokens: int) -> list[dict]:
    pics = [data_url(png_bytes((37 * i % 256, 91 * i % 256, 53 * i % 256), (64 + i, 48 + i))) for i in range(images)]
    prompts = [p for p in somedata_prompts(64) if len(p) < 400]  # short enough for the tiny model's positions
    return [{"messages": [{"role": "user", "content": [{"type": "text", "text": prompts[i % len(prompts)]},
                                                       {"type": "image_url", "image_url": {"url": pics[i % images]}}]}],
             "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0} for i in range(n)]


def run_load(url: str, bodies: list[dict], clients: int) -> dict:
    latencies: list[float] = []

    def one(body: dict) -> None:
        t = time.perf_counter()
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        latencies.append(time.perf_counter() - t)

    before = httpx.get(url + "/metrics").json()
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, bodies))
    wall = time.perf_counter() - start
    after = httpx.get(url + "/metrics").json()
    batches = after["batches"] - before["batches"]
    q = statistics.quantiles(latencies, n=20)
    return {"rps": len(bodies) / wall, "p50": statistics.median(latencies), "p95": q[18],
            "batch": (after["requests"] - before["requests"]) / max(batches, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="tiny (default) or a benchmarks/common.py preset (mid)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--images", type=int, default=8, help="distinct images among the requests")
    parser.add_argument("--max-tokens", type=int, default=16, help="answer length (min = max: no early stop)")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--threads", type=int, default=1, help="server torch threads (1: steady on a busy machine)")
    args = parser.parse_args()
    bodies = requests_for(args.requests, args.images, args.max_tokens)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = "tiny"
        if args.preset != "tiny":
            model = str(Path(tmp) / "model")
            random_model(args.preset, torch.float32, "cpu", Path(tmp)).save_pretrained(model, force=True)
        setups = [("one at a time", ["--max-batch", "1", "--batch-window-ms", "0"], [1]),
                  ("dynamic batching", [], [int(c) for c in args.clients.split(",")])]
        for name, flags, clients in setups:
            server = ServerProcess("serve", ["--model", model, "--log-level", "warning", *flags],
                                   Path(tmp) / "server.log", threads=args.threads)
            try:
                run_load(server.url, bodies[: min(4, len(bodies))], 1)  # warm-up
                for c in clients:
                    r = run_load(server.url, bodies, c)
                    rows.append([name, c, f"{r['rps']:.2f}", f"{r['p50'] * 1000:.0f}", f"{r['p95'] * 1000:.0f}",
                                 f"{r['batch']:.1f}"])
                    print(rows[-1], file=sys.stderr)
            finally:
                server.stop()
    print(f"{args.requests} requests, {args.images} images, {args.max_tokens} new tokens each, preset {args.preset}, "
          f"server threads {args.threads}")
    print(markdown_table(["server", "clients", "requests/s", "p50 ms", "p95 ms", "mean batch"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
