"""The released LAVIS files, without LAVIS: read them into one LAVIS-named state dict, map it to
our names with `weights_map.json`, and (the other way) export a LAVIS `checkpoint.pth`.

Sources, in LAVIS's own loading order (later ones win, as in LAVIS):
1. `eva_vit_g.pth`: a bare EVA-ViT-g state dict with 40 blocks; keys get `visual_encoder.`, and
   blocks beyond the configured depth (39) are dropped, as LAVIS's `strict=False` load does.
2. the Hugging Face LLaMA folder: keys get `llm_model.`; values are rounded to fp16 (LAVIS loads it
   with `torch_dtype=float16`) and the vocab is resized to the tokenizer's pieces + `[PAD]` (32001):
   one `[PAD]` row is appended to Vicuna's 32000 (see `model.pad_rows`), extra rows are dropped.
3. `checkpoint.pth`: `{"model": ..., "optimizer": ..., ...}` or a bare state dict with the
   Q-Former, `query_tokens`, `ln_vision` and `llm_proj`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import LLMConfig, SoMeLVLMConfig
from .loading import assign_state_dict, empty_model, parse_dtype
from .model import pad_rows
from .processing import LlamaTokenizer, QFormerTokenizer, SoMeLVLMProcessor
from .vision import FP16_ROUNDED, round_to_fp16
from .weights import StateDict, WeightMap, WeightsError, hf_weight_files, load_file, unwrap_checkpoint

log = logging.getLogger("somelvlm")

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


@dataclass
class LavisSources:
    """The three released inputs, checked, with the full model config (LLM read from its folder)."""

    checkpoint: Path
    vit: Path
    llm: Path
    config: SoMeLVLMConfig
    tokenizer: LlamaTokenizer
    llm_files: list[Path]

    @classmethod
    def open(cls, checkpoint: str | Path, vit: str | Path, llm: str | Path,
             config: SoMeLVLMConfig | None = None) -> "LavisSources":
        checkpoint, vit, llm = Path(checkpoint), Path(vit), Path(llm)
        for p, what in ((checkpoint, "LAVIS checkpoint"), (vit, "ViT weights")):
            if not p.is_file():
                raise FileNotFoundError(f"{what} not found: {p}")
        if not llm.is_dir():
            raise FileNotFoundError(f"LLM folder not found: {llm}")
        tok = LlamaTokenizer(llm / "tokenizer.model")
        llm_cfg = LLMConfig.from_hf(read_json(llm / "config.json"))
        if llm_cfg.vocab_size < tok.num_pieces:
            raise WeightsError(f"{llm}: vocab_size {llm_cfg.vocab_size} < {tok.num_pieces} tokenizer pieces")
        vocab = tok.num_pieces + 1  # LAVIS resizes the LLM's vocab to len(tokenizer) = pieces + [PAD]
        llm_cfg = dataclasses.replace(llm_cfg, vocab_size=vocab, pad_id=tok.num_pieces)
        config = (config or SoMeLVLMConfig.preset("vicuna7b")).replace(llm=llm_cfg)
        warn_generation_config(llm)
        return cls(checkpoint, vit, llm, config, tok, hf_weight_files(llm))

    def tensors(self) -> Iterator[tuple[str, torch.Tensor, Path]]:
        """Yield `(our_name, tensor, file)` file by file, as LAVIS would load them (see module doc)."""
        wmap = WeightMap.load("lavis")
        round_vit = self.config.vision.fp16_weights
        ckpt = unwrap_checkpoint(load_file(self.checkpoint), self.checkpoint)
        ckpt = {k: v for k, v in ckpt.items() if not wmap.is_ignored(k)}

        def ours(lavis_name: str, t: torch.Tensor) -> tuple[str, torch.Tensor]:
            name = wmap.key_to_ours(lavis_name)
            if round_vit and name.startswith("vision.") and FP16_ROUNDED.match(name[len("vision."):]):
                t = round_to_fp16(t)
            return name, t

        vit_sd = unwrap_checkpoint(load_file(self.vit), self.vit)
        dropped: set[int] = set()
        for k, t in vit_sd.items():
            k = k.removeprefix("visual_encoder.")
            m = _BLOCK.match(k)
            if m and int(m.group(1)) >= self.config.vision.depth:
                dropped.add(int(m.group(1)))
                continue
            if "visual_encoder." + k not in ckpt:
                yield (*ours("visual_encoder." + k, t), self.vit)
        del vit_sd
        if dropped:
            log.info("%s: dropped %d unused ViT block(s) %s (LAVIS uses the first %d)", self.vit, len(dropped),
                     sorted(dropped), self.config.vision.depth)

        pieces = self.tokenizer.num_pieces
        for f in self.llm_files:
            sd = load_file(f)
            for k, t in sd.items():
                name = "llm_model." + k
                if wmap.is_ignored(name) or name in ckpt:
                    continue
                if t.is_floating_point():
                    t = round_to_fp16(t)  # LAVIS loads the LLM with torch_dtype=float16
                if k in ("model.embed_tokens.weight", "lm_head.weight"):
                    t = resize_vocab(t, pieces + 1, 0 if k.startswith("model.") else 1, f"{f}: {k}")
                yield (*ours(name, t), f)
            del sd

        for k, t in ckpt.items():
            if k.startswith("llm_model.") and t.is_floating_point():
                t = round_to_fp16(t)  # LAVIS loads them into its fp16 LLM
            yield (*ours(k, t), self.checkpoint)


def resize_vocab(t: torch.Tensor, rows: int, which: int, what: str) -> torch.Tensor:
    """LAVIS's `resize_token_embeddings(len(tokenizer))`: append the `[PAD]` row (`pad_rows()[which]`)
    or drop rows beyond the tokenizer."""
    if t.shape[0] == rows - 1:
        log.info("%s grown from %d to %d rows with the [PAD] row", what, rows - 1, rows)
        return torch.cat([t, pad_rows(t.shape[1])[which].to(t.dtype)[None]])
    if t.shape[0] > rows:
        log.info("%s cut from %d to %d rows (the tokenizer's pieces + [PAD])", what, t.shape[0], rows)
        return t[:rows]
    return t


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return json.loads(path.read_text())


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
    src = LavisSources.open(checkpoint, vit, llm, config)
    state, origin = {}, {}
    for name, t, f in src.tensors():
        state[name], origin[name] = t, str(f)
    processor = make_processor(src, qformer_tokenizer)
    model = empty_model(cls, src.config, processor)
    assign_state_dict(model, state, dtype=dtype, device=device, origin=origin)
    return model.eval()


def make_processor(src: LavisSources, qformer_tokenizer: str | Path | None) -> SoMeLVLMProcessor:
    c = src.config
    return SoMeLVLMProcessor(src.tokenizer, QFormerTokenizer(qformer_tokenizer, max_length=c.qformer.max_text_len),
                             image_size=c.vision.image_size, max_txt_len=c.max_txt_len,
                             max_output_txt_len=c.max_output_txt_len)


def warn_generation_config(folder: Path) -> None:
    path = folder / "generation_config.json"
    if path.is_file():
        eos = json.loads(path.read_text()).get("eos_token_id")
        if eos not in (None, 2, [2]):
            log.warning("%s says eos_token_id=%s; LAVIS-correct Vicuna v1.1 uses 2, which somelvlm uses", path, eos)


def lavis_state_dict(model: Any, with_llm: bool | None = None, with_vision: bool | None = None) -> StateDict:
    """What LAVIS's runner saves, under LAVIS names: the whole connection module (`query_tokens`,
    `ln_vision`, Q-Former, `llm_proj`), plus the LLM / ViT when they are trained (by default: when any
    of their parameters requires grad)."""
    from .model import FP32_MODULES

    if with_llm is None:
        with_llm = any(p.requires_grad for p in model.llm.parameters())
    if with_vision is None:
        with_vision = any(p.requires_grad for p in model.vision.parameters())
    prefixes = FP32_MODULES + (("llm.",) if with_llm else ()) + (("vision.",) if with_vision else ())
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items() if k.startswith(prefixes)}
    return WeightMap.load("lavis").from_ours(sd)
