"""The released LAVIS files, without LAVIS: read them into one LAVIS-named state dict, map it to
our names with `weights_map.json`, and (the other way) export a LAVIS `checkpoint.pth`.

Sources, in LAVIS's own loading order (later ones win, as in LAVIS):
1. `eva_vit_g.pth`: a bare EVA-ViT-g state dict with 40 blocks; keys get `visual_encoder.`, and
   blocks beyond the configured depth (39) are dropped. Other keys the model lacks (EVA-CLIP's
   final `norm`, `fc_norm`, `head`) are dropped with one log line, as LAVIS's `strict=False` load
   ignores them; `strict=True` makes them errors. Missing keys and wrong shapes are always errors.
2. the Hugging Face LLaMA folder: keys get `llm_model.`; values are rounded to fp16 (LAVIS loads it
   with `torch_dtype=float16`) and the vocab is resized to the tokenizer's pieces + `[PAD]` (see `vocab`).
3. one or more `checkpoint.pth` files: `{"model": ..., "optimizer": ..., ...}` or bare state dicts
   with the Q-Former, `query_tokens`, `ln_vision` and `llm_proj`. SoMeLVLM's config loads InstructBLIP's
   `instruct_blip_vicuna7b_trimmed.pth` first and its own `checkpoint.pth` on top: pass both, base
   first; later files win per key.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .config import LLMConfig, SoMeLVLMConfig, read_json
from .folder import atomic_folder
from .loading import Checkpoint
from .precision import FP32_MODULES
from .processing import LlamaTokenizer, QFormerTokenizer, SoMeLVLMProcessor
from .vision import FP16_ROUNDED, round_to_fp16
from .vocab import RESIZED, resize_vocab, with_tokenizer
from .weights import StateDict, WeightMap, WeightsError, hf_weight_files, load_file, unwrap_checkpoint

log = logging.getLogger("somelvlm")

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
PathLike = str | Path


@dataclass
class LavisSources:
    """The released inputs, checked, with the full model config (LLM read from its folder)."""

    checkpoints: list[Path]
    vit: Path
    llm: Path
    config: SoMeLVLMConfig
    tokenizer: LlamaTokenizer
    llm_files: list[Path]

    @classmethod
    def open(cls, checkpoint: PathLike | Sequence[PathLike], vit: PathLike, llm: PathLike,
             config: SoMeLVLMConfig | None = None) -> "LavisSources":
        checkpoints = [Path(c) for c in ([checkpoint] if isinstance(checkpoint, (str, Path)) else checkpoint)]
        if not checkpoints:
            raise ValueError("no LAVIS checkpoint given")
        vit, llm = Path(vit), Path(llm)
        for p, what in [(c, "LAVIS checkpoint") for c in checkpoints] + [(vit, "ViT weights")]:
            if not p.is_file():
                raise FileNotFoundError(f"{what} not found: {p}")
        if not llm.is_dir():
            raise FileNotFoundError(f"LLM folder not found: {llm}")
        tok = LlamaTokenizer(llm / "tokenizer.model")
        llm_cfg = LLMConfig.from_hf(read_json(llm / "config.json", "the LLM's config"))
        if llm_cfg.vocab_size < tok.num_pieces:
            raise WeightsError(f"{llm}: vocab_size {llm_cfg.vocab_size} < {tok.num_pieces} tokenizer pieces")
        config = (config or SoMeLVLMConfig.preset("vicuna7b")).replace(llm=with_tokenizer(llm_cfg, tok.num_pieces))
        warn_generation_config(llm)
        return cls(checkpoints, vit, llm, config, tok, hf_weight_files(llm))

    def read_checkpoints(self, wmap: WeightMap) -> tuple[StateDict, dict[str, Path]]:
        """The checkpoints layered in order (later files win per key), with each key's file."""
        merged: StateDict = {}
        origin: dict[str, Path] = {}
        for path in self.checkpoints:
            sd = unwrap_checkpoint(load_file(path), path)
            sd = {k: v for k, v in sd.items() if not wmap.is_ignored(k)}
            merged.update(sd)
            origin.update(dict.fromkeys(sd, path))
            del sd
        if len(self.checkpoints) > 1:
            for path in self.checkpoints:
                n = sum(1 for f in origin.values() if f == path)
                log.info("%s supplied %d of the %d checkpoint keys", path, n, len(merged))
        return merged, origin

    def tensors(self) -> Iterator[tuple[str, torch.Tensor, str]]:
        """Yield `(our_name, tensor, file)` file by file, as LAVIS would load them (see module doc)."""
        wmap = WeightMap.load("lavis")
        round_vit = self.config.vision.fp16_weights
        ckpt, ckpt_origin = self.read_checkpoints(wmap)

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
                yield (*ours("visual_encoder." + k, t), str(self.vit))
        del vit_sd
        if dropped:
            log.info("%s: dropped %d unused ViT block(s) %s (LAVIS uses the first %d)", self.vit, len(dropped),
                     sorted(dropped), self.config.vision.depth)

        rows = self.config.llm.vocab_size
        for f in self.llm_files:
            sd = load_file(f)
            for k, t in sd.items():
                name = "llm_model." + k
                if wmap.is_ignored(name) or name in ckpt:
                    continue
                if t.is_floating_point():
                    t = round_to_fp16(t)  # LAVIS loads the LLM with torch_dtype=float16
                name, t = ours(name, t)
                if name in RESIZED:
                    t = resize_vocab(t, rows, RESIZED[name], f"{f}: {k}")
                yield name, t, str(f)
            del sd

        for k, t in ckpt.items():
            if k.startswith("llm_model.") and t.is_floating_point():
                t = round_to_fp16(t)  # LAVIS loads them into its fp16 LLM
            yield (*ours(k, t), str(ckpt_origin[k]))


def read_lavis(checkpoint: PathLike | Sequence[PathLike], vit: PathLike, llm: PathLike,
               qformer_tokenizer: PathLike | None = None, config: SoMeLVLMConfig | None = None) -> Checkpoint:
    """The released LAVIS files as a `Checkpoint` (the ViT file is lenient, see module doc)."""
    src = LavisSources.open(checkpoint, vit, llm, config)
    return Checkpoint(src.config, make_processor(src, qformer_tokenizer), src.tensors(),
                      lenient=frozenset({str(src.vit)}))


def make_processor(src: LavisSources, qformer_tokenizer: str | Path | None) -> SoMeLVLMProcessor:
    c = src.config
    return SoMeLVLMProcessor(src.tokenizer, QFormerTokenizer(qformer_tokenizer, max_length=c.qformer.max_text_len),
                             image_size=c.vision.image_size, max_txt_len=c.max_txt_len,
                             max_output_txt_len=c.max_output_txt_len)


def warn_generation_config(folder: Path) -> None:
    path = folder / "generation_config.json"
    if path.is_file():
        data = read_json(path, "the LLM's generation config")
        eos = data.get("eos_token_id") if isinstance(data, dict) else None
        if eos not in (None, 2, [2]):
            log.warning("%s says eos_token_id=%s; LAVIS-correct Vicuna v1.1 uses 2, which somelvlm uses", path, eos)


def lavis_state_dict(model: Any, with_llm: bool | None = None, with_vision: bool | None = None) -> StateDict:
    """What LAVIS's runner saves, under LAVIS names: the whole connection module (`query_tokens`,
    `ln_vision`, Q-Former, `llm_proj`), plus the LLM / ViT when they are trained (by default: when any
    of their parameters requires grad)."""
    if with_llm is None:
        with_llm = any(p.requires_grad for p in model.llm.parameters())
    if with_vision is None:
        with_vision = any(p.requires_grad for p in model.vision.parameters())
    prefixes = FP32_MODULES + (("llm.",) if with_llm else ()) + (("vision.",) if with_vision else ())
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items() if k.startswith(prefixes)}
    return WeightMap.load("lavis").from_ours(sd)


def save_lavis(model: Any, folder: PathLike, force: bool = False) -> Path:
    """Write `folder/checkpoint.pth` as LAVIS's runner saves it (`{"model": lavis_state_dict(model)}`)."""
    with atomic_folder(folder, force) as tmp:
        torch.save({"model": lavis_state_dict(model)}, tmp / "checkpoint.pth")
    return Path(folder)
