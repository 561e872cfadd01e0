"""GRPO (Shao et al. 2024): group-normalised advantages and the clipped per-token
policy-gradient loss with a k3 KL penalty to a frozen reference, as TRL's `GRPOTrainer`
computes them (its defaults: `scale_rewards="group"`, `loss_type="dapo"`,
`importance_sampling_level="token"`).

A GRPO batch holds `group_size` completions of each prompt in adjacent rows; the token
weights are 1 on the completion tokens (the closing END included) and 0 on the prompt and
the padding.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jaxlm.losses.preference import token_logps

ADVANTAGE_EPS = 1e-4  # TRL's: advantages = (r - mean) / (std + 1e-4)


def group_advantages(rewards_B: np.ndarray, group_size: int) -> np.ndarray:
    """(r - group mean) / (group std + 1e-4), the std with Bessel's correction (TRL's
    `nanstd`); rows i*G .. i*G+G-1 are one prompt's group."""
    r = np.asarray(rewards_B, np.float64).reshape(-1, group_size)
    mean = r.mean(axis=1, keepdims=True)
    std = r.std(axis=1, ddof=1, keepdims=True) if group_size > 1 else np.zeros_like(mean)
    return ((r - mean) / (std + ADVANTAGE_EPS)).reshape(-1).astype(np.float32)


def temperature_logps(logits_BxLxV: jax.Array, targets_BxL: jax.Array, temperature: float,
                      vocab_size: int) -> jax.Array:
    """[B, L] log-probabilities of the targets under the logits divided by the sampling
    temperature (TRL scores completions at the temperature that sampled them)."""
    return token_logps(logits_BxLxV.astype(jnp.float32) / temperature, targets_BxL, vocab_size)


def token_losses(logps_BxL: jax.Array, old_logps_BxL: jax.Array,
                 ref_logps_BxL: jax.Array | None, advantages_BxL: jax.Array, *,
                 epsilon: float, beta: float
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(per-token loss, per-token k3 KL, clipped) [B, L].

    loss = -min(ratio A, clip(ratio, 1-eps, 1+eps) A) + beta * KL with ratio =
    exp(logp - old logp) and KL = exp(ref - logp) - (ref - logp) - 1; `clipped` is 1 where
    the clip bounds the objective (ratio < 1-eps with A < 0, ratio > 1+eps with A > 0)."""
    ratio = jnp.exp(logps_BxL - old_logps_BxL)
    clipped_ratio = jnp.clip(ratio, 1 - epsilon, 1 + epsilon)
    loss = -jnp.minimum(ratio * advantages_BxL, clipped_ratio * advantages_BxL)
    kl = jnp.zeros_like(logps_BxL)
    if ref_logps_BxL is not None:
        delta = ref_logps_BxL - logps_BxL
        kl = jnp.exp(delta) - delta - 1
        loss = loss + beta * kl
    clipped = (((ratio < 1 - epsilon) & (advantages_BxL < 0))
               | ((ratio > 1 + epsilon) & (advantages_BxL > 0))).astype(jnp.float32)
    return loss, kl, clipped
