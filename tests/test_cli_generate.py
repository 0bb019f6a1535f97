"""`somelvlm generate`: single answers, streaming, task files, resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_images
from somelvlm import SoMeLVLM
from somelvlm.cli import main
from somelvlm.decoding import Flight
from somelvlm.processing import SAMPLE_IMAGE, asset_path

IMG = str(asset_path(SAMPLE_IMAGE))
FAST = ["--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def tiny():
    return SoMeLVLM.from_config("tiny")


@pytest.fixture()
def images(tmp_path) -> Path:
    return write_images(tmp_path / "imgs", ("a.jpg", "b.png", "c.png"), (20, 30), 1,
                        ("broken.jpg", b"\xff\xd8 not really a jpeg"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_single_answer_and_stream(tiny, capsys):
    assert main(["generate", "--image", IMG, "--prompt", "What is this?", *FAST]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == tiny.generate(IMG, ["What is this?"], max_new_tokens=6)[0]
    assert main(["generate", "--image", IMG, "--prompt", "What is this?", "--stream", *FAST]) == 0
    assert capsys.readouterr().out.strip() == tiny.generate(IMG, ["What is this?"], num_beams=1, max_new_tokens=6)[0]


def test_default_runs_tiny_demo_and_says_random(tiny, caplog, capsys):
    from somelvlm.cli import DEMO_PROMPT

    assert main(["generate", *FAST]) == 0
    assert capsys.readouterr().out.strip() == tiny.generate(IMG, [DEMO_PROMPT], max_new_tokens=6)[0]
    assert any("RANDOM weights" in r.getMessage() for r in caplog.records)


def test_batch_groups_by_image(tiny, images, tmp_path, monkeypatch):
    rows = [{"id": f"t{i}", "image": img, "prompt": f"question {i} about {img}?"}
            for i, img in enumerate(["a.jpg", "b.png", "a.jpg", "c.png", "a.jpg", "b.png"])]
    tasks = write_jsonl(tmp_path / "tasks.jsonl", rows)
    calls = []
    real = tiny.vision.forward
    monkeypatch.setattr(tiny.vision, "forward", lambda x: (calls.append(x.shape[0]), real(x))[1])
    monkeypatch.setattr(SoMeLVLM, "load", classmethod(lambda cls, *a, **k: tiny))
    out = tmp_path / "answers.jsonl"
    assert main(["generate", "--input", str(tasks), "--output", str(out), "--images-root", str(images),
                 "--batch-size", "4", "--no-progress", *FAST]) == 0
    got = {r["id"]: r for r in read_jsonl(out)}
    assert set(got) == {r["id"] for r in rows}
    assert sum(calls) == 3  # three distinct images, each through the vision tower once
    for r in rows:
        want = tiny.generate(str(images / r["image"]), [r["prompt"]], max_new_tokens=6)[0]
        assert got[r["id"]]["answer"] == want and got[r["id"]]["prompt"] == r["prompt"]


def test_somedata_format_and_bad_lines(tiny, images, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(SoMeLVLM, "load", classmethod(lambda cls, *a, **k: tiny))
    rows = [{"text_input": "Is it hateful?\nPick from: [true, false]", "text_output": "true", "image": "a.jpg"},
            "{not json",
            {"text_input": "where?", "image": "missing.jpg"},
            {"text_input": "what?", "image": "broken.jpg"},
            {"image": "a.jpg"},
            {"text_input": "who?", "image": "c.png"}]
    tasks = write_jsonl(tmp_path / "tasks.jsonl", rows)
    out = tmp_path / "answers.jsonl"
    code = main(["generate", "--input", str(tasks), "--output", str(out), "--images-root", str(images),
                 "--no-progress", *FAST])
    assert code == 1  # something failed
    done = read_jsonl(out)
    assert sorted(r["id"] for r in done) == [0, 5]  # ids default to the 0-based position
    msgs = "\n".join(r.getMessage() for r in caplog.records)
    assert "tasks.jsonl:2: not valid JSON" in msgs
    assert "tasks.jsonl:3: cannot use image" in msgs and "missing.jpg" in msgs
    assert "tasks.jsonl:4: cannot use image" in msgs and "broken.jpg" in msgs
    assert "tasks.jsonl:5: needs a non-empty string 'prompt'" in msgs
    # a JSON list (SoMeData file) works the same way
    data = tmp_path / "set.json"
    data.write_text(json.dumps([rows[0], rows[5]]))
    assert main(["generate", "--input", str(data), "--output", str(tmp_path / "b.jsonl"),
                 "--images-root", str(images), "--no-progress", *FAST]) == 0
    assert len(read_jsonl(tmp_path / "b.jsonl")) == 2


def test_resume_after_interruption(tiny, images, tmp_path, monkeypatch):
    rows = [{"id": i, "image": ["a.jpg", "b.png", "c.png"][i % 3], "prompt": f"q{i}"} for i in range(9)]
    tasks = write_jsonl(tmp_path / "tasks.jsonl", rows)
    out = tmp_path / "answers.jsonl"
    monkeypatch.setattr(SoMeLVLM, "load", classmethod(lambda cls, *a, **k: tiny))
    real = Flight.step
    calls = {"n": 0}

    def flaky(self, *a, **k):  # Ctrl-C in the middle of decoding, after some answers were written
        calls["n"] += 1
        if calls["n"] == 13:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Flight, "step", flaky)
    args = ["generate", "--input", str(tasks), "--output", str(out), "--images-root", str(images),
            "--batch-size", "2", "--no-progress", *FAST]
    assert main(args) == 130
    first = read_jsonl(out)
    assert 1 <= len(first) < 9
    with out.open("a") as f:
        f.write('{"id": 99, "answ')  # a line cut by the kill
    monkeypatch.setattr(Flight, "step", real)
    assert main(args) == 0
    final = read_jsonl(out)
    assert sorted(r["id"] for r in final) == list(range(9))  # nothing lost, nothing twice
    assert final[:len(first)] == first


def test_resume_after_sigkill(images, tmp_path):
    """A real process killed mid-run, then restarted: every id exactly once."""
    rows = [{"id": i, "image": ["a.jpg", "b.png"][i % 2], "prompt": f"long answer {i}"} for i in range(8)]
    tasks = write_jsonl(tmp_path / "tasks.jsonl", rows)
    out = tmp_path / "answers.jsonl"
    cmd = [sys.executable, "-m", "somelvlm", "generate", "--input", str(tasks), "--output", str(out),
           "--images-root", str(images), "--batch-size", "1", "--num-beams", "1", "--max-new-tokens", "120",
           "--min-length", "121", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(read_jsonl(out))
    assert 2 <= partial < 8, "the run finished before it could be killed"
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert sorted(r["id"] for r in read_jsonl(out)) == list(range(8))


def test_argument_errors(capsys):
    assert main(["generate", "--input", "x.jsonl"]) == 1
    assert capsys.readouterr().err.strip() == "somelvlm generate: error: --input and --output go together"
    assert main(["generate", "--model", "/no/such/folder", "--image", IMG, "--prompt", "x"]) == 1
