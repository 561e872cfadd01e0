"""Beam search with the KV cache, batched; the same search as `transformers`' `generate`
with `num_beams=K, do_sample=False`.

Each prompt keeps K running beams (rows b*K .. b*K+K-1 of the cache). One step:
  1. log-softmax of every running beam's next-token logits, plus the beam's running
     score; the best 2K of the K*V continuations (2K, so that K continuations that do not
     end remain even when K of them end in EOS);
  2. a continuation ending in EOS, or reaching the length limit, and ranked among the
     best K, becomes a finished hypothesis scored sum_logprob / length**length_penalty
     (length counts the generated tokens, EOS included); the best K finished hypotheses
     are kept;
  3. the best K continuations that did not end are the next running beams: the cache
     rows are gathered to follow their parents, and their new tokens are fed through the
     model.
A prompt is done when no running beam can improve on its finished hypotheses:
`early_stopping=True` stops as soon as K hypotheses are finished; False (the default)
when the best running score divided by the current length is no better than the worst
finished score; "never" the same with the longest possible length when
length_penalty > 0. The search stops when every prompt is done or the length limit is
reached, and returns each prompt's best hypothesis (ending with EOS if it ended).

The whole sequence stays in the cache: prompt plus new tokens must fit the context.
"""

import time
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Sampling
from jaxlm.inference.generate import Generator, _left_pad  # one padding rule for both
from jaxlm.losses.cross_entropy import mask_padded_vocab

EarlyStopping = Literal[True, False, "never"]
_NEG = -1.0e9  # the score of a slot that must not be chosen (as `transformers` uses)


def _gather(x_BxKx: jax.Array, idx_BxN: jax.Array) -> jax.Array:
    """x[b, idx[b, n], ...] for every b, n."""
    idx = idx_BxN.reshape(idx_BxN.shape + (1,) * (x_BxKx.ndim - 2))
    return jnp.take_along_axis(x_BxKx, idx, axis=1)


def _length_penalties(n: int, length_penalty: float) -> jax.Array:
    """[n]: length**length_penalty for lengths 1..n, raised in float64 and rounded to
    float32 (as `transformers` divides float32 scores by a Python float)."""
    return jnp.asarray((np.arange(1, n + 1, dtype=np.float64) ** length_penalty)
                       .astype(np.float32))


def beam_step(state: dict[str, jax.Array], logits_BKxV: jax.Array, cur: jax.Array, *,
              num_beams: int, width: int, max_length: int, eos_id: int | None,
              length_penalty: float, early_stopping: EarlyStopping, vocab_size: int
              ) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
    """Choose the tokens at position `cur` for every beam (module docstring, steps 1-3).

    Returns the new state, the parent row of each new running beam [B*K] (rows of the
    flattened batch) that the cache must be gathered by, and whether to go on.
    """
    k = num_beams
    b = state["scores"].shape[0]
    logp = jax.nn.log_softmax(mask_padded_vocab(logits_BKxV.astype(jnp.float32), vocab_size))
    v = logp.shape[-1]
    acc_BxKV = (logp.reshape(b, k, v) + state["running_scores"][:, :, None]).reshape(b, k * v)
    keep = 2 * k
    top_scores, top_idx = jax.lax.top_k(acc_BxKV, keep)
    parent, token = top_idx // v, (top_idx % v).astype(jnp.int32)
    cand_seqs = _gather(state["running_seqs"], parent)
    cand_seqs = jax.lax.dynamic_update_slice_in_dim(cand_seqs, token[:, :, None], cur, axis=2)
    ends = jnp.broadcast_to(cur + 1 >= max_length, token.shape)
    if eos_id is not None:
        ends = ends | (token == eos_id)

    # Running beams: the best K continuations that did not end.
    running = top_scores + ends.astype(jnp.float32) * _NEG
    nxt = jax.lax.top_k(running, k)[1]
    new = {"running_seqs": _gather(cand_seqs, nxt), "running_scores": _gather(running, nxt)}
    rows = (_gather(parent, nxt) + jnp.arange(b)[:, None] * k).reshape(-1)

    # Finished hypotheses: the continuations among the best K that ended.
    just = ends & (jnp.arange(keep) < k)[None, :]
    penalty = _length_penalties(max_length - width, length_penalty)
    scores = top_scores / penalty[cur - width]
    if early_stopping is True:
        full = jnp.all(state["finished"], axis=-1, keepdims=True)
        scores = scores + full.astype(jnp.float32) * _NEG
    scores = scores + (~state["improvable"]).astype(jnp.float32) * _NEG
    scores = scores + (~just).astype(jnp.float32) * _NEG
    merged_scores = jnp.concatenate([state["scores"], scores], axis=1)
    best = jax.lax.top_k(merged_scores, k)[1]
    lengths = jnp.broadcast_to(cur + 1 - width, token.shape).astype(jnp.int32)
    new["scores"] = _gather(merged_scores, best)
    new["seqs"] = _gather(jnp.concatenate([state["seqs"], cand_seqs], axis=1), best)
    new["lengths"] = _gather(jnp.concatenate([state["lengths"], lengths], axis=1), best)
    new["finished"] = _gather(jnp.concatenate([state["finished"], just], axis=1), best)

    # Can a running beam still beat the worst finished hypothesis?
    if early_stopping == "never" and length_penalty > 0.0:
        hypothetical = penalty[-1]
    else:
        hypothetical = penalty[cur - width]
    best_running = new["running_scores"][:, :1] / hypothetical
    worst = jnp.where(new["finished"], jnp.min(new["scores"], axis=1, keepdims=True), _NEG)
    new["improvable"] = state["improvable"] & jnp.any(best_running > worst, axis=-1,
                                                      keepdims=True)
    go_on = jnp.any(new["improvable"]) & ~jnp.all(ends)
    if early_stopping is True:
        go_on = go_on & ~jnp.all(new["finished"])
    return new, rows, go_on


class BeamSearch:
    """Jitted beam-search steps over one model's KV cache; reusable across calls."""

    def __init__(self, graphdef: nnx.GraphDef, model_cfg: Any, context: int):
        self.gen = Generator(graphdef, model_cfg, context)
        self.graphdef, self.cfg, self.context = graphdef, model_cfg, context
        self._step = jax.jit(self._step_impl, donate_argnums=(2,),
                             static_argnames=("num_beams", "width", "max_length", "eos_id",
                                              "length_penalty", "early_stopping"))

    def _step_impl(self, params, state, cache, logits, cur, position_B, kv_valid, *,
                   num_beams, width, max_length, eos_id, length_penalty, early_stopping):
        state, rows, go_on = beam_step(
            state, logits, cur, num_beams=num_beams, width=width, max_length=max_length,
            eos_id=eos_id, length_penalty=length_penalty, early_stopping=early_stopping,
            vocab_size=self.cfg.vocab_size)
        cache = jax.tree.map(lambda c: jnp.take(c, rows, axis=1), cache)
        tokens = jax.lax.dynamic_index_in_dim(state["running_seqs"], cur, axis=2,
                                              keepdims=False).reshape(-1, 1)
        model = nnx.merge(self.graphdef, params)
        out = model(tokens, positions_BxL=position_B[:, None], cache=cache, cache_index=cur,
                    kv_valid_BxS=kv_valid)
        return state, out.cache, out.logits[:, 0], go_on

    def generate(self, params: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 num_beams: int, eos_id: int | None = None, length_penalty: float = 1.0,
                 early_stopping: EarlyStopping = False
                 ) -> tuple[list[list[int]], dict[str, float]]:
        """Each prompt's best hypothesis of at most `max_new_tokens` new tokens (ending
        with `eos_id` if it ended), and timings."""
        Sampling().check_prompts(prompts, self.context)
        if num_beams < 1:
            raise ConfigError("num_beams", f"must be at least 1 (got {num_beams})")
        width = max(len(p) for p in prompts)
        if width + max_new_tokens > self.context:
            raise ConfigError("length", f"beam search keeps the whole sequence in the cache: "
                                        f"a {width}-token prompt plus {max_new_tokens} new "
                                        f"tokens exceeds the context of {self.context} "
                                        "tokens (seq_len); ask for fewer tokens")
        b, k, total = len(prompts), num_beams, width + max_new_tokens
        seq_np, valid_np = _left_pad(prompts, total)
        statics = dict(num_beams=k, width=width, max_length=total, eos_id=eos_id,
                       length_penalty=float(length_penalty), early_stopping=early_stopping)

        t0 = time.perf_counter()
        logits, cache, pos, kv_valid = self.gen._prefill(
            params, jnp.asarray(seq_np[:, :width]), jnp.asarray(valid_np[:, :width]))
        # Prompt b's beams are rows b*K .. b*K+K-1.
        logits, pos, kv_valid = (jnp.repeat(x, k, axis=0) for x in (logits, pos, kv_valid))
        cache = jax.tree.map(lambda c: jnp.repeat(c, k, axis=1), cache)
        seqs = jnp.broadcast_to(jnp.asarray(seq_np)[:, None], (b, k, total))
        state = {"running_seqs": seqs,
                 "running_scores": jnp.tile(jnp.asarray([0.0] + [_NEG] * (k - 1),
                                                        jnp.float32), (b, 1)),
                 "seqs": seqs, "scores": jnp.full((b, k), _NEG, jnp.float32),
                 "lengths": jnp.zeros((b, k), jnp.int32),
                 "finished": jnp.zeros((b, k), bool),
                 "improvable": jnp.ones((b, 1), bool)}
        jax.block_until_ready(logits)
        t_prefill = time.perf_counter() - t0

        t0 = time.perf_counter()
        steps = 0
        for cur in range(width, total):
            pos = pos + 1
            state, cache, logits, go_on = self._step(
                params, state, cache, logits, jnp.asarray(cur, jnp.int32), pos, kv_valid,
                **statics)
            steps += 1
            if not bool(go_on):
                break
        seqs, lengths = jax.device_get((state["seqs"][:, 0], state["lengths"][:, 0]))
        t_decode = time.perf_counter() - t0
        out = [np.asarray(s[width:width + n]).tolist() for s, n in zip(seqs, lengths)]
        stats = {"prefill_seconds": t_prefill,
                 "prefill_tokens_per_sec": b * width / max(t_prefill, 1e-9),
                 "decode_seconds": t_decode,
                 "decode_tokens_per_sec": b * steps / max(t_decode, 1e-9),
                 "num_beams": float(k)}
        return out, stats
