"""Model folders: conversion, from_pretrained, HF and LAVIS round trips, memory, failures."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from reference import TINY_PIECES, hf_input_ids
from somelvlm import SoMeLVLM
from somelvlm.cli import main as cli_main
from somelvlm.convert import convert_lavis
from somelvlm.processing import SAMPLE_IMAGE, asset_path
from somelvlm.weights import WeightsError

ATOL, RTOL = 1e-5, 1e-5
IMG = str(asset_path(SAMPLE_IMAGE))


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(3)
    px = torch.randn(2, 3, 56, 56, generator=g)
    q = torch.tensor([[101, 2054, 2003, 1999, 102], [101, 7592, 102, 0, 0]])
    qm = (q != 0).long()
    ids = torch.randint(3, TINY_PIECES, (2, 6), generator=g)
    ids[:, 0] = 2
    return dict(pixel_values=px, input_ids=ids, qformer_input_ids=q, qformer_attention_mask=qm)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def converted(lavis_files, tiny_cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "model"
    summary = convert_lavis(config=tiny_cfg, out=out, dtype="fp32", progress=False, **lavis_files)
    return out, summary


def test_convert_then_from_pretrained_is_exact(converted, loaded, batch):
    out, summary = converted
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "generation_config.json",
                                               "tokenizer.model", "qformer_tokenizer", "processor_config.json"}
    assert summary.params["total"] == sum(p.numel() for p in loaded.parameters())
    assert set(summary.files) == {"model.safetensors"} and all(len(h) == 64 for h in summary.files.values())
    m = SoMeLVLM.from_pretrained(out)
    for (k, a), b in zip(m.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(logits(m, batch), logits(loaded, batch))
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (2, 2, TINY_PIECES)
    assert (gen["num_beams"], gen["repetition_penalty"], gen["max_length"]) == (5, 1.5, 256)
    assert (out / "qformer_tokenizer" / "vocab.txt").read_text().splitlines()[30522] == "[DEC]"


def test_default_conversion_is_lossless(lavis_files, tiny_cfg, tmp_path, loaded, batch):
    """dtype="auto": fp16 where LAVIS's values are fp16 (LLM, ViT linears), fp32 elsewhere, so an fp32
    load reproduces from_lavis exactly."""
    from safetensors import safe_open

    out = tmp_path / "auto"
    summary = convert_lavis(config=tiny_cfg, out=out, progress=False, **lavis_files)
    assert summary.dtype == "auto"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["llm.lm_head.weight"] == "F16" and dtypes["vision.blocks.0.attn.qkv.weight"] == "F16"
    assert dtypes["vision.blocks.0.attn.q_bias"] == "F32" and dtypes["qformer.embeddings.LayerNorm.weight"] == "F32"
    m = SoMeLVLM.from_pretrained(out, dtype="fp32")
    for (k, a), b in zip(m.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(logits(m, batch), logits(loaded, batch))


def test_sharded_conversion(lavis_files, tiny_cfg, tmp_path, loaded, batch):
    out = tmp_path / "sharded"
    convert_lavis(config=tiny_cfg, out=out, dtype="fp32", progress=False, max_shard_bytes=2_000_000, **lavis_files)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert torch.equal(logits(SoMeLVLM.from_pretrained(out), batch), logits(loaded, batch))


def test_hf_export_loads_in_transformers_and_matches(loaded, batch, tmp_path):
    from transformers import InstructBlipForConditionalGeneration

    hf_dir = loaded.save_pretrained(tmp_path / "hf", format="hf")
    hf = InstructBlipForConditionalGeneration.from_pretrained(hf_dir).eval()
    image_token = hf.config.image_token_index
    assert image_token == TINY_PIECES + 1
    with torch.no_grad():
        theirs = hf(pixel_values=batch["pixel_values"], qformer_input_ids=batch["qformer_input_ids"],
                    qformer_attention_mask=batch["qformer_attention_mask"],
                    input_ids=torch.cat([torch.full((2, 8), image_token), batch["input_ids"]], 1)).logits
    ours = logits(loaded, batch)
    assert theirs.shape[-1] == ours.shape[-1] + 1  # the <image> row
    assert_close(theirs[..., :-1], ours, atol=ATOL, rtol=RTOL)
    # ... and back: HF folder -> ours gives the same model again
    back = SoMeLVLM.from_hf(hf_dir)
    assert_close(logits(back, batch), ours, atol=ATOL, rtol=RTOL)
    for (k, a), b in zip(back.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_hf_reference_folder_imports(hf_ref, batch, tmp_path):
    """A folder written by transformers itself (vocab with extra rows, fused qkv bias) imports and matches."""
    hf_ref.save_pretrained(tmp_path / "ref")
    (tmp_path / "ref" / "tokenizer.model").write_bytes((Path(__import__("somelvlm").__file__).parent / "assets" / "tiny-llm-tokenizer.model").read_bytes())
    ours = SoMeLVLM.from_hf(tmp_path / "ref")
    with torch.no_grad():
        theirs = hf_ref(pixel_values=batch["pixel_values"], qformer_input_ids=batch["qformer_input_ids"],
                        qformer_attention_mask=batch["qformer_attention_mask"],
                        input_ids=hf_input_ids(8, batch["input_ids"])).logits
    assert_close(logits(ours, batch), theirs, atol=ATOL, rtol=RTOL)


def test_hf_processor_files_load(loaded, tmp_path):
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read a SentencePiece model")
    from transformers import InstructBlipProcessor

    loaded.save_pretrained(tmp_path / "hf", format="hf")
    proc = InstructBlipProcessor.from_pretrained(tmp_path / "hf")
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == TINY_PIECES + 1
    out = proc(images=torch.zeros(40, 30, 3, dtype=torch.uint8).numpy(), text="is it hateful?", return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 56, 56)
    assert out["qformer_input_ids"][0, 0] == 101


def test_lavis_export_round_trip_is_identity(loaded, lavis_files, tiny_cfg, tmp_path):
    out = loaded.save_pretrained(tmp_path / "lavis_out", format="lavis")
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert set(ckpt) == {"model"}
    keys = set(ckpt["model"])
    assert "query_tokens" in keys and "ln_vision.weight" in keys and "llm_proj.weight" in keys
    assert not any(k.startswith(("visual_encoder.", "llm_model.")) for k in keys)  # frozen parts are not saved
    again = SoMeLVLM.from_lavis(out / "checkpoint.pth", lavis_files["vit"], lavis_files["llm"], config=tiny_cfg)
    for (k, a), b in zip(again.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_bf16_load_keeps_dtypes_and_device_map_auto(converted, batch, tmp_path):
    out, _ = converted
    m = SoMeLVLM.from_pretrained(out, dtype="bf16")
    for n, p in m.named_parameters():
        want = torch.float32 if n.startswith(("ln_vision", "qformer", "query_tokens", "proj")) else torch.bfloat16
        assert p.dtype == want, n
    auto = SoMeLVLM.from_pretrained(out, device_map="auto")
    assert torch.equal(logits(auto, batch), logits(SoMeLVLM.from_pretrained(out), batch))


def test_bf16_load_never_materialises_fp32(tmp_path):
    """Peak RSS of a child process loading a ~230 MB bf16 folder stays within 1.15x of the weights."""
    from somelvlm import SoMeLVLMConfig
    from somelvlm.config import LLMConfig

    cfg = SoMeLVLMConfig.preset("tiny").replace(llm=LLMConfig(hidden=1024, layers=8, heads=8, kv_heads=8,
                                                              intermediate=2816, vocab_size=2001, pad_id=2000))
    m = SoMeLVLM.from_config(cfg)
    m.processor = __import__("somelvlm").SoMeLVLMProcessor.tiny()
    m.to_dtype(torch.bfloat16)
    folder = m.save_pretrained(tmp_path / "mid")
    weight_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    del m
    # VmHWM, not ru_maxrss: the latter inherits the (large) pytest parent's peak across fork/exec
    code = textwrap.dedent(f"""
        import torch, json
        import somelvlm, transformers.models.llama.modeling_llama  # imports count in the baseline
        from somelvlm import SoMeLVLM
        def status(key):
            return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
        base = status("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")  # VmHWM restarts from here
        m = SoMeLVLM.from_pretrained({str(folder)!r}, dtype=torch.{{DTYPE}})
        print(json.dumps({{"delta": status("VmHWM") - base}}))
    """)
    def delta(dtype: str) -> float:
        r = subprocess.run([sys.executable, "-c", code.replace("{DTYPE}", dtype)], capture_output=True, text=True,
                           check=True)
        return json.loads(r.stdout.strip().splitlines()[-1])["delta"]

    assert weight_bytes > 200e6
    assert delta("bfloat16") <= 1.15 * weight_bytes
    assert delta("float32") > 1.5 * weight_bytes  # the measurement does see an fp32 copy


def test_interrupted_conversion_leaves_nothing(lavis_files, tiny_cfg, tmp_path, monkeypatch):
    from somelvlm import lavis

    real = lavis.LavisSources.tensors

    def broken(self):
        for i, item in enumerate(real(self)):
            if i == 20:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(lavis.LavisSources, "tensors", broken)
    out = tmp_path / "sub" / "model"
    with pytest.raises(KeyboardInterrupt):
        convert_lavis(config=tiny_cfg, out=out, progress=False, **lavis_files)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temporary folder left behind


def test_cli_refuses_to_overwrite_and_force_works(lavis_files, tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = ["convert", "--lavis-checkpoint", str(lavis_files["checkpoint"]), "--vit", str(lavis_files["vit"]),
            "--llm", str(lavis_files["llm"]), "--out", str(out), "--config", "tiny", "--no-progress"]
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert "somelvlm convert: error: " in err and "already exists; use --force" in err
    assert (out / "keep.txt").exists()
    assert cli_main(args + ["--force"]) == 0
    printed = capsys.readouterr().out
    assert "parameters:" in printed and "model.safetensors" in printed and "the values LAVIS uses" in printed
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_cli_to_hf_and_from_hf(converted, tmp_path, batch):
    out, _ = converted
    assert cli_main(["convert", "--model", str(out), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert cli_main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert torch.equal(logits(SoMeLVLM.from_pretrained(tmp_path / "back"), batch),
                       logits(SoMeLVLM.from_pretrained(out), batch))


def test_corrupt_shard_and_bad_index_are_clear(converted, tmp_path):
    import shutil

    out, _ = converted
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightsError, match="model.safetensors: not a valid safetensors file"):
        SoMeLVLM.from_pretrained(bad)
    (bad / "model.safetensors").unlink()
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"query_tokens": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(WeightsError, match=r"names shard\(s\) \['model-00001-of-00002.safetensors'\] that are missing"):
        SoMeLVLM.from_pretrained(bad)


def test_hf_hub_layout_with_extra_vocab_rows(tmp_path, batch):
    """Like Salesforce/instructblip-vicuna-7b: LLM vocab padded beyond pieces + [PAD] (32064 there)."""
    from reference import hf_tiny_instructblip, set_pad_rows

    from somelvlm.processing import BUNDLED_TINY_SPM, asset_path

    hf = hf_tiny_instructblip(seed=4, llm_vocab=TINY_PIECES + 64)
    set_pad_rows(hf)
    hf.save_pretrained(tmp_path / "hub")
    (tmp_path / "hub" / "tokenizer.model").write_bytes(asset_path(BUNDLED_TINY_SPM).read_bytes())
    ours = SoMeLVLM.from_hf(tmp_path / "hub")
    assert ours.llm.config.vocab_size == TINY_PIECES + 1 and ours.config.llm.pad_id == TINY_PIECES
    with torch.no_grad():
        theirs = hf(pixel_values=batch["pixel_values"], qformer_input_ids=batch["qformer_input_ids"],
                    qformer_attention_mask=batch["qformer_attention_mask"],
                    input_ids=hf_input_ids(8, batch["input_ids"])).logits
    assert_close(logits(ours, batch), theirs[..., :TINY_PIECES + 1], atol=ATOL, rtol=RTOL)


def test_cli_generate_with_device_map(converted, capsys):
    """`--device-map auto` loads through accelerate's placement (all on the CPU here) and answers
    exactly as the plain load does."""
    out, _ = converted
    args = ["generate", "--model", str(out), "--image", IMG, "--prompt", "what is it?", "--max-new-tokens", "4"]
    assert cli_main(args + ["--device-map", "auto"]) == 0
    with_map = capsys.readouterr().out
    assert cli_main(args) == 0
    assert with_map == capsys.readouterr().out and with_map.strip()
