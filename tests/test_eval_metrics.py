"""Acc/Acc*, BLEU and ROUGE-L against their reference libraries, the judge hook, and scoring."""

from __future__ import annotations

import json

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from somelvlm.evaluate.metrics import accuracy, bleu, judge_score, option_counts, rouge_l
from somelvlm.evaluate.runner import read_predictions, score
from somelvlm.evaluate.tasks import load_tasks

PREDS = [
    "The sentiment of this combination is positive.",
    "It is a false news",
    "travelling. The user posts beaches and planes, so travel is the field.",
    "",
    "#BeachVibes #Summer #Sunset",
    "The users are running quickly",
]
REFS = [
    "The sentiment of this combination is positive.",
    "This news is false.",
    "travel. The image shows a beach, which suggests a focus on travel rather than fashion.",
    "It is neutral.",
    "#Sunset #BeachLife #SummerVibes",
    "The user runs quick",
]


def test_accuracy_and_acc_star():
    result = accuracy(["a", "b", "a", "b"], ["a", None, "b", "b"])
    assert result == {"n": 4, "correct": 2, "parseable": 3, "unparseable": 1, "acc": 50.0,
                      "acc_star": pytest.approx(200 / 3)}
    assert accuracy(["a", "b"], [None, None]) == {"n": 2, "correct": 0, "parseable": 0, "unparseable": 2,
                                                  "acc": 0.0, "acc_star": None}
    assert accuracy([], [])["acc"] is None
    with pytest.raises(ValueError, match="2 gold labels but 1 answers"):
        accuracy(["a", "b"], ["a"])


def test_option_counts():
    counts = option_counts(["male", "female", "female"], ["female", "female", None])
    assert counts == {"male": {"gold": 1, "predicted": 0, "correct": 0},
                      "female": {"gold": 2, "predicted": 2, "correct": 1}}


def test_bleu_matches_sacrebleu_13a():
    expected = sacrebleu.corpus_bleu(PREDS, [REFS], tokenize="13a").score
    assert bleu(PREDS, REFS) == pytest.approx(expected)
    assert bleu(REFS, REFS) == pytest.approx(100.0)
    assert bleu([], []) is None


def test_rouge_l_matches_rouge_score_with_stemming():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = 100 * sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(PREDS, REFS)) / len(PREDS)
    assert rouge_l(PREDS, REFS) == pytest.approx(expected)
    unstemmed = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    assert unstemmed.score(REFS[5], PREDS[5])["rougeL"].fmeasure < scorer.score(REFS[5], PREDS[5])["rougeL"].fmeasure
    with pytest.raises(ValueError, match="length mismatch"):
        rouge_l(PREDS, REFS[:2])


def test_judge_hook_gets_prompt_prediction_reference():
    calls = []

    def judge(prompt: str, prediction: str, reference: str) -> float:
        calls.append((prompt, prediction, reference))
        return 10.0 if prediction == reference else 4

    assert judge_score(judge, ["q1", "q2"], ["x", "y"], ["x", "z"]) == 7.0
    assert calls == [("q1", "x", "x"), ("q2", "y", "z")]
    assert judge_score(judge, [], [], []) is None


# ----------------------------------------------------------------------------------------------
# Scoring prediction files
# ----------------------------------------------------------------------------------------------
def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    cls = [{"text_input": "Is the user male or female?\nPick your answer from [male, female].",
            "text_output": gold, "image": f"{i}.jpg"} for i, gold in enumerate(["male", "female", "female", "male"])]
    gen = [{"text_input": f"Describe post {i}.", "text_output": ref, "image": "x.jpg"} for i, ref in enumerate(REFS)]
    (folder / "PAN_test.json").write_text(json.dumps(cls))
    (folder / "PAN_test_g.json").write_text(json.dumps(gen))
    return folder


def test_score_classification_file(data, tmp_path):
    preds = _write(tmp_path / "p.jsonl", [
        {"id": 0, "prediction": "The user is male."},
        {"id": 1, "prediction": "I'd say MALE"},
        {"id": 2, "prediction": "no idea"},
        {"id": 3, "prediction": "", "error": "image not found: 3.jpg"},
    ])
    report = score(data / "PAN_test.json", preds)
    assert report["task"] == "classification" and report["family"] == "social_factors"
    assert (report["n"], report["correct"], report["parseable"], report["failed"], report["missing"]) == (4, 1, 2, 1, 0)
    assert report["acc"] == 25.0 and report["acc_star"] == 50.0
    assert report["per_option"]["male"] == {"gold": 2, "predicted": 2, "correct": 1}
    assert report["failures"] == [{"file": "PAN_test.json", "id": 3, "error": "image not found: 3.jpg"}]


def test_score_generation_file_and_missing_predictions(data, tmp_path):
    preds = _write(tmp_path / "p.jsonl", [{"id": i, "prediction": p} for i, p in enumerate(PREDS) if i != 2])
    report = score(data / "PAN_test_g.json", preds)
    with_blank = [p if i != 2 else "" for i, p in enumerate(PREDS)]
    assert report["task"] == "generation" and report["missing"] == 1
    assert report["bleu"] == pytest.approx(sacrebleu.corpus_bleu(with_blank, [REFS]).score)
    assert report["rouge_l"] == pytest.approx(rouge_l(with_blank, REFS))


def test_score_folder_per_file_and_family(data, tmp_path):
    golds = ["male", "female", "female", "male"]
    records = [{"id": i, "file": "PAN_test.json", "prediction": g} for i, g in enumerate(golds)]
    records += [{"id": i, "file": "PAN_test_g.json", "prediction": r} for i, r in enumerate(REFS)]
    report = score(data, _write(tmp_path / "p.jsonl", records), judge=lambda q, p, r: float(p == r))
    assert set(report["files"]) == {"PAN_test.json", "PAN_test_g.json"}
    assert report["files"]["PAN_test.json"]["acc"] == 100.0
    assert report["files"]["PAN_test_g.json"]["judge"] == 1.0
    family = report["families"]["social_factors"]
    assert family["files"] == ["PAN_test.json", "PAN_test_g.json"]
    assert family["classification"]["acc"] == 100.0 and family["classification"]["n"] == 4
    assert family["generation"]["bleu"] == pytest.approx(100.0)
    assert report["n"] == 10 and report["failed"] == 0


@pytest.mark.parametrize("lines, message", [
    (['{"id": 0, "file": "PAN_test.json", "prediction": "male"}', '{"id": 1, "prediction": '],
     r"p.jsonl:2: not valid JSON"),
    (['{"id": 4, "file": "PAN_test.json", "prediction": "male"}'],
     r"p.jsonl:1: id 4 out of range for PAN_test.json \(4 samples\)"),
    (['{"id": -1, "file": "PAN_test.json", "prediction": "male"}'], "id -1 out of range"),
    (['{"id": "0", "file": "PAN_test.json", "prediction": "male"}'], "'id' must be an integer"),
    (['{"id": 0, "prediction": "male"}'], "p.jsonl:1: no 'file' key"),
    (['{"id": 0, "file": "nope.json", "prediction": "male"}'], "file 'nope.json' is not among the data files"),
    (['{"id": 0, "file": "PAN_test.json", "prediction": 3}'], "'prediction' must be a string"),
    (['{"id": 0, "file": "PAN_test.json", "prediction": "a"}', "",
      '{"id": 0, "file": "PAN_test.json", "prediction": "b"}'],
     r"p.jsonl:3: duplicate prediction for PAN_test.json id 0 \(first at .*p.jsonl:1\)"),
])
def test_prediction_file_errors(data, tmp_path, lines, message):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        read_predictions(path, load_tasks(data))


def test_missing_prediction_file(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="predictions file not found"):
        score(data, tmp_path / "none.jsonl")
