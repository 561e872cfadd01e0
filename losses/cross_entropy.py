"""Token cross-entropy over a (possibly padded, possibly vocab-sharded) logit matrix."""

import jax
import jax.numpy as jnp

_MASKED = -1e30


def mask_padded_vocab(logits_BxLxV: jax.Array, vocab_size: int) -> jax.Array:
    """Logits of padding entries (ids >= vocab_size) become -1e30: zero probability."""
    if logits_BxLxV.shape[-1] == vocab_size:
        return logits_BxLxV
    ids = jax.lax.broadcasted_iota(jnp.int32, logits_BxLxV.shape, logits_BxLxV.ndim - 1)
    return jnp.where(ids < vocab_size, logits_BxLxV, _MASKED)


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                  weights_BxL: jax.Array | None, vocab_size: int
                  ) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token losses, sum of weights), in float32.

    The target logit is read with a one-hot contraction rather than a gather, so with
    the vocabulary sharded each device reduces its own slice and nothing is gathered.
    """
    logits = mask_padded_vocab(logits_BxLxV.astype(jnp.float32), vocab_size)
    lse_BxL = jax.nn.logsumexp(logits, axis=-1)
    one_hot = jax.nn.one_hot(targets_BxL, logits.shape[-1], dtype=logits.dtype)
    target_BxL = jnp.sum(logits * one_hot, axis=-1)
    loss_BxL = lse_BxL - target_BxL
    if weights_BxL is None:
        return jnp.sum(loss_BxL), jnp.asarray(loss_BxL.size, jnp.float32)
    weights_BxL = weights_BxL.astype(jnp.float32)
    return jnp.sum(loss_BxL * weights_BxL), jnp.sum(weights_BxL)
