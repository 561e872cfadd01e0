"""Autoregressive generation with a KV cache: one prefill, then one jitted step per token.

Batched prompts are left-padded; padding is masked out of attention and RoPE positions
start at each row's first real token. The cache holds `context` slots (the training
sequence length). When it is full, generation continues from a fresh prefill of the
last `context // 2` tokens ("context shift"); `generate_uncached` applies the same
windows with full recomputation and is the reference the cached path must equal. In a
batch, the shift happens at the same step for every row.
"""

import contextlib
import functools
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.configs.sections import Sampling
from jaxlm.losses.cross_entropy import mask_padded_vocab
from jaxlm.models.config import ModelConfig
from jaxlm.parallel.sharding import Rules, mesh_axes_size, use_rules


def filter_logits(logits_BxV: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Set logits outside the top-k / top-p support to -inf (ties at the k-th value kept)."""
    neg_inf = jnp.asarray(-jnp.inf, logits_BxV.dtype)
    if top_k > 0 and top_k < logits_BxV.shape[-1]:
        kth = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth, neg_inf, logits_BxV)
    if top_p < 1.0:
        sorted_desc = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Smallest set whose mass reaches top_p: keep tokens with mass_before < top_p.
        n_keep = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
        logits_BxV = jnp.where(logits_BxV < threshold, neg_inf, logits_BxV)
    return logits_BxV


def sample_tokens(logits_BxV: jax.Array, key: jax.Array, sp: Sampling,
                  vocab_size: int) -> jax.Array:
    logits = mask_padded_vocab(logits_BxV.astype(jnp.float32), vocab_size)
    if sp.temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / sp.temperature, sp.top_k, sp.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _left_pad(prompts: Sequence[Sequence[int]], total: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), total), np.int32)
    valid = np.zeros((len(prompts), total), bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):width] = p
        valid[i, width - len(p):] = True  # generated positions are valid too
    return tokens, valid


def _positions(valid_BxL: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.cumsum(valid_BxL, axis=1) - 1, 0).astype(jnp.int32)


class Generator:
    """Jitted prefill and decode steps for one model; reusable across calls.

    With a `layout` (mesh, rules), the steps are traced under those rules: activations
    and the KV cache are split as in training (the batch over the data-parallel axes,
    heads over `tensor`), and a batch is padded to a multiple of the batch's shards."""

    def __init__(self, graphdef: nnx.GraphDef, model_cfg: ModelConfig, context: int,
                 layout: tuple[jax.sharding.Mesh, Rules] | None = None):
        self.graphdef, self.cfg, self.context = graphdef, model_cfg, context
        self.layout = layout
        self._prefill = jax.jit(self._prefill_impl)
        self._decode = jax.jit(self._decode_impl, static_argnames="sp", donate_argnums=(1, 3))
        self._sample = jax.jit(sample_tokens, static_argnames=("sp", "vocab_size"))

    def _empty_cache(self, batch: int) -> dict[str, jax.Array]:
        c = self.cfg
        shape = (c.model.num_layers, batch, self.context, c.model.num_kv_heads, c.head_dim)
        return {"k": jnp.zeros(shape, c.compute_dtype), "v": jnp.zeros(shape, c.compute_dtype)}

    def _prefill_impl(self, params, tokens_BxL, valid_BxL):
        model = nnx.merge(self.graphdef, params)
        t = tokens_BxL.shape[1]
        positions = _positions(valid_BxL)
        # Slots after the prompt are masked by causality until decoding fills them.
        kv_valid = jnp.pad(valid_BxL, ((0, 0), (0, self.context - t)), constant_values=True)
        out = model(tokens_BxL, positions_BxL=positions,
                    cache=self._empty_cache(tokens_BxL.shape[0]),
                    cache_index=jnp.zeros((), jnp.int32), kv_valid_BxS=kv_valid)
        return out.logits[:, -1], out.cache, positions[:, -1], kv_valid

    def _decode_impl(self, params, cache, logits_BxV, seq_BxL, cur, slot, position_B,
                     kv_valid, key, sp):
        """Sample the token at `cur` from `logits_BxV`, then run it through the model."""
        token_B = sample_tokens(logits_BxV, key, sp, self.cfg.vocab_size)
        seq_BxL = jax.lax.dynamic_update_slice_in_dim(seq_BxL, token_B[:, None], cur, axis=1)
        model = nnx.merge(self.graphdef, params)
        out = model(token_B[:, None], positions_BxL=position_B[:, None], cache=cache,
                    cache_index=slot, kv_valid_BxS=kv_valid)
        return out.logits[:, 0], out.cache, seq_BxL

    def _rules(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext() if self.layout is None else use_rules(*self.layout)

    def batch_shards(self) -> int:
        """How many shards a batch is split into (1 without a layout)."""
        if self.layout is None:
            return 1
        mesh, rules = self.layout
        return mesh_axes_size(mesh, "act_batch", rules)

    def generate(self, params: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sp: Sampling = Sampling(), seed: int = 0
                 ) -> tuple[list[list[int]], dict[str, float]]:
        """Continue each prompt by `max_new_tokens` tokens; returns (new tokens, timings)."""
        sp.check_prompts(prompts, self.context)
        n, shards = len(prompts), self.batch_shards()
        if n % shards:  # padding rows (copies of the first prompt), dropped at the end
            prompts = list(prompts) + [prompts[0]] * (math.ceil(n / shards) * shards - n)
        with self._rules():
            out, stats = self._generate(params, prompts, max_new_tokens, sp, seed)
        return out[:n], stats

    def _generate(self, params: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  sp: Sampling, seed: int) -> tuple[list[list[int]], dict[str, float]]:
        width = max(len(p) for p in prompts)
        total = width + max_new_tokens
        seq_np, valid_np = _left_pad(prompts, total)
        seq, valid = jnp.asarray(seq_np), jnp.asarray(valid_np)
        key = jax.random.key(seed)
        keep = max(1, self.context // 2)

        t0 = time.perf_counter()  # compile first, so the timings below are run time only
        if self.layout is None:
            prefill = self._prefill.lower(params, seq[:, :width], valid[:, :width]).compile()
            shapes = jax.eval_shape(self._prefill_impl, params, seq[:, :width],
                                    valid[:, :width])
            decode = self._decode.lower(params, shapes[1], shapes[0], seq, width, width,
                                        shapes[2], shapes[3], key, sp=sp).compile()
            reprefill = None
            if width + max_new_tokens > self.context:  # the context shift will be needed
                reprefill = self._prefill.lower(params, seq[:, :keep],
                                                valid[:, :keep]).compile()
        else:  # the steps compile for the shardings their inputs arrive with
            prefill = reprefill = self._prefill
            decode = functools.partial(self._decode, sp=sp)
        t_compile = time.perf_counter() - t0

        t0 = time.perf_counter()
        logits, cache, pos, kv_valid = prefill(params, seq[:, :width], valid[:, :width])
        jax.block_until_ready(logits)
        t_prefill = time.perf_counter() - t0

        t0 = time.perf_counter()
        cur, slot = width, width
        for i in range(max_new_tokens):
            step_key = jax.random.fold_in(key, i)
            if i == max_new_tokens - 1:  # last token: sample only
                token = self._sample(logits, step_key, sp=sp, vocab_size=self.cfg.vocab_size)
                seq = seq.at[:, cur].set(token)
                break
            if slot == self.context:  # cache full: sample, then re-prefill the last `keep`
                token = self._sample(logits, step_key, sp=sp, vocab_size=self.cfg.vocab_size)
                seq = seq.at[:, cur].set(token)
                lo = cur + 1 - keep
                logits, cache, pos, kv_valid = reprefill(params, seq[:, lo:cur + 1],
                                                         valid[:, lo:cur + 1])
                slot = keep
            else:
                pos = pos + 1
                logits, cache, seq = decode(params, cache, logits, seq, cur, slot, pos,
                                            kv_valid, step_key)
                slot += 1
            cur += 1
        out = np.asarray(jax.device_get(seq))
        t_decode = time.perf_counter() - t0
        b = len(prompts)
        stats = {"compile_seconds": t_compile,
                 "prefill_seconds": t_prefill,
                 "prefill_tokens_per_sec": b * width / max(t_prefill, 1e-9),
                 "decode_seconds": t_decode,
                 "decode_tokens_per_sec": b * max_new_tokens / max(t_decode, 1e-9)}
        return [row[width:].tolist() for row in out], stats


def generate_uncached(graphdef: nnx.GraphDef, model_cfg: ModelConfig, params: Any,
                      prompts: Sequence[Sequence[int]], max_new_tokens: int, context: int,
                      sp: Sampling = Sampling(), seed: int = 0) -> list[list[int]]:
    """Reference: recompute the whole current window for every token (same windows)."""
    sp.check_prompts(prompts, context)
    width = max(len(p) for p in prompts)
    seq, valid = _left_pad(prompts, width + max_new_tokens)
    key = jax.random.key(seed)
    keep = max(1, context // 2)

    @jax.jit
    def next_logits(window_BxL, valid_BxL):
        # Windows are left-padded to a fixed width (one compile); padding is its own
        # segment, so real tokens never attend to it.
        model = nnx.merge(graphdef, params)
        out = model(window_BxL, positions_BxL=_positions(valid_BxL),
                    segment_ids_BxL=valid_BxL.astype(jnp.int32))
        return out.logits[:, -1]

    lo, cur = 0, width
    for i in range(max_new_tokens):
        if cur - lo > context:  # mirrors the cached path's context shift
            lo = cur - keep
        pad = context - (cur - lo)
        window = np.pad(seq[:, lo:cur], ((0, 0), (pad, 0)))
        wvalid = np.pad(valid[:, lo:cur], ((0, 0), (pad, 0)))
        logits = next_logits(window, wvalid)
        token = sample_tokens(logits, jax.random.fold_in(key, i), sp, model_cfg.vocab_size)
        seq[:, cur] = np.asarray(token)
        cur += 1
    return [row[width:].tolist() for row in seq]
