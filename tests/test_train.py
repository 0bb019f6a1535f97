"""Fine-tuning: LAVIS training forward, freeze policy, data, trainer, checkpoints/resume, DDP, CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from somelvlm import SoMeLVLM
from somelvlm.processing import IGNORE_INDEX
from somelvlm.train import trainer
from somelvlm.train.data import Collator, EpochBatchSampler, Example, Problems, read_samples
from somelvlm.train.trainer import (FinetuneConfig, build_model, lr_at, param_groups, token_nll,
                                    train)

VENV_BIN = Path(sys.executable).parent
# Prompts / answers with identical token counts (LLM and Q-Former), so that a batch of 4 on one
# process and 2 x 2 on two processes weigh every token the same (LAVIS averages per process).
WORDS = ["red", "blue", "cat", "dog", "sun", "car", "tree", "bird", "fish", "moon", "star", "rose"]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each `train()` builds its own Accelerator; reset accelerate's process-wide singletons after it."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def tiny():
    return SoMeLVLM.from_config("tiny")


def equal_length_words(processor, n: int) -> list[str]:
    sp, q = processor.llm_tokenizer.sp, processor.qformer_tokenizer

    def lengths(w: str) -> tuple[int, int, int]:
        return len(sp.encode(prompt_for(w))), len(sp.encode(answer_for(w))), len(q.encode(prompt_for(w)))

    ref = lengths(WORDS[0])
    words = [w for w in WORDS if lengths(w) == ref]
    assert len(words) >= n, "not enough equal-length words for the DDP comparison"
    return words[:n]


def prompt_for(word: str) -> str:
    return f"What color is the {word} thing?"


def answer_for(word: str) -> str:
    return f"It is {word}"


def write_dataset(folder: Path, words: list[str], name: str = "data.json", size: tuple[int, int] = (72, 64)) -> Path:
    """Synthetic images (one colour pattern per word) and a SoMeData-style JSON list."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i, w in enumerate(words):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{w}{i}.png")
        records.append({"text_input": prompt_for(w), "text_output": answer_for(w), "image": f"{w}{i}.png"})
    path = folder / name
    path.write_text(json.dumps(records))
    return path


def config(tmp: Path, data: Path, **kw) -> FinetuneConfig:
    base = dict(model="tiny", train=[str(data)], out=str(tmp), num_workers=0, save_every=1000, log_every=1,
                warmup_steps=2, lr=1e-3, batch_size=4)
    base.update(kw)
    return FinetuneConfig(**base)


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]


def eval_losses(run: Path) -> list[float]:
    return [r["eval_loss"]["dev.json"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
            if "eval_loss" in r]


def last_trainable(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(trainer.checkpoints(run)[-1] / "trainable.safetensors"))


# ------------------------------------------------------------------------------------------------
# 1. The training forward against a loss computed by hand
# ------------------------------------------------------------------------------------------------
def test_training_loss_matches_hand_reference(tiny):
    proc = tiny.processor
    sp, Q = proc.llm_tokenizer.sp, tiny.config.qformer.num_queries
    prompts = ["Describe the image.", "word " * 200 + "Is this post hateful?", "What is the mood?"]
    answers = ["A cat on a mat.  ", "yes", "happy " * 300]
    g = torch.Generator().manual_seed(3)
    examples = [Example(torch.randn(3, 56, 56, generator=g), p, a, []) for p, a in zip(prompts, answers)]
    batch = Collator(proc)(examples)

    # the ids, built here from SentencePiece directly
    rows = []
    for p, a in zip(prompts, answers):
        instruction = [2] + sp.encode(p)[-127:]  # left-truncated to 128 with the leading </s> kept
        answer = (sp.encode(a.rstrip()) + [2])[:255]  # answer + </s>, right-truncated
        rows.append((instruction, answer))
    assert len(sp.encode(prompts[1])) > 127 and len(sp.encode(answers[2])) > 255  # both truncations happen
    L = max(len(i) + len(a) for i, a in rows)
    assert batch.input_ids.shape == (3, L)
    for b, (instruction, answer) in enumerate(rows):
        n = len(instruction) + len(answer)
        assert batch.input_ids[b, :n].tolist() == instruction + answer
        assert (batch.input_ids[b, n:] == tiny.config.llm.pad_id).all()  # right padding with [PAD]
        assert batch.attention_mask[b].tolist() == [1] * n + [0] * (L - n)
        assert batch.labels[b].tolist() == [IGNORE_INDEX] * len(instruction) + answer + [IGNORE_INDEX] * (L - n)
        q = proc.qformer_tokenizer.encode(prompts[b])  # the Q-Former sees the instruction
        assert batch.qformer_input_ids[b, :len(q)].tolist() == q

    tiny.eval()
    with torch.no_grad():
        out = tiny(**batch.inputs())
        assert out.logits.shape[1] == Q + L
        logp = torch.log_softmax(out.logits.double(), dim=-1)
        nll, count = 0.0, 0
        for b, (instruction, answer) in enumerate(rows):
            for t in range(len(instruction), len(instruction) + len(answer)):  # answer and </s> only
                nll -= logp[b, Q + t - 1, batch.input_ids[b, t]].item()  # position Q+t-1 predicts token t
                count += 1
        reference = nll / count
        assert out.loss.item() == pytest.approx(reference, abs=1e-5)
        loss = tiny.compute_loss(images=batch.pixel_values, prompts=prompts, answers=answers)
        assert loss.item() == pytest.approx(reference, abs=1e-5)
        s, c = token_nll(out.logits, batch.labels)
        assert (s.sum() / c.sum()).item() == pytest.approx(reference, abs=1e-5)


# ------------------------------------------------------------------------------------------------
# 2. Freeze policy: gradients reach exactly the trainable set
# ------------------------------------------------------------------------------------------------
def _batch(processor, n: int = 2):
    g = torch.Generator().manual_seed(1)
    return Collator(processor)([Example(torch.randn(3, 56, 56, generator=g), prompt_for(w), answer_for(w), [])
                                for w in WORDS[:n]])


@pytest.mark.parametrize("policy", ["default", "unfreeze_llm", "lora", "train_vit"])
def test_gradients_reach_exactly_the_trainable_set(policy):
    if policy == "lora":
        pytest.importorskip("peft")
    flags = {} if policy == "default" else {policy: True}
    model = build_model(FinetuneConfig(train=["x"], out="y", **flags))
    model.train()
    model(**_batch(model.processor).inputs()).loss.backward()
    trainable = {n for n, _ in model.trainable_parameters()}
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
        assert p.dtype == torch.float32 or not p.requires_grad
    last = model.config.qformer.layers - 1
    dead = (f"qformer.encoder.layer.{last}.intermediate.", f"qformer.encoder.layer.{last}.output.")
    connection = {n for n, _ in model.named_parameters()
                  if n.startswith(("query_tokens", "ln_vision.", "qformer.", "proj.")) and not n.startswith(dead)}
    vision = {n for n, _ in model.named_parameters() if n.startswith("vision.")}
    llm = {n for n, _ in model.named_parameters() if n.startswith("llm.")}
    assert model.qformer.training  # Q-Former dropout is on in training
    if policy == "default":
        assert trainable == connection
        assert not model.vision.training and not model.llm.training
    elif policy == "unfreeze_llm":
        assert trainable == connection | llm and model.llm.training
    elif policy == "train_vit":
        assert trainable == connection | vision and model.vision.training and not model.llm.training
    else:
        lora = trainable - connection
        assert lora and all(".lora_A." in n or ".lora_B." in n for n in lora)
        targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora}
        assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert not model.vision.training


def test_grad_checkpointing_is_active_in_the_frozen_llm_and_changes_nothing():
    cfg = FinetuneConfig(train=["x"], out="y", qformer_dropout=0.0)
    plain, ckpt = build_model(cfg), build_model(FinetuneConfig(**{**cfg.__dict__, "grad_checkpointing": True}))
    calls = []
    ckpt.llm.model.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))  # inside the checkpoint
    grads = []
    for m in (plain, ckpt):
        m.train()
        m(**_batch(m.processor).inputs()).loss.backward()
        grads.append({n: p.grad for n, p in m.trainable_parameters()})
    assert not ckpt.llm.training and len(calls) == 2  # the layer ran again in backward
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-6, rtol=1e-5)


def test_optimizer_groups_and_schedule():
    model = build_model(FinetuneConfig(train=["x"], out="y"))
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 and not names[id(p)].endswith(".bias") for p in decay["params"])
    assert all(p.ndim < 2 or names[id(p)].endswith(".bias") for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(model.trainable_parameters())
    cfg = FinetuneConfig()  # LAVIS: 1e-8 -> 1e-5 over 1000 steps, cosine to 0
    assert lr_at(0, cfg, 5000) == 1e-8
    assert lr_at(500, cfg, 5000) == pytest.approx(1e-8 + (1e-5 - 1e-8) / 2)
    assert lr_at(1000, cfg, 5000) == pytest.approx(1e-5)
    assert lr_at(3000, cfg, 5000) == pytest.approx(0.5e-5)
    assert lr_at(5000, cfg, 5000) == pytest.approx(0.0, abs=1e-20)


def test_sampler_resumes_and_shards_exactly():
    full = list(EpochBatchSampler(10, 2, seed=5, epoch=3))
    assert len(full) == 5 and sorted(i for b in full for _, i in b) == list(range(10))
    assert list(EpochBatchSampler(10, 2, seed=5, epoch=3, start=2)) == full[2:]
    global4 = list(EpochBatchSampler(10, 4, seed=5, epoch=3))  # drop_last: 2 global batches of 4
    ranks = [list(EpochBatchSampler(10, 2, seed=5, epoch=3, num_processes=2, rank=r)) for r in (0, 1)]
    assert [ranks[0][b] + ranks[1][b] for b in range(2)] == global4


# ------------------------------------------------------------------------------------------------
# 3. Data: bad lines and images are skipped and counted
# ------------------------------------------------------------------------------------------------
def test_bad_data_is_reported_skipped_and_counted(tmp_path, capsys):
    data = write_dataset(tmp_path / "d", WORDS[:4])
    good = json.loads(data.read_text())
    (tmp_path / "d" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    lines = [json.dumps(good[0]), "{broken json", json.dumps({**good[1], "text_output": "  "}),
             json.dumps({**good[2], "image": "missing.png"}), json.dumps({**good[3], "image": "corrupt.png"}),
             "", json.dumps(good[1]), json.dumps(good[2]), json.dumps(good[3]), json.dumps(["not", "an object"])]
    jsonl = tmp_path / "d" / "data.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")

    problems = Problems()
    samples = read_samples(jsonl, problems=problems)
    assert len(samples) == 5  # 4 good + the corrupt image, found only when decoded
    found = problems.lines()
    assert len(found) == 4
    for line, why in [(2, "not valid JSON"), (3, "'text_output' is missing or empty"), (4, "image not found"),
                      (10, "expected an object")]:
        assert any(f"data.jsonl:{line}: {why}" in f for f in found), (line, found)

    run = tmp_path / "run"
    train(config(run, jsonl, batch_size=5, max_steps=1))  # one batch holds every sample
    out = capsys.readouterr().out
    assert "5 sample(s) skipped" in out
    skipped = (run / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 5 and any("data.jsonl:5: cannot read image" in s for s in skipped)
    assert (run / "final" / "model.safetensors").is_file()


def test_clear_errors(tmp_path):
    data = write_dataset(tmp_path / "d", WORDS[:2])
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        train(config(tmp_path / "r1", tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train(config(tmp_path / "r2", data, batch_size=4))
    empty = tmp_path / "d" / "empty.json"
    empty.write_text(json.dumps([{"text_input": "q", "text_output": "", "image": "x.png"}]))
    with pytest.raises(ValueError, match="no usable training samples"):
        train(config(tmp_path / "r3", empty))
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        FinetuneConfig.for_resume(tmp_path / "d")
    with pytest.raises(ValueError, match="--lora and --unfreeze-llm"):
        train(config(tmp_path / "r4", data, lora=True, unfreeze_llm=True))


# ------------------------------------------------------------------------------------------------
# 4. Trainer: overfitting, resume, two processes
# ------------------------------------------------------------------------------------------------
def test_overfits_a_tiny_set(tmp_path):
    data = write_dataset(tmp_path / "d", WORDS[:4])
    # The random tiny LLM's output layer is nearly uniform, so 8 soft-prompt vectors alone can only
    # move the loss a little: the default policy must lower it, the unfrozen LLM must halve it.
    default = train(config(tmp_path / "default", data, max_steps=30))
    curve = losses(default)
    assert len(curve) == 30 and curve[-1] < curve[0] - 0.2
    llm = train(config(tmp_path / "llm", data, max_steps=30, lr=3e-3, warmup_steps=3, unfreeze_llm=True))
    curve = losses(llm)
    assert curve[-1] <= curve[0] / 2, curve


class Killed(Exception):
    pass


def test_resume_continues_exactly(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "d", WORDS[:6])  # 3 batches of 2 per epoch: 20 steps cross epochs
    kw = dict(max_steps=20, batch_size=2, grad_accum=2, save_every=10, keep_checkpoints=0)
    whole = train(config(tmp_path / "whole", data, **kw))

    save = trainer.save_checkpoint

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise Killed  # the process dies right after the step-10 checkpoint

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train(config(tmp_path / "cut", data, **kw))
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    with (tmp_path / "cut" / "log.jsonl").open("a") as fh:  # lines logged after the checkpoint are dropped
        fh.write(json.dumps({"step": 11, "loss": 0.0}) + '\n{"step": 12, "lo')
    # loader worker processes must not change anything either (augmentation is seeded per sample)
    resumed = train(FinetuneConfig.for_resume(tmp_path / "cut", num_workers=2))

    assert build_model(config(tmp_path, data)).qformer.embeddings.dropout.p == 0.1  # dropout was on
    assert losses(resumed) == pytest.approx(losses(whole), abs=1e-6)
    a, b = last_trainable(whole), last_trainable(resumed)
    assert trainer.checkpoints(resumed)[-1].name == "step-00000020" and a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0)
    with pytest.raises(FileExistsError, match="--resume"):
        train(config(tmp_path / "whole", data))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny):
    data = write_dataset(tmp_path / "d", equal_length_words(tiny.processor, 8))
    dev = tmp_path / "d" / "dev.json"  # 7 samples: uneven shards, padded on one process
    dev.write_text(json.dumps(json.loads(data.read_text())[:7]))
    common = ["--train", str(data), "--max-steps", "3", "--lr", "1e-3", "--warmup-steps", "1", "--log-every", "1",
              "--qformer-dropout", "0", "--num-workers", "0", "--eval", str(dev)]
    # `accelerate launch --cpu` starts one process only (several need mpirun); --multi_gpu starts
    # torchrun, and the trainer's --cpu makes every process a gloo CPU worker.
    cmd = [str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "somelvlm.train", "--cpu", "--batch-size", "2", "--out", str(tmp_path / "two"), *common]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((trainer.checkpoints(tmp_path / "two")[-1] / "state.json").read_text())
    assert state["num_processes"] == 2 and state["step"] == 3
    assert state["fingerprints"][0] == state["fingerprints"][1]  # the ranks hold identical weights

    from somelvlm.train import config_from_args, configure
    import argparse

    args = configure(argparse.ArgumentParser()).parse_args(["--batch-size", "4", "--out", str(tmp_path / "one"),
                                                            *common])
    train(config_from_args(args))
    a, b = last_trainable(tmp_path / "one"), last_trainable(tmp_path / "two")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    assert eval_losses(tmp_path / "two") == pytest.approx(eval_losses(tmp_path / "one"), abs=1e-5)


# ------------------------------------------------------------------------------------------------
# 5. Command line and outputs
# ------------------------------------------------------------------------------------------------
def test_cli_writes_a_loadable_final_model_and_lavis_checkpoint(tmp_path, capsys):
    pytest.importorskip("peft")
    from somelvlm.cli import main

    data = write_dataset(tmp_path / "d", WORDS[:4], name="ann.jsonl")
    data.write_text("\n".join(json.dumps(r) for r in json.loads(data.read_text())))
    images = tmp_path / "d"
    run = tmp_path / "run"
    rc = main(["finetune", "--model", "tiny", "--train", str(data), "--images-root", str(images), "--out", str(run),
               "--max-steps", "2", "--batch-size", "2", "--num-workers", "0", "--lora", "--lavis-checkpoint",
               "--eval", str(data), "--lr", "1e-2", "--warmup-steps", "1"])
    assert rc == 0
    final = SoMeLVLM.from_pretrained(run / "final")
    base = SoMeLVLM.from_config("tiny")
    trained = last_trainable(run)
    sd = final.state_dict()
    for name, t in trained.items():
        if ".lora_" not in name:
            torch.testing.assert_close(sd[name], t)
    q = "llm.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sd[q], base.state_dict()[q])  # LoRA merged into the LLM
    assert (run / "lora-adapter" / "adapter_config.json").is_file()
    lavis = torch.load(run / "final" / "checkpoint.pth", weights_only=True)["model"]
    torch.testing.assert_close(lavis["llm_proj.weight"], sd["proj.weight"])
    torch.testing.assert_close(lavis["Qformer.bert.encoder.layer.3.output.dense.weight"],
                               sd["qformer.encoder.layer.3.output.dense.weight"])
    assert {"query_tokens", "ln_vision.weight", "llm_model.model.layers.0.self_attn.q_proj.weight"} <= lavis.keys()
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "samples_per_s", "grad_norm"} <= records[0].keys()
    assert any("eval_loss" in r and math.isfinite(r["eval_loss"]["ann.jsonl"]) for r in records)
    assert json.loads((run / "args.json").read_text())["lora"] is True

    # --resume RUN continues with the saved settings; flags given with it override them
    assert main(["finetune", "--resume", str(run), "--max-steps", "3"]) == 0
    assert trainer.checkpoints(run)[-1].name == "step-00000003"
    saved = json.loads((run / "args.json").read_text())
    assert saved["max_steps"] == 3 and saved["lora"] is True and saved["resume"] is None
    assert main(["finetune", "--resume", str(tmp_path / "d")]) == 1
    assert "not a run folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# 6. Failures a user meets: divergence, all samples bad, odd checkpoint folders, options
# ------------------------------------------------------------------------------------------------
def finetune_cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """`python -m somelvlm finetune ...` in a subprocess, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "somelvlm", "finetune", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def strict_json_lines(path: Path) -> list[dict]:
    """Every line of `path` parsed as strict JSON (no NaN / Infinity)."""
    def refuse(constant: str):
        raise AssertionError(f"{path}: bare {constant} in a JSON line")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("somelvlm finetune: error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    data = write_dataset(tmp_path / "d", WORDS[:4])
    run = tmp_path / "run"
    # lr 1e10 from step 2 on: step 2's update gives weights whose loss at step 3 is NaN
    proc = finetune_cli("--train", str(data), "--out", str(run), "--max-steps", "3", "--batch-size", "2",
                        "--lr", "1e10", "--warmup-steps", "1", "--log-every", "1", "--save-every", "1",
                        "--keep-checkpoints", "1", "--num-workers", "0", "--no-progress")
    assert proc.returncode == 1
    error = one_line_error(proc)
    assert "training diverged at step 3: the loss is nan" in error and "no final/ written" in error, error
    assert "last good checkpoint" in error and "step-00000001" in error, error
    assert not (run / "final").exists()
    # step 2's checkpoint holds the weights that gave the NaN: set aside, and the older one was not
    # rotated away (--keep-checkpoints 1) before the next step's loss vouched for the newer one
    assert [p.name for p in trainer.checkpoints(run)] == ["step-00000001"]
    assert (run / "diverged" / "step-00000002" / "trainable.safetensors").is_file()
    records = strict_json_lines(run / "log.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and "nan" in records[-1]["diverged"]
    assert all(math.isfinite(r["loss"]) for r in records[:2])

    # the advice in the message works: continue from the good checkpoint with a lower lr
    proc = finetune_cli("--resume", str(run), "--lr", "1e-3", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "final" / "model.safetensors").is_file()
    records = strict_json_lines(run / "log.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)


def test_non_finite_learning_rate_or_weights_stop_the_run(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "d", WORDS[:4])
    schedule = trainer.lr_at
    monkeypatch.setattr(trainer, "lr_at", lambda s, cfg, total: math.nan if s >= 2 else schedule(s, cfg, total))
    with pytest.raises(trainer.Diverged, match="at step 3: the learning rate is nan"):
        train(config(tmp_path / "lr", data, max_steps=4, batch_size=2, save_every=1, keep_checkpoints=1))
    # the weights of step 2 gave a finite loss at step 3: they are the last good checkpoint
    assert [p.name for p in trainer.checkpoints(tmp_path / "lr")] == ["step-00000002"]
    assert not (tmp_path / "lr" / "final").exists() and not (tmp_path / "lr" / "diverged").exists()
    monkeypatch.setattr(trainer, "lr_at", schedule)

    # an lr of 1e300 is a finite float, but fp32 weights overflow: no checkpoint of them, no final/
    with pytest.raises(trainer.Diverged, match="at step 2: a trainable weight is not finite"):
        train(config(tmp_path / "w", data, lr=1e300, warmup_steps=1, max_steps=2, batch_size=2, save_every=1))
    assert [p.name for p in trainer.checkpoints(tmp_path / "w")] == ["step-00000001"]
    assert not (tmp_path / "w" / "final").exists()
    strict_json_lines(tmp_path / "w" / "log.jsonl")


def test_json_log_never_holds_nan(tmp_path):
    log = trainer.RunLog(tmp_path, enabled=True, resume_step=None)
    log.write({"step": 1, "loss": 1.5, "grad_norm": math.inf, "eval_loss": {"dev.json": math.nan}})
    log.close()
    assert strict_json_lines(tmp_path / "log.jsonl") == [
        {"step": 1, "loss": 1.5, "grad_norm": None, "eval_loss": {"dev.json": None}}]


def test_a_run_whose_every_image_is_bad_can_be_rerun_with_the_same_out(tmp_path):
    data = write_dataset(tmp_path / "d", WORDS[:4])
    images = sorted((tmp_path / "d").glob("*.png"))
    good = {p: p.read_bytes() for p in images}
    for p in images:  # present but undecodable: found only when the loader reads them
        p.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    run = tmp_path / "run"
    # default --num-workers: the images are read in worker processes, as by users
    args = ["--train", str(data), "--out", str(run), "--max-steps", "2", "--batch-size", "2", "--no-progress"]
    proc = finetune_cli(*args)
    assert proc.returncode == 1
    error = one_line_error(proc)
    assert "none of the 4 samples has a readable image" in error and "cannot read image" in error, error

    for p, content in good.items():
        p.write_bytes(content)
    proc = finetune_cli(*args)  # the same command again: no "existing run" / "no checkpoint" dead end
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "final" / "model.safetensors").is_file()
    assert "starting it again" in proc.stderr
    assert "worker processes in total" not in proc.stderr  # torch's warning about too many workers
    # --no-progress: no bar, one plain line per logged step
    assert "it/s" not in proc.stderr and "step 2/2: loss " in proc.stdout, (proc.stdout, proc.stderr)
    assert [r["step"] for r in strict_json_lines(run / "log.jsonl")] == [2]


def test_folders_that_are_not_checkpoints_are_ignored_with_a_warning(tmp_path, caplog):
    data = write_dataset(tmp_path / "d", WORDS[:4])
    run = train(config(tmp_path / "run", data, max_steps=2, batch_size=2, save_every=1, keep_checkpoints=0))
    folder = run / "checkpoints"
    (folder / "step-00000002-copy").mkdir()  # a user's copy
    (folder / "step-00000099").mkdir()  # a step-N folder without its files
    (folder / "step-notes.txt").write_text("tried lr 1e-3")
    with caplog.at_level("WARNING", logger="somelvlm"):
        found = trainer.checkpoints(run, warn=True)
    assert [p.name for p in found] == ["step-00000001", "step-00000002"]
    ignored = sorted(r.getMessage() for r in caplog.records if r.getMessage().startswith("ignoring"))
    assert len(ignored) == 3 and any("step-00000099: not a complete checkpoint" in m for m in ignored), ignored
    caplog.clear()
    with caplog.at_level("WARNING", logger="somelvlm"):  # resuming picks the newest real one
        train(FinetuneConfig.for_resume(run, max_steps=3))
    assert trainer.checkpoints(run)[-1].name == "step-00000003"
    assert (folder / "step-00000002-copy").is_dir() and (folder / "step-notes.txt").is_file()  # left alone
    assert any("step-00000002-copy: not a checkpoint folder name" in r.getMessage() for r in caplog.records)
    for p in trainer.checkpoints(run):  # only odd folders left: nothing to resume, and final/ is not overwritten
        shutil.rmtree(p)
    with pytest.raises(FileNotFoundError, match="has a final/ model but no checkpoint"):
        train(FinetuneConfig.for_resume(run, max_steps=4))


def test_mixed_precision_and_dtype_are_explicit(tmp_path, capsys):
    from somelvlm.cli import main
    from somelvlm.train import mixed_precision

    cfg = FinetuneConfig(train=["x"], out="y")
    assert mixed_precision(cfg, on_gpu=False) == "no" and trainer.frozen_dtype(cfg, on_gpu=False) == torch.float32
    assert FinetuneConfig(dtype="auto").dtype is None  # args.json of runs saved before --mixed-precision
    model = build_model(FinetuneConfig(train=["x"], out="y", mixed_precision="bf16"))
    assert trainer.frozen_dtype(FinetuneConfig(mixed_precision="bf16", dtype="fp16"), False) == torch.float16
    for name, p in model.named_parameters():  # frozen ViT and LLM in the autocast dtype, trainable ones fp32
        if p.requires_grad or name.startswith(("vision.", "llm.")):
            assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name

    data = write_dataset(tmp_path / "d", WORDS[:2])
    run = train(config(tmp_path / "bf16", data, mixed_precision="bf16", max_steps=1, batch_size=2))
    assert all(math.isfinite(x) for x in losses(run))
    assert main(["finetune", "--train", str(data), "--out", str(tmp_path / "r"), "--mixed-precision", "fp16",
                 "--cpu"]) == 1
    assert "--mixed-precision fp16 needs a GPU" in capsys.readouterr().err
    assert main(["finetune", "--train", str(data), "--out", str(tmp_path / "r"), "--lr", "nan"]) == 1
    assert "--lr must be a finite number" in capsys.readouterr().err


def test_help_shows_every_default():
    import argparse
    import re

    from dataclasses import fields as dataclass_fields

    from somelvlm.train import configure

    text = re.sub(r"\s+", " ", configure(argparse.ArgumentParser(prog="x")).format_help())
    for f in dataclass_fields(FinetuneConfig):
        default = f.default_factory() if callable(f.default_factory) else f.default
        flag = "--" + f.name.replace("_", "-")
        help_text = text.split(flag, 2)[-1].split(" --", 1)[0]  # the option's own entry
        if default is None or default is False or default == []:
            continue  # flags, required settings and documented defaults ("default: ...")
        assert re.sub(r"\s+", "", f"(default: {default})") in help_text.replace(" ", ""), (flag, help_text)
    assert "--no-progress" in text and "--mixed-precision {no,bf16,fp16}" in text
    assert f"{trainer.default_workers()} for one process here" in text


@pytest.mark.slow
def test_readme_smoke_test_runs_verbatim_and_lowers_the_loss(tmp_path):
    import re

    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text()
    block = readme.split("<!-- finetune-smoke-test -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    claimed = re.search(r"done: runs/try/run/final; loss ([\d.]+) \(step 5\) -> ([\d.]+) \(step 30\)", readme)
    assert claimed, "the README's smoke test names no result"
    (tmp_path / "src").symlink_to(repo / "src")  # the repository root as the README assumes it
    (tmp_path / ".venv").symlink_to(VENV_BIN.parent)
    env = {**os.environ, "PYTHONPATH": str(repo / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = re.search(r"loss ([\d.]+) \(step 5\) -> ([\d.]+) \(step 30\)", proc.stdout)
    assert got, proc.stdout
    first, last = map(float, got.groups())
    assert last < first / 3
    assert (first, last) == pytest.approx(tuple(map(float, claimed.groups())), abs=0.02)
