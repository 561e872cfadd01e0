"""The train state, its logical layout, and a sharded initialisation from abstract shapes."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, PartitionSpec as P

from models import ModelConfig, create_model, split_params
from parallel.sharding import Rules, tree_shardings


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any  # nested dict of float32 arrays
    opt_state: Any


def state_logical_axes(optimizer: optax.GradientTransformation, abstract_state: TrainState,
                       param_axes: Any) -> TrainState:
    """Logical PartitionSpecs for every leaf: optimizer moments follow their parameter."""
    opt_axes = optax.tree_map_params(
        optimizer, lambda _, spec: spec, abstract_state.opt_state, param_axes,
        transform_non_params=lambda _: P(), is_leaf=lambda x: isinstance(x, P))
    return TrainState(step=P(), params=param_axes, opt_state=opt_axes)


def make_state_fn(optimizer: optax.GradientTransformation, seed: int,
                  extra_params: Callable[[jax.Array], Any] | None = None
                  ) -> Callable[[Any], TrainState]:
    """model params -> a step-0 TrainState with a fresh optimizer. `extra_params(key)`, if
    given, adds trained parameters beside the model's under params["objective"] (e.g. a
    distillation projection)."""
    def build(params: Any) -> TrainState:
        extra = None if extra_params is None else extra_params(
            jax.random.fold_in(jax.random.key(seed), 1))
        if extra is not None:
            params = {**params, "objective": extra}
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params))
    return build


def make_init_fn(model_cfg: ModelConfig, optimizer: optax.GradientTransformation,
                 seed: int, extra_params: Callable[[jax.Array], Any] | None = None
                 ) -> Callable[[], TrainState]:
    """A fresh random init of the model, as `make_state_fn`'s step-0 state."""
    build = make_state_fn(optimizer, seed, extra_params)

    def init() -> TrainState:
        return build(split_params(create_model(model_cfg, seed))[1])
    return init


def init_sharded(init_fn: Callable[[], TrainState], shardings: TrainState) -> TrainState:
    """Run the init under jit with output shardings: each device makes only its shards."""
    return jax.jit(init_fn, out_shardings=shardings)()


def state_shardings(mesh: Mesh, logical: TrainState, rules: Rules) -> TrainState:
    return tree_shardings(mesh, logical, rules)


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
