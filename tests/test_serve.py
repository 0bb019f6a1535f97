"""`somelvlm serve`: the real server on 127.0.0.1 with the tiny model, the official `openai` client,
raw HTTP for errors, and a bounded concurrency test (answers equal the same requests sent alone;
batching is visible in /metrics)."""

from __future__ import annotations

import functools
import json
import http.server
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import subprocess  # noqa: E402
import sys  # noqa: E402

from serve_helpers import ThreadServer, data_url, png_bytes  # noqa: E402

KEY = "test-key-123"
RED, BLUE, GREEN = png_bytes((200, 20, 20)), png_bytes((20, 20, 200), (33, 47)), png_bytes((10, 180, 30))
MAX_IMAGE_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    images = root / "images"
    images.mkdir()
    (images / "red.png").write_bytes(RED)
    (root / "secret.png").write_bytes(RED)
    remote = root / "remote"
    remote.mkdir()
    (remote / "blue.png").write_bytes(BLUE)
    (remote / "big.bin").write_bytes(b"\0" * (MAX_IMAGE_BYTES + 10))
    return root


@pytest.fixture(scope="module")
def remote_site(files):
    """A static file server on 127.0.0.1 standing in for remote image hosts."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(files / "remote"))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(files):
    srv = ThreadServer(["--model", "tiny", "--images-root", str(files / "images"), "--allow-remote-images",
                        "--max-image-mb", str(MAX_IMAGE_BYTES / 2**20), "--max-image-pixels", "250000",
                        "--batch-window-ms", "100", "--image-timeout", "5"], env={"SOMELVLM_API_KEY": KEY})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tiny():
    from somelvlm.model import SoMeLVLM

    return SoMeLVLM.from_config("tiny")


def user(text: str, image: str | None = None) -> list[dict]:
    content: list[dict] = [{"type": "text", "text": text}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": image}})
    return [{"role": "user", "content": content}]


def post(server, body: dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=60)


def test_openai_client_answer_equals_library(client, tiny):
    """LAVIS defaults (5-beam search) when the request leaves options out; the text equals `generate`."""
    r = client.chat.completions.create(model="somelvlm", messages=user("What does this post show?", data_url(RED)),
                                       max_tokens=6)
    expected = tiny.generate(RED, ["What does this post show?"], max_new_tokens=6)[0]
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == tiny.query_tokens.shape[1] + len(
        tiny.processor.llm_tokenizer.encode("What does this post show?"))
    assert 1 <= r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_openai_client_stream_joins_to_answer(client, tiny):
    kw = dict(model="somelvlm", messages=user("Describe it.", data_url(BLUE)), max_tokens=8, temperature=0)
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len([p for p in pieces if p]) >= 2, "greedy answers stream piece by piece"
    assert "".join(pieces) == tiny.generate(BLUE, ["Describe it."], num_beams=1, max_new_tokens=8)[0]
    assert "".join(pieces) == client.chat.completions.create(**kw).choices[0].message.content
    assert finish == ["length"] or finish == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_text_only_post(client, tiny):
    """A request without an image is a text-only post (`generate(images=None)`): no query tokens."""
    kw = dict(model="somelvlm", messages=[{"role": "user", "content": "Is this post hateful? Choices: [true, false]"}],
              max_tokens=6, temperature=0)
    r = client.chat.completions.create(**kw)
    assert r.choices[0].message.content == tiny.generate(None, [kw["messages"][0]["content"]], num_beams=1,
                                                         max_new_tokens=6)[0]
    assert r.usage.prompt_tokens == len(tiny.processor.llm_tokenizer.encode(kw["messages"][0]["content"]))
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw))
    assert streamed == r.choices[0].message.content


def test_raw_stream_ends_with_done(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": user("Hi there", data_url(RED)), "max_tokens": 3, "stream": True,
                            "n": 2, "num_beams": 2}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert sum('"finish_reason": "' in e for e in events) == 2  # one finish per choice (beams: whole answers)


def test_sampling_n_choices_and_seed(client):
    kw = dict(model="somelvlm", messages=user("Tags?", data_url(GREEN)), max_tokens=5, temperature=0.9, n=3, seed=7)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert len(a.choices) == 3 and [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded: reproducible


def test_models_health_metrics_and_api_key(server, client):
    assert [m.id for m in client.models.list().data] == ["somelvlm"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # no key needed
    for path in ("/v1/models", "/metrics"):
        r = httpx.get(server.url + path)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert post(server, {"messages": user("x")}, key="wrong").status_code == 401
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="somelvlm", messages=user("x"))


def test_local_and_remote_images(server, files, remote_site, tiny):
    local = post(server, {"messages": user("What?", "red.png"), "max_tokens": 4, "temperature": 0})
    same = post(server, {"messages": user("What?", data_url(RED)), "max_tokens": 4, "temperature": 0})
    assert local.status_code == 200, local.text
    assert local.json()["choices"][0]["message"]["content"] == same.json()["choices"][0]["message"]["content"]
    remote = post(server, {"messages": user("What?", f"{remote_site}/blue.png"), "max_tokens": 4, "temperature": 0})
    assert remote.status_code == 200, remote.text
    expected = tiny.generate(BLUE, ["What?"], num_beams=1, max_new_tokens=4)[0]
    assert remote.json()["choices"][0]["message"]["content"] == expected


BAD_IMAGE = "data:image/png;base64,aGVsbG8gd29ybGQ="  # valid base64 of "hello world": not an image


def bad_requests(remote_site: str) -> list[tuple[dict, int, str]]:
    """(body, status, error code) for requests a client can get wrong."""
    bomb = png_bytes((0, 0, 0), (1000, 1000))  # a few KB of PNG, 1M pixels > the 250k cap
    return [
        ({"messages": user("x", "data:image/png;base64,@@notbase64@@")}, 400, "invalid_base64"),
        ({"messages": user("x", BAD_IMAGE)}, 400, "invalid_image"),
        ({"messages": user("x", data_url(b"\x89PNG" + b"\0" * (MAX_IMAGE_BYTES + 1)))}, 413, "image_too_large"),
        ({"messages": user("x", data_url(bomb))}, 413, "image_too_many_pixels"),
        ({"messages": user("x", f"{remote_site}/big.bin")}, 413, "image_too_large"),
        ({"messages": user("x", f"{remote_site}/missing.png")}, 400, "image_fetch_failed"),
        ({"messages": user("x", "../secret.png")}, 403, "image_path_forbidden"),
        ({"messages": user("x", "nope.png")}, 404, "image_not_found"),
        ({"messages": user("x", "ftp://example.org/a.png")}, 400, "invalid_image_url"),
        ({"messages": user("word " * 1200, data_url(RED)), "max_tokens": 4}, 400, "context_length_exceeded"),
        ({"messages": user("x"), "max_tokens": 2000}, 400, "context_length_exceeded"),
        ({"messages": user("x"), "frequency_penalty": 0.5}, 400, "invalid_request"),
        ({"messages": user("x"), "n": 2, "temperature": 0}, 400, "invalid_option"),
        ({"messages": user("x", data_url(RED)) + user("y", data_url(BLUE))}, 400, "too_many_images"),
        ({"messages": user("x"), "model": "gpt-4o"}, 404, "model_not_found"),
        ({"messages": []}, 400, "invalid_request"),
    ]


def test_bad_input_gets_openai_errors_and_server_keeps_serving(server, remote_site):
    for body, status, code in bad_requests(remote_site):
        r = post(server, body)
        assert r.status_code == status, (body.get("messages", [{}])[0], r.text)
        err = r.json()["error"]
        assert err["code"] == code and err["message"] and err["type"] == "invalid_request_error", r.text
    huge = post(server, {"messages": user("x", data_url(b"\0" * (2 * MAX_IMAGE_BYTES + 1_000_000)))})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=10,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    ok = post(server, {"messages": user("still there?", data_url(RED)), "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]


def test_cli_rejects_bad_flags_in_one_line():
    r = subprocess.run([sys.executable, "-m", "somelvlm", "serve", "--images-root", "/nonexistent/dir"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == "somelvlm serve: error: --images-root /nonexistent/dir is not a folder", r.stderr
    assert "Traceback" not in r.stderr


def test_concurrent_requests_batch_and_equal_alone(server, remote_site):
    """32 simultaneous requests (two option sets, three images and text-only posts, four bad ones): every good
    answer equals the same request sent alone, the bad ones fail alone, and batches formed."""
    images = [data_url(RED), data_url(BLUE), data_url(GREEN)]
    prompts = ["What is shown?", "Is this post hateful? Choices: [true, false]", "Give three hashtags."]
    variants = []
    for i in range(7):
        opts = {"max_tokens": 5, "temperature": 0} if i % 2 else {"max_tokens": 4, "num_beams": 2}
        image = images[i % 3] if i < 5 else None  # two text-only posts, batched with the others
        variants.append({"messages": user(prompts[i % 3], image), **opts})
    alone = [post(server, v).json()["choices"][0]["message"]["content"] for v in variants]
    before = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).json()
    bad = [body for body, _, _ in bad_requests(remote_site)[:4]]
    bodies = [variants[i % 7] for i in range(28)] + bad
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: post(server, b), bodies))
    for i, r in enumerate(responses[:28]):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == alone[i % 7], i
    assert all(400 <= r.status_code < 500 for r in responses[28:])
    after = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert after["requests"] - before["requests"] == 28
    assert after["batches"] - before["batches"] < 28, after  # some requests shared a generate call
    assert after["max_batch_size"] > 1
    assert after["images_encoded"] == before["images_encoded"]  # all three images came from the cache


def _stream_text(server, body: dict) -> str:
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_concurrent_streams_batch_and_equal_alone(server):
    """12 simultaneous greedy streams decode in shared batches; each streamed answer equals the same
    request answered alone without streaming."""
    images = [data_url(RED), data_url(BLUE), None]
    bodies = [{"messages": user(p, images[i % 3]), "max_tokens": 6, "temperature": 0}
              for i, p in enumerate(["What is shown?", "Describe the post.", "Hashtags?", "Hate speech?"])]
    alone = [post(server, b).json()["choices"][0]["message"]["content"] for b in bodies]
    before = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).json()
    with ThreadPoolExecutor(12) as pool:
        streamed = list(pool.map(lambda i: _stream_text(server, bodies[i % 4]), range(12)))
    assert streamed == [alone[i % 4] for i in range(12)]
    after = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert after["requests"] - before["requests"] == 12
    assert after["batches"] - before["batches"] < 12, after


def _request_image(data: bytes):
    from somelvlm.serve.images import ImagePolicy, load_request_image

    return load_request_image(data_url(data), ImagePolicy())


def test_features_cache_encodes_each_image_once_and_evicts(tiny):
    from somelvlm.serve.batcher import FeatureCache

    cache = FeatureCache(capacity=2)
    red, blue, green = (_request_image(x) for x in (RED, BLUE, GREEN))
    feats, encoded = cache.features(tiny, [red, None, red, blue])
    assert encoded == 2 and feats.index.tolist() == [0, -1, 0, 1]
    torch.testing.assert_close(feats.embeds, tiny.encode_images([red.image, blue.image]).embeds, rtol=1e-5, atol=1e-5)
    _, encoded = cache.features(tiny, [blue, green])  # blue from the cache; green evicts red (LRU)
    assert encoded == 1 and list(cache.entries) == [blue.key, green.key]
    assert (cache.hits, cache.misses) == (2, 3)
    assert cache.features(tiny, [None, None]) == (None, 0)


def test_a_failing_request_does_not_break_its_batch(tiny):
    """A batch whose `generate` fails is retried request by request: only the bad one gets the error.
    (The server refuses over-long prompts before batching; here one reaches the batcher directly.)"""
    from somelvlm.options import GenerationOptions
    from somelvlm.serve.batcher import Batcher, Job

    options = GenerationOptions(num_beams=1, max_new_tokens=4)
    results: dict[int, tuple[str, object]] = {}
    prompts = ["What is shown?", "word " * 2000, "Give three hashtags."]
    jobs = [Job(p, _request_image(RED), options, lambda kind, value, i=i: results.__setitem__(i, (kind, value)))
            for i, p in enumerate(prompts)]
    batcher = Batcher(tiny, max_batch=8, window_s=0.5)
    batcher.start()
    for job in jobs:
        batcher.submit(job)
    batcher.stop()
    assert results[1][0] == "error" and "too long" in str(results[1][1])
    for i in (0, 2):
        kind, answers = results[i]
        assert kind == "done"
        assert answers[0].text == tiny.generate(RED, [prompts[i]], num_beams=1, max_new_tokens=4)[0]
    metrics = batcher.metrics()
    assert metrics["batch_sizes"] == {"1": 3, "3": 1}  # the batch of three, then each alone
    assert (metrics["requests"], metrics["failed_requests"]) == (3, 1)
