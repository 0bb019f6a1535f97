"""The LLM vocabulary rules of LAVIS: the tokenizer's pieces + one `[PAD]` (id = number of pieces).

LAVIS adds `[PAD]` to the LLaMA tokenizer and calls `resize_token_embeddings(len(tokenizer))`, so the
embedding and LM head get one fresh row (drawn at random, never saved); extra rows of a padded hub
vocabulary are cut. Every loader applies these rules through this module.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from .config import LLMConfig

log = logging.getLogger("somelvlm")

PAD_ROW_SEED = 32000
PAD_ROW_STD = 0.02
EMBED_ROW, HEAD_ROW = 0, 1  # index into pad_rows()
RESIZED = {"llm.model.embed_tokens.weight": EMBED_ROW, "llm.lm_head.weight": HEAD_ROW}


def vocab_size(num_pieces: int) -> int:
    """LAVIS's LLM vocabulary: the SentencePiece pieces + `[PAD]`."""
    return num_pieces + 1


def with_tokenizer(llm: LLMConfig, num_pieces: int) -> LLMConfig:
    """`llm` resized to the tokenizer: vocab = pieces + `[PAD]`, pad id = pieces."""
    return dataclasses.replace(llm, vocab_size=vocab_size(num_pieces), pad_id=num_pieces)


def pad_rows(hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `[PAD]` rows appended to `embed_tokens` and `lm_head` when growing the vocab by one.

    LAVIS draws them at random (HF `_init_weights`, N(0, 0.02²)) and never saves them; we draw from the
    same distribution but deterministically: one `torch.Generator` seeded 32000, first the
    `embed_tokens` row, then the `lm_head` row, in fp32.
    """
    g = torch.Generator().manual_seed(PAD_ROW_SEED)
    embed = torch.randn(hidden, generator=g, dtype=torch.float32) * PAD_ROW_STD
    head = torch.randn(hidden, generator=g, dtype=torch.float32) * PAD_ROW_STD
    return embed, head


def resize_vocab(t: torch.Tensor, rows: int, which: int, what: str) -> torch.Tensor:
    """LAVIS's `resize_token_embeddings(rows)`: append the `[PAD]` row (`pad_rows()[which]`) or drop
    rows beyond the tokenizer; fewer than `rows - 1` rows is an error naming `what`."""
    if t.shape[0] < rows - 1:
        raise ValueError(f"{what} has {t.shape[0]} rows but the tokenizer has {rows - 1} pieces")
    if t.shape[0] == rows - 1:
        log.info("%s grown from %d to %d rows with the [PAD] row", what, rows - 1, rows)
        return torch.cat([t, pad_rows(t.shape[1])[which].to(t.dtype)[None]])
    if t.shape[0] > rows:
        log.info("%s cut from %d to %d rows (the tokenizer's pieces + [PAD])", what, t.shape[0], rows)
        return t[:rows]
    return t
