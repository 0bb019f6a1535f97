"""Scale-out engines on the real tiny model: `accelerate launch` (2 CPU processes over gloo) and
Ray Data (`ray.init(num_cpus=2)`) give the single-process answers; kills and bad rows lose nothing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from somelvlm import SoMeLVLM
from somelvlm.options import GenerationOptions

VENV_BIN = Path(sys.executable).parent
OPTS = dict(num_beams=1, max_new_tokens=3)


@pytest.fixture(scope="module")
def tiny():
    return SoMeLVLM.from_config("tiny")


def make_tasks(root: Path, n: int, n_images: int) -> tuple[Path, list[dict]]:
    rng = np.random.default_rng(7)
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"im{i}.png")
    tasks = [{"id": f"t{i}", "prompt": f"question {i}?", "image": f"im{i % n_images}.png"} for i in range(n)]
    path = root / "tasks.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    return path, tasks


def reference(model, tasks: list[dict], root: Path, **opts) -> dict:
    return {t["id"]: model.generate(str(root / t["image"]), [t["prompt"]], **(opts or OPTS))[0] for t in tasks}


def answers(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(rows) == len({r["id"] for r in rows}), "an id was written twice"
    return {r["id"]: r["answer"] for r in rows}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tasks: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "somelvlm.generate", "--input", str(tasks), "--output", str(out), "--no-progress", *extra]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def test_accelerate_two_processes_equal_one_process(tiny, tmp_path):
    tasks, rows = make_tasks(tmp_path, 10, 5)
    out = tmp_path / "out.jsonl"
    proc = launch(tasks, out, "--num-beams", "1", "--max-new-tokens", "3")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "merged 10 answer(s) from 2 process(es)" in err and "answered 10," in err
    assert answers(out) == reference(tiny, rows, tmp_path)
    assert not (tmp_path / "out.jsonl.parts").exists()


def _worker_pids(root: int) -> list[int]:
    """Descendant processes of `root` that run a rank (they have LOCAL_RANK in their environment)."""
    children = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    found, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                if b"LOCAL_RANK=" in Path(f"/proc/{pid}/environ").read_bytes():
                    found.append(pid)
            except OSError:
                pass
    return found


@pytest.mark.slow
def test_accelerate_kill9_of_one_process_then_rerun_on_one_process(tiny, tmp_path):
    tasks, rows = make_tasks(tmp_path, 12, 6)
    out = tmp_path / "out.jsonl"
    slow = ["--batch-size", "1", "--num-beams", "1", "--max-new-tokens", "40", "--min-length", "41"]
    proc = launch(tasks, out, *slow)
    parts = tmp_path / "out.jsonl.parts"
    deadline = time.time() + 240
    while time.time() < deadline:
        lines = sum(len(p.read_text().splitlines()) for p in parts.glob("part-*.jsonl")) if parts.exists() else 0
        if lines >= 2:
            break
        time.sleep(0.1)
    workers = _worker_pids(proc.pid)
    assert workers, "no worker process found"
    os.kill(workers[-1], signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    done_before = sum(len(p.read_text().splitlines()) for p in parts.glob("part-*.jsonl"))
    assert 2 <= done_before < 12, "the run finished before it could be killed"
    # resume on ONE process: the part files count as done and are merged
    rerun = subprocess.run([sys.executable, "-m", "somelvlm", "generate", "--input", str(tasks), "--output", str(out),
                            "--no-progress", *slow], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert answers(out) == reference(tiny, rows, tmp_path, num_beams=1, max_new_tokens=40, min_length=41)
    assert not parts.exists()


def test_ray_data_engine_equals_one_process_and_skips_bad_rows(tiny, tmp_path, caplog):
    ray = pytest.importorskip("ray")
    from somelvlm.engines.ray import answer_dataset
    from somelvlm.tasks.job import JobSpec

    tasks, rows = make_tasks(tmp_path, 8, 4)
    with tasks.open("a") as fh:
        fh.write('{"id": "bad", "prompt": "no such image", "image": "nope.png"}\n{"id": "broken", "pro\n')
    out = tmp_path / "out.jsonl"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        result = answer_dataset(JobSpec(tasks, out, options=GenerationOptions(**OPTS), batch_size=3), actors=1,
                                rows_per_batch=4)
    finally:
        ray.shutdown()
    assert answers(out) == reference(tiny, rows, tmp_path)
    assert result.answered == 8 and len(result.failures) == 2
    assert any("tasks.jsonl:9: cannot use image" in f and "nope.png" in f for f in result.failures)
    assert any("tasks.jsonl:10: not valid JSON" in f for f in result.failures)
    assert json.loads((tmp_path / "out.jsonl.somelvlm.json").read_text())["settings"]["options"]["max_new_tokens"] == 3
