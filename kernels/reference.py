"""Softmax attention in plain XLA ops: one block, its mask, its gradient, and the merge.

`attention_block` is the one implementation of softmax(q k^T / sqrt(K) + mask) v outside
the Pallas kernels; `attention_weights` returns its probabilities (attention maps). The model's "xla" attention and its KV-cache decoding call it, every
block of context-parallel attention calls it (blocks of the same queries merge by their
log-sum-exp, `merge_blocks`), and `reference_attention` wraps it in the kernels' calling
convention as the oracle of their tests.

Its gradient is jax's autodiff of it. `block_grads` turns that into one block's share of
the gradient of a softmax merged from several blocks, given the merged rows' log-sum-exp
and delta = rowsum(dO * O): the contract of `kernels.flash_attention_backward`.

Masks follow the kernels' rules (`kernels/_common.py`): query position p sees key
position s when causal: s <= p; window w: p - w < s (and s < p + w when not causal); same
segment id; a valid key slot.
"""

import functools
import operator
from collections.abc import Callable

import jax
import jax.numpy as jnp

# The logit of a masked pair: zero probability after the softmax, yet finite, so a row
# that sees no key computes no inf - inf and no NaN enters the values or the gradients.
MASKED = -1e30

BlockFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def attention_mask(q_pos: jax.Array, kv_pos: jax.Array, *, causal: bool,
                   window: int | None = None, q_segment: jax.Array | None = None,
                   kv_segment: jax.Array | None = None, kv_valid: jax.Array | None = None
                   ) -> jax.Array | None:
    """Boolean [B or 1, L, S]: which keys each query sees, from positions [B or 1, L] and
    [B or 1, S], segment ids (`kv_segment` defaults to `q_segment`) and valid key slots
    [B, S]; None when nothing is masked."""
    q, kv = q_pos[:, :, None], kv_pos[:, None, :]
    conditions = []
    if causal:
        conditions.append(kv <= q)
    if window is not None:
        conditions.append(kv > q - window)
        if not causal:
            conditions.append(kv < q + window)
    if q_segment is not None:
        kv_segment = q_segment if kv_segment is None else kv_segment
        conditions.append(q_segment[:, :, None] == kv_segment[:, None, :])
    if kv_valid is not None:
        conditions.append(kv_valid[:, None, :])
    return functools.reduce(operator.and_, conditions) if conditions else None


def _probs(q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, mask_BxLxS: jax.Array | None,
           scale: float | None, precision: jax.lax.Precision | None
           ) -> tuple[jax.Array, jax.Array, tuple[str, str]]:
    """(probabilities, lse) float32 in the grouped layout [B, G, R, L, S] / [B, G, R, L]
    ([B, H, L, S] / [B, H, L] when G == H), and the einsum specs of the two products."""
    b, t, h, kdim = q_BxLxHxK.shape
    g = k_BxSxGxK.shape[2]
    scale = kdim ** -0.5 if scale is None else scale
    q = q_BxLxHxK * jnp.asarray(scale, q_BxLxHxK.dtype)
    if g == h:  # plain multi-head attention: no group axis
        specs, rows = ("bthk,bshk->bhts", "bhts,bshk->bthk"), (slice(None), None)
    else:
        q = q.reshape(b, t, g, h // g, kdim)
        specs, rows = ("btgrk,bsgk->bgrts", "bgrts,bsgk->btgrk"), (slice(None), None, None)
    logits = jnp.einsum(specs[0], q, k_BxSxGxK, preferred_element_type=jnp.float32,
                        precision=precision)
    if mask_BxLxS is not None:
        logits = logits + jnp.where(mask_BxLxS, 0.0, MASKED).astype(jnp.float32)[rows]
    probs = jax.nn.softmax(logits, axis=-1)
    lse = jax.nn.logsumexp(logits, axis=-1)
    if mask_BxLxS is not None:
        seen = mask_BxLxS.any(-1)[rows]
        probs = jnp.where(seen[..., None], probs, 0.0)
        lse = jnp.where(seen, lse, -jnp.inf)
    return probs, lse, specs


def attention_weights(q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array,
                      mask_BxLxS: jax.Array | None = None, *, scale: float | None = None,
                      precision: jax.lax.Precision | None = None) -> jax.Array:
    """[B, H, L, S] float32: the probabilities `attention_block` multiplies v by (query
    head h reads KV head h // (H / G)); rows that see no key are 0."""
    b, t, h, _ = q_BxLxHxK.shape
    probs = _probs(q_BxLxHxK, k_BxSxGxK, mask_BxLxS, scale, precision)[0]
    return probs.reshape(b, h, t, k_BxSxGxK.shape[1])


def attention_block(q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array,
                    mask_BxLxS: jax.Array | None = None, *, scale: float | None = None,
                    out_dtype: jnp.dtype | None = None,
                    precision: jax.lax.Precision | None = None
                    ) -> tuple[jax.Array, jax.Array]:
    """(out [B, L, H, K], lse [B, H, L] float32) of softmax(scale q k^T + mask) v, with
    KV heads shared by groups of query heads.

    `scale` defaults to 1/sqrt(K) and multiplies q in its dtype; the logits are float32;
    the output is in `out_dtype` (default v's dtype). The mask enters as an additive bias
    (0 or MASKED). Rows that see no key give output 0 and lse -inf.
    """
    b, t, h, kdim = q_BxLxHxK.shape
    probs, lse, specs = _probs(q_BxLxHxK, k_BxSxGxK, mask_BxLxS, scale, precision)
    out = jnp.einsum(specs[1], probs.astype(v_BxSxGxK.dtype), v_BxSxGxK,
                     preferred_element_type=out_dtype, precision=precision)
    return out.reshape(b, t, h, kdim), lse.reshape(b, h, t)


def _per_row(x_BxHxL: jax.Array) -> jax.Array:
    """[B, H, L] row statistics as [B, L, H, 1], to scale outputs [B, L, H, K]."""
    return jnp.swapaxes(x_BxHxL, 1, 2)[..., None]


def merge_blocks(o: jax.Array, lse: jax.Array, o_j: jax.Array, lse_j: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    """Two partial softmax outputs of the same queries (against different keys) merged by
    their log-sum-exp; each row's lse must be finite in at least one of them (a row of
    lse -inf, which saw no key, adds nothing)."""
    new = jnp.logaddexp(lse, lse_j)
    return o * _per_row(jnp.exp(lse - new)) + o_j * _per_row(jnp.exp(lse_j - new)), new


def block_grads(block: BlockFn, q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array,
                lse: jax.Array, delta: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv) of one key/value block of an attention whose rows merge several
    blocks, by autodiff of `block(q, k, v) -> (o_b, lse_b)`.

    The merged output is O = sum_b w_b o_b with w_b = exp(lse_b - lse), so the block's
    cotangents are dO_b = w_b dO and dlse_b = w_b (rowsum(dO * o_b) - delta); `lse` and
    `delta` = rowsum(dO * O) [B, H, L] are the merged rows'.
    """
    (o_b, lse_b), vjp = jax.vjp(block, q, k, v)
    w = jnp.exp(lse_b - lse)
    do = do.astype(o_b.dtype)
    dlse_b = w * (jnp.swapaxes(jnp.sum(do * o_b, -1), 1, 2) - delta)
    return vjp((do * _per_row(w), dlse_b))


def reference_attention(q, k, v, *, causal: bool = True, segment_ids=None, kv_segment_ids=None,
                        q_positions=None, kv_positions=None,
                        window_size: int | None = None, softmax_scale: float | None = None,
                        return_lse: bool = False):
    """`attention_block` in float32 at the highest matmul precision, called as
    `kernels.flash_attention` is (rows that see no key give 0 / -inf); `jax.grad` of it
    gives the reference gradients of the kernel's."""
    t, s = q.shape[1], k.shape[1]
    q_pos = jnp.arange(t)[None] if q_positions is None else q_positions
    kv_pos = jnp.arange(s)[None] if kv_positions is None else kv_positions
    mask = attention_mask(q_pos, kv_pos, causal=causal, window=window_size,
                          q_segment=segment_ids, kv_segment=kv_segment_ids)
    out, lse = attention_block(*(x.astype(jnp.float32) for x in (q, k, v)), mask,
                               scale=softmax_scale, precision=jax.lax.Precision.HIGHEST)
    out = out.astype(q.dtype)
    return (out, lse) if return_lse else out
