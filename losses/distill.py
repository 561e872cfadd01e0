"""Distillation losses: per-token KL divergences between teacher and student distributions,
and distances between hidden states. Pure functions of arrays, in float32.

Notation: p = teacher, q = student, both softmax(logits / T) over the real vocabulary
(padding ids beyond `vocab_size` get zero probability).

  forward_kl       KL(p || q)                    mean-seeking (classic KD)
  reverse_kl       KL(q || p)                    mode-seeking
  skew_forward_kl  KL(p || a p + (1 - a) q)      DistiLLM's skew KL, a = loss.distill.skew
  skew_reverse_kl  KL(q || a q + (1 - a) p)

The distillation loss is T^2 * KL at temperature T (Hinton et al.): the gradient w.r.t.
the student logits is T * (q_T - p_T) for forward KL, so its size does not shrink ~1/T^2.
"""

import jax
import jax.numpy as jnp

from jaxlm.configs.sections import FeatureKind, KlKind
from jaxlm.configs.wording import choices
from jaxlm.losses.cross_entropy import mask_padded_vocab

KL_KINDS = choices(KlKind)
FEATURE_KINDS = choices(FeatureKind)


def log_probs(logits_BxLxV: jax.Array, temperature: float | jax.Array,
              vocab_size: int) -> jax.Array:
    logits = mask_padded_vocab(logits_BxLxV.astype(jnp.float32), vocab_size)
    return jax.nn.log_softmax(logits / temperature, axis=-1)


def _kl(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """sum_v p (log p - log q) over the last axis; entries with p = 0 contribute 0."""
    p = jnp.exp(logp)
    return jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)


def _mix(loga: jax.Array, logb: jax.Array, a: float) -> jax.Array:
    """log(a * exp(loga) + (1 - a) * exp(logb)), stable, also for a in {0, 1}."""
    if a <= 0.0:
        return logb
    if a >= 1.0:
        return loga
    return jnp.logaddexp(jnp.log(a) + loga, jnp.log1p(-a) + logb)


def token_kl(student_logits: jax.Array, teacher_logits: jax.Array, *, kind: str,
             temperature: float | jax.Array = 1.0, skew: float = 0.0,
             vocab_size: int | None = None) -> jax.Array:
    """Per-token divergence [B, L] (without the T^2 factor)."""
    vocab_size = student_logits.shape[-1] if vocab_size is None else vocab_size
    if student_logits.shape[-1] != teacher_logits.shape[-1]:  # padded differently
        n = min(student_logits.shape[-1], teacher_logits.shape[-1])
        student_logits, teacher_logits = student_logits[..., :n], teacher_logits[..., :n]
    logq = log_probs(student_logits, temperature, vocab_size)
    logp = log_probs(teacher_logits, temperature, vocab_size)
    if kind == "forward_kl":
        return _kl(logp, logq)
    if kind == "reverse_kl":
        return _kl(logq, logp)
    if kind == "skew_forward_kl":
        return _kl(logp, _mix(logp, logq, skew))
    if kind == "skew_reverse_kl":
        return _kl(logq, _mix(logq, logp, skew))
    raise ValueError(f"unknown KL kind {kind!r}; choose one of {KL_KINDS}")


def distill_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                 weights_BxL: jax.Array | None, *, kind: str,
                 temperature: float | jax.Array = 1.0, skew: float = 0.0,
                 vocab_size: int | None = None) -> jax.Array:
    """sum over tokens of weight * T^2 * KL; padding (weight 0) contributes nothing."""
    kl = token_kl(student_logits, jax.lax.stop_gradient(teacher_logits), kind=kind,
                  temperature=temperature, skew=skew, vocab_size=vocab_size)
    kl = kl * jnp.square(jnp.asarray(temperature, jnp.float32))
    if weights_BxL is not None:
        kl = kl * weights_BxL.astype(jnp.float32)
    return jnp.sum(kl)


def token_feature_distance(student_BxLxD: jax.Array, teacher_BxLxD: jax.Array, kind: str
                           ) -> jax.Array:
    """Per-token [B, L]: mean squared error over features, or 1 - cosine similarity."""
    s = student_BxLxD.astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher_BxLxD).astype(jnp.float32)
    if kind == "mse":
        return jnp.mean(jnp.square(s - t), axis=-1)
    if kind == "cosine":
        eps = 1e-8
        dot = jnp.sum(s * t, axis=-1)
        norms = jnp.sqrt(jnp.sum(s * s, axis=-1) * jnp.sum(t * t, axis=-1) + eps)
        return 1.0 - dot / norms
    raise ValueError(f"unknown feature distance {kind!r}; choose one of {FEATURE_KINDS}")


def feature_loss(student_hidden: list[jax.Array], teacher_hidden: list[jax.Array],
                 weights_BxL: jax.Array | None, *, kind: str,
                 projection: jax.Array | None = None) -> jax.Array:
    """sum over tokens of weight * (mean over layer pairs of the feature distance).

    Pair i compares student_hidden[i] (projected by projection[i] when the widths differ;
    `projection` is [pairs, student width, teacher width]) with teacher_hidden[i]."""
    total = 0.0
    for i, (s, t) in enumerate(zip(student_hidden, teacher_hidden, strict=True)):
        if projection is not None:
            s = jnp.einsum("bld,de->ble", s.astype(jnp.float32), projection[i])
        total = total + token_feature_distance(s, t, kind)
    dist = total / len(student_hidden)
    if weights_BxL is not None:
        dist = dist * weights_BxL.astype(jnp.float32)
    return jnp.sum(dist)
