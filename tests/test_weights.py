"""weights_map.json rules, strict checks and unsafe / broken files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from somelvlm import SoMeLVLM
from somelvlm.weights import WeightMap, WeightsError, check_state_dict, load_file


@pytest.fixture(scope="module")
def tiny_sd():
    return SoMeLVLM.from_config("tiny").state_dict()


@pytest.mark.parametrize("rules", ["lavis", "hf"])
def test_map_round_trip_is_identity(tiny_sd, rules):
    wmap = WeightMap.load(rules)
    external = wmap.from_ours(tiny_sd)
    back = wmap.to_ours(external)
    assert set(back) == set(tiny_sd)
    for k, v in tiny_sd.items():
        assert torch.equal(back[k], v), k


def test_lavis_names_are_the_released_ones(tiny_sd):
    """Names from lavis.md (Blip2VicunaInstruct.state_dict()) for the tiny sizes."""
    lavis = set(WeightMap.load("lavis").from_ours(tiny_sd))
    for name in ["query_tokens", "ln_vision.weight", "ln_vision.bias", "llm_proj.weight", "llm_proj.bias",
                 "visual_encoder.cls_token", "visual_encoder.pos_embed", "visual_encoder.patch_embed.proj.weight",
                 "visual_encoder.blocks.1.attn.q_bias", "visual_encoder.blocks.1.attn.v_bias",
                 "visual_encoder.blocks.1.attn.qkv.weight", "visual_encoder.blocks.1.mlp.fc2.bias",
                 "Qformer.bert.embeddings.word_embeddings.weight", "Qformer.bert.embeddings.LayerNorm.weight",
                 "Qformer.bert.encoder.layer.0.crossattention.self.key.weight",
                 "Qformer.bert.encoder.layer.2.crossattention.output.LayerNorm.bias",
                 "Qformer.bert.encoder.layer.3.attention.self.query.weight",
                 "Qformer.bert.encoder.layer.3.intermediate_query.dense.weight",
                 "Qformer.bert.encoder.layer.3.output.LayerNorm.weight",
                 "llm_model.model.embed_tokens.weight", "llm_model.lm_head.weight",
                 "llm_model.model.layers.1.self_attn.q_proj.weight"]:
        assert name in lavis, name
    assert not any("crossattention" in k for k in lavis if ".layer.1." in k or ".layer.3." in k)
    assert not any(k.startswith(("vision.", "qformer.", "proj.", "llm.")) for k in lavis)


def test_hf_qkv_bias_is_fused_and_k_part_checked(tiny_sd):
    wmap = WeightMap.load("hf")
    hf = wmap.from_ours(tiny_sd)
    fused = hf["vision_model.encoder.layers.0.self_attn.qkv.bias"]
    q, k, v = fused.chunk(3)
    assert torch.equal(q, tiny_sd["vision.blocks.0.attn.q_bias"]) and torch.equal(v, tiny_sd["vision.blocks.0.attn.v_bias"])
    assert not k.any()
    hf["vision_model.encoder.layers.0.self_attn.qkv.bias"] = fused + 1
    with pytest.raises(WeightsError, match="must be zero"):
        wmap.to_ours(hf)


def test_ignored_buffers_are_dropped():
    wmap = WeightMap.load("lavis")
    sd = {"Qformer.bert.embeddings.position_ids": torch.arange(4),
          "llm_model.model.layers.3.self_attn.rotary_emb.inv_freq": torch.ones(2), "query_tokens": torch.ones(1)}
    assert list(wmap.to_ours(sd)) == ["query_tokens"]


def test_strict_check_names_every_problem():
    expected = {"a.weight": (2, 3), "b.weight": (4,), "c": (1,)}
    got = {"a.weight": torch.zeros(3, 2), "b.weight": torch.zeros(4), "extra.bias": torch.zeros(1)}
    with pytest.raises(WeightsError) as e:
        check_state_dict(expected, got, {"extra.bias": "x.pth", "a.weight": "y.pth"})
    msg = str(e.value)
    assert "missing 1 key(s): c" in msg
    assert "unexpected 1 key(s): extra.bias (from x.pth)" in msg
    assert "wrong shape for a.weight (from y.pth): file has (3, 2), model needs (2, 3)" in msg


# ------------------------------------------------------------------------------------------------
# Files, through the real from_lavis path
# ------------------------------------------------------------------------------------------------
class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/somelvlm_pwned",))


def _copy(lavis_files, tmp_path) -> dict[str, Path]:
    root = tmp_path / "lavis"
    shutil.copytree(lavis_files["checkpoint"].parent, root)
    return {"checkpoint": root / "checkpoint.pth", "vit": root / "eva_vit_g.pth", "llm": root / "llm"}


def test_pickle_that_runs_code_is_refused(lavis_files, tiny_cfg, tmp_path):
    files = _copy(lavis_files, tmp_path)
    ckpt = torch.load(files["checkpoint"], weights_only=True)
    ckpt["config"] = Evil()
    torch.save(ckpt, files["checkpoint"])
    Path("/tmp/somelvlm_pwned").unlink(missing_ok=True)
    with pytest.raises(WeightsError, match=r"checkpoint\.pth: refused to load"):
        SoMeLVLM.from_lavis(config=tiny_cfg, **files)
    assert not Path("/tmp/somelvlm_pwned").exists()


@pytest.mark.parametrize("change,pattern", [
    ("missing", r"missing 1 key\(s\): qformer\.encoder\.layer\.1\.output_query\.dense\.weight"),
    ("extra", r"unexpected 1 key\(s\): qformer\.encoder\.layer\.1\.surprise \(from .*checkpoint\.pth\)"),
    ("shape", r"wrong shape for proj\.weight \(from .*checkpoint\.pth\): file has \(96, 63\), model needs \(96, 64\)"),
])
def test_bad_checkpoint_keys(lavis_files, tiny_cfg, tmp_path, change, pattern):
    files = _copy(lavis_files, tmp_path)
    ckpt = torch.load(files["checkpoint"], weights_only=True)
    sd = ckpt["model"]
    if change == "missing":
        del sd["Qformer.bert.encoder.layer.1.output_query.dense.weight"]
    elif change == "extra":
        sd["Qformer.bert.encoder.layer.1.surprise"] = torch.zeros(3)
    else:
        sd["llm_proj.weight"] = sd["llm_proj.weight"][:, :63].clone()
    torch.save(ckpt, files["checkpoint"])
    with pytest.raises(WeightsError, match=pattern):
        SoMeLVLM.from_lavis(config=tiny_cfg, **files)


def test_bare_state_dict_checkpoint_is_accepted(lavis_files, tiny_cfg, tmp_path, loaded):
    files = _copy(lavis_files, tmp_path)
    torch.save(torch.load(files["checkpoint"], weights_only=True)["model"], files["checkpoint"])
    m = SoMeLVLM.from_lavis(config=tiny_cfg, **files)
    for (k, a), b in zip(m.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("which", ["checkpoint", "vit", "llm-shard"])
def test_truncated_file_is_a_clear_error(lavis_files, tiny_cfg, tmp_path, which):
    files = _copy(lavis_files, tmp_path)
    path = files["llm"] / "pytorch_model-00002-of-00002.bin" if which == "llm-shard" else files[which]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=rf"{path.name}: cannot read \(truncated or corrupt file\?\)"):
        SoMeLVLM.from_lavis(config=tiny_cfg, **files)


def test_llm_index_naming_missing_shard(lavis_files, tiny_cfg, tmp_path):
    files = _copy(lavis_files, tmp_path)
    (files["llm"] / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(WeightsError, match=r"names shard\(s\) \['pytorch_model-00002-of-00002\.bin'\]"):
        SoMeLVLM.from_lavis(config=tiny_cfg, **files)


def test_llm_as_single_safetensors(lavis_files, tiny_cfg, tmp_path, loaded):
    from safetensors.torch import save_file

    files = _copy(lavis_files, tmp_path)
    sd = {}
    for f in sorted(files["llm"].glob("*.bin")):
        sd.update(torch.load(f, weights_only=True))
        f.unlink()
    (files["llm"] / "pytorch_model.bin.index.json").unlink()
    save_file(sd, str(files["llm"] / "model.safetensors"))
    m = SoMeLVLM.from_lavis(config=tiny_cfg, **files)
    assert torch.equal(m.llm.lm_head.weight, loaded.llm.lm_head.weight)


def test_fp16_vit_file_and_rounding(lavis_files, tiny_cfg, tmp_path, loaded):
    """A ViT file stored in fp16 loads to the same values (rounding is a no-op on fp16 values)."""
    files = _copy(lavis_files, tmp_path)
    sd = torch.load(files["vit"], weights_only=True)
    raw = sd["blocks.0.attn.qkv.weight"].clone()
    torch.save({k: v.half() if "qkv.weight" in k or "mlp" in k or "patch" in k or "attn.proj" in k else v
                for k, v in sd.items()}, files["vit"])
    m = SoMeLVLM.from_lavis(config=tiny_cfg, **files)
    assert torch.equal(m.vision.blocks[0].attn.qkv.weight, raw.half().float())
    assert torch.equal(m.vision.blocks[0].attn.qkv.weight, loaded.vision.blocks[0].attn.qkv.weight)


def test_vit_fp32_values_are_rounded_like_lavis(lavis_files, tiny_cfg, tmp_path):
    files = _copy(lavis_files, tmp_path)
    sd = torch.load(files["vit"], weights_only=True)
    sd["blocks.0.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"] + 1e-4 * torch.randn_like(sd["blocks.0.attn.qkv.weight"])
    sd["blocks.0.attn.q_bias"] = sd["blocks.0.attn.q_bias"] + 1e-4 * torch.randn(48)
    torch.save(sd, files["vit"])
    m = SoMeLVLM.from_lavis(config=tiny_cfg, **files)
    assert torch.equal(m.vision.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"].half().float())
    assert torch.equal(m.vision.blocks[0].attn.q_bias, sd["blocks.0.attn.q_bias"])  # biases of q/v stay fp32
    m32 = SoMeLVLM.from_lavis(config=tiny_cfg.replace(vision=tiny_cfg.vision.__class__(
        **{**tiny_cfg.vision.__dict__, "fp16_weights": False})), **files)
    assert torch.equal(m32.vision.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])


def test_missing_files_are_named(lavis_files, tiny_cfg, tmp_path):
    files = _copy(lavis_files, tmp_path)
    with pytest.raises(FileNotFoundError, match="ViT weights not found: .*nope.pth"):
        SoMeLVLM.from_lavis(config=tiny_cfg, **{**files, "vit": tmp_path / "nope.pth"})
    (files["llm"] / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        SoMeLVLM.from_lavis(config=tiny_cfg, **files)


def test_load_file_accepts_only_tensors(tmp_path):
    torch.save({"model": {"a": torch.ones(1)}, "epoch": 3, "config": {"lr": 1e-5}}, tmp_path / "ok.pth")
    assert load_file(tmp_path / "ok.pth")["epoch"] == 3
    (tmp_path / "x.json").write_text(json.dumps({}))
    with pytest.raises(WeightsError):
        load_file(tmp_path / "x.json")


def test_llm_folder_like_lavis_loads_it(lavis_files, tiny_cfg, tmp_path, loaded):
    """LAVIS loads the LLM with torch_dtype=float16 and resizes its vocab to pieces + [PAD]: an fp32
    folder is rounded to fp16 values, extra vocab rows are dropped."""
    files = _copy(lavis_files, tmp_path)
    for f in sorted(files["llm"].glob("*.bin")):
        sd = torch.load(f, weights_only=True)
        for k in list(sd):
            sd[k] = sd[k].float() + (1e-4 * torch.randn_like(sd[k].float()) if k == "lm_head.weight" else 0)
            if k in ("model.embed_tokens.weight", "lm_head.weight"):
                sd[k] = torch.cat([sd[k], torch.randn(7, sd[k].shape[1])])
        torch.save(sd, f)
        if "lm_head.weight" in sd:
            raw = sd["lm_head.weight"][:2001].clone()
    m = SoMeLVLM.from_lavis(config=tiny_cfg, **files)
    assert m.llm.lm_head.weight.shape[0] == 2001  # the file's first 2001 rows, as resize_token_embeddings keeps
    assert torch.equal(m.llm.lm_head.weight, raw.half().float())
    emb, ref = m.llm.get_input_embeddings().weight, loaded.llm.get_input_embeddings().weight
    assert emb.shape == ref.shape and torch.equal(emb[:2000], ref[:2000])
