"""Loading: the module graph, the default dtype policy, LAVIS-tolerant ViT files, layered checkpoints,
plain-text forward, and every bad weight/config/tokenizer file giving one clear line."""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from reference import TINY_PIECES
from somelvlm import SoMeLVLM
from somelvlm.convert import convert_lavis
from somelvlm.processing import SAMPLE_IMAGE, asset_path
from somelvlm.weights import WeightsError

SRC = Path(__file__).resolve().parents[1] / "src" / "somelvlm"


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "somelvlm", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("somelvlm") and ": error: " in line]
    assert len(errors) == 1, r.stderr[-2000:]
    message = r.stderr[r.stderr.index(errors[0]):]  # a key list may follow the line, indented
    for n in needles:
        assert n in message, (n, message)


@pytest.fixture(scope="module")
def auto_folder(lavis_files, tiny_cfg, tmp_path_factory):
    """A folder written by the default conversion: LLM and ViT linears fp16, the rest fp32."""
    out = tmp_path_factory.mktemp("auto") / "model"
    convert_lavis(config=tiny_cfg, out=out, progress=False, **lavis_files)
    return out


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, TINY_PIECES, (2, 6), generator=g)
    ids[:, 0] = 2
    q = torch.tensor([[101, 2054, 2003, 102], [101, 7592, 102, 0]])
    return dict(pixel_values=torch.randn(2, 3, 56, 56, generator=g), input_ids=ids, qformer_input_ids=q,
                qformer_attention_mask=(q != 0).long())


# ------------------------------------------------------------------------------------------------
# The module graph
# ------------------------------------------------------------------------------------------------
def _imports(path: Path, top_level: bool) -> set[str]:
    """somelvlm modules imported by `path` (module level only, or inside functions only)."""
    tree = ast.parse(path.read_text())
    package = path.relative_to(SRC.parent).with_suffix("").parts[:-1]
    func_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f) if n is not f}
    out = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or (id(node) in func_nodes) == top_level:
            continue
        if node.level:
            base = list(package[: len(package) - node.level + 1])
            mod = ".".join(base + ([node.module] if node.module else []))
            names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
        else:
            names = [node.module] if node.module and node.module.startswith("somelvlm") else []
        for name in names:
            while name and not (SRC.parent / (name.replace(".", "/") + ".py")).is_file() \
                    and not (SRC.parent / name.replace(".", "/") / "__init__.py").is_file():
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def test_import_graph_is_acyclic_and_loaders_do_not_dodge_cycles():
    graph = {}
    for f in SRC.rglob("*.py"):
        mod = ".".join(f.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
        graph[mod] = _imports(f, top_level=True) - {mod}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [m, n]))
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    ours = ["config", "weights", "loading", "folder", "lavis", "hf", "hub", "convert", "model", "precision",
            "vocab", "loss"]
    for name in ours:
        inner = _imports(SRC / f"{name}.py", top_level=False)
        assert not inner & {f"somelvlm.{o}" for o in ours}, (name, inner)
    # each module imports first, alone (heavy third-party modules stay loaded between tries)
    code = ("import importlib, sys\n"
            f"for name in {ours!r}:\n"
            "    for m in [m for m in sys.modules if m.startswith('somelvlm')]: del sys.modules[m]\n"
            "    importlib.import_module('somelvlm.' + name)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# ------------------------------------------------------------------------------------------------
# Default dtype (issue 13, must-fix 1)
# ------------------------------------------------------------------------------------------------
def test_default_load_of_auto_folder_runs_in_fp32_on_cpu(auto_folder, loaded, batch):
    stored = {k: v.dtype for k, v in __import__("safetensors.torch").torch.load_file(
        str(auto_folder / "model.safetensors")).items()}
    assert stored["llm.lm_head.weight"] == torch.float16 and stored["qformer.embeddings.LayerNorm.weight"] == torch.float32
    m = SoMeLVLM.from_pretrained(auto_folder)
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    with torch.no_grad():
        assert torch.equal(m(**batch).logits, loaded(**batch).logits)  # lossless: fp32 values of LAVIS
        loss = m.compute_loss(batch["pixel_values"][:1], ["a question"], ["an answer"])
    assert torch.isfinite(loss)


def test_default_policy_per_device():
    from somelvlm.precision import auto_dtype, resolve_dtype, target_dtype

    assert auto_dtype("cpu") == torch.float32 and auto_dtype(None) == torch.float32
    assert auto_dtype("cuda:1") == torch.float16 and resolve_dtype("bf16", "cuda") == torch.bfloat16
    assert target_dtype("qformer.encoder.layer.0.output.dense.weight", torch.float16) == torch.float32
    assert target_dtype("llm.lm_head.weight", torch.float16) == torch.float16


def test_cli_generate_on_default_converted_folder(auto_folder):
    r = run_cli("generate", "--model", str(auto_folder), "--image", str(asset_path(SAMPLE_IMAGE)), "--prompt",
                "What is shown?", "--max-new-tokens", "3", "--num-beams", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Float and Half" not in r.stderr


def test_torch_dtype_alias(auto_folder):
    m = SoMeLVLM.from_pretrained(auto_folder, torch_dtype=torch.bfloat16)
    assert m.llm.lm_head.weight.dtype == torch.bfloat16 and m.proj.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="disagree"):
        SoMeLVLM.from_pretrained(auto_folder, dtype="fp16", torch_dtype="bf16")


def test_generation_options_come_from_the_folder(auto_folder, tmp_path):
    from somelvlm.options import GenerationOptions

    assert SoMeLVLM.from_pretrained(auto_folder).generation_options == GenerationOptions()
    folder = tmp_path / "m"
    shutil.copytree(auto_folder, folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**gen, "num_beams": 2}))
    assert SoMeLVLM.from_pretrained(folder).generation_options.num_beams == 2


# ------------------------------------------------------------------------------------------------
# LAVIS-tolerant ViT and layered checkpoints (issue 10, section 2)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eva_clip_vit(lavis_files, tmp_path_factory):
    """The ViT file with EVA-CLIP's final norm and head (1024 x width), which LAVIS ignores."""
    sd = torch.load(lavis_files["vit"], weights_only=True)
    width = sd["cls_token"].shape[-1]
    sd.update({"norm.weight": torch.ones(width), "norm.bias": torch.zeros(width),
               "head.weight": torch.randn(1024, width), "head.bias": torch.zeros(1024)})
    path = tmp_path_factory.mktemp("vit") / "eva_vit_g.pth"
    torch.save(sd, path)
    return path


def test_vit_extras_are_ignored_like_lavis_and_strict_rejects(lavis_files, tiny_cfg, eva_clip_vit, loaded, caplog,
                                                             batch):
    files = {**lavis_files, "vit": eva_clip_vit}
    with caplog.at_level(logging.INFO, logger="somelvlm"):
        m = SoMeLVLM.from_lavis(config=tiny_cfg, **files)
    line = next(r.getMessage() for r in caplog.records if "ignored 4 key(s)" in r.getMessage())
    assert str(eva_clip_vit) in line and "vision.head.weight" in line and "vision.norm.bias" in line
    with torch.no_grad():
        assert torch.equal(m(**batch).logits, loaded(**batch).logits)
    with pytest.raises(WeightsError, match=r"unexpected 4 key\(s\): vision.head.bias \(from .*eva_vit_g.pth\)"):
        SoMeLVLM.from_lavis(config=tiny_cfg, strict=True, **files)


def test_vit_missing_key_and_wrong_shape_stay_errors(lavis_files, tiny_cfg, tmp_path):
    sd = torch.load(lavis_files["vit"], weights_only=True)
    del sd["blocks.1.mlp.fc1.bias"]
    sd["pos_embed"] = sd["pos_embed"][:, :-1]
    torch.save(sd, tmp_path / "vit.pth")
    with pytest.raises(WeightsError) as e:
        SoMeLVLM.from_lavis(config=tiny_cfg, **{**lavis_files, "vit": tmp_path / "vit.pth"})
    assert "missing 1 key(s): vision.blocks.1.mlp.fc1.bias" in str(e.value)
    assert f"wrong shape for vision.pos_embed (from {tmp_path / 'vit.pth'})" in str(e.value)


def test_layered_checkpoints_later_wins_and_base_fills_gaps(lavis_files, tiny_cfg, tmp_path, loaded, caplog):
    ckpt = torch.load(lavis_files["checkpoint"], weights_only=True)["model"]
    gap = "Qformer.bert.encoder.layer.1.output_query.dense.bias"
    base = {k: v + 1 for k, v in ckpt.items() if v.is_floating_point()}
    torch.save({"model": base}, tmp_path / "base.pth")
    torch.save({"model": {k: v for k, v in ckpt.items() if k != gap}}, tmp_path / "finetuned.pth")
    with caplog.at_level(logging.INFO, logger="somelvlm"):
        m = SoMeLVLM.from_lavis(checkpoint=[tmp_path / "base.pth", tmp_path / "finetuned.pth"], vit=lavis_files["vit"],
                                llm=lavis_files["llm"], config=tiny_cfg)
    ours = "qformer.encoder.layer.1.output_query.dense.bias"
    assert torch.equal(m.state_dict()[ours], base[gap])
    for k, v in loaded.state_dict().items():
        if k != ours:
            assert torch.equal(m.state_dict()[k], v), k
    n = len(base)
    assert f"base.pth supplied 1 of the {n} checkpoint keys" in caplog.text
    assert f"finetuned.pth supplied {n - 1} of the {n} checkpoint keys" in caplog.text
    # the finetuned file alone lacks the tensor
    with pytest.raises(WeightsError, match=f"missing 1 key.*{ours}"):
        SoMeLVLM.from_lavis(checkpoint=tmp_path / "finetuned.pth", vit=lavis_files["vit"], llm=lavis_files["llm"],
                            config=tiny_cfg)


def test_cli_layered_checkpoints_and_strict(lavis_files, eva_clip_vit, tmp_path):
    args = ["convert", "--lavis-checkpoint", str(lavis_files["checkpoint"]), "--lavis-checkpoint",
            str(lavis_files["checkpoint"]), "--vit", str(eva_clip_vit), "--llm", str(lavis_files["llm"]),
            "--config", "tiny", "--no-progress"]
    r = run_cli(*args, "--out", str(tmp_path / "ok"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "supplied" in r.stderr and "ignored 4 key(s)" in r.stderr
    assert_one_line_error(run_cli(*args, "--strict", "--out", str(tmp_path / "strict")), "unexpected 4 key(s)")
    assert not (tmp_path / "strict").exists()


# ------------------------------------------------------------------------------------------------
# Plain-text posts (issue 10, section 3: the model side)
# ------------------------------------------------------------------------------------------------
def test_text_only_logits_equal_llama_alone(loaded, batch):
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM(loaded.llm.config).eval()
    llama.load_state_dict(loaded.llm.state_dict())
    ids = batch["input_ids"]
    with torch.no_grad():
        ours = loaded(input_ids=ids).logits
        theirs = llama(input_ids=ids).logits
        assert ours.shape == (2, ids.shape[1], TINY_PIECES + 1)
        assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        labels = ids.clone()
        labels[:, :3] = -100
        full = loaded(input_ids=ids, labels=labels).loss
        lean = loaded(input_ids=ids, labels=labels, return_logits=False).loss
        ref = torch.nn.functional.cross_entropy(theirs[:, :-1].reshape(-1, theirs.shape[-1]),
                                                labels[:, 1:].reshape(-1), ignore_index=-100)
    assert_close(full, ref, atol=1e-5, rtol=1e-5)
    assert_close(lean, ref, atol=1e-5, rtol=1e-5)


def test_compute_loss_without_images_is_the_llm_alone(loaded):
    proc = loaded.processor
    text = proc.training_text(["a post without an image"], ["positive"])
    with torch.no_grad():
        got = loaded.compute_loss(None, ["a post without an image"], ["positive"])
        logits = loaded.llm(input_ids=text.input_ids, attention_mask=text.attention_mask).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                            text.labels[:, 1:].reshape(-1), ignore_index=-100)
    assert_close(got, ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Folders we write
# ------------------------------------------------------------------------------------------------
def test_written_folders_respect_umask_and_stale_temporaries_go(loaded, tmp_path):
    stale = tmp_path / ".model.tmp-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    old = os.umask(0o022)
    try:
        loaded.save_pretrained(tmp_path / "model")
    finally:
        os.umask(old)
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755
    assert not stale.exists()


def test_hf_folder_given_to_load_is_imported(loaded, tmp_path, batch):
    loaded.save_pretrained(tmp_path / "hf", format="hf")
    m = SoMeLVLM.load(str(tmp_path / "hf"))
    with torch.no_grad():
        assert_close(m(**batch).logits, loaded(**batch).logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Bad inputs: one clear line (issue 13, "Also")
# ------------------------------------------------------------------------------------------------
def _break(folder: Path, case: str) -> str:
    """Damage a copy of a converted folder; returns what the error must name."""
    from safetensors.torch import load_file, save_file

    if case == "config-json":
        (folder / "config.json").write_text("{not json")
        return "config.json: not valid JSON"
    if case == "config-type":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["vision"]["width"] = "48"
        (folder / "config.json").write_text(json.dumps(cfg))
        return "vision.width must be int, got '48'"
    if case == "processor-json":
        (folder / "processor_config.json").write_text("[1,")
        return "processor_config.json: not valid JSON"
    if case == "no-tokenizer":
        (folder / "tokenizer.model").unlink()
        return "tokenizer.model is missing"
    if case == "garbage-tokenizer":
        (folder / "tokenizer.model").write_bytes(b"\x00garbage" * 10)
        return "tokenizer.model: not a SentencePiece model"
    sd = load_file(str(folder / "model.safetensors"))
    if case == "int-weight":
        sd["proj.bias"] = sd["proj.bias"].to(torch.int32)
        save_file(sd, str(folder / "model.safetensors"))
        return "proj.bias is stored as torch.int32"
    if case == "float64-weight":
        sd["proj.bias"] = sd["proj.bias"].double()
        save_file(sd, str(folder / "model.safetensors"))
        return "proj.bias is stored as float64"
    if case == "index-escape":
        (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"proj.bias": "../model-00001-of-00001.safetensors"}}))
        return "point outside"
    if case == "index-json":
        (folder / "model.safetensors.index.json").write_text("{")
        return "model.safetensors.index.json: not a valid index file"
    raise KeyError(case)


BAD_FOLDERS = ["config-json", "config-type", "processor-json", "no-tokenizer", "garbage-tokenizer", "int-weight",
               "float64-weight", "index-escape", "index-json"]


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_bad_folder_is_one_clear_error(case, auto_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(auto_folder, folder)
    needle = _break(folder, case)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        SoMeLVLM.from_pretrained(folder)
    assert needle in str(e.value) and "\n" not in str(e.value).strip()


@pytest.mark.parametrize("case", ["config-type", "garbage-tokenizer", "int-weight", "index-escape"])
def test_bad_folder_through_the_cli(case, auto_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(auto_folder, folder)
    needle = _break(folder, case)
    r = run_cli("generate", "--model", str(folder), "--image", str(asset_path(SAMPLE_IMAGE)), "--prompt", "hi",
                "--max-new-tokens", "2", "--num-beams", "1")
    assert_one_line_error(r, needle)


def test_non_finite_values_warn_once_naming_the_tensor(auto_folder, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(auto_folder, folder)
    sd = load_file(str(folder / "model.safetensors"))
    sd["proj.bias"][0] = float("nan")
    save_file(sd, str(folder / "model.safetensors"))
    with caplog.at_level(logging.WARNING, logger="somelvlm"):
        SoMeLVLM.from_pretrained(folder)
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warnings) == 1 and "proj.bias" in warnings[0]


def test_pickle_refusal_shows_only_our_explanation(lavis_files, tiny_cfg, tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model": {"x": Evil()}}, tmp_path / "ckpt.pth")
    r = run_cli("convert", "--lavis-checkpoint", str(tmp_path / "ckpt.pth"), "--vit", str(lavis_files["vit"]),
                "--llm", str(lavis_files["llm"]), "--config", "tiny", "--out", str(tmp_path / "out"))
    assert_one_line_error(r, "refused to load", "system")
    assert "weights_only=False" not in r.stderr
