"""The released LAVIS files, without LAVIS: read them into one LAVIS-named state dict, map it to
our names with `weights_map.json`, and (the other way) export a LAVIS `checkpoint.pth`.

Sources, in LAVIS's own loading order (later ones win, as in LAVIS):
1. `eva_vit_g.pth`: a bare EVA-ViT-g state dict with 40 blocks; keys get `visual_encoder.`, and
   blocks beyond the configured depth (39) are dropped, as LAVIS's `strict=False` load does.
2. the Hugging Face LLaMA folder: keys get `llm_model.`; the vocab grows from the tokenizer's
   piece count (32000) by one `[PAD]` row (see `model.pad_rows`).
3. `checkpoint.pth`: `{"model": ..., "optimizer": ..., ...}` or a bare state dict with the
   Q-Former, `query_tokens`, `ln_vision` and `llm_proj`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

import torch

from .config import SoMeLVLMConfig
from .loading import assign_state_dict, empty_model, parse_dtype
from .processing import LlamaTokenizer, QFormerTokenizer, SoMeLVLMProcessor
from .vision import round_weights_to_fp16_
from .weights import StateDict, WeightMap, WeightsError, iter_hf_weights, load_file, unwrap_checkpoint

log = logging.getLogger("somelvlm")

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def read_vit(path: str | Path, depth: int) -> tuple[StateDict, list[int]]:
    """EVA-ViT-g weights with LAVIS names (`visual_encoder.*`); returns the dropped block indices."""
    sd = unwrap_checkpoint(load_file(path), path)
    out: StateDict = {}
    dropped: set[int] = set()
    for k, v in sd.items():
        k = k.removeprefix("visual_encoder.")
        m = _BLOCK.match(k)
        if m and int(m.group(1)) >= depth:
            dropped.add(int(m.group(1)))
            continue
        out["visual_encoder." + k] = v
    return out, sorted(dropped)


def read_llm(folder: str | Path, hidden: int, num_pieces: int) -> tuple[StateDict, dict[str, str], int]:
    """The LLaMA folder's weights as `llm_model.*`, vocab grown to `num_pieces + 1` if needed."""
    sd: StateDict = {}
    origin: dict[str, str] = {}
    for k, v, f in iter_hf_weights(folder):
        sd["llm_model." + k] = v
        origin["llm_model." + k] = str(f)
    emb_key, head_key = "llm_model.model.embed_tokens.weight", "llm_model.lm_head.weight"
    if emb_key not in sd:
        raise WeightsError(f"{folder}: no model.embed_tokens.weight: not a LLaMA checkpoint?")
    vocab = sd[emb_key].shape[0]
    if vocab < num_pieces:
        raise WeightsError(f"{folder}: embed_tokens has {vocab} rows but tokenizer.model has {num_pieces} pieces")
    if vocab == num_pieces:
        emb_row, head_row = pad_rows_like(hidden)
        sd[emb_key] = torch.cat([sd[emb_key], emb_row.to(sd[emb_key].dtype)[None]])
        if head_key in sd:
            sd[head_key] = torch.cat([sd[head_key], head_row.to(sd[head_key].dtype)[None]])
        vocab += 1
        log.info("LLM vocab grown from %d to %d with a deterministic [PAD] row (as LAVIS resizes it)", num_pieces, vocab)
    elif vocab > num_pieces + 1:
        log.warning("%s: LLM vocab is %d (> %d pieces + [PAD]); keeping the extra rows", folder, vocab, num_pieces)
    return sd, origin, vocab


def pad_rows_like(hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    from .model import pad_rows

    return pad_rows(hidden)


def load_lavis(
    cls: type,
    checkpoint: str | Path,
    vit: str | Path,
    llm: str | Path,
    qformer_tokenizer: str | Path | None = None,
    config: SoMeLVLMConfig | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
) -> Any:
    dtype = parse_dtype(dtype) or torch.float32
    llm = Path(llm)
    config = config or SoMeLVLMConfig.preset("vicuna7b")
    llm_tok = LlamaTokenizer(llm / "tokenizer.model")
    llm_cfg = cls.llm_config_from_folder(llm)
    warn_generation_config(llm)

    vit_sd, dropped = read_vit(vit, config.vision.depth)
    if dropped:
        log.info("%s: dropped %d unused ViT block(s) %s (LAVIS uses the first %d)", vit, len(dropped), dropped,
                 config.vision.depth)
    llm_sd, origin, vocab = read_llm(llm, llm_cfg.hidden, llm_tok.num_pieces)
    llm_cfg = dataclasses.replace(llm_cfg, vocab_size=vocab, pad_id=llm_tok.num_pieces)
    config = config.replace(llm=llm_cfg)

    ckpt_sd = unwrap_checkpoint(load_file(checkpoint), checkpoint)
    lavis_sd: StateDict = {}
    lavis_sd.update(vit_sd)
    origin.update({k: str(vit) for k in vit_sd})
    lavis_sd.update(llm_sd)
    overridden = [k for k in ckpt_sd if k in lavis_sd]
    if overridden:
        log.info("%s overrides %d tensor(s) from the ViT/LLM files (LAVIS loads it last)", checkpoint, len(overridden))
    lavis_sd.update(ckpt_sd)
    origin.update({k: str(checkpoint) for k in ckpt_sd})

    wmap = WeightMap.load("lavis")
    ours = wmap.to_ours(lavis_sd)
    our_origin = {wmap.key_to_ours(k): v for k, v in origin.items()}

    processor = SoMeLVLMProcessor(
        llm_tok, QFormerTokenizer(qformer_tokenizer, max_length=config.qformer.max_text_len),
        image_size=config.vision.image_size, max_txt_len=config.max_txt_len,
        max_output_txt_len=config.max_output_txt_len,
    )
    model = empty_model(cls, config, processor)
    assign_state_dict(model, ours, dtype=dtype, device=device, origin=our_origin)
    if config.vision.fp16_weights:
        round_weights_to_fp16_(model.vision)
    return model.eval()


def warn_generation_config(folder: Path) -> None:
    import json

    path = folder / "generation_config.json"
    if path.is_file():
        eos = json.loads(path.read_text()).get("eos_token_id")
        if eos not in (None, 2, [2]):
            log.warning("%s says eos_token_id=%s; LAVIS-correct Vicuna v1.1 uses 2, which somelvlm uses", path, eos)


def lavis_state_dict(model: Any, trainable_only: bool = True) -> StateDict:
    """Our weights under LAVIS names; by default only what LAVIS's runner saves (trainable parts)."""
    wmap = WeightMap.load("lavis")
    names = {n for n, p in model.named_parameters() if p.requires_grad} if trainable_only else None
    sd = {k: v.detach() for k, v in model.state_dict().items() if names is None or k in names}
    return wmap.from_ours(sd)
