"""SoMeLVLM: EVA-ViT-g -> ln_vision -> instruction-aware Q-Former -> linear -> LLaMA (HF).

Only this file knows all the parts. Loading from external formats lives in `weights.py` (names and
files) and `folder.py` (our own model folder); generation in `generation.py`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .hub import LAVIS_CHECKPOINT, resolve_folder, resolve_model, resolve_vit
from .config import SoMeLVLMConfig
from .folder import read_folder, save_folder
from .hf import read_hf, save_hf
from .lavis import read_lavis, save_lavis
from .loading import Checkpoint, materialize
from .loss import next_token_loss
from .options import GenerationOptions
from .precision import parse_dtype, resolve_dtype, target_dtype
from .processing import IGNORE_INDEX, SoMeLVLMProcessor
from .qformer import QFormer
from .vision import VisionTransformer

log = logging.getLogger("somelvlm")
PathLike = str | Path


class LayerNormFp32(nn.LayerNorm):
    """LAVIS's fp16-safe LayerNorm: always computes in fp32 and returns fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


@dataclass
class SoMeLVLMOutput:
    logits: torch.Tensor | None  # [B, Q + L, V]: query positions, then text positions ([B, L] text-only)
    loss: torch.Tensor | None = None
    past_key_values: Any = None


def _dtype_arg(dtype: Any, torch_dtype: Any) -> Any:
    """`torch_dtype=` is accepted as an alias of `dtype=` (transformers users type it)."""
    if torch_dtype is not None and dtype is not None and parse_dtype(dtype) != parse_dtype(torch_dtype):
        raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass one of them")
    return dtype if dtype is not None else torch_dtype


class SoMeLVLM(nn.Module):
    """InstructBLIP-Vicuna as used by SoMeLVLM. Build with `from_config`, `from_lavis`,
    `from_pretrained` or `from_hf`; see README for the data flow."""

    def __init__(self, config: SoMeLVLMConfig, processor: SoMeLVLMProcessor | None = None) -> None:
        super().__init__()
        if config.llm is None:
            raise ValueError("config.llm is None: the LLM architecture must be known (use from_lavis to read it)")
        from transformers import LlamaForCausalLM

        self.config = config
        exact = config.attn_implementation == "exact"
        q = config.qformer
        self.query_tokens = nn.Parameter(torch.zeros(1, q.num_queries, q.hidden))
        nn.init.normal_(self.query_tokens, std=0.02)
        self.vision = VisionTransformer(config.vision, exact)
        self.ln_vision = LayerNormFp32(config.vision.width, eps=config.ln_vision_eps)
        self.qformer = QFormer(q, encoder_width=config.vision.width, exact=exact)
        self.proj = nn.Linear(q.hidden, config.llm.hidden)
        self.llm = LlamaForCausalLM(config.llm.to_hf("eager" if exact else "sdpa"))
        self.processor = processor
        self.generation_options = GenerationOptions()  # decoding defaults (a folder's generation_config.json)
        self.freeze_vision = True
        self.freeze_llm = True
        self.apply_freeze_policy()

    # ------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: SoMeLVLMConfig | str = "tiny", seed: int | None = 0) -> "SoMeLVLM":
        """Random weights (tests, benchmarks, the built-in `tiny` demo). The tiny preset gets the
        bundled tokenizers; other presets have no tokenizer until loaded from files."""
        if isinstance(config, str):
            config = SoMeLVLMConfig.preset(config)
        if seed is not None:
            torch.manual_seed(seed)
        processor = None
        if config == SoMeLVLMConfig.preset("tiny"):
            processor = SoMeLVLMProcessor.tiny(config.vision.image_size)
        return cls(config, processor).eval()

    @classmethod
    def load(cls, spec: PathLike | None = "tiny", dtype: torch.dtype | str | None = None,
             device: str | torch.device | None = None, device_map: Any = None) -> "SoMeLVLM":
        """What `--model` accepts: `"tiny"` (the built-in random demo model, with a warning), a somelvlm
        folder, an HF InstructBLIP folder, the released LAVIS layout, or a Hub id of any of them.
        `device_map` ("auto", "balanced", "sequential" or a dict) spreads a model over several devices."""
        if spec in (None, "tiny") and device_map is not None:
            raise ValueError("--device-map needs a model folder or Hub id; the tiny model fits one device")
        if spec in (None, "tiny"):
            log.warning("using the built-in 'tiny' model with RANDOM weights: its answers are meaningless; "
                        "pass a converted model folder for real answers")
            model = cls.from_config("tiny").to_dtype(resolve_dtype(dtype, device))  # the one "auto" rule
            return model.to(device) if device is not None else model
        return cls.from_pretrained(spec, dtype=dtype, device=device, device_map=device_map)

    @classmethod
    def from_lavis(
        cls,
        checkpoint: PathLike | Sequence[PathLike],
        vit: PathLike | None = None,
        llm: PathLike | None = None,
        qformer_tokenizer: PathLike | None = None,
        config: SoMeLVLMConfig | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        strict: bool = False,
        torch_dtype: torch.dtype | str | None = None,
    ) -> "SoMeLVLM":
        """Load the released LAVIS files: `checkpoint.pth`, `eva_vit_g.pth` and the HF LLM folder.

        `checkpoint` may be a list `[base, finetuned]` (later files win per key, as SoMeLVLM's config
        loads InstructBLIP's checkpoint under its own); `llm` may be a Hub id, and defaults to the folder of
        `checkpoint` (the released repo holds both); `vit` is a path or URL, by default LAVIS's URL
        (fetched once into the cache). `strict=True`: keys of the ViT file that the model lacks are errors
        instead of being ignored as LAVIS does. `config=None` is the released architecture; the LLM
        architecture always comes from the folder. `dtype=None`: fp32 on CPU, fp16 on CUDA (see `precision`).
        """
        ckpts = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
        if llm is None:
            llm = Path(ckpts[-1]).parent
        llm_folder = resolve_folder(llm, "LLM folder")
        vit_file = resolve_vit(vit)
        src = read_lavis(ckpts, vit_file, llm_folder, qformer_tokenizer, config)
        return materialize(cls, src, _dtype_arg(dtype, torch_dtype), device, strict=strict)

    @classmethod
    def from_pretrained(cls, id_or_dir: PathLike, dtype: torch.dtype | str | None = None,
                        device: str | torch.device | None = None, device_map: Any = None,
                        torch_dtype: torch.dtype | str | None = None, vit: PathLike | None = None,
                        strict: bool = False, config: SoMeLVLMConfig | None = None) -> "SoMeLVLM":
        """Load a model folder or Hub id (`owner/name[@revision]`): a somelvlm folder (see
        `save_pretrained`), an HF InstructBLIP folder, or the released SoMeLVLM layout (`checkpoint.pth`
        beside the Vicuna folder, e.g. "Lishi0905/SoMeLVLM"; `vit`, `config` and `strict` as in `from_lavis`).
        `dtype=None`: fp32 on CPU, fp16 on CUDA with the connection module fp32 (see `precision`)."""
        dtype = _dtype_arg(dtype, torch_dtype)
        folder, kind = resolve_model(id_or_dir)
        if kind == "lavis":
            src: Checkpoint = read_lavis(folder / LAVIS_CHECKPOINT,
                                         resolve_vit(vit), folder, config=config)
        elif kind == "hf":
            log.info("%s is an HF InstructBLIP folder: importing it (`somelvlm convert --from-hf` makes a "
                     "somelvlm folder once)", id_or_dir)
            src = read_hf(folder)
        else:
            src = read_folder(folder)
        return materialize(cls, src, dtype, device, device_map, strict=strict)

    @classmethod
    def from_hf(cls, id_or_dir: PathLike, dtype: torch.dtype | str | None = None,
                device: str | torch.device | None = None, ln_vision_eps: float | None = None,
                torch_dtype: torch.dtype | str | None = None) -> "SoMeLVLM":
        """Import a Hugging Face `InstructBlipForConditionalGeneration` folder or Hub id. `ln_vision_eps=None`
        reproduces the HF model (vision eps); pass 1e-5 for LAVIS numerics."""
        folder = resolve_folder(id_or_dir, "HF InstructBLIP folder")
        return materialize(cls, read_hf(folder, ln_vision_eps), _dtype_arg(dtype, torch_dtype), device)

    def save_pretrained(self, folder: PathLike, format: str = "somelvlm", force: bool = False,
                        dtype: torch.dtype | str | None = None, **kwargs: Any) -> Path:
        """Write a model folder: `format="somelvlm"` (safetensors, our config), `"hf"` (a folder
        `InstructBlipForConditionalGeneration.from_pretrained` loads) or `"lavis"` (`checkpoint.pth`)."""
        if format == "somelvlm":
            return save_folder(self, folder, force=force, dtype=dtype, **kwargs)
        if format == "hf":
            return save_hf(self, folder, force=force, dtype=dtype)
        if format == "lavis":
            return save_lavis(self, folder, force=force)
        raise ValueError(f"format must be 'somelvlm', 'hf' or 'lavis', got {format!r}")

    # ------------------------------------------------------------------------------------------
    # Freezing (InstructBLIP: ViT and LLM frozen, connection module trained)
    # ------------------------------------------------------------------------------------------
    def apply_freeze_policy(self, freeze_vision: bool | None = None, freeze_llm: bool | None = None) -> None:
        if freeze_vision is not None:
            self.freeze_vision = freeze_vision
        if freeze_llm is not None:
            self.freeze_llm = freeze_llm
        for p in self.vision.parameters():
            p.requires_grad_(not self.freeze_vision)
        for p in self.llm.parameters():
            p.requires_grad_(not self.freeze_llm)
        self.train(self.training)

    def train(self, mode: bool = True) -> "SoMeLVLM":
        super().train(mode)
        if getattr(self, "freeze_vision", False):
            self.vision.eval()  # LAVIS disabled_train: a frozen ViT never leaves eval mode
        if getattr(self, "freeze_llm", False):
            self.llm.eval()
            if mode:  # transformers checkpoints only layers in training mode; LLaMA has no dropout
                from transformers.modeling_layers import GradientCheckpointingLayer

                for m in self.llm.modules():
                    if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing:
                        m.training = True
        return self

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """`(name, parameter)` for everything that trains under the current policy."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------------
    # Numerics switches
    # ------------------------------------------------------------------------------------------
    def set_attention(self, implementation: str) -> None:
        """`"sdpa"` (fast) or `"exact"` (LAVIS's explicit matmul-softmax in ViT and Q-Former, eager LLaMA)."""
        if implementation not in ("sdpa", "exact"):
            raise ValueError(f"implementation must be 'sdpa' or 'exact', got {implementation!r}")
        exact = implementation == "exact"
        self.vision.set_exact_attention(exact)
        self.qformer.set_exact_attention(exact)
        self.llm.set_attn_implementation("eager" if exact else "sdpa")
        self.config = self.config.replace(attn_implementation=implementation)

    def set_grad_checkpointing(self, vision: bool = True, qformer: bool = False, llm: bool = True) -> None:
        self.vision.set_grad_checkpointing(vision)
        self.qformer.set_grad_checkpointing(qformer)
        if llm:
            self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif self.llm.is_activation_checkpointing:
            self.llm.activation_checkpointing_disable()
        self.train(self.training)  # re-apply the frozen LLM's layer modes

    def to_dtype(self, dtype: torch.dtype, keep_fp32: bool = True) -> "SoMeLVLM":
        """Cast to `dtype`, keeping the connection module in fp32 for half precision (see FP32_MODULES)."""
        for name, p in self.named_parameters():
            t = target_dtype(name, dtype, keep_fp32)
            if p.dtype != t:
                p.data = p.data.to(t)
        return self

    # ------------------------------------------------------------------------------------------
    # Forward pieces
    # ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[B, 3, S, S]` -> image embeds after `ln_vision` `[B, N, width]` (fp32, as LAVIS)."""
        dev = self.vision.patch_embed.proj.weight.device
        x = self.vision(pixel_values.to(dev))  # [B, N, C]
        return self.ln_vision(x.to(self.ln_vision.weight.device))  # fp32

    def query_embeds(
        self,
        image_embeds: torch.Tensor,
        qformer_input_ids: torch.Tensor | None,
        qformer_attention_mask: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Image embeds + instruction -> `[B, Q, llm_hidden]` soft prompt (the mask covers the text only).

        With `image_index [B]`, `image_embeds [U, N, C]` holds the distinct images only (see
        `ImageFeatures`): the Q-Former's cross-attention keys/values are computed once per image."""
        dev = self.query_tokens.device
        if image_index is None:
            image_index = torch.arange(image_embeds.shape[0], device=dev)
        used, local = image_index.to(dev).unique(return_inverse=True)
        if qformer_input_ids is not None:
            qformer_input_ids = qformer_input_ids.to(dev)
            if qformer_attention_mask is not None:
                qformer_attention_mask = qformer_attention_mask.to(dev)
        q = self.query_tokens.expand(len(local), -1, -1)
        h = self.qformer(q, image_embeds.to(dev).index_select(0, used), qformer_input_ids, qformer_attention_mask,
                         local)  # [B, Q+T, H]
        h = h[:, : q.shape[1]]
        return self.proj(h.to(self.proj.weight.dtype))  # [B, Q, D]

    def llm_inputs(
        self, queries: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`[queries | embed(ids)]`, its mask and position ids (cumsum of the mask: pads are skipped).
        `queries=None` (a post without an image): the text alone, no soft prompt."""
        embed = self.llm.get_input_embeddings()
        input_ids = input_ids.to(embed.weight.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(input_ids.device)
        text = embed(input_ids)  # [B, L, D]
        if queries is None:
            queries = text.new_zeros(text.shape[0], 0, text.shape[2])  # [B, 0, D]
        inputs = torch.cat([queries.to(text.device, text.dtype), text], dim=1)  # [B, Q+L, D]
        mask = torch.cat([attention_mask.new_ones(queries.shape[:2]), attention_mask], dim=1)  # [B, Q+L]
        position_ids = (mask.cumsum(-1) - 1).clamp_(min=0)
        return inputs, mask, position_ids

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        return_logits: bool = True,
    ) -> SoMeLVLMOutput:
        """Logits over `[Q query positions + L text positions]`; `labels` cover the text (`[B, L]`) or
        everything (`[B, Q+L]`), -100 = ignored; the loss is LAVIS's token-mean next-token CE.
        Without `pixel_values` and `image_embeds` (a plain-text post) the LLM runs alone on the same
        tokens: no soft prompt, Q = 0. `return_logits=False` (with labels) applies the LM head to the
        labelled positions only, which saves the `[B, Q+L, vocab]` logits' memory in training."""
        if input_ids is None:
            raise ValueError("input_ids are required")
        if image_embeds is None and pixel_values is not None:
            image_embeds = self.encode_image(pixel_values)
        queries = None
        if image_embeds is not None:
            queries = self.query_embeds(image_embeds, qformer_input_ids, qformer_attention_mask)  # [B, Q, D]
        inputs, mask, pos = self.llm_inputs(queries, input_ids, attention_mask)  # [B, Q+L, D]
        if labels is not None:
            Q = inputs.shape[1] - input_ids.shape[1]
            if labels.shape[1] == input_ids.shape[1]:
                labels = torch.cat([labels.new_full((labels.shape[0], Q), IGNORE_INDEX), labels], dim=1)
            elif labels.shape[1] != Q + input_ids.shape[1]:
                raise ValueError(f"labels have length {labels.shape[1]}; expected {input_ids.shape[1]} or {Q + input_ids.shape[1]}")
        if labels is not None and not return_logits:
            hidden = self.llm.get_decoder()(inputs_embeds=inputs, attention_mask=mask, position_ids=pos,
                                            use_cache=False).last_hidden_state  # [B, Q+L, D]
            return SoMeLVLMOutput(logits=None, loss=next_token_loss(hidden, labels, self.llm.get_output_embeddings()))
        logits = self.llm(inputs_embeds=inputs, attention_mask=mask, position_ids=pos, use_cache=False).logits
        loss = next_token_loss(logits, labels) if labels is not None else None
        return SoMeLVLMOutput(logits=logits, loss=loss)

    # ------------------------------------------------------------------------------------------
    # High-level API (implemented in generation.py / train)
    # ------------------------------------------------------------------------------------------
    def require_processor(self) -> SoMeLVLMProcessor:
        if self.processor is None:
            raise RuntimeError(
                "this model has no tokenizers: load it with from_pretrained/from_lavis/from_hf, "
                "or set model.processor = SoMeLVLMProcessor(...)"
            )
        return self.processor

    def encode_images(self, images: Any, batch_size: int = 16):
        """Run the vision tower once: returns reusable `ImageFeatures` for `generate`/`rank`."""
        from .generation import encode_images

        return encode_images(self, images, batch_size=batch_size)

    def generate(self, images: Any = None, prompts: Any = None, **kwargs: Any) -> list[str]:
        """Answers for `prompts` about `images` (LAVIS defaults: 5 beams, 256 new tokens, ...)."""
        from .generation import generate

        return generate(self, images=images, prompts=prompts, **kwargs)

    def generate_stream(self, image: Any, prompt: str, **kwargs: Any) -> Iterator[str]:
        """Yield the answer's text pieces as they are produced (greedy or sampling)."""
        from .generation import generate_stream

        return generate_stream(self, image, prompt, **kwargs)

    def rank(self, image: Any, prompt: str, candidates: list[str], **kwargs: Any) -> list[tuple[str, float]]:
        """Candidate answers sorted by LM log-likelihood (LAVIS `predict_class`), best first."""
        from .generation import rank

        return rank(self, image, prompt, candidates, **kwargs)

    def compute_loss(self, images: Any, prompts: list[str], answers: list[str]) -> torch.Tensor:
        """LAVIS instruction-tuning loss for raw texts (tokenised with LAVIS's rules); `images=None`:
        plain-text posts, the LLM alone on the same tokens."""
        proc = self.require_processor()
        text = proc.training_text(prompts, answers)
        if images is None or isinstance(images, torch.Tensor):
            pixel_values = images
        else:
            pixel_values = proc.images(images)
        if pixel_values is not None:
            pixel_values = pixel_values.to(self.device)
        out = self(pixel_values=pixel_values, input_ids=text.input_ids,
                   attention_mask=text.attention_mask, qformer_input_ids=text.qformer_input_ids,
                   qformer_attention_mask=text.qformer_attention_mask, labels=text.labels, return_logits=False)
        return out.loss

    def num_parameters(self) -> dict[str, int]:
        parts = {"vision": self.vision, "ln_vision": self.ln_vision, "qformer": self.qformer, "proj": self.proj,
                 "llm": self.llm}
        out = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
        out["query_tokens"] = self.query_tokens.numel()
        out["total"] = sum(out.values())
        return out
