"""A lean greedy/sampling decoder over the weights of a `transformers.LlamaForCausalLM`.

`transformers`' `generate` spends most of a decode step on bookkeeping (generation config and
logits-processor plumbing, cache objects, mask construction) that a batch of one image and a few
prompts does not need. This module runs the same math — the model's own RMSNorm, rotary, MLP and
projection modules, SDPA attention — over a preallocated KV cache, and reproduces `generate`'s
greedy and sampling semantics (LAVIS repetition penalty, min/max new tokens, temperature, top-k,
top-p, eos handling, pad after eos). Beam search stays on `transformers`.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from .logits import SamplingSettings, process_scores


def supports(llm) -> bool:
    """Whether `llm` is a plain LLaMA this decoder reproduces (default RoPE, no biases, no sliding window)."""
    cfg = llm.config
    rope = getattr(cfg, "rope_parameters", None) or {}
    return (getattr(cfg, "model_type", "") == "llama" and rope.get("rope_type", "default") == "default"
            and not getattr(cfg, "attention_bias", False) and not getattr(cfg, "mlp_bias", False)
            and getattr(cfg, "pretraining_tp", 1) == 1 and cfg.hidden_act == "silu")


class KVCache:
    """Per-layer `[B, kv_heads, capacity, head_dim]` keys and values, filled left to right."""

    def __init__(self, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch, kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]  # finite in pad slots
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.length = 0


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaDecoder:
    """Runs a `LlamaForCausalLM`'s layers with a `KVCache`; see module doc."""

    def __init__(self, llm) -> None:
        if not supports(llm):
            raise ValueError("this LLM is not a plain LLaMA; use transformers' generate")
        self.llm = llm
        cfg = llm.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5

    def new_cache(self, batch: int, capacity: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        return KVCache(len(self.llm.get_decoder().layers), batch, self.kv_heads, capacity, self.head_dim, dtype, device)

    def _run(self, x: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """The decoder layers on `x [B, T, D]`; `attend(layer_index, q, k, v)` does the attention
        (and the cache bookkeeping). Returns the last position's logits `[B, V]` in fp32."""
        model = self.llm.get_decoder()
        B, T, _ = x.shape
        cos, sin = model.rotary_emb(x, positions)  # [B, T, head_dim]
        cos, sin = cos[:, None], sin[:, None]
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(B, T, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            out = attend(i, q, k, v)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.llm.get_output_embeddings()(model.norm(x[:, -1:]))[:, 0].float()

    def _sdpa(self, q, k, v, mask, causal):
        groups = self.heads // self.kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, key_mask: torch.Tensor) -> torch.Tensor:
        """`x [B, T, D]` embeddings at `positions [B, T]`, appended to `cache`; `key_mask [B, cache.length+T]`
        marks real (non-pad) keys. Returns the last position's logits `[B, V]` in fp32."""
        T = x.shape[1]
        start, end = cache.length, cache.length + T
        if T == 1 and bool(key_mask.all()):
            mask, causal = None, False
        elif bool(key_mask.all()) and start == 0:
            mask, causal = None, True
        else:
            idx = torch.arange(end, device=x.device)
            allowed = idx[None, :] <= (start + torch.arange(T, device=x.device))[:, None]  # [T, end]
            mask, causal = (allowed[None] & key_mask[:, None, :].bool())[:, None], False  # [B, 1, T, end]

        def attend(i, q, k, v):
            cache.k[i][:, :, start:end] = k
            cache.v[i][:, :, start:end] = v
            return self._sdpa(q, cache.k[i][:, :, :end], cache.v[i][:, :, :end], mask, causal)

        logits = self._run(x, positions, attend)
        cache.length = end
        return logits

    @torch.inference_mode()
    def prefill_rows(self, x: torch.Tensor, key_mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Prefill a padded batch one row at a time over its real tokens only (no compute on pads),
        writing each row's keys/values at its padded slots. Same result as `forward` on the batch."""
        logits = []
        for b in range(x.shape[0]):
            slots = key_mask[b].nonzero().squeeze(1)  # cache positions of the real tokens
            xb = x[b:b + 1, slots]
            pos = torch.arange(len(slots), device=x.device)[None]

            def attend(i, q, k, v, b=b, slots=slots):
                cache.k[i][b, :, slots] = k[0]
                cache.v[i][b, :, slots] = v[0]
                return self._sdpa(q, k, v, None, True)

            logits.append(self._run(xb, pos, attend))
        cache.length = x.shape[1]
        return torch.cat(logits)

    def prefill(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                extra: int) -> tuple[KVCache, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the prompt; returns the cache (room for `extra` more tokens), the last logits, the
        attention mask and the next position ids."""
        B, L, _ = inputs_embeds.shape
        device = inputs_embeds.device
        cache = self.new_cache(B, L + extra, inputs_embeds.dtype, device)
        mask = attention_mask.to(device).long()
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        if B > 1 and int(mask.sum()) < 0.8 * mask.numel():  # much padding: skip computing it
            logits = self.prefill_rows(inputs_embeds, mask, cache)
        else:
            logits = self.forward(inputs_embeds, positions, cache, mask)
        return cache, logits, mask, positions[:, -1:] + 1

    def decode(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
               s: SamplingSettings) -> Iterator[torch.Tensor]:
        """Greedy or sampling: yield the next token ids `[B]` step by step (pad for rows that ended)."""
        B = inputs_embeds.shape[0]
        cache, logits, mask, next_pos = self.prefill(inputs_embeds, attention_mask, s.max_new_tokens)
        unfinished = torch.ones(B, dtype=torch.bool, device=logits.device)
        generated = torch.empty(B, 0, dtype=torch.long, device=logits.device)
        embed = self.llm.get_input_embeddings()
        for step in range(s.max_new_tokens):
            scores = process_scores(logits, generated, step, s)
            if s.do_sample:
                nxt = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                nxt = scores.argmax(dim=-1)
            nxt = torch.where(unfinished, nxt, torch.full_like(nxt, s.pad_id))
            yield nxt
            generated = torch.cat([generated, nxt[:, None]], dim=1)
            unfinished &= nxt != s.eos_id
            if not bool(unfinished.any()) or step + 1 == s.max_new_tokens:
                return
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            logits = self.forward(embed(nxt[:, None]), next_pos, cache, mask)
            next_pos = next_pos + 1

    @torch.inference_mode()
    def beam_search(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, s: SamplingSettings,
                    num_beams: int, length_penalty: float = 1.0, num_return_sequences: int = 1) -> list[list[int]]:
        """Beam search with transformers 4.33's rules, which LAVIS's numbers depend on (see
        `NBest`): every hypothesis counts a dummy start token in its length, log-probs go through
        the processors (repetition penalty, min length) before the running beam score is added, the
        top `2 * num_beams` candidates are scanned in order, and beams still running at the length
        limit are scored by that limit. Returns the new tokens of the best `num_return_sequences`
        hypotheses per prompt (prompt-major)."""
        if num_return_sequences > num_beams:
            raise ValueError("num_return_sequences must be <= num_beams")
        B, K = inputs_embeds.shape[0], num_beams
        max_length = s.max_new_tokens + 1  # the dummy start token counts, as in transformers 4.33
        cache, logits, mask, next_pos = self.prefill(inputs_embeds, attention_mask, s.max_new_tokens)
        device = logits.device
        cache.k = [k.repeat_interleave(K, dim=0) for k in cache.k]
        cache.v = [v.repeat_interleave(K, dim=0) for v in cache.v]
        logits, mask, next_pos = (t.repeat_interleave(K, dim=0) for t in (logits, mask, next_pos))
        beam_scores = torch.zeros(B, K, device=device)
        beam_scores[:, 1:] = -1e9  # at first all beams are the same: expand beam 0 only
        beam_scores = beam_scores.view(-1)
        generated = torch.empty(B * K, 0, dtype=torch.long, device=device)
        best = [NBest(K, length_penalty) for _ in range(B)]
        done = [False] * B
        embed = self.llm.get_input_embeddings()
        cur_len = 1
        while True:
            scores = process_scores(logits.log_softmax(dim=-1), generated, cur_len - 1, s)
            scores = scores + beam_scores[:, None]
            V = scores.shape[-1]
            top_scores, top_ids = torch.topk(scores.view(B, K * V), 2 * K, dim=1)
            next_scores = torch.zeros(B, K, device=device)
            next_tokens = torch.full((B, K), s.pad_id, dtype=torch.long, device=device)
            next_rows = torch.arange(B, device=device)[:, None].mul(K).expand(B, K).clone()
            top_scores_l, top_ids_l = top_scores.tolist(), top_ids.tolist()
            for b in range(B):
                if done[b]:
                    continue
                j = 0
                for rank, (score, flat) in enumerate(zip(top_scores_l[b], top_ids_l[b])):
                    row, token = b * K + flat // V, flat % V
                    if token == s.eos_id:
                        if rank < K:  # an eos below the top num_beams candidates is ignored
                            best[b].add(generated[row].tolist(), score, cur_len)
                    else:
                        next_scores[b, j], next_tokens[b, j], next_rows[b, j] = score, token, row
                        j += 1
                    if j == K:
                        break
                done[b] = best[b].is_done(max(top_scores_l[b]), cur_len + 1)
            rows = next_rows.view(-1)
            beam_scores = next_scores.view(-1)
            generated = torch.cat([generated.index_select(0, rows), next_tokens.view(-1, 1)], dim=1)
            cur_len += 1
            if all(done) or cur_len >= max_length:
                break
            cache.k = [k.index_select(0, rows) for k in cache.k]
            cache.v = [v.index_select(0, rows) for v in cache.v]
            mask = torch.cat([mask, mask.new_ones(B * K, 1)], dim=1)
            logits = self.forward(embed(generated[:, -1:]), next_pos, cache, mask)
            next_pos = next_pos + 1
        out: list[list[int]] = []
        scores_l = beam_scores.tolist()
        for b in range(B):
            if not done[b]:  # beams still running at the limit, scored by their full length
                for j in range(K):
                    best[b].add(generated[b * K + j].tolist(), scores_l[b * K + j], cur_len)
            out.extend(best[b].top(num_return_sequences))
        return out


class NBest:
    """The `num_beams` best finished hypotheses of one prompt (transformers 4.33 `BeamHypotheses`
    semantics): score = sum of log-probs / length ** length_penalty, where the length counts the
    dummy start token; the search for a prompt is over when even the best running candidate,
    at the next length, cannot beat the worst kept hypothesis."""

    def __init__(self, size: int, length_penalty: float) -> None:
        self.size, self.length_penalty = size, length_penalty
        self.items: list[tuple[float, list[int]]] = []
        self.worst = 1e9

    def add(self, tokens: list[int], sum_logprobs: float, length: int) -> None:
        score = sum_logprobs / length**self.length_penalty
        if len(self.items) < self.size or score > self.worst:
            self.items.append((score, tokens))
            if len(self.items) > self.size:
                order = sorted(range(len(self.items)), key=lambda i: (self.items[i][0], i))
                self.worst = self.items[order[1]][0]
                del self.items[order[0]]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum_logprobs: float, length: int) -> bool:
        return len(self.items) >= self.size and self.worst >= best_sum_logprobs / length**self.length_penalty

    def top(self, n: int) -> list[list[int]]:
        ranked = sorted(self.items, key=lambda item: item[0])
        return [ranked.pop()[1] for _ in range(n)]

