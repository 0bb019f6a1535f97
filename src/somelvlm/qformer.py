"""The instruction-aware Q-Former of InstructBLIP (LAVIS `Qformer.py`, BERT-base layout).

`[query_tokens | instruction]` go through one post-LN BERT encoder with *bidirectional*
self-attention (padded instruction keys get -10000); in every `cross_attention_freq`-th layer the
query rows (only) cross-attend to the image embeddings; query rows and text rows use separate
feed-forward weights. The 32 query rows of the last layer are the output.

Parameter names follow LAVIS's `Qformer.bert.*` (minus that prefix) so the key map is a prefix rename.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import QFormerConfig

MASK_VALUE = -10000.0  # LAVIS get_extended_attention_mask (non-decoder branch)


class Embeddings(nn.Module):
    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden, padding_idx=0)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, query_embeds: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        x = query_embeds  # [B, Q, H]: no position embedding on queries
        if input_ids is not None and input_ids.shape[1] > 0:
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)  # text positions start at 0
            text = self.word_embeddings(input_ids) + self.position_embeddings(pos)  # [B, T, H]
            x = torch.cat([x.to(text.dtype), text], dim=1)  # [B, Q+T, H]
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    """LAVIS `BertSelfAttention`: scores = (Q K^T) / sqrt(d) + additive mask."""

    def __init__(self, cfg: QFormerConfig, kv_width: int, exact: bool = False) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.hidden // cfg.heads
        self.exact = exact
        self.dropout_p = cfg.dropout
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(kv_width, cfg.hidden)
        self.value = nn.Linear(kv_width, cfg.hidden)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.heads, self.head_dim).transpose(1, 2)  # [B, h, L, d]

    def forward(self, h: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None,
                kv_index: torch.Tensor | None = None) -> torch.Tensor:
        """`kv_index [B]` picks rows of `kv` per query row: keys/values are computed once per distinct
        image and shared by all prompts about it."""
        k, v = self._split(self.key(kv)), self._split(self.value(kv))
        if kv_index is not None:
            k, v = k.index_select(0, kv_index), v.index_select(0, kv_index)
        q = self._split(self.query(h))
        p = self.dropout_p if self.training else 0.0
        if self.exact:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # [B, h, Lq, Lk]
            if mask is not None:
                scores = scores + mask
            probs = F.dropout(scores.softmax(dim=-1), p=p, training=self.training)
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        B, _, L, _ = out.shape
        return out.transpose(1, 2).reshape(B, L, self.heads * self.head_dim)  # [B, Lq, H]


class ResidualOutput(nn.Module):
    """BERT's output sublayer, `LayerNorm(dropout(dense(x)) + residual)`: `BertSelfOutput` after
    attention (`width` = hidden) and `BertOutput` after the feed-forward (`width` = ffn)."""

    def __init__(self, cfg: QFormerConfig, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)  # [B, L, hidden]


class AttentionBlock(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_width: int, exact: bool = False) -> None:
        super().__init__()
        # LAVIS names this submodule `self`; keep it so the key map stays a prefix rename.
        self.add_module("self", SelfAttention(cfg, kv_width, exact))
        self.output = ResidualOutput(cfg, cfg.hidden)

    def forward(self, h: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None,
                kv_index: torch.Tensor | None = None) -> torch.Tensor:
        attn: SelfAttention = self._modules["self"]  # type: ignore[assignment]
        return self.output(attn(h, kv, mask, kv_index), h)


class Intermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact erf GELU (BERT "gelu")


class Layer(nn.Module):
    def __init__(self, cfg: QFormerConfig, index: int, encoder_width: int, exact: bool = False) -> None:
        super().__init__()
        self.attention = AttentionBlock(cfg, cfg.hidden, exact)
        self.has_cross_attention = index % cfg.cross_attention_freq == 0
        if self.has_cross_attention:
            self.crossattention = AttentionBlock(cfg, encoder_width, exact)
        self.intermediate = Intermediate(cfg)
        self.output = ResidualOutput(cfg, cfg.ffn)
        self.intermediate_query = Intermediate(cfg)
        self.output_query = ResidualOutput(cfg, cfg.ffn)

    def forward(
        self, h: torch.Tensor, mask: torch.Tensor | None, image_embeds: torch.Tensor, num_queries: int,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        a = self.attention(h, h, mask)  # [B, Q+T, H], bidirectional over queries and text
        q = a[:, :num_queries]
        if self.has_cross_attention:  # queries only; image mask is all ones
            q = self.crossattention(q, image_embeds, None, image_index)
        out = self.output_query(self.intermediate_query(q), q)
        if a.shape[1] > num_queries:
            t = a[:, num_queries:]
            out = torch.cat([out, self.output(self.intermediate(t), t)], dim=1)
        return out


class Encoder(nn.Module):
    def __init__(self, cfg: QFormerConfig, encoder_width: int, exact: bool = False) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg, i, encoder_width, exact) for i in range(cfg.layers))


class QFormer(nn.Module):
    """`forward(query_embeds [B,Q,H], image_embeds [B,N,Cv], input_ids [B,T], attention_mask [B,T])`
    returns the last hidden state of all `Q+T` rows; `[:, :Q]` are the query outputs. With
    `image_index [B]`, `image_embeds` holds only the distinct images `[U,N,Cv]`."""

    def __init__(self, cfg: QFormerConfig, encoder_width: int, exact: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg, encoder_width, exact)
        self.grad_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT init (normal 0.02, zero bias, LN 1/0); real weights always overwrite it."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_exact_attention(self, exact: bool) -> None:
        for m in self.modules():
            if isinstance(m, SelfAttention):
                m.exact = exact

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.LayerNorm.weight.dtype

    def forward(
        self,
        query_embeds: torch.Tensor,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dtype = self.dtype
        B, Q = query_embeds.shape[:2]
        h = self.embeddings(query_embeds.to(dtype), input_ids)  # [B, Q+T, H]
        mask = None
        if input_ids is not None and input_ids.shape[1] > 0:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            full = torch.cat([attention_mask.new_ones(B, Q), attention_mask], dim=1)  # [B, Q+T]
            if not bool(full.all()):
                mask = (1.0 - full[:, None, None, :].to(dtype)) * MASK_VALUE  # [B, 1, 1, Q+T] additive
        image_embeds = image_embeds.to(dtype)
        for layer in self.encoder.layer:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, mask, image_embeds, Q, image_index, use_reentrant=False)
            else:
                h = layer(h, mask, image_embeds, Q, image_index)
        return h
