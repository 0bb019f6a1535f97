"""The lean decoder: greedy, sampling and LAVIS's beam search over the weights of a
`transformers.LlamaForCausalLM`.

`transformers`' `generate` spends most of a decode step on bookkeeping (generation config and
logits-processor plumbing, cache objects, mask construction) and, in beam search, on copying every
beam's whole padded cache each step. This module runs the same math — the model's own RMSNorm,
rotary, MLP and projection modules — with `generate`'s semantics (LAVIS repetition penalty, min/max
new tokens, temperature, top-k, top-p, eos handling, transformers 4.33's beam scorer):

- `Flight` (greedy and beam search, and the continuous batching of `scheduler.py`): each prompt's
  keys/values stored once, unpadded, shared by its beams; only generated tokens are per beam; the
  beam step is tensor ops with one host sync per step.
- `LlamaDecoder._decode_static` (sampling, and greedy with `compile=True`): a preallocated
  fixed-shape cache whose step can run under `torch.compile(mode="reduce-overhead")`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

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


STATIC_BLOCK = 128  # the static cache's capacity is a multiple of this (fewer shapes to compile)


class LlamaDecoder:
    """Runs a `LlamaForCausalLM`'s layers with a `KVCache`; see module doc. `compile=True` (default:
    the `SOMELVLM_COMPILE` environment variable) runs greedy/sampling decode steps on the static
    cache under `torch.compile(mode="reduce-overhead")` (CUDA graphs on GPU)."""

    def __init__(self, llm, compile: bool | None = None) -> None:
        if not supports(llm):
            raise ValueError("this LLM is not a plain LLaMA; use transformers' generate")
        self.llm = llm
        cfg = llm.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.compiled = os.environ.get("SOMELVLM_COMPILE", "") not in ("", "0") if compile is None else compile

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
        """Greedy or sampling: yield the next token ids `[B]` step by step (pad for rows that ended).

        Greedy runs on `Flight` (ragged: no pads stored or attended, ended rows leave the batch);
        sampling keeps every row in the batch (its random draws then match `generate`'s) on the
        static cache."""
        if s.do_sample or self.compiled:
            yield from self._decode_static(inputs_embeds, attention_mask, s)
            return
        B = inputs_embeds.shape[0]
        flight = Flight(self, s)
        flight.add(list(range(B)), inputs_embeds, attention_mask)
        while flight.groups:
            keys = [g.key for g in flight.groups]
            nxt, _ = flight.step()
            full = torch.full((B,), s.pad_id, dtype=torch.long, device=nxt.device)
            full[torch.tensor(keys, device=nxt.device)] = nxt
            yield full

    def _decode_static(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                       s: SamplingSettings) -> Iterator[torch.Tensor]:
        """Greedy or sampling on a preallocated cache with fixed shapes: every step attends over the
        whole capacity under a key mask, so it can run compiled (`compile=True`)."""
        B, L, _ = inputs_embeds.shape
        capacity = -(-(L + s.max_new_tokens) // STATIC_BLOCK) * STATIC_BLOCK  # few distinct shapes
        cache, logits, mask, next_pos = self.prefill(inputs_embeds, attention_mask, capacity - L)
        key_mask = torch.zeros(B, capacity, dtype=torch.bool, device=logits.device)
        key_mask[:, :L] = mask.bool()
        unfinished = torch.ones(B, dtype=torch.bool, device=logits.device)
        generated = torch.empty(B, 0, dtype=torch.long, device=logits.device)
        embed = self.llm.get_input_embeddings()
        step_fn = self._compiled_step() if self.compiled else self._static_step
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
            write_at = torch.full((1,), L + step, dtype=torch.long, device=logits.device)
            key_mask[:, L + step] = True
            logits = step_fn(embed(nxt[:, None]), next_pos, write_at, key_mask, cache.k, cache.v).clone()
            next_pos = next_pos + 1

    def _static_step(self, x: torch.Tensor, positions: torch.Tensor, write_at: torch.Tensor,
                     key_mask: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor]) -> torch.Tensor:
        """One decode step with fixed shapes: `x [B, 1, D]` at `positions [B, 1]`, its keys/values
        written at cache slot `write_at [1]`, attention over every slot allowed by `key_mask [B, cap]`."""
        mask = key_mask[:, None, None, :]  # [B, 1, 1, cap]

        def attend(i, q, k, v):
            ks[i].index_copy_(2, write_at, k)
            vs[i].index_copy_(2, write_at, v)
            return self._sdpa(q, ks[i], vs[i], mask, False)

        return self._run(x, positions, attend)

    def _compiled_step(self):
        """The compiled step, kept on the LLM module (decoders are made per call; compiling is slow)."""
        fn = getattr(self.llm, "_somelvlm_compiled_step", None)
        if fn is None:
            fn = torch.compile(self._static_step, mode="reduce-overhead", dynamic=False)
            object.__setattr__(self.llm, "_somelvlm_compiled_step", fn)
        return fn

    @torch.inference_mode()
    def beam_search(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, s: SamplingSettings,
                    num_beams: int, length_penalty: float = 1.0, num_return_sequences: int = 1) -> list[list[int]]:
        """Beam search with transformers 4.33's rules, which LAVIS's numbers depend on (see
        `Flight`). Returns the new tokens of the best `num_return_sequences` hypotheses per prompt
        (prompt-major)."""
        if num_return_sequences > num_beams:
            raise ValueError("num_return_sequences must be <= num_beams")
        B = inputs_embeds.shape[0]
        flight = Flight(self, s, num_beams, length_penalty, num_return_sequences)
        flight.add(list(range(B)), inputs_embeds, attention_mask)
        answers: dict[int, list[list[int]]] = {}
        while flight.groups:
            _, finished = flight.step()
            answers.update(finished)
        return [seq for b in range(B) for seq in answers[b]]


@dataclass
class _Group:
    """One prompt in flight: its keys/values (stored once, shared by its beams) and progress."""

    key: Any
    prefix_k: list[torch.Tensor]  # per layer [kv_heads, P, head_dim]
    prefix_v: list[torch.Tensor]
    length: int  # P: prompt tokens (soft prompt included), no pads
    steps: int = 0  # tokens generated so far by each of its rows


class Flight:
    """Prompts being decoded together, each with its own length; prompts join (`add`) and leave
    (when finished) between steps, so a caller can keep the batch full (continuous batching).

    Layout: a prompt's keys/values are stored once, unpadded, and shared by its `K` beams; only
    the generated tokens' keys/values are per row (`[rows, kv_heads, capacity, head_dim]`), so a
    beam reorder copies the generated part only. Attention of a group's rows is one softmax over
    `[prompt keys | own generated keys]`: on CPUs a small loop over prompts (no pads, no masks); in
    packed mode (default on GPUs) the prompts' keys lie side by side, unpadded, and every row
    attends to all of them under a mask in a few large ops (exact: masked entries add 0).

    Beam search follows transformers 4.33 (which LAVIS ran), as tensor ops: log-softmax, then the
    processors (repetition penalty, min length), then + the running beam score; the top `2K`
    candidates in order: an eos ranked below `K` is ignored, other eos close a hypothesis (tokens
    without the eos) scored `sum / (len + 1) ** length_penalty` (the dummy start token counts);
    the first `K` other candidates are the next beams. A prompt keeps its `K` best hypotheses and
    is done when it has `K` and the worst beats the best candidate's `sum / (len + 2) ** lp`;
    beams still running at the length limit are then added, scored by that length.
    Greedy (`num_beams=1`) takes the argmax of the processed logits (no log-softmax), as `generate`.
    One host sync per step (which prompts finished)."""

    packed_default: bool | None = None  # None: packed on GPUs, per-prompt loop on CPUs

    def __init__(self, decoder: LlamaDecoder, s: SamplingSettings, num_beams: int = 1,
                 length_penalty: float = 1.0, num_return_sequences: int = 1, packed: bool | None = None) -> None:
        if s.do_sample:
            raise ValueError("Flight decodes greedily or by beam search; sampling runs on the static cache")
        self.dec, self.s, self.K = decoder, s, num_beams
        self.length_penalty, self.n_return = length_penalty, num_return_sequences
        weight = decoder.llm.get_input_embeddings().weight
        self.dtype, self.device = weight.dtype, weight.device
        self.capacity = s.max_new_tokens
        packed = self.packed_default if packed is None else packed
        self.packed = self.device.type != "cpu" if packed is None else packed
        self._pack: tuple | None = None  # packed prompts, rebuilt when prompts join or leave
        self.groups: list[_Group] = []
        layers = len(decoder.llm.get_decoder().layers)
        shape = (0, decoder.kv_heads, self.capacity, decoder.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]
        self.tokens = torch.zeros(0, self.capacity, dtype=torch.long, device=self.device)  # [R, cap]
        self.scores = torch.zeros(0, device=self.device)  # [R] running beam log-prob sums
        self.logits: torch.Tensor | None = None  # [R, V] next-token logits of every row
        K = self.K
        self.hyp_scores = torch.zeros(0, K, dtype=torch.float64, device=self.device)  # [G, K] best first
        self.hyp_tokens = torch.zeros(0, K, self.capacity, dtype=torch.long, device=self.device)
        self.hyp_len = torch.zeros(0, K, dtype=torch.long, device=self.device)

    def __len__(self) -> int:
        """Rows in flight (prompts x beams)."""
        return len(self.groups) * self.K

    @torch.inference_mode()
    def add(self, keys: list[Any], inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Prefill prompts `inputs_embeds [N, L, D]` (pads where `attention_mask [N, L]` is 0, which are
        dropped) and put them in flight under `keys`."""
        dec, K = self.dec, self.K
        logits = []
        for b, key in enumerate(keys):
            slots = attention_mask[b].to(inputs_embeds.device).nonzero().squeeze(1)
            x = inputs_embeds[b:b + 1, slots].to(self.dtype)
            pos = torch.arange(len(slots), device=x.device)[None]
            group = _Group(key, [], [], len(slots))

            def attend(i, q, k, v, group=group):
                group.prefix_k.append(k[0])
                group.prefix_v.append(v[0])
                return dec._sdpa(q, k, v, None, True)

            logits.append(dec._run(x, pos, attend).expand(K, -1))
            self.groups.append(group)
        self._pack = None
        n = len(keys)
        new_rows = n * K
        self.k = [torch.cat([c, c.new_zeros(new_rows, *c.shape[1:])]) for c in self.k]
        self.v = [torch.cat([c, c.new_zeros(new_rows, *c.shape[1:])]) for c in self.v]
        self.tokens = torch.cat([self.tokens, self.tokens.new_zeros(new_rows, self.capacity)])
        start = torch.zeros(n, K, device=self.device)
        start[:, 1:] = -1e9  # at first all beams are the same: expand beam 0 only
        self.scores = torch.cat([self.scores, start.view(-1)])
        new_logits = torch.cat(logits)
        self.logits = new_logits if self.logits is None else torch.cat([self.logits, new_logits])
        self.hyp_scores = torch.cat([self.hyp_scores, self.hyp_scores.new_full((n, K), -float("inf"))])
        self.hyp_tokens = torch.cat([self.hyp_tokens, self.hyp_tokens.new_zeros(n, K, self.capacity)])
        self.hyp_len = torch.cat([self.hyp_len, self.hyp_len.new_zeros(n, K)])

    def _processed(self, scores: torch.Tensor) -> torch.Tensor:
        """`process_scores` for every row; rows of prompts at different steps are processed apart."""
        steps = [g.steps for g in self.groups]
        if len(set(steps)) == 1:
            return process_scores(scores, self.tokens[:, :steps[0]], steps[0], self.s)
        out = torch.empty_like(scores)
        for t in sorted(set(steps)):
            rows = torch.tensor([g * self.K + j for g, st in enumerate(steps) if st == t for j in range(self.K)],
                                device=scores.device)
            out[rows] = process_scores(scores[rows], self.tokens[rows, :t], t, self.s)
        return out

    @torch.inference_mode()
    def step(self) -> tuple[torch.Tensor, dict[Any, list[list[int]]]]:
        """Choose every row's next token, retire finished prompts and run the decoder on the rest.
        Returns the chosen tokens `[rows before the step]` and `{key: answers}` of prompts that finished
        (greedy: the tokens including a final eos; beams: the best `num_return_sequences`)."""
        s, K, G = self.s, self.K, len(self.groups)
        steps = torch.tensor([g.steps for g in self.groups], device=self.device)  # [G]
        if K == 1:
            nxt = self._processed(self.logits).argmax(dim=-1)  # [R]
            rows = None
            ended = nxt == s.eos_id
        else:
            nxt, rows, ended = self._beam_select(steps)
        if rows is not None:  # each row takes its new parent's tokens and generated keys/values
            t = max(g.steps for g in self.groups)
            if t:
                self.tokens[:, :t] = self.tokens[rows, :t]
                for c in self.k + self.v:
                    c[:, :, :t] = c[rows, :, :t]
        self.tokens[torch.arange(G * K, device=self.device), steps.repeat_interleave(K)] = nxt
        for g in self.groups:
            g.steps += 1
        at_limit = [g.steps >= self.capacity for g in self.groups]
        ended_l = ended.tolist()  # the one host sync of the step
        finished = [i for i in range(G) if ended_l[i] or at_limit[i]]
        out = self._answers(finished, [ended_l[i] for i in finished]) if finished else {}
        if finished:
            self._retire(finished)
        if self.groups:
            self._forward()
        return nxt, out

    def _beam_select(self, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """4.33's beam step for every prompt at once; returns next tokens `[R]`, parent rows `[R]`
        and which prompts are done `[G]`."""
        s, K, G = self.s, self.K, len(self.groups)
        lp = self.length_penalty
        logp = self._processed(self.logits.float().log_softmax(dim=-1)) + self.scores[:, None]
        V = logp.shape[-1]
        top_scores, top_ids = torch.topk(logp.view(G, K * V), 2 * K, dim=1)  # [G, 2K]
        beam, token = top_ids // V, top_ids % V
        is_eos = token == s.eos_id
        rank = (~is_eos).cumsum(dim=1) - 1
        dest = torch.where(~is_eos & (rank < K), rank, K)  # slot among the next beams; K = dropped
        next_scores = top_scores.new_zeros(G, K + 1).scatter_(1, dest, top_scores)[:, :K]
        next_tokens = token.new_zeros(G, K + 1).scatter_(1, dest, token)[:, :K]
        next_beam = beam.new_zeros(G, K + 1).scatter_(1, dest, beam)[:, :K]
        base = torch.arange(G, device=self.device)[:, None] * K
        # eos among the top K candidates close hypotheses (tokens so far, without the eos)
        length = (steps + 1).double()[:, None]  # the dummy start token counts
        cand = is_eos[:, :K]
        cand_scores = torch.where(cand, top_scores[:, :K].double() / length**lp, -float("inf"))
        cand_rows = (base + beam[:, :K]).view(-1)
        self._keep_best(cand_scores, self.tokens.index_select(0, cand_rows).view(G, K, -1),
                        steps[:, None].expand(G, K))
        full = torch.isfinite(self.hyp_scores[:, -1])
        done = full & (self.hyp_scores[:, -1] >= top_scores[:, 0].double() / (length[:, 0] + 1)**lp)
        self.scores = next_scores.reshape(-1)
        return next_tokens.reshape(-1), (base + next_beam).reshape(-1), done

    def _keep_best(self, scores: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        """Merge candidate hypotheses `scores [G, n]` (-inf: none) into each prompt's `K` best."""
        all_scores = torch.cat([self.hyp_scores, scores], dim=1)
        self.hyp_scores, order = torch.topk(all_scores, self.K, dim=1)
        all_tokens = torch.cat([self.hyp_tokens, tokens], dim=1)
        self.hyp_tokens = all_tokens.gather(1, order[:, :, None].expand(-1, -1, all_tokens.shape[-1]))
        self.hyp_len = torch.cat([self.hyp_len, lengths], dim=1).gather(1, order)

    def _answers(self, finished: list[int], done: list[bool]) -> dict[Any, list[list[int]]]:
        K = self.K
        idx = torch.tensor(finished, device=self.device)
        if K == 1:
            ids = self.tokens.index_select(0, idx).tolist()
            return {self.groups[g].key: [ids[j][:self.groups[g].steps]] for j, g in enumerate(finished)}
        running = [g for g, d in zip(finished, done) if not d]
        if running:  # beams still running at the limit, scored by their full length
            G = len(self.groups)
            lengths = torch.tensor([g.steps for g in self.groups], device=self.device)
            add = torch.full((G, K), -float("inf"), dtype=torch.float64, device=self.device)
            r = torch.tensor(running, device=self.device)
            add[r] = self.scores.view(G, K)[r].double() / (lengths[r, None] + 1).double()**self.length_penalty
            self._keep_best(add, self.tokens.view(G, K, -1), lengths[:, None].expand(G, K))
        n = self.n_return
        toks = self.hyp_tokens.index_select(0, idx)[:, :n].tolist()
        lens = self.hyp_len.index_select(0, idx)[:, :n].tolist()
        return {self.groups[g].key: [t[:m] for t, m in zip(toks[j], lens[j])] for j, g in enumerate(finished)}

    def _retire(self, finished: list[int]) -> None:
        K = self.K
        gone = set(finished)
        keep_g = [g for g in range(len(self.groups)) if g not in gone]
        g_idx = torch.tensor(keep_g, dtype=torch.long, device=self.device)
        r_idx = (g_idx[:, None] * K + torch.arange(K, device=self.device)).view(-1)
        self.groups = [self.groups[g] for g in keep_g]
        self._pack = None
        t = max((g.steps for g in self.groups), default=0)
        self.k = [self._take(c, r_idx, t) for c in self.k]
        self.v = [self._take(c, r_idx, t) for c in self.v]
        self.tokens = self.tokens.index_select(0, r_idx)
        self.scores = self.scores.index_select(0, r_idx)
        self.logits = self.logits.index_select(0, r_idx)
        self.hyp_scores, self.hyp_tokens, self.hyp_len = (
            x.index_select(0, g_idx) for x in (self.hyp_scores, self.hyp_tokens, self.hyp_len))

    @staticmethod
    def _take(cache: torch.Tensor, rows: torch.Tensor, t: int) -> torch.Tensor:
        out = cache.new_zeros(len(rows), *cache.shape[1:])
        out[:, :, :t] = cache[rows, :, :t]
        return out

    def _forward(self) -> None:
        """Feed each row's last token; sets `self.logits`."""
        dec, K = self.dec, self.K
        R = len(self.groups) * K
        steps = [g.steps for g in self.groups]
        t_rows = torch.tensor(steps, device=self.device).repeat_interleave(K)  # [R]
        last = self.tokens.gather(1, (t_rows - 1)[:, None])  # [R, 1]
        pos = torch.tensor([g.length + g.steps - 1 for g in self.groups], device=self.device)
        x = dec.llm.get_input_embeddings()(last)  # [R, 1, D]
        same = len(set(steps)) == 1
        row_ids = torch.arange(R, device=self.device)
        groups = dec.kv_heads, dec.heads // dec.kv_heads

        def attend(i, q, k, v):  # q [R, H, 1, hd], k/v [R, kvh, 1, hd]
            if same:
                self.k[i][:, :, steps[0] - 1] = k[:, :, 0]
                self.v[i][:, :, steps[0] - 1] = v[:, :, 0]
            else:
                self.k[i][row_ids, :, t_rows - 1] = k[:, :, 0]
                self.v[i][row_ids, :, t_rows - 1] = v[:, :, 0]
            if self.packed:
                return self._attend_packed(i, q, t_rows)
            outs = []
            for n, g in enumerate(self.groups):
                r0, r1 = n * K, (n + 1) * K
                qg = q[r0:r1, :, 0].reshape(K, *groups, -1)  # [K, kvh, g, hd]
                sk, sv = self.k[i][r0:r1, :, :g.steps], self.v[i][r0:r1, :, :g.steps]  # [K, kvh, t, hd]
                w = torch.cat([torch.einsum("kcgd,cpd->kcgp", qg, g.prefix_k[i]),
                               torch.einsum("kcgd,kctd->kcgt", qg, sk)], dim=-1) * dec.scale
                w = w.float().softmax(dim=-1).to(qg.dtype)  # [K, kvh, g, P + t]
                out = (torch.einsum("kcgp,cpd->kcgd", w[..., :g.length], g.prefix_v[i])
                       + torch.einsum("kcgt,kctd->kcgd", w[..., g.length:], sv))
                outs.append(out.reshape(K, -1, 1, out.shape[-1]))
            return torch.cat(outs)  # [R, H, 1, hd]

        if self.packed and self._pack is None:
            self._repack()
        self.logits = dec._run(x, pos.repeat_interleave(K)[:, None], attend)

    def _repack(self) -> None:
        """Packed mode: every prompt's keys/values side by side in one `[kv_heads, sum P, head_dim]`
        tensor per layer (no pads), with a `[rows, sum P]` mask of the keys each row may see. The
        groups' own copies become views into it."""
        K, layers = self.K, len(self.k)
        pk = [torch.cat([g.prefix_k[i] for g in self.groups], dim=1) for i in range(layers)]
        pv = [torch.cat([g.prefix_v[i] for g in self.groups], dim=1) for i in range(layers)]
        total = sum(g.length for g in self.groups)
        mask = torch.zeros(len(self.groups) * K, total, dtype=torch.bool, device=self.device)
        start = 0
        for n, g in enumerate(self.groups):
            mask[n * K:(n + 1) * K, start:start + g.length] = True
            g.prefix_k = [k.narrow(1, start, g.length) for k in pk]
            g.prefix_v = [v.narrow(1, start, g.length) for v in pv]
            start += g.length
        self._pack = (pk, pv, mask)

    def _attend_packed(self, i: int, q: torch.Tensor, t_rows: torch.Tensor) -> torch.Tensor:
        """All rows at once over the packed prompts and their own generated keys: a few large ops
        per layer whatever the number of prompts (GPU-friendly); masked entries add exactly 0."""
        dec, (pk, pv, pmask) = self.dec, self._pack
        R, t = q.shape[0], int(max(g.steps for g in self.groups))
        qr = q[:, :, 0].reshape(R, dec.kv_heads, dec.heads // dec.kv_heads, -1)  # [R, kvh, g, hd]
        sk, sv = self.k[i][:, :, :t], self.v[i][:, :, :t]  # [R, kvh, t, hd]
        smask = torch.arange(t, device=self.device)[None, :] < t_rows[:, None]  # [R, t]
        mask = torch.cat([pmask, smask], dim=1)[:, None, None, :]  # [R, 1, 1, sum P + t]
        w = torch.cat([torch.einsum("rcgd,cpd->rcgp", qr, pk[i]),
                       torch.einsum("rcgd,rctd->rcgt", qr, sk)], dim=-1) * dec.scale
        w = w.float().masked_fill(~mask, -float("inf")).softmax(dim=-1).to(qr.dtype)
        P = pk[i].shape[1]
        out = torch.einsum("rcgp,cpd->rcgd", w[..., :P], pv[i]) + torch.einsum("rcgt,rctd->rcgd", w[..., P:], sv)
        return out.reshape(R, -1, 1, out.shape[-1])  # [R, H, 1, hd]

