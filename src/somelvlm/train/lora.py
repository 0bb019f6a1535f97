"""LoRA on the LLM (optional extra: `pip install somelvlm[lora]`, i.e. `peft`).

Only `model.llm` is wrapped; the base LLM weights stay frozen and the adapters train together with
the connection module. The final model folder gets the adapters merged (`merge_and_unload`), so
`SoMeLVLM.from_pretrained` needs no peft; the adapter alone is saved with peft's own format too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("--lora needs peft: pip install 'somelvlm[lora]' (or pip install peft)") from None
    return peft


def add_lora(model: nn.Module, r: int = 8, alpha: int = 16, dropout: float = 0.05,
             targets: Sequence[str] = DEFAULT_TARGETS) -> None:
    """Wrap `model.llm` with LoRA adapters on the named linear layers (in place).

    The LLM's base weights are frozen; the LLM is no longer kept in eval mode by `model.train()`
    (LLaMA has no dropout of its own, so this only switches LoRA dropout on in training).
    """
    peft = _peft()
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                             bias="none", task_type="CAUSAL_LM")
    model.llm = peft.get_peft_model(model.llm, config)
    model.freeze_llm = False  # mode only: requires_grad is set by peft (base frozen, adapters trainable)


def has_lora(model: nn.Module) -> bool:
    return type(model.llm).__module__.startswith("peft.")


def save_adapter(model: nn.Module, folder: str | Path) -> None:
    """The adapters alone, in peft's format (`adapter_config.json`, `adapter_model.safetensors`)."""
    model.llm.save_pretrained(str(folder))


def merge_lora(model: nn.Module) -> None:
    """Fold the adapters into the LLM weights and drop peft's wrapper (in place)."""
    model.llm = model.llm.merge_and_unload()
    model.freeze_llm = not any(p.requires_grad for p in model.llm.parameters())
