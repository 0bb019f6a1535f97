"""The evaluation runner with a fake model (grouping, resume, failures, rank mode) and the CLI."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from somelvlm import cli
from somelvlm.evaluate.runner import evaluate

CLS_IMAGES = ["a.jpg", "a.jpg", "b.jpg", "c.jpg", "b.jpg", "a.jpg"]
CLS_GOLDS = ["male", "female", "female", "male", "male", "female"]
GEN_IMAGES = ["b.jpg", "a.jpg", "d.jpg", "c.jpg"]
GEN_REFS = ["The user is male.", "The gender is female.", "This user is female.", "It is male."]


class FakeFeatures:
    def __init__(self, paths: list[str]) -> None:
        self.paths = list(paths)

    def select(self, indices: list[int]) -> "FakeFeatures":
        return FakeFeatures([self.paths[i] for i in indices])

    def __len__(self) -> int:
        return len(self.paths)


class FakeModel:
    """Answers from a prompt -> answer table, checking that each prompt gets its own image."""

    def __init__(self, task_dir: Path, stop_after: int | None = None) -> None:
        self.answers, self.gold, self.image = {}, {}, {}
        for path in task_dir.glob("*.json"):
            for s in json.loads(path.read_text()):
                self.image[s["text_input"]] = s["image"]
                self.gold[s["text_input"]] = s["text_output"]
                self.answers[s["text_input"]] = f"I think it is {s['text_output']}."
        self.stop_after = stop_after
        self.encoded: list[list[str]] = []
        self.generated: list[list[str]] = []
        self.ranked: list[str] = []
        self.kwargs: list[dict] = []

    def encode_images(self, images: list[str]) -> FakeFeatures:
        for path in images:
            Image.open(path).load()  # raises for a broken file, like a real model
        self.encoded.append([Path(p).name for p in images])
        return FakeFeatures(images)

    def generate(self, images: FakeFeatures, prompts: list[str], **kwargs) -> list[str]:
        assert isinstance(images, FakeFeatures) and len(images) == len(prompts)
        if len(self.generated) == self.stop_after:
            raise KeyboardInterrupt
        assert [Path(p).name for p in images.paths] == [self.image[q] for q in prompts]
        self.generated.append(list(prompts))
        self.kwargs.append(kwargs)
        return [self.answers[q] for q in prompts]

    def rank(self, image: str, prompt: str, candidates: list[str]) -> list[tuple[str, float]]:
        Image.open(image).load()
        assert Path(image).name == self.image[prompt]
        self.ranked.append(prompt)
        best = self.gold[prompt]
        return [(best, -0.5)] + [(c, -2.0 - i) for i, c in enumerate(c for c in candidates if c != best)]


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


def test_each_image_encoded_once_and_prompts_batched(setup):
    data, images, out = setup
    model = FakeModel(data)
    report = evaluate(model, data, images, out, batch_size=2, generate_kwargs={"num_beams": 1}, progress=False)

    assert sorted(n for call in model.encoded for n in call) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert len(model.encoded) == 2 and all(len(call) <= 2 for call in model.encoded)
    assert all(1 <= len(call) <= 2 for call in model.generated)
    assert sorted(q for call in model.generated for q in call) == sorted(model.answers)
    assert model.kwargs == [{"num_beams": 1}] * len(model.generated)

    assert sorted(_keys(out / "predictions.jsonl")) == ALL_KEYS
    cls = report["files"]["PAN_test.json"]
    assert (cls["acc"], cls["acc_star"], cls["failed"]) == (100.0, 100.0, 0)
    assert report["files"]["PAN_test_g.json"]["bleu"] > 0
    assert (out / "report.json").is_file() and (out / "report.md").is_file()
    row = "| PAN_test.json | social_factors | classification | 6 | 100.00 | 100.00 |"
    assert row in (out / "report.md").read_text()
    assert bool(list(out.glob("*.png"))) == (importlib.util.find_spec("matplotlib") is not None)


def test_resume_after_interruption(setup):
    data, images, out = setup
    first = FakeModel(data, stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        evaluate(first, data, images, out, batch_size=2, progress=False)
    preds = out / "predictions.jsonl"
    assert len(_lines(preds)) == 4  # two finished generate calls of two prompts
    with preds.open("a") as fh:
        fh.write('{"id": 5, "file": "PAN_te')  # a write cut short by the interruption

    second = FakeModel(data)
    report = evaluate(second, data, images, out, batch_size=2, progress=False)
    assert sorted(_keys(preds)) == ALL_KEYS  # nothing lost, nothing twice
    done_first = {q for call in first.generated for q in call}
    done_second = {q for call in second.generated for q in call}
    assert not done_first & done_second and len(done_second) == 6
    assert report["files"]["PAN_test.json"]["acc"] == 100.0

    third = FakeModel(data)
    evaluate(third, data, images, out, batch_size=2, progress=False)
    assert third.encoded == [] and third.generated == [] and len(_lines(preds)) == 10


def test_missing_and_unreadable_images_are_failures(setup):
    data, images, out = setup
    (images / "broken.jpg").write_bytes(b"not an image")
    samples = json.loads((data / "PAN_test.json").read_text())
    samples[2]["image"], samples[3]["image"] = "missing.jpg", "broken.jpg"
    (data / "PAN_test.json").write_text(json.dumps(samples))
    gen = json.loads((data / "PAN_test_g.json").read_text())
    gen[0]["image"] = "missing.jpg"
    (data / "PAN_test_g.json").write_text(json.dumps(gen))

    model = FakeModel(data)
    report = evaluate(model, data, images, out, batch_size=4, progress=False)
    cls = report["files"]["PAN_test.json"]
    assert (cls["n"], cls["failed"], cls["parseable"], cls["correct"]) == (6, 2, 4, 4)
    assert cls["acc"] == pytest.approx(400 / 6) and cls["acc_star"] == 100.0
    errors = {f["id"]: f["error"] for f in cls["failures"]}
    assert errors.keys() == {2, 3} and "image not found" in errors[2] and "unreadable image" in errors[3]
    assert errors[2].endswith("missing.jpg") and "broken.jpg" in errors[3]
    assert report["files"]["PAN_test_g.json"]["failed"] == 1 and report["failed"] == 3

    lines = {(r["file"], r["id"]): r for r in _lines(out / "predictions.jsonl")}
    assert sorted(lines) == ALL_KEYS
    assert "error" in lines["PAN_test.json", 2] and "error" in lines["PAN_test_g.json", 0]
    assert "missing.jpg" in (out / "report.md").read_text()


def test_rank_mode(setup):
    data, images, out = setup
    model = FakeModel(data)
    report = evaluate(model, data, images, out, mode="rank", progress=False)
    assert len(model.ranked) == 6
    assert all(q.endswith("?") for call in model.generated for q in call)  # only generation prompts
    cls = report["files"]["PAN_test.json"]
    assert (cls["acc"], cls["acc_star"], cls["parseable"]) == (100.0, 100.0, 6)
    ranked = [r for r in _lines(out / "predictions.jsonl") if r["file"] == "PAN_test.json"]
    assert all(r["prediction"] == r["ranking"][0][0] and len(r["ranking"]) == 2 for r in ranked)


def test_limit_and_single_file(setup):
    data, images, out = setup
    report = evaluate(FakeModel(data), data / "PAN_test.json", images, out, limit=2, progress=False)
    assert report["n"] == 2 and report["acc"] == 100.0 and report["settings"]["limit"] == 2
    assert sorted(_keys(out / "predictions.jsonl")) == [("PAN_test.json", 0), ("PAN_test.json", 1)]


def test_bad_arguments(setup):
    data, images, out = setup
    with pytest.raises(ValueError, match="mode must be"):
        evaluate(FakeModel(data), data, images, out, mode="beam")
    with pytest.raises(FileNotFoundError, match="data file not found"):
        evaluate(FakeModel(data), data / "nope.json", images, out)


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
    ("bad_json", "line 2: not valid JSON"),
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


def test_cli_model_mode_and_subcommand(setup, monkeypatch):

    data, images, out = setup
    model = FakeModel(data)
    monkeypatch.setattr(cli, "load_model", lambda args: model)
    parser = cli.build_parser()
    args = parser.parse_args(["eval", "--model", "some/dir", "--data", str(data), "--images-root", str(images),
                              "--out", str(out / "report.json"), "--mode", "rank", "--batch-size", "3",
                              "--num-beams", "2", "--generate-kwargs", '{"top_p": 0.9}', "--no-progress"])
    assert args.func(args) == 0
    assert model.kwargs and all(k == {"num_beams": 2, "top_p": 0.9} for k in model.kwargs)
    assert len(model.ranked) == 6
    assert sorted(_keys(out / "report.predictions.jsonl")) == ALL_KEYS
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["mode"] == "rank" and report["files"]["PAN_test.json"]["acc"] == 100.0
