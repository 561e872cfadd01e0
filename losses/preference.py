"""Preference losses on (chosen, rejected) pairs: DPO and its variants (IPO, robust DPO,
SimPO), as functions of sequence log-probabilities, and a reward model's read-out.

A preference batch holds each pair in two adjacent rows: row 2i is the chosen response,
row 2i+1 the rejected one, both after the same prompt; the token weights are 1 on the
response tokens and 0 on the prompt and the padding. The formulas follow TRL's
`DPOTrainer` (sigmoid, robust, ipo) and `CPOTrainer` (simpo); the sigmoid and simpo
losses take conservative label smoothing (cDPO): -(1-e) log s(z) - e log s(-z).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlm.losses.cross_entropy import mask_padded_vocab


class Pairs(NamedTuple):
    """Per-pair [P] values of one preference batch."""
    chosen: jax.Array  # summed log-probabilities of the chosen responses
    rejected: jax.Array
    chosen_len: jax.Array  # response tokens (sum of the token weights)
    rejected_len: jax.Array
    valid: jax.Array  # 1.0 where both responses have tokens (padding pairs: 0.0)


def token_logps(logits_BxLxV: jax.Array, targets_BxL: jax.Array, vocab_size: int
                ) -> jax.Array:
    """[B, L] log-probability of each target token, in float32 (one-hot contraction, so a
    vocabulary-sharded logit matrix is reduced where it lies)."""
    logits = mask_padded_vocab(logits_BxLxV.astype(jnp.float32), vocab_size)
    one_hot = jax.nn.one_hot(targets_BxL, logits.shape[-1], dtype=logits.dtype)
    return jnp.sum(logits * one_hot, axis=-1) - jax.nn.logsumexp(logits, axis=-1)


def pairs(logps_BxL: jax.Array, weights_BxL: jax.Array | None) -> Pairs:
    """Sum each row's weighted token log-probabilities and pair rows 2i, 2i+1."""
    weights = (jnp.ones_like(logps_BxL) if weights_BxL is None
               else weights_BxL.astype(jnp.float32))
    seq_B = jnp.sum(logps_BxL * weights, axis=-1)
    len_B = jnp.sum(weights, axis=-1)
    valid = ((len_B[0::2] > 0) & (len_B[1::2] > 0)).astype(jnp.float32)
    return Pairs(seq_B[0::2], seq_B[1::2], len_B[0::2], len_B[1::2], valid)


def pair_losses(policy: Pairs, reference: Pairs | None, *, loss_type: str, beta: float,
                label_smoothing: float = 0.0, simpo_gamma: float = 0.5
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(per-pair loss [P], chosen rewards [P], rejected rewards [P]).

    Rewards are beta * (log pi - log pi_ref) of each response (SimPO: beta times the
    mean token log-probability, its implicit reward)."""
    if loss_type == "simpo":
        chosen = beta * policy.chosen / jnp.maximum(policy.chosen_len, 1.0)
        rejected = beta * policy.rejected / jnp.maximum(policy.rejected_len, 1.0)
        z = chosen - rejected - simpo_gamma
        loss = (-(1 - label_smoothing) * jax.nn.log_sigmoid(z)
                - label_smoothing * jax.nn.log_sigmoid(-z))
        return loss, chosen, rejected
    chosen_ratio = policy.chosen - reference.chosen
    rejected_ratio = policy.rejected - reference.rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        loss = (-(1 - label_smoothing) * jax.nn.log_sigmoid(beta * delta)
                - label_smoothing * jax.nn.log_sigmoid(-beta * delta))
    elif loss_type == "robust":
        loss = (-(1 - label_smoothing) * jax.nn.log_sigmoid(beta * delta)
                + label_smoothing * jax.nn.log_sigmoid(-beta * delta)) / (1 - 2 * label_smoothing)
    elif loss_type == "ipo":
        # Token-averaged log-ratios, as TRL (and the IPO authors' experiments) use.
        avg = (chosen_ratio / jnp.maximum(policy.chosen_len, 1.0)
               - rejected_ratio / jnp.maximum(policy.rejected_len, 1.0))
        loss = (avg - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {loss_type!r}")
    return loss, beta * chosen_ratio, beta * rejected_ratio


def token_kl(policy_BxLxV: jax.Array, reference_BxLxV: jax.Array, vocab_size: int
             ) -> jax.Array:
    """[B, L] KL(policy || reference) of each position's next-token distribution."""
    logp = jax.nn.log_softmax(mask_padded_vocab(policy_BxLxV.astype(jnp.float32), vocab_size))
    logq = jax.nn.log_softmax(mask_padded_vocab(reference_BxLxV.astype(jnp.float32),
                                                vocab_size))
    p = jnp.exp(logp)
    return jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)


def last_response_hidden(hidden_BxLxD: jax.Array, weights_BxL: jax.Array | None
                         ) -> jax.Array:
    """[B, D] each row's hidden state at its last response position (the last weighted
    target: it has read every response token but the last), RMS-normalised (a learned
    head absorbs the final norm's scale)."""
    length = hidden_BxLxD.shape[1]
    if weights_BxL is None:
        last_B = jnp.full(hidden_BxLxD.shape[:1], length - 1)
    else:
        pos_BxL = jnp.arange(length)[None, :]
        last_B = jnp.max(jnp.where(weights_BxL > 0, pos_BxL, 0), axis=1)
    one_hot = jax.nn.one_hot(last_B, length, dtype=hidden_BxLxD.dtype)
    h_BxD = jnp.einsum("bl,bld->bd", one_hot, hidden_BxLxD).astype(jnp.float32)
    return h_BxD * jax.lax.rsqrt(jnp.mean(h_BxD ** 2, axis=-1, keepdims=True) + 1e-6)


def reward_values(head: dict[str, jax.Array], hidden_BxLxD: jax.Array,
                  weights_BxL: jax.Array | None) -> jax.Array:
    """[B] a reward model's scalar of each row: the value head (`w` [D], `b`) on its
    last response position's normalised hidden state (`last_response_hidden`)."""
    return last_response_hidden(hidden_BxLxD, weights_BxL) @ head["w"] + head["b"]
