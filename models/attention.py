"""Grouped-query self-attention with RoPE, pluggable attention kernels and a KV cache.

An attention implementation is a function
    fn(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, *, causal, segment_ids_BxL, window) -> o_BxLxHxK
(`window` = w: a query sees only the last w positions, itself included; None = all)
registered under a name in ATTENTION_IMPLS and selected by `model.attention_impl`:

* "xla": einsum + softmax (`kernels.reference.attention_block`; any backend);
* "pallas": the FlashAttention-2 Pallas kernel of `kernels/`, Triton on GPU, Mosaic on TPU;
* "pallas_interpret": the same kernel in Pallas interpret mode, on any backend (CPU tests);
* "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, NVIDIA GPUs only.

The kernels run once per shard (`shard_map` over the batch and head axes, from the
logical rules); their Pallas backends load only when one is traced, so the model imports
on a machine without an accelerator. When the rules split the sequence itself (context
parallelism), `parallel.context.context_attention` runs instead: a ring or an all-gather
of key/value blocks, each block attended by the XLA path or the Pallas kernel.
`IMPL_PLATFORMS` says which devices each implementation needs (`training/layout.py` checks
it). Decoding with a KV cache always uses the XLA path with an explicit mask.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.kernels.flash_attention import flash_attention
from jaxlm.kernels.reference import attention_block, attention_mask, attention_weights
from jaxlm.models.layers import Linear, RMSNorm, rope
from jaxlm.parallel.context import context_attention, context_shards
from jaxlm.parallel.sharding import constrain, shard_map_logical

AttentionFn = Callable[..., jax.Array]
ATTENTION_IMPLS: dict[str, AttentionFn] = {}


def register_attention(name: str) -> Callable[[AttentionFn], AttentionFn]:
    def deco(fn: AttentionFn) -> AttentionFn:
        ATTENTION_IMPLS[name] = fn
        return fn
    return deco


@register_attention("xla")
def xla_attention(q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array, *,
                  causal: bool = True, segment_ids_BxL: jax.Array | None = None,
                  window: int | None = None) -> jax.Array:
    """Attention by `kernels.reference.attention_block`: materialises the [L, S] scores."""
    mask = self_attention_mask(q_BxLxHxK.shape[1], k_BxSxGxK.shape[1], causal=causal,
                               segment_ids_BxL=segment_ids_BxL, window=window)
    return attention_block(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask)[0]


def self_attention_mask(t: int, s: int, *, causal: bool, segment_ids_BxL: jax.Array | None,
                        window: int | None) -> jax.Array | None:
    """The mask of an attention implementation's arguments (module docstring)."""
    return attention_mask(jnp.arange(t)[None], jnp.arange(s)[None], causal=causal,
                          window=window, q_segment=segment_ids_BxL)


# Logical axes of the kernels' operands. The length axis stays whole on every shard.
_Q_AXES = ("act_batch", None, "act_heads", None)
_KV_AXES = ("act_batch", None, "act_kv_heads", None)
_SEG_AXES = ("act_batch", None)


def _per_shard(local_fn: AttentionFn, q: jax.Array, k: jax.Array, v: jax.Array,
               segment_ids_BxL: jax.Array | None) -> jax.Array:
    """local_fn(q, k, v[, segment_ids]) on each shard of the batch and head axes.

    Query and KV heads are split together or not at all, so a shard holds whole GQA groups.
    """
    args, axes = [q, k, v], [_Q_AXES, _KV_AXES, _KV_AXES]
    if segment_ids_BxL is not None:
        args.append(segment_ids_BxL)
        axes.append(_SEG_AXES)
    return shard_map_logical(local_fn, args, axes, _Q_AXES,
                             tied=[("act_heads", "act_kv_heads")])


def _pallas_attention(interpret: bool) -> AttentionFn:
    def attend(q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array, *,
               causal: bool = True, segment_ids_BxL: jax.Array | None = None,
               window: int | None = None) -> jax.Array:
        def local(q, k, v, segment_ids=None):
            return flash_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                                   window_size=window, interpret=interpret)

        return _per_shard(local, q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, segment_ids_BxL)
    return attend


register_attention("pallas")(_pallas_attention(interpret=False))
register_attention("pallas_interpret")(_pallas_attention(interpret=True))


@register_attention("cudnn")
def cudnn_attention(q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array, *,
                    causal: bool = True, segment_ids_BxL: jax.Array | None = None,
                    window: int | None = None, implementation: str = "cudnn") -> jax.Array:
    """cuDNN's fused attention; segment ids become a (materialised) [B, 1, T, S] mask, and
    a window w is cuDNN's local window of w - 1 earlier keys (`implementation="xla"`
    runs the same call anywhere, for tests)."""
    local_window = None if window is None else (window - 1, 0 if causal else window - 1)

    def local(q, k, v, segment_ids=None):
        mask = None
        if segment_ids is not None:
            mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                            local_window_size=local_window,
                                            implementation=implementation)

    return _per_shard(local, q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, segment_ids_BxL)


# Which device platforms each implementation runs on (others run everywhere), and what to
# use instead elsewhere.
IMPL_PLATFORMS = {
    "pallas": (("gpu", "tpu"), "the Pallas kernel compiles for GPU (Triton) or TPU (Mosaic); "
                               "use 'pallas_interpret' to run it interpreted (slow, for tests) "
                               "or 'xla'"),
    "cudnn": (("gpu",), "cuDNN attention needs an NVIDIA GPU; use 'xla' or 'pallas'"),
}


class Attention(nnx.Module):
    """Multi-head attention with grouped KV heads, RoPE, an optional sliding window and a
    KV cache; q/k/v (and output) biases and per-head q/k RMSNorm as `cfg` asks."""

    def __init__(self, cfg: Any, *, std: float, out_std: float, rngs: nnx.Rngs):
        d, h, g, kd = cfg.model.d_model, cfg.model.num_heads, cfg.model.num_kv_heads, cfg.head_dim
        dtype = cfg.compute_dtype
        self.num_heads, self.num_kv_heads, self.head_dim = h, g, kd
        self.rope_theta = cfg.model.rope_theta
        self.rope_scaling = cfg.rope_scaling
        self.use_rope = cfg.model.position == "rope"
        self.window = cfg.window
        self.impl = cfg.model.attention_impl
        self.context_mode = cfg.model.context_attention
        qkv_bias = cfg.model.attention_bias in ("qkv", "all")
        kw: dict[str, Any] = dict(std=std, dtype=dtype, rngs=rngs, bias=qkv_bias)
        self.q = Linear((d,), (h, kd), ("embed", "heads", "head_dim"), **kw, lora=cfg.adapter("q"))
        self.k = Linear((d,), (g, kd), ("embed", "kv_heads", "head_dim"), **kw,
                        lora=cfg.adapter("k"))
        self.v = Linear((d,), (g, kd), ("embed", "kv_heads", "head_dim"), **kw,
                        lora=cfg.adapter("v"))
        self.o = Linear((h, kd), (d,), ("heads", "head_dim", "embed"), std=out_std,
                        dtype=dtype, rngs=rngs, bias=cfg.model.attention_bias == "all",
                        lora=cfg.adapter("o"))
        self.use_qk_norm = cfg.model.qk_norm
        if cfg.model.qk_norm:
            self.q_norm = RMSNorm(kd, eps=cfg.model.norm_eps, dtype=dtype, rngs=rngs)
            self.k_norm = RMSNorm(kd, eps=cfg.model.norm_eps, dtype=dtype, rngs=rngs)

    def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array, *,
                 segment_ids_BxL: jax.Array | None = None,
                 cache: dict[str, jax.Array] | None = None,
                 cache_index: jax.Array | None = None,
                 kv_valid_BxS: jax.Array | None = None,
                 lora_key: jax.Array | None = None,
                 ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        keys = (None,) * 4 if lora_key is None else jax.random.split(lora_key, 4)
        q, k, v = self.qkv(x_BxLxD, positions_BxL, keys[:3])
        if cache is None and context_shards() > 1:  # the sequence is split: zig-zag order
            out = context_attention(q, k, v, impl=self.impl, mode=self.context_mode,
                                    segment_ids_BxL=segment_ids_BxL, window=self.window)
            new_cache = None
        elif cache is None:
            kwargs = {} if self.window is None else {"window": self.window}
            out = ATTENTION_IMPLS[self.impl](q, k, v, causal=True,
                                             segment_ids_BxL=segment_ids_BxL, **kwargs)
            new_cache = None
        else:
            out, new_cache = self._attend_cached(q, k, v, cache, cache_index, kv_valid_BxS)
        out = constrain(out, ("act_batch", "act_len", "act_heads", None))
        return self.o(out, keys[3]), new_cache

    def qkv(self, x_BxLxD: jax.Array, positions_BxL: jax.Array,
            lora_keys: tuple[jax.Array | None, ...] = (None,) * 3
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The queries [B, L, H, K], keys and values [B, L, G, K] (normed and rotated)."""
        q = constrain(self.q(x_BxLxD, lora_keys[0]), ("act_batch", "act_len", "act_heads", None))
        k = constrain(self.k(x_BxLxD, lora_keys[1]),
                      ("act_batch", "act_len", "act_kv_heads", None))
        v = constrain(self.v(x_BxLxD, lora_keys[2]),
                      ("act_batch", "act_len", "act_kv_heads", None))
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            q = rope(q, positions_BxL, self.rope_theta, self.rope_scaling)
            k = rope(k, positions_BxL, self.rope_theta, self.rope_scaling)
        return q, k, v

    def weights(self, x_BxLxD: jax.Array, positions_BxL: jax.Array,
                segment_ids_BxL: jax.Array | None = None) -> jax.Array:
        """[B, H, L, L] float32: the attention probabilities of a cache-free call on these
        inputs, as the "xla" implementation computes them (the causal mask, the window,
        the segments)."""
        q, k, _ = self.qkv(x_BxLxD, positions_BxL)
        t = q.shape[1]
        mask = self_attention_mask(t, t, causal=True, segment_ids_BxL=segment_ids_BxL,
                                   window=self.window)
        return attention_weights(q, k, mask)

    def _attend_cached(self, q, k, v, cache, cache_index, kv_valid_BxS):
        """Write this chunk's K/V at `cache_index`, then attend over the whole cache.

        Slots hold consecutive tokens, so the sliding window counts slots."""
        k_cache = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype),
                                                      cache_index, axis=1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype),
                                                      cache_index, axis=1)
        b, t = q.shape[:2]
        s = k_cache.shape[1]
        q_slot_BxL = jnp.broadcast_to(cache_index + jnp.arange(t)[None], (b, t))
        kv_slot_BxS = jnp.broadcast_to(jnp.arange(s)[None], (b, s))
        mask = attention_mask(q_slot_BxL, kv_slot_BxS, causal=True, window=self.window,
                              kv_valid=kv_valid_BxS)
        out, _ = attention_block(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask)
        return out, {"k": k_cache, "v": v_cache}
