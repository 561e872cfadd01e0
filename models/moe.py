"""Mixture-of-Experts feed-forward layer: fp32 top-k router, capacity or dropless dispatch.

Routing (`route`) and dispatch are pure functions of the tokens a device holds. Under a
mesh, `parallel.expert.expert_parallel` runs the layer per device with `shard_map`:
experts are split over the `experts` logical axis, and tokens travel to their experts and
back with an all-to-all.

Dispatch:
  * capacity_factor > 0: the tokens form capacity groups of `model.moe.group_size`
    tokens (0 = one sequence; `capacity_groups`), a property of the model, never of the
    layout: a group is a run of consecutive positions of one sequence or a run of whole
    consecutive sequences, and every layout keeps groups whole on one device. Within a
    group of n tokens each expert takes at most C = ceil(n*k/E * capacity_factor)
    assignments, first choices before second choices, in token order (GShard's
    priority); overflow assignments are dropped (the token keeps its residual). So the
    same tokens drop on one device and on any mesh.
  * capacity_factor <= 0: dropless. Assignments are sorted by expert and the experts run
    as one grouped matmul: `jax.lax.ragged_dot` on GPU/TPU, padded blocks on CPU, where
    ragged_dot is 10-20x slower (`model.moe.grouped_matmul`). With expert parallelism the exchange
    uses capacity buffers sized so nothing can drop (`ragged_all_to_all` has no CPU
    implementation).
"""

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.models.layers import MLP, param
from jaxlm.parallel.compat import logsumexp, softmax
from jaxlm.parallel.expert import expert_parallel

ROUTER_ORDERS = ("softmax_topk", "topk_softmax")
GROUPED_MATMULS = ("auto", "ragged_dot", "blocks")


class Routing(NamedTuple):
    weights_TxA: jax.Array  # combine weights, float32
    experts_TxA: jax.Array  # int32 expert ids
    probs_TxE: jax.Array  # softmax over all experts, float32
    logits_TxE: jax.Array


def route(logits_TxE: jax.Array, top_k: int, order: str = "softmax_topk",
          renormalize: bool = True) -> Routing:
    """Top-k routing in float32.

    softmax_topk (default): softmax over all experts, keep the k largest probabilities
    (renormalised to sum to 1 if `renormalize`). topk_softmax: keep the k largest
    logits and softmax over those k (Mixtral's order).
    """
    logits = logits_TxE.astype(jnp.float32)
    probs = softmax(logits, axis=-1)
    if order == "softmax_topk":
        weights, experts = jax.lax.top_k(probs, top_k)
        if renormalize:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    elif order == "topk_softmax":
        top, experts = jax.lax.top_k(logits, top_k)
        weights = softmax(top, axis=-1)
    else:
        raise ValueError(f"unknown router order {order!r}")
    return Routing(weights, experts.astype(jnp.int32), probs, logits)


def capacity(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    """ceil(tokens * top_k / experts * capacity_factor)."""
    return max(1, math.ceil(num_tokens * top_k / num_experts * factor))


def capacity_slots(experts_xQxA: jax.Array, num_experts: int, cap: Any
                   ) -> tuple[jax.Array, jax.Array]:
    """(slot within its expert's buffer, kept?) for each assignment, GShard priority.

    `experts_xQxA`: [..., Q, A] expert ids of Q tokens, one capacity group per leading
    index ([Q, A]: one group). Ids outside [0, E) are padding: they take no slot and are not
    kept. `cap`: the capacity, an int or one per group (shape of the leading axes).
    """
    *lead, q, k = experts_xQxA.shape
    # Choice-major within each group: all first choices in token order, then second...
    flat = jnp.swapaxes(experts_xQxA, -1, -2).reshape(*lead, k * q)
    one_hot = jax.nn.one_hot(flat, num_experts, dtype=jnp.int32)  # padding: all zeros
    position = jnp.sum((jnp.cumsum(one_hot, axis=-2) - 1) * one_hot, axis=-1)
    slot = jnp.swapaxes(position.reshape(*lead, k, q), -1, -2)
    cap = np.asarray(cap)
    real = (experts_xQxA >= 0) & (experts_xQxA < num_experts)
    return slot, real & (slot < cap.reshape(cap.shape + (1, 1)))


@dataclasses.dataclass(frozen=True)
class CapacityGroups:
    """How the T tokens one device holds split into P capacity groups of Q places (static).

    `token_PxQ`: the token in each place of a group, in token order; T marks an empty place
    (a shorter group, only in decoding). `capacity_P`: each group's capacity,
    ceil(its tokens * k / E * capacity_factor).
    """
    num_tokens: int
    token_PxQ: np.ndarray
    capacity_P: np.ndarray

    @classmethod
    def single(cls, num_tokens: int, cap: int) -> "CapacityGroups":
        """All tokens in one group of capacity `cap`."""
        return cls(num_tokens, np.arange(num_tokens)[None], np.array([cap]))

    @property
    def full(self) -> bool:
        """Every place holds a token: the groups are consecutive runs of Q tokens."""
        return self.token_PxQ.size == self.num_tokens

    @property
    def max_capacity(self) -> int:
        return int(np.max(self.capacity_P))


def capacity_groups(rows: int, length: int, group_size: int, top_k: int, num_experts: int,
                    factor: float, seq_len: int = 0) -> CapacityGroups:
    """The capacity groups of `rows` sequences of `length` tokens each (row-major tokens).

    group_size 0 is one sequence per group; up to `seq_len` (the training sequence length;
    0 = `length`) it splits each sequence into runs of group_size consecutive positions;
    above, a group is group_size // seq_len whole consecutive sequences. In training and
    evaluation (`length` = seq_len) the config checks make every group full. In decoding
    the layer sees fewer tokens per sequence: each group keeps the tokens it has (a
    sequence's last run, or the last run of sequences, may be shorter) and its capacity
    counts them.
    """
    t = rows * length
    seq_len = seq_len or length
    if group_size <= seq_len:
        run = min(group_size or length, length)
        per_row = -(-length // run)
        pos = np.arange(per_row * run).reshape(per_row, run)
        token = np.where(pos < length, np.arange(rows)[:, None, None] * length + pos, t)
        token = token.reshape(rows * per_row, run)
    else:
        rows_per_group = group_size // seq_len
        num_groups = -(-rows // rows_per_group)
        place = np.arange(num_groups * rows_per_group * length)
        token = np.where(place < t, place, t).reshape(num_groups, rows_per_group * length)
    counts = np.sum(token < t, axis=1)
    caps = {int(n): capacity(int(n), top_k, num_experts, factor) for n in np.unique(counts)}
    return CapacityGroups(num_tokens=t, token_PxQ=token,
                          capacity_P=np.array([caps[int(n)] for n in counts]))


def aux_statistics(r: Routing, num_experts: int, kept_TxA: jax.Array | None
                   ) -> dict[str, jax.Array]:
    """Load-balance and z losses plus routing metrics, as means over this device's tokens."""
    assigned = jax.nn.one_hot(r.experts_TxA, num_experts, dtype=jnp.float32).sum(1)  # [T, E]
    load = jnp.mean(assigned, axis=0) / r.experts_TxA.shape[1]  # f_e, sums to 1
    mean_prob = jnp.mean(r.probs_TxE, axis=0)  # P_e
    z = logsumexp(r.logits_TxE, axis=-1)
    entropy = -jnp.sum(r.probs_TxE * jnp.log(jnp.maximum(r.probs_TxE, 1e-30)), axis=-1)
    dropped = 0.0 if kept_TxA is None else 1.0 - jnp.mean(kept_TxA.astype(jnp.float32))
    return {"load": load, "mean_prob": mean_prob, "z_loss": jnp.mean(z * z),
            "router_entropy": jnp.mean(entropy), "drop_fraction": jnp.asarray(dropped)}


def load_balance_loss(load_E: jax.Array, mean_prob_E: jax.Array) -> jax.Array:
    """Switch Transformer: E * sum_e f_e * P_e (1.0 for uniform routing)."""
    return load_E.shape[0] * jnp.sum(load_E * mean_prob_E)


def expert_ffn(x_ExCxD: jax.Array, w: dict[str, jax.Array], kind: str) -> jax.Array:
    """Each expert's MLP on its own buffer of tokens."""
    up = jnp.einsum("ecd,edf->ecf", x_ExCxD, w["up"])
    if kind == "swiglu":
        h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", x_ExCxD, w["gate"])) * up
    else:
        h = jax.nn.gelu(up)
    return jnp.einsum("ecf,efd->ecd", h, w["down"])


def ragged_ffn(x_NxD: jax.Array, group_sizes_E: jax.Array, w: dict[str, jax.Array],
               kind: str) -> jax.Array:
    """Expert MLPs over rows sorted by expert, as grouped matmuls."""
    up = jax.lax.ragged_dot(x_NxD, w["up"], group_sizes_E)
    if kind == "swiglu":
        h = jax.nn.silu(jax.lax.ragged_dot(x_NxD, w["gate"], group_sizes_E)) * up
    else:
        h = jax.nn.gelu(up)
    return jax.lax.ragged_dot(h.astype(x_NxD.dtype), w["down"], group_sizes_E)


def dispatch_capacity(x_TxD, r: Routing, w, cfg: Any, groups: CapacityGroups | int,
                      exchange=None):
    """Capacity dispatch: scatter into [E, P*C, D] buffers, run experts, gather back.

    `groups`: the capacity groups of the tokens, or an int capacity C for one group of
    all of them. Expert e's buffer holds each group's C slots in turn (group p at rows
    p*C .. p*C + C - 1), so an expert-parallel exchange moves all groups at once.
    """
    t, d = x_TxD.shape
    e = cfg.model.moe.num_experts
    k = r.experts_TxA.shape[1]
    if not isinstance(groups, CapacityGroups):
        groups = CapacityGroups.single(t, groups)
    num_groups, places = groups.token_PxQ.shape
    cap = groups.max_capacity
    if groups.full:
        experts_PxQxA = r.experts_TxA.reshape(num_groups, places, k)
    else:  # empty places get expert id E: they take no slot
        padded = jnp.concatenate([r.experts_TxA, jnp.full((1, k), e, r.experts_TxA.dtype)])
        experts_PxQxA = padded[groups.token_PxQ]
    slot, kept = capacity_slots(experts_PxQxA, e, groups.capacity_P)
    group = np.arange(num_groups)[:, None, None]
    rows = e * num_groups * cap  # buffer rows, plus one spare row for dropped assignments
    index = jnp.where(kept, (experts_PxQxA * num_groups + group) * cap + slot, rows)
    index_TxA, kept_TxA = index.reshape(-1, k), kept.reshape(-1, k)
    if not groups.full:  # back to token order: each token's place
        place_T = np.argsort(groups.token_PxQ.reshape(-1), kind="stable")[:t]
        index_TxA, kept_TxA = index_TxA[place_T], kept_TxA[place_T]
    token = jnp.broadcast_to(jnp.arange(t)[:, None], index_TxA.shape)
    buf = jnp.zeros((rows + 1, d), x_TxD.dtype).at[index_TxA.reshape(-1)].set(
        x_TxD[token.reshape(-1)], mode="drop")
    buf = buf[:-1].reshape(e, num_groups * cap, d)
    if exchange is None:
        out = expert_ffn(buf, w, cfg.model.mlp)
    else:
        out = exchange(buf, lambda b: expert_ffn(b, w, cfg.model.mlp))
    out = jnp.concatenate([out.reshape(rows, d), jnp.zeros((1, d), out.dtype)])
    combine = jnp.where(kept_TxA, r.weights_TxA, 0.0).astype(x_TxD.dtype)
    return jnp.einsum("tk,tkd->td", combine, out[index_TxA]), kept_TxA


def blocked_ffn(x_NxD: jax.Array, group_sizes_E: jax.Array, w: dict[str, jax.Array],
                kind: str, block: int = 64) -> jax.Array:
    """`ragged_ffn` as padded blocks: each expert's rows are padded to a multiple of
    `block`, and every block runs as a batched matmul with its expert's weights.

    The same result as `ragged_ffn` (padding rows are zeros and discarded). XLA:CPU runs
    `ragged_dot` 10-20x slower than a dense matmul of the same size; this costs at most
    E * (block - 1) padding rows instead.
    """
    n, d = x_NxD.shape
    e = group_sizes_E.shape[0]
    num_blocks = -(-(n + e * (block - 1)) // block)
    padded = -(-group_sizes_E // block) * block
    start = jnp.cumsum(group_sizes_E) - group_sizes_E
    padded_end = jnp.cumsum(padded)
    row_expert = jnp.repeat(jnp.arange(e), group_sizes_E, total_repeat_length=n)
    dest = padded_end[row_expert] - padded[row_expert] + jnp.arange(n) - start[row_expert]
    buf = jnp.zeros((num_blocks * block, d), x_NxD.dtype).at[dest].set(x_NxD)
    block_expert = jnp.minimum(
        jnp.searchsorted(padded_end, jnp.arange(num_blocks) * block, side="right"), e - 1)
    # Weights per block as a one-hot contraction, not a gather: the gather's transpose is a
    # scatter-add, which XLA:CPU runs element by element.
    pick = jax.nn.one_hot(block_expert, e, dtype=next(iter(w.values())).dtype)
    wb = {k: jnp.einsum("be,e...->b...", pick, v) for k, v in w.items()}
    out = expert_ffn(buf.reshape(num_blocks, block, d), wb, kind)
    return out.reshape(num_blocks * block, -1)[dest]


def dispatch_dropless(x_TxD, r: Routing, w, cfg: Any):
    """Dropless: sort assignments by expert and run grouped matmuls."""
    t, d = x_TxD.shape
    k = r.experts_TxA.shape[1]
    expert = r.experts_TxA.reshape(-1)
    token = jnp.repeat(jnp.arange(t), k)
    order = jnp.argsort(expert, stable=True)
    sizes = jnp.bincount(expert, length=cfg.model.moe.num_experts).astype(jnp.int32)
    grouped = ragged_ffn if _use_ragged_dot(cfg) else blocked_ffn
    out = grouped(x_TxD[token[order]], sizes, w, cfg.model.mlp)
    weight = r.weights_TxA.reshape(-1)[order].astype(out.dtype)
    return jnp.zeros((t, d), out.dtype).at[token[order]].add(weight[:, None] * out)


def _use_ragged_dot(cfg: Any) -> bool:
    impl = cfg.model.moe.grouped_matmul
    if impl == "auto":
        return jax.default_backend() != "cpu"
    return impl == "ragged_dot"


def moe_tokens(x_TxD: jax.Array, router_DxE: jax.Array, w: dict[str, jax.Array], cfg: Any,
               jitter_key: jax.Array | None = None, exchange=None, ep_size: int = 1,
               length: int | None = None):
    """The routed experts on one device's tokens; returns (output, aux statistics).

    `length`: tokens per sequence (the tokens are whole sequences, row-major); None = one
    sequence of all T tokens. It places the capacity groups (`capacity_groups`).
    """
    moe = cfg.model.moe
    x_router = x_TxD.astype(jnp.float32)
    if jitter_key is not None and moe.jitter > 0:
        x_router = x_router * jax.random.uniform(jitter_key, x_router.shape, jnp.float32,
                                                 1.0 - moe.jitter, 1.0 + moe.jitter)
    r = route(x_router @ router_DxE.astype(jnp.float32), moe.top_k, moe.router_order,
              moe.renormalize)
    t = x_TxD.shape[0]
    if moe.capacity_factor > 0:
        length = length or t
        groups = capacity_groups(t // length, length, moe.group_size, moe.top_k,
                                 moe.num_experts, moe.capacity_factor, cfg.seq_len)
        y, kept = dispatch_capacity(x_TxD, r, w, cfg, groups, exchange)
    elif exchange is not None and ep_size > 1:
        y, kept = dispatch_capacity(x_TxD, r, w, cfg, t * moe.top_k, exchange)
        kept = None  # sized so that nothing drops
    else:
        y, kept = dispatch_dropless(x_TxD, r, w, cfg), None
    return y, aux_statistics(r, moe.num_experts, kept)


class MoE(nnx.Module):
    """Routed experts (+ optional always-on shared experts) replacing a dense MLP."""

    def __init__(self, cfg: Any, *, std: float, out_std: float, rngs: nnx.Rngs):
        self.cfg = cfg
        e, d, f = cfg.model.moe.num_experts, cfg.model.d_model, cfg.expert_d_ff
        init = nnx.initializers.normal
        self.router = param(rngs, init(std), (d, e), ("embed", "router"))
        if cfg.model.mlp == "swiglu":
            self.gate = param(rngs, init(std), (e, d, f), ("experts", "embed", "mlp"))
        self.up = param(rngs, init(std), (e, d, f), ("experts", "embed", "mlp"))
        self.down = param(rngs, init(out_std), (e, f, d), ("experts", "mlp", "embed"))
        if cfg.model.moe.num_shared_experts:
            self.shared = MLP(d, cfg.model.moe.num_shared_experts * f, cfg.model.mlp, std=std,
                              out_std=out_std, dtype=cfg.compute_dtype, rngs=rngs)

    def __call__(self, x_BxLxD: jax.Array, jitter_key: jax.Array | None = None):
        dtype = self.cfg.compute_dtype
        w = {"up": self.up[...].astype(dtype), "down": self.down[...].astype(dtype)}
        if self.cfg.model.mlp == "swiglu":
            w["gate"] = self.gate[...].astype(dtype)
        y, aux = expert_parallel(moe_tokens, x_BxLxD.astype(dtype), self.router[...], w,
                                 self.cfg, jitter_key)
        if self.cfg.model.moe.num_shared_experts:
            y = y + self.shared(x_BxLxD)
        return y, aux
