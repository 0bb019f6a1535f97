"""The evaluation runner on the real tiny model (grouping, resume, failures, rank mode) and the CLI."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from somelvlm import SoMeLVLM, cli
from somelvlm.evaluate.runner import evaluate
from somelvlm.tasks import answer as answer_module

CLS_IMAGES = ["a.jpg", "a.jpg", "b.jpg", "c.jpg", "b.jpg", "a.jpg"]
CLS_GOLDS = ["male", "female", "female", "male", "male", "female"]
GEN_IMAGES = ["b.jpg", "a.jpg", "d.jpg", "c.jpg"]
GEN_REFS = ["The user is male.", "The gender is female.", "This user is female.", "It is male."]
OPTS = {"num_beams": 1, "max_new_tokens": 3}


@pytest.fixture(scope="module")
def tiny():
    return SoMeLVLM.from_config("tiny")


class Spy:
    """Records the real model's vision batches and each answer the answering loop's scheduler gives
    (the real code does the work); `stop_after` answers, a Ctrl-C."""

    def __init__(self, model, monkeypatch, stop_after: int | None = None) -> None:
        self.vision, self.generated = [], []
        real_forward, real_stream = model.vision.forward, answer_module.answer_stream

        def forward(x):
            self.vision.append(x.shape[0])
            return real_forward(x)

        def answer_stream(model, requests, max_batch=8):
            for key, answers in real_stream(model, requests, max_batch):
                if len(self.generated) == stop_after:
                    raise KeyboardInterrupt
                self.generated.append(answers)
                yield key, answers

        monkeypatch.setattr(model.vision, "forward", forward)
        monkeypatch.setattr(answer_module, "answer_stream", answer_stream)


def expected(model, data: Path, images: Path) -> dict:
    """One independent generate call per sample: what the batched runner must reproduce."""
    out = {}
    for f in sorted(data.glob("*.json")):
        for i, s in enumerate(json.loads(f.read_text())):
            if (images / s["image"]).is_file():
                out[f.name, i] = model.generate(str(images / s["image"]), [s["text_input"]], **OPTS)[0]
    return out


@pytest.fixture
def setup(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i, name in enumerate(["a.jpg", "b.jpg", "c.jpg", "d.jpg"]):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(images / name)
    data = tmp_path / "data"
    data.mkdir()
    cls = [{"text_input": f"Post {i}: is the user male or female?\nPick your answer from [male, female].",
            "text_output": gold, "image": image} for i, (gold, image) in enumerate(zip(CLS_GOLDS, CLS_IMAGES))]
    gen = [{"text_input": f"Post {i}: who posted this?", "text_output": ref, "image": image}
           for i, (ref, image) in enumerate(zip(GEN_REFS, GEN_IMAGES))]
    (data / "PAN_test.json").write_text(json.dumps(cls))
    (data / "PAN_test_g.json").write_text(json.dumps(gen))
    return data, images, tmp_path / "out"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _keys(path: Path) -> list[tuple[str, int]]:
    return [(r["file"], r["id"]) for r in _lines(path)]


ALL_KEYS = sorted([("PAN_test.json", i) for i in range(6)] + [("PAN_test_g.json", i) for i in range(4)])


def test_each_image_encoded_once_and_prompts_batched(setup, tiny, monkeypatch):
    data, images, out = setup
    want = expected(tiny, data, images)
    spy = Spy(tiny, monkeypatch)
    report = evaluate(tiny, data, images, out, batch_size=2, generate_kwargs=OPTS, progress=False)
    assert sum(spy.vision) == 4 and all(n <= 2 for n in spy.vision)  # four images, each encoded once
    assert len(spy.generated) == 10  # every prompt answered once
    preds = {(r["file"], r["id"]): r["prediction"] for r in _lines(out / "predictions.jsonl")}
    assert preds == want
    assert report["files"]["PAN_test.json"]["failed"] == 0
    assert (out / "report.json").is_file() and (out / "report.md").is_file()
    assert "| PAN_test.json | social_factors | classification | 6 |" in (out / "report.md").read_text()
    assert bool(list(out.glob("*.png"))) == (importlib.util.find_spec("matplotlib") is not None)


def test_resume_after_interruption(setup, tiny, monkeypatch):
    data, images, out = setup
    Spy(tiny, monkeypatch, stop_after=4)
    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny, data, images, out, batch_size=2, generate_kwargs=OPTS, progress=False)
    preds = out / "predictions.jsonl"
    assert len(_lines(preds)) == 4  # the four answers given before the interruption
    with preds.open("a") as fh:
        fh.write('{"id": 5, "file": "PAN_te')  # a write cut short by the interruption
    monkeypatch.undo()
    second = Spy(tiny, monkeypatch)
    evaluate(tiny, data, images, out, batch_size=2, generate_kwargs=OPTS, progress=False)
    assert sorted(_keys(preds)) == ALL_KEYS  # nothing lost, nothing twice
    assert len(second.generated) == 6
    third = Spy(tiny, monkeypatch)
    evaluate(tiny, data, images, out, batch_size=2, generate_kwargs=OPTS, progress=False)
    assert third.vision == [] and third.generated == [] and len(_lines(preds)) == 10


def test_corrupt_image_fails_its_samples_only_and_is_retried(setup, tiny, tmp_path):
    """Bug: eval aborted on a corrupt image (load_image raises ValueError). Real CLI, real file."""
    data, images, out = setup
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    samples = json.loads((data / "PAN_test.json").read_text())
    samples[2]["image"], samples[3]["image"] = "missing.jpg", "broken.jpg"
    (data / "PAN_test.json").write_text(json.dumps(samples))
    report_path = out / "report.json"
    args = [sys.executable, "-m", "somelvlm", "eval", "--model", "tiny", "--data", str(data / "PAN_test.json"),
            "--images-root", str(images), "--out", str(report_path), "--num-beams", "1", "--max-new-tokens", "3",
            "--no-progress"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    report = json.loads(report_path.read_text())
    assert (report["n"], report["failed"]) == (6, 2)
    errors = {f["id"]: f["error"] for f in report["failures"]}
    assert "image not found" in errors[2] and "broken.jpg" in errors[3] and "cannot read image" in errors[3]
    # the images are fixed: a rerun retries exactly the two failed samples
    Image.new("RGB", (8, 8)).save(images / "missing.jpg")
    Image.new("RGB", (8, 8)).save(images / "broken.jpg", format="JPEG")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "retrying 2 sample(s)" in proc.stderr
    assert json.loads(report_path.read_text())["failed"] == 0
    assert sorted(r["id"] for r in _lines(out / "report.predictions.jsonl")) == list(range(6))


def test_rank_mode(setup, tiny):
    data, images, out = setup
    report = evaluate(tiny, data / "PAN_test.json", images, out, mode="rank", generate_kwargs=OPTS, progress=False)
    ranked = _lines(out / "predictions.jsonl")
    samples = json.loads((data / "PAN_test.json").read_text())
    for r in ranked:
        s = samples[r["id"]]
        want = tiny.rank(str(images / s["image"]), s["text_input"], ["male", "female"])
        assert r["prediction"] == want[0][0] and r["ranking"][0][0] == want[0][0]
    assert report["parseable"] == 6


def test_limit_and_bad_arguments(setup, tiny):
    data, images, out = setup
    report = evaluate(tiny, data / "PAN_test.json", images, out, limit=2, generate_kwargs=OPTS, progress=False)
    assert report["n"] == 2 and report["settings"]["limit"] == 2
    assert sorted(_keys(out / "predictions.jsonl")) == [("PAN_test.json", 0), ("PAN_test.json", 1)]
    with pytest.raises(ValueError, match="mode must be"):
        evaluate(tiny, data, images, out, mode="beam")
    with pytest.raises(FileNotFoundError, match="data file not found"):
        evaluate(tiny, data / "nope.json", images, out)
    with pytest.raises(ValueError, match="unknown generation option"):
        evaluate(tiny, data, images, out / "x", generate_kwargs={"beams": 2})


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def _write_preds(path: Path, answers: list[str], file: str | None = None) -> Path:
    rows = [{"id": i, "prediction": a} | ({"file": file} if file else {}) for i, a in enumerate(answers)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_scores_predictions_in_a_subprocess(setup, tmp_path):
    data, _, _ = setup
    preds = _write_preds(tmp_path / "p.jsonl", ["male", "The answer is female.", "male", "no idea", "Male!", "female"])
    out = tmp_path / "r" / "report.json"
    proc = subprocess.run([sys.executable, "-m", "somelvlm", "eval", "--data", str(data / "PAN_test.json"),
                           "--predictions", str(preds), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert (report["n"], report["parseable"], report["correct"]) == (6, 5, 4)
    assert report["acc"] == pytest.approx(400 / 6) and report["acc_star"] == pytest.approx(80.0)
    assert report["per_option"]["female"] == {"gold": 3, "predicted": 2, "correct": 2}
    assert out.with_suffix(".md").is_file()


def test_cli_folder_garbage_and_generation(setup, tmp_path):
    data, _, _ = setup
    preds = tmp_path / "p.jsonl"
    rows = [{"id": i, "file": "PAN_test.json", "prediction": "???"} for i in range(6)]
    rows += [{"id": i, "file": "PAN_test_g.json", "prediction": r} for i, r in enumerate(GEN_REFS)]
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report.json"
    assert cli.main(["eval", "--data", str(data), "--predictions", str(preds), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["files"]["PAN_test.json"]["acc"] == 0.0 and report["files"]["PAN_test.json"]["acc_star"] is None
    assert report["files"]["PAN_test_g.json"]["bleu"] == pytest.approx(100.0)
    assert report["files"]["PAN_test_g.json"]["rouge_l"] == pytest.approx(100.0)
    assert report["families"]["social_factors"]["classification"]["acc_star"] is None

    out_g = tmp_path / "gen.json"
    _write_preds(preds, GEN_REFS)
    assert cli.main(["eval", "--data", str(data / "PAN_test_g.json"), "--predictions", str(preds), "--out", str(out_g)]) == 0
    assert json.loads(out_g.read_text())["rouge_l"] == pytest.approx(100.0)


@pytest.mark.parametrize("case, message", [
    ("missing_data", "data file not found"),
    ("bad_json", "p.jsonl:2: not valid JSON"),
    ("out_of_range", "id 6 out of range for PAN_test.json (6 samples)"),
    ("no_predictions", "predictions file not found"),
])
def test_cli_errors(setup, tmp_path, capsys, case, message):
    data, _, _ = setup
    preds = tmp_path / "p.jsonl"
    preds.write_text({"bad_json": '{"id": 0, "prediction": "male"}\n{"id": 1,\n',
                      "out_of_range": '{"id": 6, "prediction": "male"}\n'}.get(case, ""))
    args = ["--data", str(data / ("nope.json" if case == "missing_data" else "PAN_test.json")),
            "--predictions", str(tmp_path / "none.jsonl" if case == "no_predictions" else preds),
            "--out", str(tmp_path / "r.json")]
    assert cli.main(["eval", *args]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_cli_model_mode_and_subcommand(setup, tiny, monkeypatch, capsys):
    data, images, out = setup
    monkeypatch.setattr(cli, "load_model", lambda args: tiny)
    argv = ["eval", "--model", "tiny", "--data", str(data), "--images-root", str(images),
            "--out", str(out / "report.json"), "--mode", "rank", "--batch-size", "3", "--num-beams", "1",
            "--max-new-tokens", "2", "--generate-kwargs", '{"top_p": 0.8}', "--no-progress"]
    assert cli.main(argv) == 0
    assert sorted(_keys(out / "report.predictions.jsonl")) == ALL_KEYS
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["mode"] == "rank"
    assert report["settings"]["generation_options"]["top_p"] == 0.8
    # a resume with other decoding options is refused, naming the difference
    assert cli.main([a if a != "2" else "3" for a in argv]) == 1
    assert "options.max_new_tokens: 2 -> 3" in capsys.readouterr().err
