"""Bad input through the real CLI on the tiny model: each case exits non-zero with one line that
names the problem (`somelvlm CMD: error: ...`) and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from somelvlm.cli import main
from somelvlm.processing import SAMPLE_IMAGE, asset_path

IMG = str(asset_path(SAMPLE_IMAGE))
GEN = ["generate", "--image", IMG, "--prompt", "what?", "--max-new-tokens", "2"]


def _files(tmp: Path) -> dict[str, str]:
    (tmp / "tasks.jsonl").write_text(json.dumps({"id": 1, "image": IMG, "prompt": "q"}) + "\n")
    Image.new("RGB", (8, 8)).save(tmp / "ok.png")
    (tmp / "data").mkdir()
    return {"TMP": str(tmp), "TASKS": str(tmp / "tasks.jsonl")}


# (case, argv with {TMP}/{TASKS} placeholders, expected exit code, text the one error line must contain)
CASES = [
    ("num_beams_zero", GEN + ["--num-beams", "0"], 1, "num_beams must be >= 1"),
    ("temperature_negative", GEN + ["--do-sample", "--temperature", "-1"], 1, "temperature must be >= 0"),
    ("temperature_nan", GEN + ["--do-sample", "--temperature", "nan"], 1, "temperature must be a finite number"),
    ("top_p_zero", GEN + ["--do-sample", "--top-p", "0"], 1, "top_p must be in (0, 1]"),
    ("top_p_above_one", GEN + ["--do-sample", "--top-p", "1.5"], 1, "top_p must be in (0, 1]"),
    ("repetition_penalty_zero", GEN + ["--repetition-penalty", "0"], 1, "repetition_penalty must be > 0"),
    ("min_above_max", GEN + ["--min-new-tokens", "5"], 1, "minimum length (5 new tokens) is above the maximum (2)"),
    ("max_new_tokens_beyond_positions", ["generate", "--image", IMG, "--prompt", "q", "--num-beams", "1",
                                         "--max-new-tokens", "100000"], 1, "exceeds the model's 1024 positions"),
    ("stream_with_beams", GEN + ["--stream", "--num-beams", "3"], 1, "a beam search cannot stream"),
    ("device_cuda_without_gpu", GEN + ["--device", "cuda"], 1, "--device cuda:"),
    ("device_nonsense", GEN + ["--device", "gpu7"], 1, "is not a device name"),
    ("device_map_with_tiny", GEN + ["--device-map", "auto"], 1, "--device-map needs a model folder"),
    ("device_and_device_map", GEN + ["--device", "cpu", "--device-map", "auto"], 1,
     "give --device or --device-map, not both"),
    ("image_missing", ["generate", "--image", "{TMP}/nope.jpg", "--prompt", "q"], 1, "image not found: "),
    ("model_folder_missing", GEN + ["--model", "{TMP}/no-such-model"], 1, "no-such-model"),
    ("input_without_output", ["generate", "--input", "{TASKS}"], 1, "--input and --output go together"),
    ("input_missing", ["generate", "--input", "{TMP}/none.jsonl", "--output", "{TMP}/o.jsonl"], 1,
     "tasks file not found"),
    ("num_workers_negative", ["generate", "--input", "{TASKS}", "--output", "{TMP}/o.jsonl", "--num-workers", "-1"],
     1, "--num-workers must be >= 0"),
    ("eval_data_missing", ["eval", "--data", "{TMP}/none.json", "--out", "{TMP}/r.json"], 1, "data file not found"),
    ("eval_bad_judge", ["eval", "--data", "{TMP}/data", "--out", "{TMP}/r.json", "--judge", "nojudge"], 1,
     "--judge must look like MODULE:FUNCTION"),
    ("eval_unknown_generate_kwarg", ["eval", "--data", "{TMP}/data", "--out", "{TMP}/r.json",
                                     "--generate-kwargs", '{"beams": 2}'], 1, "unknown generation option(s) ['beams']"),
    ("convert_without_source", ["convert", "--out", "{TMP}/out"], 1, "give exactly one source"),
]


@pytest.mark.parametrize("case, argv, code, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, argv, code, message, tmp_path, capsys):
    values = _files(tmp_path)
    argv = [a.format(**values) if "{" in a and not a.startswith("{\"") else a for a in argv]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err
    assert message in errors[0], err


def test_a_bad_option_fails_before_the_model_loads(tmp_path):
    """A subprocess with a model path that does not exist: the option error must come first."""
    r = subprocess.run([sys.executable, "-m", "somelvlm", "generate", "--model", str(tmp_path / "none"),
                        "--image", IMG, "--prompt", "q", "--top-p", "2", "--do-sample"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["somelvlm generate: error: invalid generation option: top_p must be "
                                             "in (0, 1], got 2.0"]
