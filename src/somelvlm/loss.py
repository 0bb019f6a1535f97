"""The next-token loss of LAVIS's instruction tuning, the one definition: the token mean (model,
training) and per-sample sums (evaluation loss, candidate ranking)."""

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


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample summed NLL of predicting the last `L` positions' `labels [B, L]` (-100: not counted)
    from `logits [B, T, V]` (T >= L; position `T-L+t-1` predicts label `t`), and the counts (`[B]` each).

    Ranking scores candidates by the negated sum; evaluation averages sum / count across processes."""
    T, L = logits.shape[1], labels.shape[1]
    if T > L:  # logits also cover a soft prompt in front: those positions predict nothing here
        labels = torch.cat([labels.new_full((labels.shape[0], T - L), IGNORE_INDEX), labels], dim=1)
    target = labels[:, 1:].to(logits.device)
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, ignore_index=IGNORE_INDEX,
                          reduction="none")  # [B, T-1], 0 where not counted
    return nll.sum(1), (target != IGNORE_INDEX).sum(1)
