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
from losses.objectives import OBJECTIVE_PARAMS, Objective, build_objective, needs_teacher
from models import ModelConfig, abstract_model, param_logical_axes, split_params
from models.attention import check_attention_impl
from models.quant import QuantConfig
from parallel.mesh import make_mesh
from parallel.pipeline import bubble_fraction, stage_major_permutation
from parallel.sharding import (Rules, check_divisible, mesh_axes_of, mesh_axes_size,
                               named_sharding)
from training.optimizer import learning_rate_schedule, make_optimizer
from training.state import (TrainState, abstract_with_shardings, init_sharded, make_init_fn,
                            state_logical_axes, state_shardings)
from training.steps import make_eval_step, make_train_step
from training.teacher import Teacher

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
    state_logical: TrainState
    batch_sharding: NamedSharding
    # Circular pipelines keep layers in stage-major order in memory: perm[i] is the model
    # layer at position i. Checkpoints always hold the natural order.
    layer_perm: np.ndarray | None = None
    objective: Objective | None = None  # None = cross-entropy alone
    teacher: Teacher | None = None  # for objective terms that distil from a teacher run

    @classmethod
    def build(cls, config: Any, workdir: str | os.PathLike,
              devices: list[jax.Device] | None = None) -> "Experiment":
        validate_config(config)
        mesh = make_mesh(config.mesh, devices)
        check_attention_impl(config.model.attention_impl, mesh.devices.flat[0].platform)
        rules = tuple((k, tuple(v) if isinstance(v, list) else v)
                      for k, v in config.sharding.rules)
        _check_batch(config, mesh, rules)
        pipeline = _check_pipeline(config, mesh, rules)
        data = resolve_data(config.data, workdir)
        check_lengths(data, config.seq_len)
        if config.model.vocab_size and config.model.vocab_size < data.vocab_size:
            raise ConfigError("model.vocab_size", f"{config.model.vocab_size} is smaller than "
                                                  f"the data's vocabulary {data.vocab_size}")
        model_cfg = ModelConfig.from_config(config.model, data.vocab_size,
                                            quant=QuantConfig.from_config(config.quant),
                                            **pipeline)
        teacher = Teacher.load(config, data, model_cfg, mesh) if needs_teacher(config) else None
        model = abstract_model(model_cfg)
        graphdef, abstract_params = split_params(model)
        param_axes = param_logical_axes(model)
        _check_model_split(config, mesh, rules)
        check_divisible(abstract_params, param_axes, mesh, rules)
        objective = build_objective(config, model_cfg, teacher and teacher.model_cfg)
        if objective.param_axes() is not None:
            param_axes = {**param_axes, OBJECTIVE_PARAMS: objective.param_axes()}
            abstract_params = {**abstract_params, OBJECTIVE_PARAMS: jax.eval_shape(
                objective.init_params, jax.random.key(0))}
            check_divisible(abstract_params, param_axes, mesh, rules)
        optimizer = make_optimizer(config, param_axes)
        init_fn = make_init_fn(model_cfg, optimizer, config.seed, objective.init_params)
        abstract = jax.eval_shape(init_fn)
        logical = state_logical_axes(optimizer, abstract, param_axes)
        shardings = state_shardings(mesh, logical, rules)
        perm = None
        if model_cfg.pipeline_stages > 1 and model_cfg.pipeline_repeats > 1:
            perm = stage_major_permutation(model_cfg.num_units, model_cfg.pipeline_stages,
                                           model_cfg.pipeline_repeats)
        return cls(config=config, workdir=str(workdir), mesh=mesh, rules=rules, data=data,
                   model_cfg=model_cfg, graphdef=graphdef, optimizer=optimizer,
                   schedule=learning_rate_schedule(config),
                   abstract_state=abstract_with_shardings(abstract, shardings),
                   state_shardings=shardings, state_logical=logical,
                   batch_sharding=named_sharding(mesh, BATCH_AXES, rules), layer_perm=perm,
                   objective=objective, teacher=teacher)

    # State.
    def init_state(self) -> TrainState:
        """Initialise sharded; identical values for every mesh (layers in memory order)."""
        init_fn = make_init_fn(self.model_cfg, self.optimizer, self.config.seed,
                               self.objective and self.objective.init_params)
        if self.layer_perm is not None:
            perm = self.layer_perm
            natural = init_fn
            init_fn = lambda: self._permute_layers(natural(), perm)  # noqa: E731
        return init_sharded(init_fn, self.state_shardings)

    @functools.cached_property
    def teacher_params(self) -> Any:
        """The teacher's parameters, restored from its own run on first use (or None)."""
        return None if self.teacher is None else self.teacher.restore()

    def _permute_layers(self, state: TrainState, index: np.ndarray) -> TrainState:
        """Reorder the `layers` axis of every leaf that has one: out[i] = state[index[i]]."""
        def take(leaf, spec):
            if "layers" not in tuple(spec):
                return leaf
            return jax.numpy.take(leaf, index, axis=tuple(spec).index("layers"))
        return jax.tree.map(take, state, self.state_logical,
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))

    def to_checkpoint(self, state: TrainState) -> TrainState:
        """The state with layers in the natural order (what checkpoints hold)."""
        if self.layer_perm is None:
            return state
        inverse = np.argsort(self.layer_perm)
        return jax.jit(lambda s: self._permute_layers(s, inverse),
                       out_shardings=self.state_shardings)(state)

    def from_checkpoint(self, state: TrainState) -> TrainState:
        """Inverse of `to_checkpoint`: layers back into this mesh's memory order."""
        if self.layer_perm is None:
            return state
        perm = self.layer_perm
        return jax.jit(lambda s: self._permute_layers(s, perm),
                       out_shardings=self.state_shardings)(state)

    def describe_pipeline(self) -> str | None:
        c = self.model_cfg
        if c.pipeline_stages == 1:
            return None
        kind = "circular" if c.pipeline_repeats > 1 else "GPipe"
        bubble = bubble_fraction(c.pipeline_stages, c.pipeline_microbatches,
                                 c.pipeline_repeats)
        return (f"Pipeline: {kind}, {c.pipeline_stages} stages x {c.pipeline_repeats} "
                f"repeats, {c.pipeline_microbatches} micro-batches, "
                f"{c.pipeline_microbatches * c.pipeline_repeats + c.pipeline_stages - 1} "
                f"iterations; theoretical bubble {bubble:.1%}.")

    # Steps.
    @functools.cached_property
    def train_step(self):
        step = make_train_step(self.graphdef, self.model_cfg, self.optimizer, self.schedule,
                               self.mesh, self.rules,
                               grad_accum_steps=self.config.grad_accum_steps,
                               seed=self.config.seed, objective=self.objective,
                               teacher=self.teacher)
        if self.teacher is None:
            return jax.jit(step, in_shardings=(self.state_shardings, self.batch_sharding),
                           out_shardings=(self.state_shardings, None), donate_argnums=0)
        # The teacher's parameters are an extra argument: sharded, never donated.
        jitted = jax.jit(step, in_shardings=(self.state_shardings, self.batch_sharding,
                                             self.teacher.shardings),
                         out_shardings=(self.state_shardings, None), donate_argnums=0)
        return _WithTeacher(jitted, lambda: self.teacher_params)

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


def _check_pipeline(config: Any, mesh: Mesh, rules: Rules) -> dict[str, int]:
    """ModelConfig fields for the pipeline, after checking the schedule fits the batch."""
    stages = mesh.shape["pipeline"]
    if stages == 1:
        return {}
    repeats = config.pipeline_repeats
    micro = config.pipeline_microbatches or stages
    layers = config.model.num_layers
    moe = config.model.moe
    if moe.num_experts and moe.every > 1:
        layers //= moe.every  # the pipeline splits scanned units of `every` layers
    if not config.model.scan_layers:
        raise ConfigError("model.scan_layers", "pipeline parallelism needs scanned layers "
                                               "(model.scan_layers=True)")
    if layers % (stages * repeats):
        raise ConfigError("model.num_layers", f"{layers} scanned layers are not divisible "
                                              f"by pipeline stages x repeats = {stages} x "
                                              f"{repeats}")
    if repeats > 1 and micro < stages:
        raise ConfigError("pipeline_microbatches", f"the circular schedule needs at least "
                                                   f"as many micro-batches as stages "
                                                   f"({micro} < {stages})")
    dp = mesh_axes_size(mesh, "act_batch", rules)
    for key, batch in (("batch_size", config.batch_size // config.grad_accum_steps),
                       ("eval_batch_size", config.eval_batch_size)):
        if batch % micro or (batch // micro) % dp:
            raise ConfigError("pipeline_microbatches",
                              f"{micro} micro-batches do not split {key} {batch} into "
                              f"micro-batches divisible by the data-parallel size {dp}")
    return {"pipeline_stages": stages, "pipeline_microbatches": micro,
            "pipeline_repeats": repeats}


def _check_model_split(config: Any, mesh: Mesh, rules: Rules) -> None:
    """Tensor-parallel sizes must divide heads, KV heads and d_ff (KV heads are not
    replicated: with fewer KV heads than tensor shards, the config is rejected), and the
    expert-parallel size must divide the number of experts."""
    checks = [("model.num_heads", "heads"), ("model.num_kv_heads", "kv_heads"),
              ("model.d_ff", "mlp")]
    if config.model.moe.num_experts:
        checks.append(("model.moe.num_experts", "experts"))
    for key, axis in checks:
        node = config
        for part in key.split("."):
            node = node[part]
        value = node
        shards = mesh_axes_size(mesh, axis, rules)
        if value % shards:
            raise ConfigError(key, f"{value} is not divisible by the {shards} shards of "
                                   f"logical axis {axis!r} (mesh tensor={mesh.shape['tensor']}, "
                                   f"expert={mesh.shape['expert']})")


class _WithTeacher:
    """train_step(state, batch) for a step whose third argument is the teacher's params."""

    def __init__(self, jitted: Any, teacher_params: Any):
        self.jitted, self.teacher_params = jitted, teacher_params

    def __call__(self, state: TrainState, batch: dict[str, jax.Array]):
        return self.jitted(state, batch, self.teacher_params())

    def lower(self, state: TrainState, batch: dict[str, jax.Array]):
        return self.jitted.lower(state, batch, self.teacher_params())


def _check_batch(config: Any, mesh: Mesh, rules: Rules) -> None:
    dp = mesh_axes_size(mesh, "act_batch", rules)
    micro = config.batch_size // config.grad_accum_steps
    if micro % dp:
        what = "batch_size" if config.grad_accum_steps == 1 else \
            f"batch_size / grad_accum_steps = {micro}"
        axes = " x ".join(mesh_axes_of("act_batch", rules))
        raise ConfigError("batch_size", f"{what} is not divisible by the data-parallel size "
                                        f"{dp} (mesh {axes}, the axes of act_batch)")
    if config.eval_batch_size % dp:
        raise ConfigError("eval_batch_size", f"{config.eval_batch_size} is not divisible by "
                                             f"the data-parallel size {dp}")
