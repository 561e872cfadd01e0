"""Assemble a run from its config: mesh, data, model, optimizer, shardings and jitted steps.

`Experiment.build` checks everything it can (config values, mesh, data files, shapes
against the mesh) before anything is compiled, raising ConfigError with the bad key.
"""

import dataclasses
import functools
import os
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from configs.errors import ConfigError
from configs.validate import validate_config
from data.pipeline import EvalBatches, TokenData, TrainBatches, check_lengths, resolve_data
from models import ModelConfig, abstract_model, param_logical_axes, split_params
from parallel.mesh import make_mesh
from parallel.sharding import Rules, check_divisible, mesh_axes_size, named_sharding
from training.optimizer import learning_rate_schedule, make_optimizer
from training.state import (TrainState, abstract_with_shardings, init_sharded, make_init_fn,
                            state_logical_axes, state_shardings)
from training.steps import make_eval_step, make_train_step

BATCH_AXES = ("act_batch", "act_len")


@dataclasses.dataclass
class Experiment:
    config: Any
    workdir: str
    mesh: Mesh
    rules: Rules
    data: TokenData
    model_cfg: ModelConfig
    graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: TrainState  # ShapeDtypeStructs with shardings
    state_shardings: TrainState
    batch_sharding: NamedSharding

    @classmethod
    def build(cls, config: Any, workdir: str | os.PathLike,
              devices: list[jax.Device] | None = None) -> "Experiment":
        validate_config(config)
        mesh = make_mesh(config.mesh, devices)
        rules = tuple((k, tuple(v) if isinstance(v, list) else v)
                      for k, v in config.sharding.rules)
        _check_batch(config, mesh, rules)
        data = resolve_data(config.data, workdir)
        check_lengths(data, config.seq_len)
        if config.model.vocab_size and config.model.vocab_size < data.vocab_size:
            raise ConfigError("model.vocab_size", f"{config.model.vocab_size} is smaller than "
                                                  f"the data's vocabulary {data.vocab_size}")
        model_cfg = ModelConfig.from_config(config.model, data.vocab_size)
        model = abstract_model(model_cfg)
        graphdef, abstract_params = split_params(model)
        param_axes = param_logical_axes(model)
        check_divisible(abstract_params, param_axes, mesh, rules)
        optimizer = make_optimizer(config, param_axes)
        init_fn = make_init_fn(model_cfg, optimizer, config.seed)
        abstract = jax.eval_shape(init_fn)
        logical = state_logical_axes(optimizer, abstract, param_axes)
        shardings = state_shardings(mesh, logical, rules)
        return cls(config=config, workdir=str(workdir), mesh=mesh, rules=rules, data=data,
                   model_cfg=model_cfg, graphdef=graphdef, optimizer=optimizer,
                   schedule=learning_rate_schedule(config),
                   abstract_state=abstract_with_shardings(abstract, shardings),
                   state_shardings=shardings,
                   batch_sharding=named_sharding(mesh, BATCH_AXES, rules))

    # State.
    def init_state(self) -> TrainState:
        init_fn = make_init_fn(self.model_cfg, self.optimizer, self.config.seed)
        return init_sharded(init_fn, self.state_shardings)

    # Steps.
    @functools.cached_property
    def train_step(self):
        step = make_train_step(self.graphdef, self.model_cfg, self.optimizer, self.schedule,
                               self.mesh, self.rules,
                               grad_accum_steps=self.config.grad_accum_steps,
                               seed=self.config.seed)
        return jax.jit(step, in_shardings=(self.state_shardings, self.batch_sharding),
                       out_shardings=(self.state_shardings, None), donate_argnums=0)

    @functools.cached_property
    def eval_step(self):
        step = make_eval_step(self.graphdef, self.model_cfg, self.mesh, self.rules)
        return jax.jit(step, in_shardings=(self.state_shardings.params, self.batch_sharding))

    # Data.
    def train_source(self) -> TrainBatches:
        return TrainBatches(self.data.train, self.config.seq_len, self.config.batch_size,
                            self.config.seed, jax.process_index(), jax.process_count())

    def eval_source(self, tokens: np.ndarray | None = None) -> EvalBatches:
        tokens = self.data.val if tokens is None else tokens
        return EvalBatches(tokens, self.config.seq_len, self.config.eval_batch_size,
                           jax.process_index(), jax.process_count(),
                           self.config.eval_max_batches)

    def to_global(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows -> global arrays sharded over the batch axes."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
                for k, v in local_batch.items()}


def _check_batch(config: Any, mesh: Mesh, rules: Rules) -> None:
    dp = mesh_axes_size(mesh, "act_batch", rules)
    micro = config.batch_size // config.grad_accum_steps
    if micro % dp:
        what = "batch_size" if config.grad_accum_steps == 1 else \
            f"batch_size / grad_accum_steps = {micro}"
        raise ConfigError("batch_size", f"{what} is not divisible by the data-parallel size "
                                        f"{dp} (mesh data x fsdp)")
    if config.eval_batch_size % dp:
        raise ConfigError("eval_batch_size", f"{config.eval_batch_size} is not divisible by "
                                             f"the data-parallel size {dp}")
