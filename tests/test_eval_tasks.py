"""SoMeData task reading: option extraction (every wording), families, answer parsing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from somelvlm.evaluate.runner import score, write_report
from somelvlm.evaluate.tasks import extract_options, family_of, load_task, load_tasks, parse_answer

SHARED = Path(os.environ.get("SOMELVLM_SHARED", Path(__file__).resolve().parents[2] / "shared"))
IN_DOMAIN = SHARED / "somedata" / "in_domain"
GENERATION_NAMES = ("_test_g.json", "hashtag_gen_test.json", "domain_explain_test.json",
                    "personality_explain_test.json")
ABSENT = pytest.param(None, marks=pytest.mark.skip(reason=f"SoMeData test sets not found at {IN_DOMAIN} "
                                                          "(set SOMELVLM_SHARED to the shared/ folder)"))


def _somedata(generation: bool) -> list:
    files = sorted(IN_DOMAIN.glob("*.json")) if IN_DOMAIN.is_dir() else []
    chosen = [f for f in files if f.name.endswith(GENERATION_NAMES) == generation]
    return [pytest.param(f, id=f.name) for f in chosen] or [ABSENT]


def write_task(path: Path, samples: list[tuple[str, str]], image: str = "a.jpg") -> Path:
    path.write_text(json.dumps([{"text_input": q, "text_output": a, "image": image} for q, a in samples]))
    return path


def write_predictions(path: Path, answers: dict[int, str], file: str | None = None) -> Path:
    lines = [{"id": i, "prediction": a} | ({"file": file} if file else {}) for i, a in answers.items()]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


# ----------------------------------------------------------------------------------------------
# The real SoMeData test sets (skipped when shared/ is absent)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", _somedata(generation=False))
def test_somedata_classification_options_contain_gold(path):
    task = load_task(path)
    assert task.kind == "classification"
    assert task.family != "other"
    for s in task.samples:
        assert task.options[s.id] and s.reference in task.options[s.id], (s.id, task.options[s.id], s.reference)


@pytest.mark.parametrize("path", _somedata(generation=True))
def test_somedata_generation_files_detected(path):
    task = load_task(path)
    assert task.kind == "generation"
    assert task.family != "other"
    assert all(task.options[s.id] is None for s in task.samples)


WRAPPERS = ("{}", "The answer is {}.", "I think it is {}.", "Answer: {}!", "{upper}", "**{}**\n\nBecause reasons.")


@pytest.mark.parametrize("path", _somedata(generation=False))
def test_somedata_gold_wrapped_and_garbage_scores(path, tmp_path):
    task = load_task(path)
    n = len(task.samples)
    for k, wrapper in enumerate(WRAPPERS):
        answers = {s.id: wrapper.format(s.reference, upper=s.reference.upper()) for s in task.samples}
        report = score(path, write_predictions(tmp_path / f"w{k}.jsonl", answers))
        assert (report["acc"], report["acc_star"], report["parseable"]) == (100.0, 100.0, n), wrapper

    garbage = write_predictions(tmp_path / "g.jsonl", {s.id: "I cannot tell, sorry." for s in task.samples})
    out = tmp_path / "report.json"
    write_report(score(path, garbage), out)
    report = json.loads(out.read_text())
    assert (report["acc"], report["acc_star"], report["parseable"], report["n"]) == (0.0, None, 0, n)


# ----------------------------------------------------------------------------------------------
# Option extraction on synthetic prompts
# ----------------------------------------------------------------------------------------------
POST = "This image is associated with the following caption: 'a day [at, the] beach'.\nIs it hateful?\n"
WORDINGS = [
    ("Pick from: [true, false]", ["true", "false"]),
    ("Choices: [true, false]", ["true", "false"]),
    ("Choice: [true, false]", ["true", "false"]),
    ("Options: [true, false]", ["true", "false"]),
    ("Options are: [male, female]", ["male", "female"]),
    ("Possible options: [male, female]", ["male", "female"]),
    ("Available options: [true, false]", ["true", "false"]),
    ("Possible answers: [true, false]", ["true", "false"]),
    ("Available answers: [positive, neutral, negative].", ["positive", "neutral", "negative"]),
    ("Available choices: [left, center, right].", ["left", "center", "right"]),
    ("Select your answer from [left, right].", ["left", "right"]),
    ("Pick your answer from [male, female].", ["male", "female"]),
    ("Pick your answer form [right, center, left].", ["right", "center", "left"]),
    ("Choose from [positive, neutral, negative].", ["positive", "neutral", "negative"]),
    ("Choose from: [true, false]", ["true", "false"]),
    ("Choose your answer from: [true, false]", ["true", "false"]),
    ("Choose from the following: [male, female]", ["male", "female"]),
    ("Pick from the following: [true, false]", ["true", "false"]),
    ("Select from: [true, false]", ["true", "false"]),
    ("Select from the following: [positive, neutral, negative].", ["positive", "neutral", "negative"]),
    ("Please select from the options: [left, right].", ["left", "right"]),
    ("Constraint: Only choose one word as the output from [true, false]", ["true", "false"]),
    ("Options: only output one word from [positive, neutral, negative].", ["positive", "neutral", "negative"]),
    ("Choices: [#safari, #snowboarding, #desert, #FadoMusic]\n"
     "Constraints: Pick a single hashtag, ensuring it starts with #.",
     ["#safari", "#snowboarding", "#desert", "#FadoMusic"]),
    ("Options: ['not hateful', \"hateful\"]", ["not hateful", "hateful"]),
    ("Possible answers: [strongly agree, agree, disagree]", ["strongly agree", "agree", "disagree"]),
    ("Pick your answer from: positive, neutral, or negative.", ["positive", "neutral", "negative"]),
    ("Choose from: yes or no", ["yes", "no"]),
    ("Pick from the following: true, false", ["true", "false"]),
    ("Options are: very negative, negative, positive.", ["very negative", "negative", "positive"]),
]


@pytest.mark.parametrize("cue, options", WORDINGS, ids=[w[0].split("\n")[0] for w in WORDINGS])
def test_options_every_wording(cue, options, tmp_path):
    path = write_task(tmp_path / "x_test.json", [(POST + cue, options[-1])])
    task = load_task(path)
    assert task.kind == "classification"
    assert list(task.options[0]) == options


@pytest.mark.parametrize("prompt", [
    "What sentiment does this combination convey?",
    "This image is associated with the caption: 'shop now [50% off, today only]'.",
    "caption: 'options [left, right]' by @user\nWhat field does the user belong to?",
    "What's the personality of this user?\nConstraints: First give the personality and explain it in one sentence.",
    "Caption: 'I bought it from [Amazon]'.",
    "Give three hashtags: one per line.",
    "Answer the question: who, what, or where?",
    "Pick your answer and explain: first the label, then one sentence.",
    "",
])
def test_generation_prompts_have_no_options(prompt):
    assert extract_options(prompt) is None


def test_last_cue_list_wins_over_bracketed_post_text():
    prompt = "Options: [a, b]\nCaption: 'choose [this, that]'.\nPick from: [true, false]\n"
    assert extract_options(prompt) == ("true", "false")
    assert extract_options("Choose from [x, y]\nPost: I love it [really, truly]") == ("x", "y")


def test_mixed_file_rejected(tmp_path):
    path = write_task(tmp_path / "mixed.json", [("Choices: [a, b]", "a"), ("Why?", "because")])
    with pytest.raises(ValueError, match=r"mixed.json: 1 of 2 prompts list label options .*\[1\]"):
        load_task(path)


def test_load_errors_are_clear(tmp_path):
    """A missing file or folder raises; a bad record is reported with FILE:LINE and skipped."""
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_task(tmp_path / "nope.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.json task files"):
        load_tasks(tmp_path / "empty")
    cases = {"bad.json": ("[{", "bad.json:1: not valid JSON"),
             "obj.json": ('{"text_input": "x"}', "obj.json:1: expected a JSON list"),
             "key.json": ('[\n {"text_output": "a", "image": "a.jpg", "text_input": "Choices: [a, b]"},\n'
                          ' {"text_input": "x", "image": "a.jpg"}\n]',
                          "key.json:3 (record 2): 'text_output' is missing or empty")}
    for name, (text, problem) in cases.items():
        (tmp_path / name).write_text(text)
        task = load_task(tmp_path / name)
        assert any(problem in p for p in task.problems), (name, task.problems)
    assert [s.id for s in load_task(tmp_path / "key.json").samples] == [0]


def test_folder_is_read_in_name_order(tmp_path):
    write_task(tmp_path / "b_test.json", [("Why?", "x")])
    write_task(tmp_path / "a_test.json", [("Choices: [x, y]", "x")])
    (tmp_path / "notes.txt").write_text("ignored")
    assert [t.name for t in load_tasks(tmp_path)] == ["a_test.json", "b_test.json"]


@pytest.mark.parametrize("name, family", [
    ("4chans_test.json", "hate"), ("HatefulMemes_test_g.json", "hate"), ("MMHS_test_g.json", "hate"),
    ("MMHS150K_test.json", "hate"), ("FakeNewsNet_test.json", "misinformation"),
    ("MVSA_Single_test_id.json", "sentiment"), ("MVSA_Multiple_test_g.json", "sentiment"),
    ("TumEmo_test.json", "sentiment"), ("Tweet_cele_test.json", "ideology"), ("Tweet_leg_test_g.json", "ideology"),
    ("PAN_test.json", "social_factors"), ("hashtag_choice_test.json", "social_factors"),
    ("domain_explain_test.json", "explanation"), ("personality_explain_test.json", "explanation"),
    ("hashtag_gen_test.json", "hashtag_generation"), ("my_new_set_test.json", "other"), ("PANDA.json", "other"),
])
def test_family_table(name, family):
    assert family_of(name) == family


# ----------------------------------------------------------------------------------------------
# Answer parsing
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, answer, expected", [
    (["male", "female"], "female", "female"),
    (["male", "female"], "I think it is female.", "female"),
    (["male", "female"], "The user is MALE.", "male"),
    (["male", "female"], "Female, not male", "female"),
    (["NotHate", "Hate"], "NotHate", "NotHate"),
    (["Hate", "NotHate"], "The meme is nothate.", "NotHate"),
    (["NotHate", "Hate"], "It is Hate", "Hate"),
    (["NotHate", "Racist"], "The answer is Racist.", "Racist"),
    (["hateful", "not hateful"], "not hateful", "not hateful"),  # the longer option starts first
    (["true", "false"], "not true", "true"),  # negations are not understood (documented)
    (["true", "false"], "True or false? It is false.", "true"),  # first mentioned wins
    (["true", "false"], "It's false rather than true", "false"),
    (["left", "right"], "Right-leaning, not left", "right"),
    (["hate", "hate speech"], "hate speech.", "hate speech"),  # same position: the longest wins
    (["#desert", "#desserts"], "#desserts", "#desserts"),
    (["#desert", "#desserts"], "The best one is desert", "#desert"),
    (["#safari", "#FadoMusic"], "#fadomusic!", "#FadoMusic"),
    (["true", "false"], "  TRUE!!! ", "true"),
    (["true", "false"], "**False**", "false"),
    (["positive", "neutral", "negative"], "Positive.", "positive"),
    (["strongly agree", "agree"], "I strongly agree", "strongly agree"),
    (["true", "false"], "truely untrue", None),
    (["male", "female"], "I don't know", None),
    (["true", "false"], "", None),
])
def test_parse_answer(options, answer, expected):
    assert parse_answer(answer, options) == expected
