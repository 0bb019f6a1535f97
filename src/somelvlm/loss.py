"""The next-token loss of LAVIS's instruction tuning (one definition for the model, training, eval)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .processing import IGNORE_INDEX


def next_token_loss(outputs: torch.Tensor, labels: torch.Tensor,
                    head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Token-mean cross-entropy of predicting `labels[:, 1:]` from `outputs[:, :-1]`, over labels != -100.

    `outputs` are logits `[B, L, V]`, or hidden states `[B, L, D]` with `head` (the LM head), which is
    then applied to the counted positions only (no `[B, L, V]` logits in memory). Logits are upcast to fp32.
    """
    target = labels[:, 1:].to(outputs.device)
    keep = target != IGNORE_INDEX  # [B, L-1] positions that count
    picked = outputs[:, :-1][keep]  # [N, V] or [N, D]
    if head is not None:
        picked = head(picked)
    return F.cross_entropy(picked.float(), target[keep])
