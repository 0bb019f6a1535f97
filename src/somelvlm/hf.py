"""Hugging Face `InstructBlipForConditionalGeneration` folders: export and import.

Names follow the `hf` rules of `weights_map.json` (the ViT's fused `qkv.bias` is split into
`q_bias`/`v_bias`, its k third must be zero). transformers 5 marks the 32 query positions with an
`<image>` token in the prompt, so the export adds that token after `[PAD]` (id 32001 for Vicuna;
zero rows in `embed_tokens` and `lm_head`), as in `Salesforce/instructblip-vicuna-7b`. On import
the LLM vocab is cut back to the tokenizer's pieces + `[PAD]` (32001; the hub has 32064 rows).

One difference HF cannot express: its `post_layernorm` (= LAVIS `ln_vision`) uses the vision eps
(1e-6) where LAVIS uses 1e-5. The export writes the vision eps; `from_hf(..., ln_vision_eps=1e-5)`
restores LAVIS numerics for weights converted from LAVIS.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import LLMConfig, QFormerConfig, SoMeLVLMConfig, VisionConfig, read_json
from .folder import atomic_folder, save_safetensors, write_json
from .loading import Checkpoint
from .precision import parse_dtype
from .processing import MEAN, STD, LlamaTokenizer, QFormerTokenizer, SoMeLVLMProcessor
from .vocab import RESIZED, resize_vocab, with_tokenizer
from .weights import WeightMap, iter_hf_weights

log = logging.getLogger("somelvlm")


def hf_config(model: Any) -> dict[str, Any]:
    c: SoMeLVLMConfig = model.config
    v, q, llm = c.vision, c.qformer, c.llm
    text = llm.to_hf().to_dict()
    text.update(vocab_size=llm.vocab_size + 1, pad_token_id=llm.pad_id, bos_token_id=llm.bos_id, eos_token_id=llm.eos_id)
    for k in ("_attn_implementation", "_attn_implementation_internal", "transformers_version", "dtype"):
        text.pop(k, None)
    if c.ln_vision_eps != v.layer_norm_eps:
        log.warning("HF InstructBLIP uses one eps (%g) for all vision LayerNorms; LAVIS's ln_vision uses %g. "
                    "Pass ln_vision_eps=%g to SoMeLVLM.from_hf to get LAVIS numerics back.",
                    v.layer_norm_eps, c.ln_vision_eps, c.ln_vision_eps)
    return {
        "architectures": ["InstructBlipForConditionalGeneration"],
        "model_type": "instructblip",
        "num_query_tokens": q.num_queries,
        "image_token_index": llm.vocab_size,
        "vision_config": {
            "model_type": "instructblip_vision_model", "hidden_size": v.width, "intermediate_size": v.mlp_dim,
            "num_hidden_layers": v.depth, "num_attention_heads": v.heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "hidden_act": "gelu", "layer_norm_eps": v.layer_norm_eps,
            "attention_dropout": 0.0, "qkv_bias": True,
        },
        "qformer_config": {
            "model_type": "instructblip_qformer", "vocab_size": q.vocab_size, "hidden_size": q.hidden,
            "num_hidden_layers": q.layers, "num_attention_heads": q.heads, "intermediate_size": q.ffn,
            "hidden_act": "gelu", "hidden_dropout_prob": q.dropout, "attention_probs_dropout_prob": q.dropout,
            "max_position_embeddings": q.max_positions, "layer_norm_eps": q.layer_norm_eps, "pad_token_id": 0,
            "cross_attention_frequency": q.cross_attention_freq, "encoder_hidden_size": v.width,
        },
        "text_config": text,
    }


def save_hf(model: Any, folder: str | Path, force: bool = False, dtype: torch.dtype | str | None = None) -> Path:
    """Write a folder that `InstructBlipForConditionalGeneration.from_pretrained` (and
    `InstructBlipProcessor.from_pretrained`, with sentencepiece+protobuf) load."""
    dtype = parse_dtype(dtype)
    cfg = hf_config(model)
    sd = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    hf_sd = WeightMap.load("hf").from_ours(sd)
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        t = hf_sd[key]
        hf_sd[key] = torch.cat([t, t.new_zeros(1, t.shape[1])])  # the <image> row
    if dtype is not None:
        hf_sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in hf_sd.items()}
    with atomic_folder(folder, force) as tmp:
        write_json(tmp / "config.json", cfg)
        save_safetensors(hf_sd, tmp)
        llm = model.config.llm
        write_json(tmp / "generation_config.json", {"bos_token_id": llm.bos_id, "eos_token_id": llm.eos_id,
                                                     "pad_token_id": llm.pad_id})
        if model.processor is not None:
            save_hf_processor(model.processor, tmp, cfg["num_query_tokens"], cfg["image_token_index"])
    return Path(folder)


def save_hf_processor(proc: SoMeLVLMProcessor, folder: Path, num_queries: int, image_token: int) -> None:
    """Write InstructBlipProcessor files with transformers itself (so its loader agrees), plus
    `tokenizer.model` (what `from_hf` reads). Needs sentencepiece + protobuf for the conversion."""
    import tempfile

    from transformers import AutoTokenizer, BertTokenizer, BlipImageProcessor, InstructBlipProcessor

    with tempfile.TemporaryDirectory() as tmp:
        proc.llm_tokenizer.save(tmp)
        proc.qformer_tokenizer.save(Path(tmp) / "q")
        try:
            llm_tok = AutoTokenizer.from_pretrained(tmp)
        except (ImportError, ValueError) as e:
            log.warning("HF processor files not written (transformers cannot convert the SentencePiece model: %s); "
                        "the weights and config are complete. Install protobuf to get them.", e)
            proc.llm_tokenizer.save(folder)
            return
        qtok = BertTokenizer.from_pretrained(Path(tmp) / "q")
    image = BlipImageProcessor(size={"height": proc.image_size, "width": proc.image_size}, resample=3,
                               image_mean=list(MEAN), image_std=list(STD), do_convert_rgb=True)
    hf_proc = InstructBlipProcessor(image_processor=image, tokenizer=llm_tok, qformer_tokenizer=qtok,
                                    num_query_tokens=num_queries)
    got = llm_tok.convert_tokens_to_ids("<image>")
    if got != image_token:
        log.warning("HF processor files not written: the tokenizer has %d pieces, so <image> would be id %d, "
                    "but the model's vocab puts it at %d", proc.llm_tokenizer.num_pieces, got, image_token)
        proc.llm_tokenizer.save(folder)
        return
    hf_proc.save_pretrained(folder)
    proc.llm_tokenizer.save(folder / "_sp")
    (folder / "_sp" / "tokenizer.model").replace(folder / "tokenizer.model")
    shutil.rmtree(folder / "_sp")
    qvocab = folder / "qformer_tokenizer" / "vocab.txt"
    if not qvocab.is_file():
        proc.qformer_tokenizer.save(folder / "_q")
        (folder / "_q" / "vocab.txt").replace(qvocab)
        shutil.rmtree(folder / "_q")


def config_from_hf(cfg: dict[str, Any], ln_vision_eps: float | None = None) -> SoMeLVLMConfig:
    v, q, t = cfg.get("vision_config", {}), cfg.get("qformer_config", {}), cfg.get("text_config", {})
    vision = VisionConfig(
        image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 14), width=v.get("hidden_size", 1408),
        depth=v.get("num_hidden_layers", 39), heads=v.get("num_attention_heads", 16),
        mlp_dim=v.get("intermediate_size", 6144), layer_norm_eps=v.get("layer_norm_eps", 1e-6),
    )
    if v.get("hidden_act", "gelu") != "gelu" or not v.get("qkv_bias", True):
        raise ValueError("only EVA-ViT-g style vision towers (gelu, q/v bias) are supported")
    qformer = QFormerConfig(
        hidden=q.get("hidden_size", 768), layers=q.get("num_hidden_layers", 12), heads=q.get("num_attention_heads", 12),
        ffn=q.get("intermediate_size", 3072), num_queries=cfg.get("num_query_tokens", 32),
        vocab_size=q.get("vocab_size", 30523), max_positions=q.get("max_position_embeddings", 512),
        layer_norm_eps=q.get("layer_norm_eps", 1e-12), cross_attention_freq=q.get("cross_attention_frequency", 2),
        dropout=q.get("hidden_dropout_prob", 0.1),
    )
    if q.get("encoder_hidden_size", vision.width) != vision.width:
        raise ValueError(f"qformer encoder_hidden_size {q.get('encoder_hidden_size')} != vision width {vision.width}")
    llm = LLMConfig.from_hf(t or {"model_type": "llama"})
    eps = vision.layer_norm_eps if ln_vision_eps is None else ln_vision_eps
    return SoMeLVLMConfig(vision=vision, qformer=qformer, llm=llm, ln_vision_eps=eps)


def is_hf_folder(folder: Path) -> bool:
    """Whether `folder` holds a transformers InstructBLIP model (its config.json says so)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    data = read_json(path, "model config")
    return isinstance(data, dict) and data.get("model_type") == "instructblip"


def read_hf(folder: str | Path, ln_vision_eps: float | None = None) -> Checkpoint:
    """An HF `InstructBlipForConditionalGeneration` folder as a `Checkpoint` (vocab cut to pieces + [PAD])."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected an HF InstructBLIP folder)")
    raw = read_json(cfg_path, "HF InstructBLIP config")
    if not isinstance(raw, dict) or raw.get("model_type") != "instructblip":
        got = raw.get("model_type") if isinstance(raw, dict) else None
        raise ValueError(f"{cfg_path}: model_type is {got!r}, expected 'instructblip'")
    config = config_from_hf(raw, ln_vision_eps)
    if not (folder / "tokenizer.model").is_file():
        raise FileNotFoundError(f"{folder}: no tokenizer.model (the LLaMA SentencePiece model is needed)")
    llm_tok = LlamaTokenizer(folder / "tokenizer.model")
    config = config.replace(llm=with_tokenizer(config.llm, llm_tok.num_pieces))
    rows = config.llm.vocab_size
    wmap = WeightMap.load("hf")

    def tensors() -> Iterator[tuple[str, torch.Tensor, str]]:
        for k, v, f in iter_hf_weights(folder):
            for name, t in wmap.to_ours({k: v}).items():
                if name in RESIZED:
                    t = resize_vocab(t, rows, RESIZED[name], f"{f}: {k}")
                yield name, t, str(f)

    qdir = folder / "qformer_tokenizer"
    processor = SoMeLVLMProcessor(llm_tok, QFormerTokenizer(qdir if (qdir / "vocab.txt").is_file() else None),
                                  image_size=config.vision.image_size)
    return Checkpoint(config, processor, tensors())
