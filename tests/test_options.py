"""GenerationOptions as the one options type of every generation entry point: defaults from the model,
overrides by name, unknown names and bad values refused before any work, through the API and the CLI."""

from __future__ import annotations

import pytest

from somelvlm import SoMeLVLM
from somelvlm.cli import main
from somelvlm.generation import stream_options, streaming_note
from somelvlm.options import GenerationOptions
from somelvlm.processing import SAMPLE_IMAGE, asset_path

IMG = str(asset_path(SAMPLE_IMAGE))
PROMPTS = ["What is in the image?", "Is this post hateful?", "a"]


@pytest.fixture(scope="module")
def model():
    return SoMeLVLM.from_config("tiny")


@pytest.fixture()
def no_work(model, monkeypatch):
    """Fails the test if the vision tower or the LLM runs."""
    def boom(*a, **k):
        raise AssertionError("model work started before the options were checked")

    monkeypatch.setattr(model.vision, "forward", boom)
    monkeypatch.setattr(model.llm, "forward", boom)
    monkeypatch.setattr(model.llm.get_input_embeddings(), "forward", boom)  # every decoding path embeds first
    return model


def test_unknown_option_is_an_error_not_another_decoder(no_work):
    """Today an unknown keyword silently switched `generate` to transformers' beam search."""
    with pytest.raises(ValueError, match=r"unknown generation option\(s\) \['num_beam'\]"):
        no_work.generate(IMG, PROMPTS, num_beam=1)
    with pytest.raises(ValueError, match="unknown generation option"):
        no_work.generate_stream(IMG, "x", topp=0.5)
    with pytest.raises(ValueError, match="must be int"):
        no_work.generate(IMG, PROMPTS, num_beams="5")


def test_defaults_come_from_the_model(model):
    explicit = model.generate(IMG, PROMPTS, num_beams=1, max_new_tokens=5, repetition_penalty=1.0)
    model.generation_options = GenerationOptions(num_beams=1, max_new_tokens=5, repetition_penalty=1.0)
    try:
        assert model.generate(IMG, PROMPTS) == explicit
        assert model.generate(IMG, PROMPTS, options=GenerationOptions(num_beams=1), max_new_tokens=5,
                              repetition_penalty=1.0) == explicit
        assert "".join(model.generate_stream(IMG, PROMPTS[0])) == explicit[0]
    finally:
        del model.generation_options
    assert model.generate(IMG, PROMPTS, options=GenerationOptions(num_beams=1, max_new_tokens=5,
                                                                  repetition_penalty=1.0)) == explicit


BAD = [
    (dict(num_beams=0), "num_beams must be >= 1"),
    (dict(num_beams=-2), "num_beams must be >= 1"),
    (dict(temperature=-0.5, do_sample=True), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.01), r"top_p must be in \(0, 1\]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(repetition_penalty=-1.5), "repetition_penalty must be > 0"),
    (dict(min_length=300), r"minimum length \(299 new tokens\) is above the maximum \(255\)"),
    (dict(max_new_tokens=10**9), r"exceeds the model's 1024 positions \(at most \d+ new tokens fit\)"),
    (dict(max_length=2000), r"max_new_tokens=1999 with a \d+-token input exceeds the model's 1024 positions"),
]


@pytest.mark.parametrize("kw,message", BAD)
def test_bad_options_fail_before_any_work(no_work, kw, message):
    with pytest.raises(ValueError, match=message):
        no_work.generate(IMG, PROMPTS, **kw)
    if "num_beams" not in kw:  # streaming refuses any num_beams but 1 itself
        with pytest.raises(ValueError, match=message):
            no_work.generate_stream(IMG, PROMPTS[0], **kw)


def test_over_long_prompt_is_refused_with_its_lengths(no_work):
    long = "word " * 1100  # the tiny LLM has 1024 positions; LAVIS does not truncate at generation
    n = len(no_work.processor.llm_tokenizer.encode(long))
    with pytest.raises(ValueError, match=rf"prompt 2 of 2 is too long: {n} tokens \+ 8 query tokens leave no "
                                         r"room for an answer in the model's 1024 positions"):
        no_work.generate(IMG, ["short", long])
    with pytest.raises(ValueError, match=rf"the prompt is too long: {n} tokens leave no room"):
        no_work.generate(None, [long])  # text only: no query tokens
    with pytest.raises(ValueError, match="too long"):
        no_work.generate_stream(IMG, long)


def test_prompt_length_counts_the_soft_prompt_only_with_an_image(model):
    tok = model.processor.llm_tokenizer
    prompt = "word " * 100
    n = len(tok.encode(prompt))
    fits_text_only = 1024 - n  # new tokens that fit without the 8 query tokens
    with pytest.raises(ValueError, match=f"at most {fits_text_only - 8} new tokens fit"):
        model.generate(IMG, [prompt], num_beams=1, max_new_tokens=fits_text_only)
    with pytest.raises(ValueError, match=f"at most {fits_text_only} new tokens fit"):
        model.generate(None, [prompt], num_beams=1, max_new_tokens=fits_text_only + 1)


def test_streaming_note_says_when_streaming_changes_the_result():
    assert streaming_note(GenerationOptions(num_beams=1)) is None
    assert streaming_note(GenerationOptions(num_beams=1, do_sample=True)) is None
    note = streaming_note(GenerationOptions(num_beams=5))
    assert "1 beam (greedy search), not beam search with num_beams=5" in note
    note = streaming_note(GenerationOptions(num_beams=3, do_sample=True))
    assert "1 beam (sampling), not beam sampling" in note and "greedy" not in note
    assert "greedy" in streaming_note(GenerationOptions(num_beams=3, do_sample=True, temperature=0.0))
    assert "num_return_sequences=2" in streaming_note(GenerationOptions(num_beams=1, do_sample=True,
                                                                        num_return_sequences=2))
    assert stream_options(GenerationOptions(num_beams=4, do_sample=True)) == GenerationOptions(num_beams=1,
                                                                                            do_sample=True)


def test_stream_beams_only_from_defaults_become_one(model):
    """The model's default 5 beams become one when streaming; beams asked for are refused, saying why."""
    want = model.generate(IMG, PROMPTS[0], num_beams=1, max_new_tokens=6)[0]
    assert "".join(model.generate_stream(IMG, PROMPTS[0], max_new_tokens=6)) == want
    with pytest.raises(ValueError, match=r"a beam search cannot stream .*1 beam \(sampling\)"):
        model.generate_stream(IMG, PROMPTS[0], num_beams=3, do_sample=True)
    with pytest.raises(ValueError, match="not beam search with num_beams=5"):
        model.generate_stream(IMG, PROMPTS[0], options=GenerationOptions())


def test_cli_stream_rule(model, monkeypatch, capsys):
    monkeypatch.setattr(SoMeLVLM, "load", classmethod(lambda cls, *a, **k: model))
    base = ["generate", "--image", IMG, "--prompt", PROMPTS[0], "--max-new-tokens", "6", "--stream"]
    assert main(base) == 0  # plain --stream: one beam by its own default, nothing to say
    out = capsys.readouterr()
    assert "note" not in out.err and "error" not in out.err
    assert out.out.strip() == model.generate(IMG, PROMPTS[0], num_beams=1, max_new_tokens=6)[0]
    assert main(base + ["--do-sample", "--seed", "3"]) == 0
    out = capsys.readouterr()
    assert "note" not in out.err and "error" not in out.err
    assert out.out.strip() == model.generate(IMG, PROMPTS[0], num_beams=1, do_sample=True, seed=3,
                                             max_new_tokens=6)[0]
    assert main(base + ["--do-sample", "--num-beams", "3"]) == 1  # today: "decodes greedily", and went on
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "1 beam (sampling), not beam sampling" in err and "greedy" not in err
    assert main(base + ["--num-beams", "2"]) == 1
    assert "1 beam (greedy search), not beam search with num_beams=2" in capsys.readouterr().err


def test_cli_text_only_post(model, monkeypatch, capsys):
    monkeypatch.setattr(SoMeLVLM, "load", classmethod(lambda cls, *a, **k: model))
    post = "Is this tweet sarcastic? 'lol great, another monday'"
    assert main(["generate", "--prompt", post, "--num-beams", "1", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == model.generate(None, [post], num_beams=1, max_new_tokens=6)[0]
    assert main(["generate", "--prompt", post, "--max-new-tokens", "6", "--stream"]) == 0
    assert capsys.readouterr().out.strip() == model.generate(None, [post], num_beams=1, max_new_tokens=6)[0]


CLI_BAD = [  # beside tests/test_bad_inputs.py's rows
    (["--min-length", "400"], "minimum length (399 new tokens) is above the maximum (255)"),
    (["--top-k", "-1"], "top_k must be >= 0"),
]


@pytest.mark.parametrize("flags,message", CLI_BAD)
def test_cli_bad_options_before_the_model_loads(flags, message, monkeypatch, capsys):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(SoMeLVLM, "load", classmethod(no_load))
    assert main(["generate", "--image", IMG, "--prompt", "x", *flags]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("somelvlm generate: error: ") and message in err


def test_folder_defaults_are_read_and_checked(tmp_path, monkeypatch, capsys):
    import json

    (tmp_path / "generation_config.json").write_text(json.dumps({"num_beams": 1, "max_new_tokens": 7,
                                                                 "eos_token_id": 2}))
    assert GenerationOptions.load(tmp_path) == GenerationOptions(num_beams=1, max_new_tokens=7)
    (tmp_path / "generation_config.json").write_text(json.dumps({"num_beams": 0}))
    with pytest.raises(ValueError, match=r"generation_config.json: invalid generation option: num_beams must be"):
        GenerationOptions.load(tmp_path)
    monkeypatch.setattr(SoMeLVLM, "load", classmethod(lambda cls, *a, **k: pytest.fail("loaded")))
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 1  # named before the model loads
    assert "generation_config.json: invalid generation option: num_beams" in capsys.readouterr().err


def test_round_trip_and_types(tmp_path):
    import json

    opts = GenerationOptions(num_beams=3, max_new_tokens=40, do_sample=True, top_p=0.8, seed=7)
    (tmp_path / "generation_config.json").write_text(json.dumps(opts.to_generation_config(eos_id=2, pad_id=0,
                                                                                          bos_id=2)))
    assert GenerationOptions.load(tmp_path) == opts  # token ids and notes are not decoding options
    assert GenerationOptions().replace(top_p=1).top_p == 1.0 and isinstance(GenerationOptions().replace(top_p=1).top_p,
                                                                             float)
    for bad in (dict(num_beams=True), dict(num_beams=2.0), dict(do_sample=1), dict(temperature="1")):
        with pytest.raises(ValueError, match=f"generation option '{next(iter(bad))}' must be"):
            GenerationOptions().replace(**bad)
    assert GenerationOptions(max_length=10, min_length=4).new_token_limits() == (9, 3)  # LAVIS counts a dummy id
    assert GenerationOptions(max_length=10, max_new_tokens=3, min_new_tokens=2).new_token_limits() == (3, 2)
