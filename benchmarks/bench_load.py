"""Conversion and loading: peak memory and time, somelvlm vs transformers' InstructBLIP.

Builds random weights with the released dims (full EVA-ViT-g, full Q-Former, Vicuna-7B-wide LLM
with --llm-layers layers), writes them in the released LAVIS layout (eva_vit_g.pth in fp16 with
40 blocks, checkpoint.pth with AdamW state, an fp16 .bin LLaMA folder), then measures in fresh
processes:
  convert      `somelvlm convert` LAVIS files -> bf16 somelvlm folder
  ours load    SoMeLVLM.from_pretrained(folder, dtype=bf16)
  HF load      InstructBlipForConditionalGeneration.from_pretrained(hf_folder, dtype=bf16), same weights
Peak memory is the process's peak RSS (VmHWM, reset after imports) minus its RSS after imports,
right after loading and again after touching every weight (memory-mapped weights count once
touched), next to the targets: load <= 1.15x weight bytes, conversion <= largest input + 1 GB.

    python benchmarks/bench_load.py --llm-layers 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, padded_tokenizer, run_worker  # noqa: E402

GB = 1e9


def write_lavis_files(root: Path, llm_layers: int) -> None:
    """Random released-layout files (names via somelvlm's LAVIS rules)."""
    import dataclasses

    from somelvlm import SoMeLVLM, SoMeLVLMConfig
    from somelvlm.weights import WeightMap

    cfg = SoMeLVLMConfig.preset("vicuna7b")
    cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, layers=llm_layers))
    torch.manual_seed(0)
    with torch.device("meta"):
        model = SoMeLVLM(cfg)
    lavis = WeightMap.load("lavis").from_ours({k: v for k, v in model.state_dict().items()})
    g = torch.Generator().manual_seed(0)

    def rand(shape, dtype):
        return (torch.randn(shape, generator=g) * 0.02).to(dtype)

    vit = {k.removeprefix("visual_encoder."): rand(v.shape, torch.float16) for k, v in lavis.items()
           if k.startswith("visual_encoder.")}
    for k in [k for k in vit if k.startswith("blocks.38.")]:  # EVA-CLIP-g stores 40 blocks
        vit[k.replace("blocks.38.", "blocks.39.")] = vit[k].clone()
    torch.save(vit, root / "eva_vit_g.pth")
    del vit
    conn = {k: rand(v.shape, torch.float32) for k, v in lavis.items()
            if not k.startswith(("visual_encoder.", "llm_model."))}
    conn["Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]
    opt = {"state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(v), "exp_avg_sq": torch.zeros_like(v)}
                     for i, v in enumerate(conn.values()) if v.is_floating_point()},
           "param_groups": [{"lr": 1e-5, "params": list(range(len(conn)))}]}
    torch.save({"model": conn, "optimizer": opt, "config": {}, "epoch": 1}, root / "checkpoint.pth")
    del conn, opt
    llm_dir = root / "llm"
    llm_dir.mkdir()
    llm = {}
    for k, v in lavis.items():
        if k.startswith("llm_model."):
            shape = list(v.shape)
            if k.endswith(("embed_tokens.weight", "lm_head.weight")):
                shape[0] = 32000  # Vicuna's vocab, before LAVIS adds [PAD]
            llm[k.removeprefix("llm_model.")] = rand(shape, torch.float16)
    keys = sorted(llm)
    half = len(keys) // 2
    index = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: llm[k] for k in part}, llm_dir / name)
        index.update({k: name for k in part})
    (llm_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": index}))
    c = cfg.llm
    (llm_dir / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": c.hidden, "intermediate_size": c.intermediate, "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads, "num_key_value_heads": c.kv_heads, "vocab_size": 32000, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 2048, "hidden_act": "silu", "tie_word_embeddings": False}))
    padded_tokenizer(llm_dir, 32000)  # LLaMA's tokenizer is not redistributable: a 32000-piece stand-in


def worker(args: argparse.Namespace) -> dict:
    import somelvlm  # noqa: F401  imports count in the baseline
    import transformers.models.instructblip.modeling_instructblip  # noqa: F401
    from common import proc_status, reset_peak_rss
    from somelvlm import SoMeLVLM

    base = proc_status("VmRSS")
    reset_peak_rss()
    t = time.perf_counter()
    if args.task == "convert":
        from somelvlm.convert import convert_lavis

        work = args.work
        convert_lavis(work / "checkpoint.pth", work / "eva_vit_g.pth", work / "llm", work / "ours", dtype="bf16",
                      force=True, progress=False)
    elif args.task == "ours":
        m = SoMeLVLM.from_pretrained(args.work / "ours", dtype=torch.bfloat16)
        assert m.llm.lm_head.weight.dtype == torch.bfloat16
    else:
        from transformers import InstructBlipForConditionalGeneration

        m = InstructBlipForConditionalGeneration.from_pretrained(args.work / "hf", dtype=torch.bfloat16)
    seconds = time.perf_counter() - t
    out = {"seconds": seconds, "peak": proc_status("VmHWM"), "base": base}
    if args.task != "convert":  # memory-mapped weights count once touched, as by a first forward pass
        with torch.no_grad():
            for p in m.parameters():
                p.sum()
        out["peak_touched"] = proc_status("VmHWM")
    return out


def folder_bytes(folder: Path, suffix: str = ".safetensors") -> int:
    return sum(p.stat().st_size for p in folder.glob(f"*{suffix}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm-layers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", dest="task", choices=["convert", "ours", "hf"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.task:
        print(json.dumps(worker(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "checkpoint.pth").is_file():
            print("writing random LAVIS-layout files ...", file=sys.stderr)
            write_lavis_files(work, args.llm_layers)
        inputs = [work / "checkpoint.pth", work / "eva_vit_g.pth", *sorted((work / "llm").glob("*.bin"))]
        largest = max(p.stat().st_size for p in inputs)
        res = {"convert": run_worker(Path(__file__), ["--worker", "convert", "--work", str(work)])}
        from somelvlm import SoMeLVLM

        SoMeLVLM.from_pretrained(work / "ours", dtype=torch.bfloat16).save_pretrained(work / "hf", format="hf", force=True)
        for task in ("ours", "hf"):
            res[task] = run_worker(Path(__file__), ["--worker", task, "--work", str(work)])
        weights = folder_bytes(work / "ours")
        hf_weights = folder_bytes(work / "hf")
    rows = []
    for task, label, ref, target in (
            ("convert", "somelvlm convert (LAVIS files -> bf16 folder)", largest + 1 * GB, "largest input + 1 GB"),
            ("ours", "somelvlm from_pretrained (bf16)", 1.15 * weights, "1.15x weight bytes"),
            ("hf", "transformers InstructBLIP from_pretrained (bf16)", 1.15 * hf_weights, "1.15x weight bytes")):
        r = res[task]
        delta = r["peak"] - r["base"]
        touched = r.get("peak_touched", r["peak"]) - r["base"]
        rows.append([label, f"{r['seconds']:.1f}", f"{delta / GB:.2f}", f"{touched / GB:.2f}",
                     f"{ref / GB:.2f} ({target})", "yes" if max(delta, touched) <= ref else "no"])
    title = (f"ViT-g (39 of 40 blocks) + Q-Former + {args.llm_layers}-layer Vicuna-7B-wide LLM, random weights; "
             f"largest input file {largest / GB:.2f} GB, somelvlm folder {weights / GB:.2f} GB, "
             f"HF folder {hf_weights / GB:.2f} GB; torch {torch.__version__}")
    print(title)
    print(markdown_table(["step", "time (s)", "peak RSS above imports (GB)",
                          "... after touching every weight (GB)", "target (GB)", "met"], rows))
    if args.out:
        args.out.write_text(json.dumps({"title": title, "rows": rows, "raw": res}, indent=2))


if __name__ == "__main__":
    main()
