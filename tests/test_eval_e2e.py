"""`somelvlm eval` end to end with the real tiny model and synthetic images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import shared_path
from somelvlm.cli import main


def task_file(tmp_path: Path) -> tuple[Path, Path]:
    """A few samples of a SoMeData file (the shared copy when present, else look-alikes) + images."""
    src = shared_path("somedata", "in_domain", "PAN_test.json")
    if src.is_file():
        samples = json.loads(src.read_text())[:4]
    else:
        samples = [{"text_input": f"This image and the following caption are from the same user: 'post {i}'\n"
                                  "Is the user likely to be male or female?\nPick your answer from [male, female].",
                    "text_output": ["male", "female"][i % 2], "image": f"img{i}.jpg"} for i in range(4)]
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for s in samples[:3]:  # the last sample's image is missing on purpose
        Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(images / s["image"])
    data = tmp_path / "PAN_test.json"
    data.write_text(json.dumps(samples))
    return data, images


@pytest.mark.parametrize("mode", ["generate", "rank"])
def test_eval_runs_the_tiny_model(tmp_path, mode):
    data, images = task_file(tmp_path)
    out = tmp_path / f"report_{mode}.json"
    code = main(["eval", "--model", "tiny", "--data", str(data), "--images-root", str(images), "--out", str(out),
                 "--mode", mode, "--max-new-tokens", "4", "--num-beams", "1", "--no-progress"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["n"] == 4 and report["failed"] == 1  # the missing image is counted, not dropped
    assert out.with_suffix(".md").is_file()
    preds = [json.loads(line) for line in out.with_name(f"{out.stem}.predictions.jsonl").read_text().splitlines()]
    assert sorted(p["id"] for p in preds) == [0, 1, 2, 3]
    if mode == "rank":  # ranking answers with an option every time
        assert report["parseable"] == 3
        assert all(p["prediction"] in ("male", "female") for p in preds if "error" not in p)


def test_python_m_somelvlm_scores_predictions(tmp_path):
    data, _ = task_file(tmp_path)
    gold = [s["text_output"] for s in json.loads(data.read_text())]
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps({"id": i, "prediction": f"I think it is {g}."}) + "\n" for i, g in enumerate(gold)))
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "somelvlm", "eval", "--data", str(data), "--predictions", str(pred),
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report["acc"] == 100.0 and report["acc_star"] == 100.0 and report["n"] == 4
