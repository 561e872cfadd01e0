"""Plain softmax(q k^T) v reference with the kernels' masking rules (the tests' oracle).

It materialises the [L, S] scores and computes in float32 whatever the input dtype, so
`jax.grad` of it gives reference gradients for the kernel's.
"""

import jax
import jax.numpy as jnp


def reference_mask(t: int, s: int, *, causal: bool, window_size: int | None = None,
                   segment_ids=None, kv_segment_ids=None, q_positions=None,
                   kv_positions=None):
    """Boolean [B or 1, T, S]: which keys each query may see."""
    if q_positions is None:
        p, j = jnp.arange(t)[None, :, None], jnp.arange(s)[None, None, :]
    else:
        p, j = q_positions[:, :, None], kv_positions[:, None, :]
    mask = jnp.ones((1, t, s), bool)
    if causal:
        mask &= j <= p
    if window_size is not None:
        mask &= j > p - window_size
        if not causal:
            mask &= j < p + window_size
    if segment_ids is not None:
        kv = segment_ids if kv_segment_ids is None else kv_segment_ids
        mask = mask & (segment_ids[:, :, None] == kv[:, None, :])
    return mask


def reference_attention(q, k, v, *, causal: bool = True, segment_ids=None, kv_segment_ids=None,
                        q_positions=None, kv_positions=None,
                        window_size: int | None = None, softmax_scale: float | None = None,
                        return_lse: bool = False):
    """Same contract as `kernels.flash_attention`: rows that see no key give 0 / -inf."""
    b, t, h, d = q.shape
    s, g = k.shape[1], k.shape[2]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    qf = q.astype(jnp.float32).reshape(b, t, g, h // g, d)
    logits = jnp.einsum("btgrd,bsgd->bgrts", qf, k.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) * scale
    mask = reference_mask(t, s, causal=causal, window_size=window_size,
                          segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                          q_positions=q_positions, kv_positions=kv_positions)
    mask = mask[:, None, None]  # [B, 1, 1, T, S]
    any_visible = mask.any(-1)
    # Rows that see no key get logits 0 before the logsumexp, so no NaN enters jax.grad.
    logits = jnp.where(mask, logits, jnp.where(any_visible[..., None], -jnp.inf, 0.0))
    lse = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.where(mask, jnp.exp(logits - lse[..., None]), 0.0)
    lse = jnp.where(any_visible, lse, -jnp.inf)
    out = jnp.einsum("bgrts,bsgd->btgrd", probs, v.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    out = out.reshape(b, t, h, d).astype(q.dtype)
    lse = lse.reshape(b, h, t)
    return (out, lse) if return_lse else out
