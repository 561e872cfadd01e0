"""The train state, its logical layout, and a sharded initialisation from abstract shapes."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, PartitionSpec as P

from jaxlm.models.config import ModelConfig
from jaxlm.models.model import create_model, split_params
from jaxlm.models.prune import mask_axes
from jaxlm.parallel.sharding import Rules, tree_shardings


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any  # nested dict of float32 arrays
    opt_state: Any


@struct.dataclass
class PrunedTrainState(TrainState):
    """The train state of a run with pruning: a TrainState (whose checkpoints keep their
    structure) plus the masks (models/prune.py), booleans shaped like the parameters they
    prune, in a nested dict of those alone."""
    masks: Any = None


def state_logical_axes(abstract_state: TrainState, param_axes: Any) -> TrainState:
    """Logical PartitionSpecs for every leaf of the state, whatever the optimizer.

    An optimizer-state leaf belongs to the parameter whose path ends its own (optax keeps
    per-parameter statistics in trees shaped like the parameters, e.g. AdamW's `mu` and
    `nu`, Lion's and Muon's momentum, partitions with masked-out leaves). A leaf of the
    parameter's shape takes its spec; Adafactor's factored second moments drop the axis
    they average over (`v_row` the largest, `v_col` the second largest, as optax picks
    them); everything else (counts, Adafactor's [1] placeholders) is replicated. optax's
    `tree_map_params` cannot do this: it initialises the optimizer on placeholders, which
    fails for states whose shapes depend on the parameters' shapes.
    """
    params = jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]
    specs = jax.tree.leaves(param_axes, is_leaf=lambda x: isinstance(x, P))
    by_path = {tuple(path): (leaf.shape, spec) for (path, leaf), spec in zip(params, specs)}

    def spec_of(path: Any, leaf: Any) -> P:
        n = len(path)
        while n and isinstance(path[n - 1], jax.tree_util.DictKey):
            n -= 1
        if tuple(path[n:]) not in by_path:
            return P()
        shape, spec = by_path[tuple(path[n:])]
        if leaf.shape == shape:
            return spec
        field = next((getattr(k, "name", None) for k in reversed(path[:n])
                      if isinstance(k, jax.tree_util.GetAttrKey)), None)
        if field in ("v_row", "v_col") and len(leaf.shape) == len(shape) - 1:
            order = np.argsort(shape)  # optax's choice of the two factored axes
            dropped = int(order[-1] if field == "v_row" else order[-2])
            if tuple(np.delete(shape, dropped)) == leaf.shape:
                return P(*(a for i, a in enumerate(spec) if i != dropped))
        if leaf.size <= 1:
            return P()
        raise ValueError(f"optimizer state {jax.tree_util.keystr(tuple(path))} of shape "
                         f"{leaf.shape} does not follow its parameter of shape {shape}")

    opt_axes = jax.tree_util.tree_map_with_path(spec_of, abstract_state.opt_state)
    if isinstance(abstract_state, PrunedTrainState):
        return PrunedTrainState(step=P(), params=param_axes, opt_state=opt_axes,
                                masks=mask_axes(abstract_state.masks, param_axes))
    return TrainState(step=P(), params=param_axes, opt_state=opt_axes)


Split = Callable[[Any], tuple[Any, Any]]  # params -> (trainable, frozen)


def make_state_fn(optimizer: optax.GradientTransformation, seed: int,
                  extra_params: Callable[[jax.Array], Any] | None = None,
                  trainable: Split | None = None,
                  masks: Callable[[Any], Any] | None = None) -> Callable[[Any], TrainState]:
    """model params -> a step-0 TrainState with a fresh optimizer. `extra_params(key)`, if
    given, adds trained parameters beside the model's under params["objective"] (e.g. a
    distillation projection). With `trainable` (LoRA), the optimizer state covers only
    the trainable part of the parameters. `masks(params)`, if given, makes the step-0
    pruning masks."""
    def build(params: Any) -> TrainState:
        extra = None if extra_params is None else extra_params(
            jax.random.fold_in(jax.random.key(seed), 1))
        if extra is not None:
            params = {**params, "objective": extra}
        trained = params if trainable is None else trainable(params)[0]
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=optimizer.init(trained))
        if masks is None:
            return state
        return PrunedTrainState(state.step, state.params, state.opt_state, masks(params))
    return build


def make_init_fn(model_cfg: ModelConfig, optimizer: optax.GradientTransformation,
                 seed: int, extra_params: Callable[[jax.Array], Any] | None = None,
                 trainable: Split | None = None,
                 prepare: Callable[[Any], Any] | None = None,
                 masks: Callable[[Any], Any] | None = None) -> Callable[[], TrainState]:
    """A fresh random init of the model, as `make_state_fn`'s step-0 state; `prepare`
    maps the fresh model parameters first (e.g. quantizes a frozen base)."""
    build = make_state_fn(optimizer, seed, extra_params, trainable, masks)

    def init() -> TrainState:
        params = split_params(create_model(model_cfg, seed))[1]
        return build(params if prepare is None else prepare(params))
    return init


def init_sharded(init_fn: Callable[[], TrainState], shardings: TrainState) -> TrainState:
    """Run the init under jit with output shardings: each device makes only its shards."""
    return jax.jit(init_fn, out_shardings=shardings)()


def state_shardings(mesh: Mesh, logical: TrainState, rules: Rules) -> TrainState:
    return tree_shardings(mesh, logical, rules)


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
