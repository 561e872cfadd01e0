"""Speculative decoding: a small draft model proposes K tokens, the target verifies them at once.

One round is one jitted call:
  1. the draft runs K+1 single-token steps with its KV cache (feeding the last committed
     token, then its own K proposals; the last step only writes d_K into its cache);
  2. the target runs one forward pass over [last token, d_1..d_K] with its KV cache,
     which gives its distributions p_1..p_{K+1} for the K+1 positions;
  3. acceptance. Greedy: keep d_i while it is the target's argmax, then emit the
     target's argmax. Sampling (Leviathan et al. 2023, Chen et al. 2023): keep d_i with
     probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection emit a sample of
     norm(max(p_i - q_i, 0)); if all K are kept, emit a sample of p_{K+1}. The output
     is then distributed exactly as the target's own samples (same temperature,
     top-k and top-p filters, applied to both models).
Rolling the caches back after a rejection costs nothing: both caches are written at
explicit slots, so the next round starts writing at the first rejected slot, and the
causal mask hides stale entries beyond it until they are overwritten.

Context windows mirror `Generator` exactly: the logits for position p are computed from
the window seq[lo:p], and when p - lo would exceed the target's context the window
restarts at p - context // 2 (a re-prefill). A round never accepts tokens past such a
boundary, so greedy output equals the target's own greedy output token for token. The
draft keeps its own windows; they only change how many tokens are accepted.

Prompts are decoded one at a time (batch 1): rows of a batch accept different numbers
of tokens per round.
"""

import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.configs.sections import Sampling
from jaxlm.inference.generate import filter_logits
from jaxlm.losses.cross_entropy import mask_padded_vocab
from jaxlm.models.config import ModelConfig


def filtered_logits(logits_LxV: jax.Array, sp: Sampling, vocab_size: int) -> jax.Array:
    """The logits `sample_tokens` draws from: padded vocabulary masked, tempered, filtered."""
    logits = mask_padded_vocab(logits_LxV.astype(jnp.float32), vocab_size)
    return filter_logits(logits / sp.temperature, sp.top_k, sp.top_p)


def accept_tokens(p_logits: jax.Array, q_logits: jax.Array, drafts: jax.Array,
                  limit: jax.Array, key: jax.Array, sp: Sampling, vocab_size: int
                  ) -> tuple[jax.Array, jax.Array]:
    """The acceptance rule for one round.

    p_logits [K+1, V]: target logits for the positions of d_1..d_K and the one after;
    q_logits [K, V]: the draft's logits d_1..d_K were sampled from; drafts [K];
    limit: at most this many drafts may be accepted (a context boundary).
    Returns (tokens [K+1], a): the first a+1 tokens are the output, a accepted drafts
    followed by one token from the target.
    """
    k = drafts.shape[0]
    idx = jnp.arange(k)
    if sp.temperature <= 0.0:
        p = mask_padded_vocab(p_logits.astype(jnp.float32), vocab_size)
        target = jnp.argmax(p, axis=-1).astype(jnp.int32)
        ok = (drafts == target[:k]) & (idx < limit)
        a = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
        emitted = target[a]
    else:
        key_u, key_s = jax.random.split(key)
        p = jax.nn.softmax(filtered_logits(p_logits, sp, vocab_size), axis=-1)
        q = jax.nn.softmax(filtered_logits(q_logits, sp, vocab_size), axis=-1)
        p_d, q_d = p[idx, drafts], q[idx, drafts]
        u = jax.random.uniform(key_u, (k,))
        ok = (u * q_d < p_d) & (idx < limit)  # u < p/q, without dividing by q
        a = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
        rejected = a < limit
        q_a = jnp.where(rejected, jnp.concatenate([q, jnp.zeros_like(q[:1])])[a], 0.0)
        residual = jnp.maximum(p[a] - q_a, 0.0)
        residual = jnp.where(residual.sum() > 0, residual, p[a])
        emitted = jax.random.categorical(key_s, jnp.log(residual)).astype(jnp.int32)
    tokens = jnp.concatenate([drafts, jnp.zeros((1,), jnp.int32)]).at[a].set(emitted)
    return tokens, a


class SpeculativeGenerator:
    """Draft-then-verify decoding of a target model with a smaller draft model."""

    def __init__(self, target: tuple[nnx.GraphDef, ModelConfig, int],
                 draft: tuple[nnx.GraphDef, ModelConfig, int], draft_tokens: int):
        (self.t_graphdef, self.t_cfg, self.t_context) = target
        (self.d_graphdef, self.d_cfg, self.d_context) = draft
        # Runs are checked in evaluation/sampling.py; these guard direct use.
        if self.d_cfg.vocab_size != self.t_cfg.vocab_size:
            raise ValueError(f"the draft model's vocabulary has {self.d_cfg.vocab_size} "
                             f"tokens, the target's {self.t_cfg.vocab_size}; they must share "
                             "a tokenizer")
        if draft_tokens < 1 or self.d_context < 2:
            raise ValueError(f"need draft_tokens >= 1 (got {draft_tokens}) and a draft "
                             f"context of at least 2 tokens (got {self.d_context})")
        self.k = draft_tokens
        self._cache: dict[Any, Any] = {}  # compiled functions, by shape
        self._round = jax.jit(self._round_impl, static_argnames="sp", donate_argnums=(2, 3))
        self._prefill_t = jax.jit(lambda params, tokens: self._feed(
            "t", params, self._empty_cache("t"), tokens, jnp.zeros((), jnp.int32))[1])
        self._prefill_d = jax.jit(lambda params, tokens: self._feed(
            "d", params, self._empty_cache("d"), tokens, jnp.zeros((), jnp.int32))[1])

    def _model(self, which: str):
        return (self.t_graphdef, self.t_cfg, self.t_context) if which == "t" else \
            (self.d_graphdef, self.d_cfg, self.d_context)

    def _empty_cache(self, which: str) -> dict[str, jax.Array]:
        _, c, context = self._model(which)
        # K slots of slack: a round may write up to K slots past the context, whose
        # outputs are never accepted (see the module docstring).
        shape = (c.model.num_layers, 1, context + self.k, c.model.num_kv_heads, c.head_dim)
        return {"k": jnp.zeros(shape, c.compute_dtype), "v": jnp.zeros(shape, c.compute_dtype)}

    def _feed(self, which: str, params: Any, cache: dict[str, jax.Array], tokens_L: jax.Array,
              slot: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Run tokens at cache slots slot..slot+T-1 (= their positions); -> logits [T, V]."""
        graphdef, _, _ = self._model(which)
        model = nnx.merge(graphdef, params)
        positions = (slot + jnp.arange(tokens_L.shape[0]))[None]
        out = model(tokens_L[None], positions_BxL=positions, cache=cache, cache_index=slot)
        return out.logits[0], out.cache

    def _round_impl(self, t_params, d_params, t_cache, d_cache, last_token, t_slot, d_slot,
                    limit, key, sp):
        k = self.k
        keys = jax.random.split(key, k + 2)

        def draft_step(carry, i):
            cache, token = carry
            logits, cache = self._feed("d", d_params, cache, token[None], d_slot + i)
            if sp.temperature <= 0.0:
                logits_1xV = mask_padded_vocab(logits.astype(jnp.float32), self.d_cfg.vocab_size)
                nxt = jnp.argmax(logits_1xV[0]).astype(jnp.int32)
            else:
                nxt = jax.random.categorical(
                    keys[i], filtered_logits(logits, sp, self.d_cfg.vocab_size)[0]
                ).astype(jnp.int32)
            return (cache, nxt), (logits[0], nxt)

        (d_cache, _), (q_logits, drafts) = jax.lax.scan(
            draft_step, (d_cache, last_token), jnp.arange(k + 1))
        q_logits, drafts = q_logits[:k], drafts[:k]
        # The draft's padded vocabulary may differ from the target's: align the widths.
        vt = self.t_cfg.padded_vocab
        if q_logits.shape[-1] < vt:
            q_logits = jnp.pad(q_logits, ((0, 0), (0, vt - q_logits.shape[-1])))
        q_logits = q_logits[:, :vt]
        tokens = jnp.concatenate([last_token[None], drafts])
        p_logits, t_cache = self._feed("t", t_params, t_cache, tokens, t_slot)
        out, a = accept_tokens(p_logits, q_logits, drafts, limit, keys[k + 1], sp,
                               self.t_cfg.vocab_size)
        return t_cache, d_cache, out, a

    def generate(self, target_params: Any, draft_params: Any,
                 prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sp: Sampling = Sampling(), seed: int = 0
                 ) -> tuple[list[list[int]], dict[str, float]]:
        """Continue each prompt by `max_new_tokens` tokens; returns (new tokens, stats)."""
        sp.check_prompts(prompts, self.t_context)
        totals = {"compile_seconds": 0.0, "prefill_seconds": 0.0, "decode_seconds": 0.0,
                  "prompt_tokens": 0, "rounds": 0, "proposed": 0, "accepted": 0}
        outputs = []
        for row, prompt in enumerate(prompts):
            tokens, stats = self._generate_one(target_params, draft_params, list(prompt),
                                               max_new_tokens, sp, seed + row)
            outputs.append(tokens)
            for name in totals:
                totals[name] += stats[name]
        new_tokens = len(prompts) * max_new_tokens
        return outputs, {
            "compile_seconds": totals["compile_seconds"],
            "prefill_seconds": totals["prefill_seconds"],
            "prefill_tokens_per_sec": totals["prompt_tokens"] / max(totals["prefill_seconds"],
                                                                    1e-9),
            "decode_seconds": totals["decode_seconds"],
            "decode_tokens_per_sec": new_tokens / max(totals["decode_seconds"], 1e-9),
            "rounds": totals["rounds"],
            "acceptance_rate": totals["accepted"] / max(totals["proposed"], 1),
            "tokens_per_round": new_tokens / max(totals["rounds"], 1),
        }

    def _compiled(self, t_params, d_params, width: int, sp: Sampling) -> dict[Any, Any]:
        """Compile (once per shape) every function the loop will call, ahead of time."""
        need = {("round", sp)}
        for which, context in (("t", self.t_context), ("d", self.d_context)):
            need |= {(which, min(width, context)), (which, max(1, context // 2))}
        for name in need - set(self._cache):
            if name[0] == "round":
                i32 = jax.ShapeDtypeStruct((), jnp.int32)
                caches = [jax.eval_shape(lambda w=w: self._empty_cache(w)) for w in "td"]
                key = jax.eval_shape(lambda: jax.random.key(0))
                self._cache[name] = self._round.lower(t_params, d_params, *caches, i32, i32,
                                                      i32, i32, key, sp=sp).compile()
            else:
                which, length = name
                fn, params = (self._prefill_t, t_params) if which == "t" else \
                    (self._prefill_d, d_params)
                toks = jax.ShapeDtypeStruct((length,), jnp.int32)
                self._cache[name] = fn.lower(params, toks).compile()
        return self._cache

    def _generate_one(self, t_params, d_params, prompt: list[int], max_new: int,
                      sp: Sampling, seed: int) -> tuple[list[int], dict[str, float]]:
        k, w = self.k, len(prompt)
        total = w + max_new
        seq = np.zeros(total + k + 1, np.int32)
        seq[:w] = prompt
        key = jax.random.key(seed)
        keep_t, keep_d = max(1, self.t_context // 2), max(1, self.d_context // 2)

        t0 = time.perf_counter()
        fns = self._compiled(t_params, d_params, w, sp)
        round_fn = fns["round", sp]
        t_compile = time.perf_counter() - t0

        t0 = time.perf_counter()
        lo_t = 0
        lo_d = 0 if w <= self.d_context else w - keep_d
        t_cache = fns["t", w - lo_t](t_params, jnp.asarray(seq[lo_t:w]))
        d_cache = fns["d", w - lo_d](d_params, jnp.asarray(seq[lo_d:w]))
        jax.block_until_ready((t_cache, d_cache))
        t_prefill = time.perf_counter() - t0

        t0 = time.perf_counter()
        n, rounds, proposed, accepted = w, 0, 0, 0
        while n < total:
            if n - lo_t > self.t_context:  # the target's window restarts (as in Generator)
                lo_t = n - keep_t
                t_cache = fns["t", keep_t](t_params, jnp.asarray(seq[lo_t:n]))
            if n - lo_d > self.d_context:
                lo_d = n - keep_d
                d_cache = fns["d", keep_d](d_params, jnp.asarray(seq[lo_d:n]))
            limit = min(k, lo_t + self.t_context - n)
            t_cache, d_cache, out, a = round_fn(
                t_params, d_params, t_cache, d_cache, jnp.int32(seq[n - 1]),
                jnp.int32(n - 1 - lo_t), jnp.int32(n - 1 - lo_d), jnp.int32(limit),
                jax.random.fold_in(key, rounds))
            out, a = jax.device_get((out, a))
            a = int(a)
            seq[n:n + a + 1] = out[:a + 1]
            n += a + 1
            rounds += 1
            proposed += limit
            accepted += a
        t_decode = time.perf_counter() - t0
        return seq[w:total].tolist(), {
            "compile_seconds": t_compile, "prefill_seconds": t_prefill,
            "decode_seconds": t_decode, "prompt_tokens": w, "rounds": rounds,
            "proposed": proposed, "accepted": accepted}
