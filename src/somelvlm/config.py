"""Frozen configuration dataclasses and the named presets (`vicuna7b`, `tiny`).

The defaults of every dataclass are the released SoMeLVLM / InstructBLIP-Vicuna-7B architecture
(LAVIS `blip2_vicuna_instruct`, see README "Numerics"). `tiny` is the built-in default: same
architecture, sizes small enough that the whole pipeline runs in about a second on a CPU.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import LlamaConfig

CONFIG_VERSION = 1


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Parse a JSON file; a missing, unreadable or invalid file is one error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file ({what})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


_KINDS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _build(cls: type, data: dict[str, Any] | None, where: str = "") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown fields and wrongly typed values by name."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: expected an object of {cls.__name__} fields, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    for name, value in data.items():
        kinds = _KINDS.get(str(known[name].type))
        if kinds and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
            raise ValueError(f"config field {where + '.' if where else ''}{name} must be {known[name].type}, "
                             f"got {value!r}")
    return cls(**data)


@dataclass(frozen=True)
class VisionConfig:
    """EVA-ViT-g/14 as LAVIS builds it (`create_eva_vit_g`): 39 blocks, no final norm."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 39
    heads: int = 16
    mlp_dim: int = 6144
    layer_norm_eps: float = 1e-6
    # LAVIS vit_precision="fp16": conv/linear weights are rounded to fp16 when loaded.
    fp16_weights: bool = True

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"vision width {self.width} is not divisible by heads {self.heads}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1


@dataclass(frozen=True)
class QFormerConfig:
    """Instruction-aware Q-Former: BERT-base with cross-attention every 2nd layer (LAVIS Qformer.py)."""

    hidden: int = 768
    layers: int = 12
    heads: int = 12
    ffn: int = 3072
    num_queries: int = 32
    vocab_size: int = 30523  # bert-base-uncased 30522 + [DEC]
    max_positions: int = 512
    layer_norm_eps: float = 1e-12
    cross_attention_freq: int = 2
    dropout: float = 0.1  # hidden and attention-probability dropout (train mode only)
    max_text_len: int = 128  # instruction tokens incl. [CLS]/[SEP], left-truncated

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"Q-Former hidden {self.hidden} is not divisible by heads {self.heads}")


@dataclass(frozen=True)
class LLMConfig:
    """The LLaMA/Vicuna decoder (built as `transformers.LlamaForCausalLM`) and LAVIS's token ids."""

    hidden: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 32
    intermediate: int = 11008
    vocab_size: int = 32001  # 32000 SentencePiece pieces + [PAD] (LAVIS resize)
    rms_norm_eps: float = 1e-6
    max_positions: int = 2048
    rope_theta: float = 10000.0
    # The special token ids, spelled here only.
    prompt_bos_id: int = 2  # LAVIS sets bos_token = '</s>': every prompt starts with id 2
    eos_id: int = 2
    pad_id: int = 32000  # '[PAD]', appended by LAVIS (= the tokenizer's pieces)
    bos_id: int = 1  # the Vicuna folder's '<s>': HF's bos, and transformers 4.33's dummy start of outputs

    def to_hf(self, attn_implementation: str = "sdpa") -> "LlamaConfig":
        from transformers import LlamaConfig

        cfg = LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=self.max_positions,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            hidden_act="silu",
            tie_word_embeddings=False,
            bos_token_id=self.bos_id,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
        )
        cfg._attn_implementation = attn_implementation
        return cfg

    @classmethod
    def from_hf(cls, hf: Any, **overrides: Any) -> "LLMConfig":
        """Read the architecture from a `LlamaConfig` (or its dict); token ids stay LAVIS's unless overridden."""
        get = (lambda k, d=None: hf.get(k, d)) if isinstance(hf, dict) else (lambda k, d=None: getattr(hf, k, d))
        model_type = get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"the LLM must be a LLaMA/Vicuna model, got model_type={model_type!r}")
        rope = get("rope_parameters") or {}
        theta = get("rope_theta") or (rope.get("rope_theta") if isinstance(rope, dict) else None) or 10000.0
        values = dict(
            hidden=get("hidden_size"),
            layers=get("num_hidden_layers"),
            heads=get("num_attention_heads"),
            kv_heads=get("num_key_value_heads") or get("num_attention_heads"),
            intermediate=get("intermediate_size"),
            vocab_size=get("vocab_size"),
            rms_norm_eps=get("rms_norm_eps", 1e-6),
            max_positions=get("max_position_embeddings", 2048),
            rope_theta=float(theta),
        )
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class SoMeLVLMConfig:
    """The whole model. `llm=None` means: read the LLM architecture from the LLM folder when loading."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig | None = None
    ln_vision_eps: float = 1e-5  # LAVIS LayerNorm default; HF's port uses 1e-6
    max_txt_len: int = 128  # LLM instruction length in training (left-truncated)
    max_output_txt_len: int = 256  # LLM answer length in training (right-truncated)
    # "sdpa": torch scaled_dot_product_attention; "exact": LAVIS's explicit matmul-softmax math.
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        if self.attn_implementation not in ("sdpa", "exact"):
            raise ValueError(f"attn_implementation must be 'sdpa' or 'exact', got {self.attn_implementation!r}")

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SoMeLVLMConfig":
        """Build from nested dicts; missing fields default to the released model."""
        data = dict(data)
        data.pop("version", None)
        data.pop("model_type", None)
        vision = _build(VisionConfig, data.pop("vision", None), "vision")
        qformer = _build(QFormerConfig, data.pop("qformer", None), "qformer")
        llm_data = data.pop("llm", None)
        llm = _build(LLMConfig, llm_data, "llm") if llm_data is not None else None
        top = _build(cls, data)
        return dataclasses.replace(top, vision=vision, qformer=qformer, llm=llm)

    @classmethod
    def preset(cls, name: str) -> "SoMeLVLMConfig":
        """A named preset: `vicuna7b` (the released model) or `tiny` (built-in default)."""
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None

    def replace(self, **changes: Any) -> "SoMeLVLMConfig":
        return dataclasses.replace(self, **changes)

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {"model_type": "somelvlm", "version": CONFIG_VERSION}
        out.update(dataclasses.asdict(self))
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "SoMeLVLMConfig":
        data = read_json(path, "somelvlm config")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        version = data.get("version", CONFIG_VERSION)
        if not isinstance(version, int) or version > CONFIG_VERSION:
            raise ValueError(f"{path}: config version {version!r} is not one this somelvlm reads (<= {CONFIG_VERSION})")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None


PRESETS: dict[str, SoMeLVLMConfig] = {
    "vicuna7b": SoMeLVLMConfig(llm=LLMConfig()),
    "tiny": SoMeLVLMConfig(
        vision=VisionConfig(image_size=56, patch_size=14, width=48, depth=2, heads=4, mlp_dim=128),
        qformer=QFormerConfig(hidden=64, layers=4, heads=4, ffn=128, num_queries=8),
        # 2000 pieces of the bundled tiny SentencePiece model + [PAD]
        llm=LLMConfig(hidden=96, layers=2, heads=4, kv_heads=4, intermediate=192, vocab_size=2001,
                      max_positions=1024, pad_id=2000),
    ),
}
