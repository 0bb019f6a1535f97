"""`somelvlm demo`: the real Gradio app on 127.0.0.1 with the tiny model, driven headless through
`gradio_client`, and once in a real headless Chromium (skipped when chromium is absent)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from conftest import require_shared  # noqa: E402
from serve_helpers import free_port  # noqa: E402

from somelvlm.evaluate.tasks import extract_options, parse_answer  # noqa: E402
from somelvlm.processing import SAMPLE_IMAGE, asset_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = str(asset_path(SAMPLE_IMAGE))


@pytest.fixture(scope="module")
def model():
    from somelvlm.model import SoMeLVLM

    return SoMeLVLM.from_config("tiny")


@pytest.fixture(scope="module")
def reference():
    """A second tiny model (same seed, same weights) for reference answers outside the app's threads."""
    from somelvlm.model import SoMeLVLM

    return SoMeLVLM.from_config("tiny")


@pytest.fixture(scope="module")
def demo_url(model):
    from somelvlm.serve.demo import build_demo

    demo = build_demo(model, random_weights=True)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        show_error=True)
    yield f"http://127.0.0.1:{port}"
    demo.close()


@pytest.fixture(scope="module")
def client(demo_url):
    return gradio_client.Client(demo_url, verbose=False, download_files=False, analytics_enabled=False)


def test_stream_through_the_app_equals_generate(client, reference):
    from somelvlm.serve.demo import TEMPLATES

    task = "Sentiment (MVSA_Single)"
    job = client.submit(gradio_client.handle_file(SAMPLE), task, "great day at the beach", False, 12,
                        api_name="/answer")
    outputs = list(job)
    prompt, answer, parsed = outputs[-1]
    assert prompt == TEMPLATES[task].format(post="great day at the beach")
    assert answer == reference.generate(SAMPLE, [prompt], num_beams=1, max_new_tokens=12)[0]
    assert len(outputs) >= 2 and all(answer.startswith(o[1]) for o in outputs), "the answer streams in"
    options = extract_options(prompt)
    assert options == ("positive", "neutral", "negative")
    assert ", ".join(f"`{o}`" for o in options) in parsed
    expected = parse_answer(answer, options)
    assert (f"`{expected}`" if expected else "*unparseable*") in parsed


def test_beam_search_and_free_prompt(client, reference):
    from somelvlm.serve.demo import FREE

    prompt, answer, parsed = client.predict(gradio_client.handle_file(SAMPLE), FREE, "Describe the photo.", True, 6,
                                            api_name="/answer")
    assert prompt == "Describe the photo."
    assert answer == reference.generate(SAMPLE, [prompt], max_new_tokens=6)[0]  # LAVIS defaults: 5 beams
    assert "no label options" in parsed


def test_empty_post_is_a_clear_error(client):
    with pytest.raises(Exception, match="type a post"):
        client.predict(gradio_client.handle_file(SAMPLE), "Hashtags (hashtag_gen)", "  ", False, 4, api_name="/answer")


FILES = {"Hate speech (HatefulMemes)": "HatefulMemes_test.json", "Sentiment (MVSA_Single)": "MVSA_Single_test.json",
         "Misinformation (FakeNewsNet)": "FakeNewsNet_test.json", "Ideology (Tweet_leg)": "Tweet_leg_test.json",
         "Hashtags (hashtag_gen)": "hashtag_gen_test.json", "Explanation (domain_explain)": "domain_explain_test.json"}


def test_templates_use_somedata_wording():
    """Each template, with its {post} as a wildcard, is the exact wording of prompts in its SoMeData file
    (the files mix several instruction wordings; the demo offers one of each task)."""
    from somelvlm.serve.demo import TEMPLATES

    assert set(TEMPLATES) == set(FILES)
    for task, template in TEMPLATES.items():
        records = json.loads(require_shared("somedata", "in_domain", FILES[task]).read_text())
        head, tail = (re.escape(part) for part in template.split("{post}"))
        pattern = re.compile(f"{head}.*{tail}", re.DOTALL)
        matched = sum(bool(pattern.fullmatch(r["text_input"])) for r in records)
        assert matched >= 5, (task, matched, len(records))


def _screenshot_module():
    spec = importlib.util.spec_from_file_location("demo_screenshot", ROOT / "scripts" / "demo_screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chromium_screenshot_after_an_answer(demo_url, reference, tmp_path):
    shot = _screenshot_module()
    if shot.find_chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    pytest.importorskip("websockets", reason="the DevTools client needs websockets")
    import numpy as np
    from PIL import Image

    from somelvlm.serve.demo import EXAMPLE_POST, TEMPLATES

    out = tmp_path / "demo.png"
    shown = shot.screenshot(demo_url, out, timeout=120)
    with Image.open(out) as img:
        assert img.size[0] >= 800 and img.size[1] >= 600
        grey = np.asarray(img.convert("L").resize((64, 64)))
        assert len(np.unique(grey)) > 20  # a rendered page, not a blank one
    prompt = TEMPLATES["Hate speech (HatefulMemes)"].format(post=EXAMPLE_POST)  # the page's defaults
    assert shown["answer"] == reference.generate(SAMPLE, [prompt], num_beams=1, max_new_tokens=64)[0]
    assert "RANDOM weights" in shown["warning"]
    assert "Options: true, false" in shown["parsed"].replace("`", "")
