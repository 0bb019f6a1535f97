"""Independent references for the tests: a tiny random `transformers` InstructBLIP, and a writer of
its weights in the *released* LAVIS formats (checkpoint.pth with optimizer state, a ViT file with one
extra block, an HF LLaMA folder with fp16 .bin shards). The name mapping here is written by hand
from LAVIS's and HF's conversion tables (lavis.md section 6), on purpose *not* with somelvlm's
weights_map.json, so a wrong rule there cannot cancel itself out.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from somelvlm import SoMeLVLMConfig
from somelvlm.processing import BUNDLED_TINY_SPM, asset_path

TINY_PIECES = 2000  # pieces of the bundled tiny SentencePiece model
IMAGE_TOKEN = 0  # HF placeholder id for the query positions (never used in test prompts)


def tiny_config(**top) -> SoMeLVLMConfig:
    """Tiny sizes from the issue: ViT width 48 / 4 heads / 56 px, Q-Former width 64 / 4 layers /
    8 queries; LLM width 96 (read from the LLM folder when loading from files)."""
    cfg = SoMeLVLMConfig.from_dict({
        "vision": {"image_size": 56, "patch_size": 14, "width": 48, "depth": 2, "heads": 4, "mlp_dim": 128},
        "qformer": {"hidden": 64, "layers": 4, "heads": 4, "ffn": 128, "num_queries": 8, "vocab_size": 30523},
    })
    return cfg.replace(**top) if top else cfg


def hf_tiny_instructblip(seed: int = 0, vision_depth: int = 2, llm_vocab: int = TINY_PIECES + 1):
    from transformers import (InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipQFormerConfig,
                              InstructBlipVisionConfig, LlamaConfig)

    torch.manual_seed(seed)
    cfg = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(hidden_size=48, intermediate_size=128, num_hidden_layers=vision_depth,
                                               num_attention_heads=4, image_size=56, patch_size=14,
                                               layer_norm_eps=1e-6),
        qformer_config=InstructBlipQFormerConfig(vocab_size=30523, hidden_size=64, num_hidden_layers=4,
                                                 num_attention_heads=4, intermediate_size=128,
                                                 max_position_embeddings=512, cross_attention_frequency=2,
                                                 encoder_hidden_size=48),
        text_config=LlamaConfig(vocab_size=llm_vocab, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                                rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                                pad_token_id=TINY_PIECES),
        num_query_tokens=8,
        image_token_index=IMAGE_TOKEN,
    )
    model = InstructBlipForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        # HF initialises many vision weights to ~1e-10; give every tensor a visible random value so
        # that a misplaced tensor cannot hide.
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "layernorm" in name.lower() or "layer_norm" in name or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("qkv.bias"):
                w = p.shape[0] // 3
                b = 0.05 * torch.randn(p.shape, generator=g)
                b[w: 2 * w] = 0  # EVA has no k bias
                p.copy_(b)
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def round_like_released(model) -> None:
    """Give the HF reference the values the released files can hold: fp16 LLM weights, and the
    fp16-rounded ViT conv/linear weights that LAVIS's vit_precision="fp16" produces."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("language_model."):
                p.copy_(p.half().float())
            if name.startswith("vision_model.") and re.search(r"(patch_embedding|qkv|projection|fc1|fc2)\.(weight|bias)$", name):
                p.copy_(p.half().float())


def documented_pad_rows(hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """README: N(0, 0.02^2) rows from torch.Generator seeded 32000, embed row first, then lm_head row."""
    g = torch.Generator().manual_seed(32000)
    return torch.randn(hidden, generator=g) * 0.02, torch.randn(hidden, generator=g) * 0.02


def set_pad_rows(model, pad_id: int = TINY_PIECES) -> None:
    emb, head = documented_pad_rows(model.config.text_config.hidden_size)
    with torch.no_grad():
        model.language_model.get_input_embeddings().weight[pad_id] = emb
        model.language_model.get_output_embeddings().weight[pad_id] = head


def hf_to_lavis_names(hf_sd: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """Split an HF InstructBLIP state dict into (connection module, ViT file, LLM folder) dicts."""
    conn, vit, llm = {}, {}, {}
    for k, v in hf_sd.items():
        v = v.detach().clone()
        if k.startswith("language_model."):
            llm[k[len("language_model."):]] = v
        elif k.startswith("vision_model.post_layernorm."):
            conn["ln_vision." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("vision_model."):
            k = k[len("vision_model."):]
            k = k.replace("embeddings.class_embedding", "cls_token")
            k = k.replace("embeddings.position_embedding", "pos_embed")
            k = k.replace("embeddings.patch_embedding", "patch_embed.proj")
            k = re.sub(r"^encoder\.layers\.", "blocks.", k)
            k = k.replace("layer_norm1", "norm1").replace("layer_norm2", "norm2")
            k = k.replace("self_attn.projection", "attn.proj").replace("self_attn.qkv", "attn.qkv")
            if k.endswith("attn.qkv.bias"):
                q, kk, vv = v.chunk(3)
                assert torch.all(kk == 0)
                vit[k.replace("qkv.bias", "q_bias")] = q.clone()
                vit[k.replace("qkv.bias", "v_bias")] = vv.clone()
            else:
                vit[k] = v
        elif k.startswith("qformer."):
            k = "Qformer.bert." + k[len("qformer."):]
            k = k.replace("embeddings.layernorm", "embeddings.LayerNorm")
            k = k.replace(".attention.attention.", ".attention.self.").replace(".crossattention.attention.", ".crossattention.self.")
            conn[k] = v
        elif k.startswith("language_projection."):
            conn["llm_proj." + k.rsplit(".", 1)[1]] = v
        elif k == "query_tokens":
            conn[k] = v
        else:
            raise KeyError(k)
    return conn, vit, llm


def write_lavis_files(hf_model, root: Path, extra_vit_blocks: int = 1, vit_dtype=torch.float32,
                      llm_pieces: int = TINY_PIECES, shards: int = 2) -> dict[str, Path]:
    """Write `checkpoint.pth`, `eva_vit_g.pth`, `llm/` as the released SoMeLVLM files are laid out."""
    root.mkdir(parents=True, exist_ok=True)
    conn, vit, llm = hf_to_lavis_names(hf_model.state_dict())

    # checkpoint.pth: a LAVIS runner checkpoint of the trainable parts, with optimizer state
    conn["Qformer.bert.embeddings.position_ids"] = torch.arange(512).expand(1, -1).clone()  # LAVIS buffer
    names = [k for k in conn if k != "Qformer.bert.embeddings.position_ids"]
    optimizer = {"state": {i: {"step": torch.tensor(7.0), "exp_avg": torch.zeros_like(conn[n]),
                               "exp_avg_sq": torch.zeros_like(conn[n])} for i, n in enumerate(names)},
                 "param_groups": [{"lr": 1e-5, "weight_decay": 0.05, "params": list(range(len(names)))}]}
    ckpt = {"model": conn, "optimizer": optimizer, "config": {"run": {"init_lr": 1e-5}}, "scaler": None, "epoch": 3}
    torch.save(ckpt, root / "checkpoint.pth")

    # eva_vit_g.pth: bare state dict with more blocks than LAVIS uses (40 stored, 39 used)
    depth = hf_model.config.vision_config.num_hidden_layers
    g = torch.Generator().manual_seed(123)
    for j in range(depth, depth + extra_vit_blocks):
        for k in [k for k in vit if k.startswith("blocks.0.")]:
            vit[k.replace("blocks.0.", f"blocks.{j}.", 1)] = torch.randn(vit[k].shape, generator=g)
    torch.save({k: v.to(vit_dtype) for k, v in vit.items()}, root / "eva_vit_g.pth")

    # LLM folder: plain Vicuna layout, fp16 .bin shards with an index, vocab = pieces (no [PAD])
    folder = root / "llm"
    folder.mkdir(exist_ok=True)
    llm = {k: v.half() for k, v in llm.items()}
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        llm[k] = llm[k][:llm_pieces].clone()
    tc = hf_model.config.text_config
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": tc.hidden_size,
        "intermediate_size": tc.intermediate_size, "num_hidden_layers": tc.num_hidden_layers,
        "num_attention_heads": tc.num_attention_heads, "num_key_value_heads": tc.num_key_value_heads,
        "max_position_embeddings": tc.max_position_embeddings, "rms_norm_eps": tc.rms_norm_eps,
        "vocab_size": llm_pieces, "hidden_act": "silu", "initializer_range": 0.02, "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": -1, "torch_dtype": "float16",
    }))
    (folder / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
    keys = sorted(llm)
    per = -(-len(keys) // shards)
    weight_map = {}
    for s in range(shards):
        name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        part = {k: llm[k] for k in keys[s * per:(s + 1) * per]}
        torch.save(part, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "tokenizer.model").write_bytes(asset_path(BUNDLED_TINY_SPM).read_bytes())
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return {"checkpoint": root / "checkpoint.pth", "vit": root / "eva_vit_g.pth", "llm": folder}


def hf_input_ids(num_queries: int, prompt_ids: torch.Tensor) -> torch.Tensor:
    """HF v5 layout: `num_queries` image placeholders in front of the prompt."""
    return torch.cat([torch.full((prompt_ids.shape[0], num_queries), IMAGE_TOKEN, dtype=torch.long), prompt_ids], 1)
