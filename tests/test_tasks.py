"""Task files in and answers out (`somelvlm.tasks`): formats, bad records, the resumable writer,
run settings, templates, and the `generate --input` CLI on the real tiny model."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import write_images
from somelvlm import SoMeLVLM
from somelvlm.tasks.records import Columns, Problems, read_tasks
from somelvlm.tasks.templates import TEMPLATES, fill

FAST = ["--max-new-tokens", "4", "--num-beams", "1", "--no-progress"]


@pytest.fixture(scope="module")
def tiny():
    return SoMeLVLM.from_config("tiny")


@pytest.fixture()
def images(tmp_path) -> Path:
    return write_images(tmp_path / "imgs", ("a.png", "b.png"), (16, 16), 3,
                        ("corrupt.jpg", b"\xff\xd8\xff\xe0 truncated jpeg"))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "somelvlm", *args], capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("somelvlm generate: error: ")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def reference_answers(model, tasks: list[dict], root: Path) -> dict:
    """One independent `generate` call per task: what every engine must reproduce."""
    return {t["id"]: model.generate(str(root / t["image"]), [t["prompt"]], num_beams=1, max_new_tokens=4)[0]
            for t in tasks}


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
GOOD = [{"id": "p1", "prompt": "first?", "image": "a.png", "user": "u1"},
        {"id": "p2", "prompt": "second?", "image": "b.png", "user": "u2"},
        {"id": 3, "prompt": "text only?", "user": "u3"}]


def _write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, ["id", "prompt", "image", "user"])
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([{**r, "id": str(r["id"])} for r in rows]), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_format_reads_the_same_tasks(tmp_path, images, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    path = _write(tmp_path / f"t{suffix}", GOOD)
    tasks = read_tasks(path, images, Columns(keep=("user",)))
    assert [str(t.id) for t in tasks] == ["p1", "p2", "3"]
    assert [t.prompt for t in tasks] == [r["prompt"] for r in GOOD]
    assert tasks[0].image == images / "a.png" and tasks[2].image is None  # CSV's empty cell: text only
    assert [t.extra for t in tasks] == [{"user": r["user"]} for r in GOOD]


def test_parquet_image_bytes_and_custom_columns(tmp_path, images):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    png = (images / "a.png").read_bytes()
    pq.write_table(pa.table({"post": ["hello", "world"], "pic": [png, png],
                             "key": ["x", "y"]}), tmp_path / "t.parquet")
    tasks = read_tasks(tmp_path / "t.parquet", columns=Columns(prompt="post", image="pic", id="key"),
                       template=TEMPLATES["hate"])
    assert [t.id for t in tasks] == ["x", "y"] and tasks[0].image == png
    assert tasks[0].prompt == fill("hate", "hello") and "'hello'" in tasks[0].prompt
    assert tasks[0].image_key == tasks[1].image_key  # same bytes: encoded once


def test_bad_records_reported_with_file_line_and_skipped(tmp_path):
    lines = [json.dumps({"id": 1, "prompt": "ok", "image": "a.png"}).encode(),
             b'{"id": [1, 2], "prompt": "list id", "image": "a.png"}',
             b'{"id": {"a": 1}, "prompt": "dict id", "image": "a.png"}',
             b'{"id": 4, "prompt": "lone \\ud800 surrogate", "image": "a.png"}',
             b'{"id": 5, "prompt": "latin-1 \xe9 byte", "image": "a.png"}',
             b"{broken",
             b'{"id": 1, "prompt": "duplicate", "image": "a.png"}',
             b'{"id": 8, "image": "a.png"}',
             json.dumps({"id": 9, "prompt": "also ok", "image": "b.png"}).encode()]
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    problems = Problems()
    tasks = read_tasks(path, problems=problems)
    assert [t.id for t in tasks] == [1, 9]
    found = problems.lines()
    for line, why in [(2, "must be a string or an integer"), (3, "must be a string or an integer"),
                      (4, "not valid UTF-8"), (5, "not valid UTF-8"), (6, "not valid JSON"),
                      (7, "duplicate id 1"), (8, "needs a non-empty string")]:
        assert any(f"t.jsonl:{line}: " in f and why in f for f in found), (line, why, found)
    assert len(found) == 7


def test_json_list_numbers_records_from_one_by_line(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('[\n  {"prompt": "a", "image": "x.png"},\n  {"prompt": 5},\n  {"prompt": "c"}\n]\n')
    problems = Problems()
    tasks = read_tasks(path, problems=problems)
    assert [t.id for t in tasks] == [0, 2]  # default ids: 0-based positions
    assert problems.lines()[0].startswith(f"{path}:3 (record 2): needs a non-empty string")


def test_templates_carry_somedata_wording():
    for name, text in TEMPLATES.items():
        assert text.count("{text}") == 1, name
    with pytest.raises(ValueError, match="unknown --task 'nope'; known: hate, sentiment"):
        from somelvlm.tasks.templates import template

        template("nope")


# ------------------------------------------------------------------------------------------------
# generate --input through the real CLI: bad records, corrupt images, outputs that are not ours
# ------------------------------------------------------------------------------------------------
def test_bad_records_and_corrupt_image_do_not_stop_the_batch(tiny, tmp_path, images):
    good = [{"id": "a", "prompt": "what is it?", "image": "a.png"}, {"id": "b", "prompt": "and this?", "image": "b.png"}]
    lines = [json.dumps(good[0]).encode(), b'{"id": ["x"], "prompt": "p", "image": "a.png"}',
             b'{"id": "s", "prompt": "\\udc80", "image": "a.png"}', b'{"id": "u", "prompt": "\xff\xfe", "image": "a.png"}',
             json.dumps({"id": "c", "prompt": "corrupt", "image": "corrupt.jpg"}).encode(), json.dumps(good[1]).encode()]
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "answers.jsonl"
    proc = cli("generate", "--input", str(tasks), "--output", str(out), "--images-root", str(images), *FAST)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    for line in (2, 3, 4, 5):
        assert f"tasks.jsonl:{line}: " in proc.stderr, (line, proc.stderr)
    assert "failed 4" in proc.stderr and "retried when you rerun" in proc.stderr
    got = {r["id"]: r["answer"] for r in rows_of(out)}
    assert got == reference_answers(tiny, good, images)
    # fix the image: the rerun answers exactly the task that failed on it
    Image.new("RGB", (9, 9), (1, 2, 3)).save(images / "corrupt.jpg", format="PNG")
    proc = cli("generate", "--input", str(tasks), "--output", str(out), "--images-root", str(images), *FAST)
    assert "answered 1, already done 2" in proc.stderr, proc.stderr
    assert sorted(r["id"] for r in rows_of(out)) == ["a", "b", "c"]


def test_output_that_is_the_input_or_not_ours_is_refused_untouched(tmp_path, images):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": 1, "prompt": "p", "image": "a.png"}) + "\n")
    before = tasks.read_bytes()
    proc = cli("generate", "--input", str(tasks), "--output", str(tasks), "--images-root", str(images), *FAST)
    assert_one_line_error(proc, "is the input file")
    assert tasks.read_bytes() == before
    theirs = tmp_path / "notes.jsonl"
    theirs.write_text('{"mine": 1}\n{"last line without newline": 2}')
    proc = cli("generate", "--input", str(tasks), "--output", str(theirs), "--images-root", str(images), *FAST)
    assert_one_line_error(proc, "notes.jsonl", "is not a somelvlm output")
    assert theirs.read_text() == '{"mine": 1}\n{"last line without newline": 2}'


def test_resume_with_other_settings_is_refused_unless_force(tmp_path, images):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"id": i, "prompt": f"q{i}", "image": "a.png"}) + "\n" for i in range(2)))
    out = tmp_path / "out.jsonl"
    base = ["generate", "--input", str(tasks), "--output", str(out), "--images-root", str(images), *FAST]
    assert cli(*base).returncode == 0
    record = json.loads((tmp_path / "out.jsonl.somelvlm.json").read_text())["settings"]
    assert record["model"] == "tiny" and record["options"]["max_new_tokens"] == 4 and record["dtype"] == "float32"
    assert record["version"] and record["config_hash"]
    with out.open("a") as fh:
        fh.write('{"id": 7, "ans')  # torn by a kill: ours, so it is repaired
    proc = cli(*base[:-len(FAST)], "--max-new-tokens", "5", "--num-beams", "1", "--no-progress")
    assert_one_line_error(proc, "options.max_new_tokens: 4 -> 5", "--force")
    assert out.read_text().endswith('"ans')  # refused before touching anything
    proc = cli(*base[:-len(FAST)], "--max-new-tokens", "5", "--num-beams", "1", "--no-progress", "--force")
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["id"] for r in rows_of(out)) == [0, 1]


def test_keep_columns_task_template_and_parquet_output(tiny, tmp_path, images, fmt="parquet"):
    """Parquet in and out (CSV in is covered by the reader tests above)."""
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    posts = [{"id": "p1", "text": "I love this", "image": "a.png", "user": "u1"},
             {"id": "p2", "text": "so sad", "image": "b.png", "user": "u2"}]
    path = tmp_path / f"posts.{fmt}"
    if fmt == "csv":
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, list(posts[0]))
            w.writeheader()
            w.writerows(posts)
    else:
        import pyarrow as pa

        pq.write_table(pa.Table.from_pylist(posts), path)
    out = tmp_path / "answers.parquet"
    proc = cli("generate", "--input", str(path), "--output", str(out), "--images-root", str(images),
               "--task", "sentiment", "--prompt-column", "text", "--keep-columns", "user", *FAST)
    assert proc.returncode == 0, proc.stderr
    rows = pq.read_table(out).to_pylist()
    want = reference_answers(tiny, [{"id": p["id"], "image": p["image"], "prompt": fill("sentiment", p["text"])}
                                    for p in posts], images)
    assert {r["id"]: r["answer"] for r in rows} == want
    assert {r["id"]: r["user"] for r in rows} == {"p1": "u1", "p2": "u2"}
    assert cli("generate", "--help").stdout.count("sentiment (MVSA_Single)") == 1


def test_text_only_tasks_are_answered_apart_from_image_tasks(tiny, tmp_path, images):
    from somelvlm.options import GenerationOptions
    from somelvlm.tasks import answer_tasks

    rows = [{"id": 1, "prompt": "a post with a photo?", "image": "a.png"}, {"id": 2, "prompt": "just text?"},
            {"id": 3, "prompt": "more text?", "image": ""}, {"id": 4, "prompt": "photo again?", "image": "a.png"}]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from somelvlm.tasks import answer as answer_module

    seen, got = [], {}
    real = answer_module.answer_stream

    def spy(model, requests, max_batch=8):  # what the loop hands the scheduler
        return real(model, (seen.append(r) or r for r in requests), max_batch)

    answer_module.answer_stream = spy
    try:
        answer_tasks(tiny, read_tasks(path, images), GenerationOptions(num_beams=1, max_new_tokens=4),
                     lambda t, a: got.__setitem__(t.id, a), lambda t, e: pytest.fail(e))
    finally:
        answer_module.answer_stream = real
    # text-only posts first, without a soft prompt; both photo posts share one encoded image
    assert [(r.prompt, r.image is None) for r in seen] == [("just text?", True), ("more text?", True),
                                                           ("a post with a photo?", False), ("photo again?", False)]
    assert seen[2].image.embeds is seen[3].image.embeds
    for r in rows:
        image = str(images / r["image"]) if r.get("image") else None
        assert got[r["id"]] == tiny.generate(image, [r["prompt"]], num_beams=1, max_new_tokens=4)[0]


def test_images_decoded_ahead_in_workers_give_the_same_answers(tiny, tmp_path, images):
    """--num-workers: images decoded and preprocessed by DataLoader worker processes, a broken one
    failing only its own tasks; answers identical to decoding in this process."""
    from somelvlm.options import GenerationOptions
    from somelvlm.tasks import answer_tasks

    (images / "broken.png").write_bytes(b"\x89PNG not really")
    rows = [{"id": i, "prompt": f"question {i}?", "image": name}
            for i, name in enumerate(["a.png", "b.png", "broken.png", "a.png", "b.png"])]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = []
    for workers in (0, 2):
        got, failed = {}, {}
        answer_tasks(tiny, read_tasks(path, images), GenerationOptions(num_beams=2, max_new_tokens=4),
                     lambda t, a: got.__setitem__(t.id, a), lambda t, e: failed.__setitem__(t.id, e),
                     batch_size=2, num_workers=workers)
        results.append((got, failed))
    assert results[0] == results[1]
    got, failed = results[1]
    assert sorted(got) == [0, 1, 3, 4] and list(failed) == [2] and "broken.png" in failed[2]
