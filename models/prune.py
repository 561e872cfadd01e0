"""Magnitude pruning: which matrices, their masks, the cubic schedule and sparse bytes.

A pruned matrix is viewed as [I, O] (a Linear's kernel flattened over its input and output
dims, as its matmul sees it); stacked layers and MoE experts add leading dims, each index of
which is one matrix. Masks are booleans shaped like their parameters (True = kept) in a
nested dict holding only the pruned parameters. Ties in |w| are broken by position: the
earlier weight is pruned first. A weight pruned once stays pruned when masks are computed
again (its score is below every kept weight's).
"""

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.configs.sections import Prune
from jaxlm.models.layers import Linear, subtree, weight_matrices
from jaxlm.models.moe import MoE

VALUE_BYTES = 4  # the parameters are float32


@dataclasses.dataclass(frozen=True)
class Target:
    """One pruned parameter: its path in the params, how many leading dims index separate
    matrices (layers, experts), and how many of the rest are inputs."""
    path: tuple[Any, ...]
    lead: int
    in_ndim: int

    @property
    def name(self) -> str:
        return ".".join(map(str, self.path))

    def matrices(self, w: jax.Array) -> jax.Array:
        """w as [matrices, I, O]."""
        i = math.prod(w.shape[self.lead:self.lead + self.in_ndim])
        return w.reshape(-1, i, math.prod(w.shape[self.lead + self.in_ndim:]))


def _stacked(var: nnx.Variable) -> bool:
    return var.get_metadata().get("out_sharding", (None,))[0] == "layers"


def prune_targets(model: nnx.Module, include_head: bool = False) -> list[Target]:
    """The pruned parameters of `model` (abstract is fine): Linear kernels (the untied
    lm_head only with `include_head`) and MoE expert weights; not embeddings, norms,
    biases, routers or LoRA adapters."""
    out = []
    for path, module, name, stacked in weight_matrices(model):
        if isinstance(module, Linear) and (include_head or tuple(path) != ("lm_head",)):
            out.append(Target((*path, name), int(stacked), module.in_ndim))
    for path, module in model.iter_modules():
        if isinstance(module, MoE):
            for name in ("gate", "up", "down"):
                if hasattr(module, name):
                    lead = 1 + _stacked(getattr(module, name))
                    out.append(Target((*path, name), lead, 1))
    return out


def _leaves(tree: Any, targets: list[Target]) -> Iterator[tuple[Target, Any]]:
    for t in targets:
        yield t, subtree(tree, t.path)


def _with(tree: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def build_tree(targets: list[Target], values: list[Any]) -> dict[str, Any]:
    """A nested dict holding `values` at the targets' paths."""
    out: dict[str, Any] = {}
    for t, v in zip(targets, values):
        _with(out, t.path, v)
    return out


def full_masks(params: Any, targets: list[Target]) -> dict[str, Any]:
    """Masks that keep every weight."""
    return build_tree(targets, [jnp.ones(w.shape, bool) for _, w in _leaves(params, targets)])


def _keep_largest(score_BxN: jax.Array, k: jax.Array | int) -> jax.Array:
    """True except at the `k` smallest scores of each row (ties: the earlier one)."""
    b, n = score_BxN.shape
    order = jnp.argsort(score_BxN, axis=-1, stable=True)
    kept_in_order = jnp.broadcast_to(jnp.arange(n) >= k, (b, n))
    return jnp.zeros((b, n), bool).at[jnp.arange(b)[:, None], order].set(kept_in_order)


def _nm_mask(score_BxIxO: jax.Array, n: int, m: int) -> jax.Array:
    """Of every m consecutive inputs of an output, the n largest scores stay."""
    b, i, o = score_BxIxO.shape
    groups = jnp.moveaxis(score_BxIxO.reshape(b, i // m, m, o), 2, -1).reshape(-1, m)
    keep = _keep_largest(groups, m - n)
    return jnp.moveaxis(keep.reshape(b, i // m, o, m), -1, 2).reshape(b, i, o)


def _scores(params: Any, masks: Any, targets: list[Target]) -> list[jax.Array]:
    """|w| as [matrices, I, O]; -1 where `masks` already prunes."""
    out = []
    for t, w in _leaves(params, targets):
        s = jnp.abs(w.astype(jnp.float32))
        if masks is not None:
            s = jnp.where(subtree(masks, t.path), s, -1.0)
        out.append(t.matrices(s))
    return out


def magnitude_masks(params: Any, targets: list[Target], cfg: Prune,
                    sparsity: jax.Array | float | None = None, masks: Any = None
                    ) -> dict[str, Any]:
    """Masks pruning `sparsity` (default cfg.sparsity) of the targets by magnitude, as
    cfg.pattern and cfg.scope say: floor(sparsity x weights) per matrix, or of all target
    weights (global); N:M per group of M inputs. Weights that `masks` prunes stay pruned."""
    s = cfg.sparsity if sparsity is None else sparsity
    scores = _scores(params, masks, targets)
    shapes = [w.shape for _, w in _leaves(params, targets)]
    if cfg.nm is not None:
        keep = [_nm_mask(x, *cfg.nm) for x in scores]
    elif cfg.scope == "layer":
        keep = [_keep_largest(x.reshape(x.shape[0], -1),
                              jnp.floor(s * x[0].size).astype(jnp.int32)).reshape(x.shape)
                for x in scores]
    else:
        flat = jnp.concatenate([x.reshape(-1) for x in scores])
        kept = _keep_largest(flat[None], jnp.floor(s * flat.size).astype(jnp.int32))[0]
        ends = np.cumsum([x.size for x in scores])[:-1]
        keep = [k.reshape(x.shape) for k, x in zip(jnp.split(kept, ends), scores)]
    return build_tree(targets, [k.reshape(shape) for k, shape in zip(keep, shapes)])


def apply_masks(params: Any, masks: Any) -> Any:
    """`params` with the masked weights set to exactly zero (others untouched)."""
    out = jax.tree.map(lambda x: x, params)
    for path, mask in jax.tree_util.tree_flatten_with_path(masks)[0]:
        keys = tuple(k.key for k in path)
        node = subtree(out, keys[:-1])
        node[keys[-1]] = jnp.where(mask, node[keys[-1]], jnp.zeros((), node[keys[-1]].dtype))
    return out


def mask_axes(masks: Any, param_axes: Any) -> Any:
    """The logical axes of `masks`: each its parameter's."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: subtree(param_axes, tuple(k.key for k in path)), masks)


def cubic_sparsity(step: jax.Array | int, cfg: Prune) -> jax.Array:
    """Zhu & Gupta's s_t = s_f + (s_i - s_f)(1 - (t - t0) / (t1 - t0))^3, clipped to
    [t0, t1] (oneshot: s_f)."""
    if cfg.schedule == "oneshot":
        return jnp.asarray(cfg.sparsity, jnp.float32)
    span = cfg.end_step - cfg.start_step
    frac = jnp.clip((jnp.asarray(step, jnp.float32) - cfg.start_step) / span, 0.0, 1.0)
    return cfg.sparsity + (cfg.initial_sparsity - cfg.sparsity) * (1.0 - frac) ** 3


def prune_due(step: jax.Array | int, cfg: Prune) -> jax.Array:
    """Whether masks are computed before update `step` + 1: at start_step (oneshot), or
    every `every` steps from start_step and at end_step (cubic)."""
    step = jnp.asarray(step)
    if cfg.schedule == "oneshot":
        return step == cfg.start_step
    inside = (step >= cfg.start_step) & (step <= cfg.end_step)
    return inside & (((step - cfg.start_step) % cfg.every == 0) | (step == cfg.end_step))


def matrix_bytes(inputs: int, outputs: int, kept: int, nm: tuple[int, int] | None) -> int:
    """Bytes of one pruned [I, O] matrix of float32 values. N:M: the N kept values of every
    group of M inputs and an index of ceil(log2 M) bits for each (2:4: 2 values + 2 2-bit
    indices per 4 weights). Unstructured: a bitmask of I x O bits and the kept values."""
    if nm is not None:
        n, m = nm
        groups = inputs // m * outputs
        return groups * n * VALUE_BYTES + math.ceil(groups * n * math.ceil(math.log2(m)) / 8)
    return math.ceil(inputs * outputs / 8) + kept * VALUE_BYTES


def sparsity_rows(params: Any, targets: list[Target], nm: tuple[int, int] | None
                  ) -> list[dict[str, Any]]:
    """One row per pruned matrix (per layer and expert): name, shape [I, O], zeros, their
    fraction, dense and sparse bytes."""
    rows = []
    for t, w in _leaves(params, targets):
        mats = np.asarray(jax.device_get(t.matrices(w)))
        for index, mat in enumerate(mats):
            zeros = int(mat.size - np.count_nonzero(mat))
            name = t.name if len(mats) == 1 else f"{t.name}[{index}]"
            rows.append({"matrix": name, "shape": list(mat.shape), "zeros": zeros,
                         "sparsity": round(zeros / mat.size, 6),
                         "dense_bytes": mat.size * VALUE_BYTES,
                         "sparse_bytes": matrix_bytes(*mat.shape, mat.size - zeros, nm)})
    return rows


@dataclasses.dataclass(frozen=True)
class Pruning:
    """A run's pruning: the `prune` section and the parameters it prunes."""
    cfg: Prune
    targets: tuple[Target, ...]

    def initial_masks(self, params: Any) -> dict[str, Any]:
        """The step-0 masks: nothing pruned yet."""
        return full_masks(params, list(self.targets))

    def before_update(self, params: Any, masks: Any, step: jax.Array
                      ) -> tuple[Any, dict[str, Any]]:
        """(params, masks) for update `step` + 1: at a pruning step, masks at the
        scheduled sparsity and the parameters they prune zeroed; else unchanged."""
        def prune(operands: tuple[Any, Any]) -> tuple[Any, Any]:
            p, m = operands
            new = magnitude_masks(p, list(self.targets), self.cfg,
                                  cubic_sparsity(step, self.cfg), m)
            return apply_masks(p, new), new
        return jax.lax.cond(prune_due(step, self.cfg), prune, lambda o: o, (params, masks))


def pruning_for(cfg: Prune, model: nnx.Module) -> Pruning | None:
    """The run's Pruning, or None when prune.sparsity is 0."""
    if not cfg.enabled:
        return None
    return Pruning(cfg, tuple(prune_targets(model, cfg.include_head)))
