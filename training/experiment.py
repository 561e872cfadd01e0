"""Assemble a run from its config: mesh, data, model, optimizer, shardings and jitted steps.

`Experiment.build` resolves the config into typed sections (`configs/sections.py`), loads
the data and the teacher, builds the model from abstract shapes, and runs `check_layout`
(`training/layout.py`) before anything is compiled; bad input raises ConfigError with the
key to change.
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

from jaxlm.configs.sections import Config
from jaxlm.data.mixture import Mixture, resolve_sources
from jaxlm.data.packing import (eval_sources, pair_eval_batches, resolve_packing,
                                split_row_info, train_batches)
from jaxlm.data.pipeline import Batch, EvalBatches, TokenData
from jaxlm.losses.objectives import (OBJECTIVE_PARAMS, Objective, build_objective,
                                     needs_reference, needs_teacher)
from jaxlm.models.config import ModelConfig
from jaxlm.models.model import abstract_model, param_logical_axes, split_params
from jaxlm.models.prune import Pruning, pruning_for
from jaxlm.parallel.mesh import make_mesh
from jaxlm.parallel.pipeline import bubble_fraction, stage_major_permutation
from jaxlm.parallel.sharding import Rules, named_sharding
from jaxlm.training import lora
from jaxlm.training.layout import check_layout, pipeline_fields, resolve_mesh_shape
from jaxlm.training.optimizer import learning_rate_schedule, make_optimizer
from jaxlm.training.state import (TrainState, abstract_with_shardings, init_sharded, make_init_fn,
                                  state_logical_axes, state_shardings)
from jaxlm.training.steps import (make_eval_step, make_pair_eval_step, make_train_step,
                                  with_pruning)
from jaxlm.training.teacher import LoraBase, Teacher, load_reference

BATCH_AXES = ("act_batch", "act_len")
# Training windows are one segment at positions 0..L-1 with every weight 1: the model's and
# the loss's defaults. Those keys stay on the host, so the step of unpacked windows is
# the program without segment, position and weight inputs (sending them changes XLA's
# fusions and the float rounding).
WINDOW_DEFAULT_KEYS = ("segment_ids", "positions", "weights")


@dataclasses.dataclass
class Experiment:
    config: Config
    workdir: str
    mesh: Mesh
    rules: Rules
    data: Mixture
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
    # For objective terms that distil from a teacher run or compare with a reference model.
    teacher: Teacher | LoraBase | None = None
    # LoRA (training/lora.py): params -> (trainable, frozen base); None = all train.
    trainable: Any = None
    prepare: Any = None  # fresh float params -> the state's (a QLoRA base as integers)
    pruning: Pruning | None = None  # masks in the state (models/prune.py); None = off

    @classmethod
    def build(cls, config: Any, workdir: str | os.PathLike,
              devices: list[jax.Device] | None = None) -> "Experiment":
        """`config`: a Config, or a ConfigDict (resolved here, once)."""
        config = Config.from_dict(config)
        devices = list(jax.devices() if devices is None else devices)
        mesh = make_mesh(resolve_mesh_shape(config.mesh, len(devices)), devices)
        rules = config.sharding.rules
        data = resolve_sources(config.data, workdir)
        teacher = Teacher.load(config.loss.distill, mesh, rules,
                               config.model.context_attention) if needs_teacher(config) else None
        model_cfg = ModelConfig.from_section(config.model, data.vocab_size, quant=config.quant,
                                             lora=config.lora, seq_len=config.train.seq_len,
                                             **pipeline_fields(config, mesh))
        model = abstract_model(model_cfg)
        graphdef, params = split_params(model)
        if needs_reference(config):
            teacher = load_reference(config, mesh, rules, graphdef)
        params, param_axes, prepare = lora.base_format(config, model, params,
                                                       param_logical_axes(model))
        check_layout(config, mesh, data, model_cfg, params, param_axes, teacher)
        objective = build_objective(config, model_cfg, getattr(teacher, "model_cfg", None))
        if objective.param_axes() is not None:
            param_axes = {**param_axes, OBJECTIVE_PARAMS: objective.param_axes()}
        trainable = lora.split_trainable if lora.enabled(config) else None
        if config.quant.ptq:  # a quantized run's weights do not train: no optimizer state
            optimizer = optax.set_to_zero()
        else:
            optimizer = make_optimizer(config.updates, config.optimizer, config.train.steps,
                                       trainable(param_axes)[0] if trainable else param_axes)
        pruning = pruning_for(config.prune, model)
        init_fn = make_init_fn(model_cfg, optimizer, config.train.seed, objective.init_params,
                               trainable, prepare, pruning and pruning.initial_masks)
        abstract = jax.eval_shape(init_fn)
        logical = state_logical_axes(abstract, param_axes)
        shardings = state_shardings(mesh, logical, rules)
        perm = None
        if model_cfg.pipeline_stages > 1 and model_cfg.pipeline_repeats > 1:
            perm = stage_major_permutation(model_cfg.num_units, model_cfg.pipeline_stages,
                                           model_cfg.pipeline_repeats)
        return cls(config=config, workdir=str(workdir), mesh=mesh, rules=rules, data=data,
                   model_cfg=model_cfg, graphdef=graphdef, optimizer=optimizer,
                   schedule=learning_rate_schedule(config.updates, config.train.steps),
                   abstract_state=abstract_with_shardings(abstract, shardings),
                   state_shardings=shardings, state_logical=logical,
                   batch_sharding=named_sharding(mesh, BATCH_AXES, rules), layer_perm=perm,
                   objective=objective, teacher=teacher, trainable=trainable, prepare=prepare,
                   pruning=pruning)

    # State.
    def init_state(self) -> TrainState:
        """Initialise sharded; identical values for every mesh (layers in memory order)."""
        init_fn = make_init_fn(self.model_cfg, self.optimizer, self.config.train.seed,
                               self.objective and self.objective.init_params, self.trainable,
                               self.prepare, self.pruning and self.pruning.initial_masks)
        if self.layer_perm is not None:
            perm = self.layer_perm
            natural = init_fn
            init_fn = lambda: self._permute_layers(natural(), perm)  # noqa: E731
        return init_sharded(init_fn, self.state_shardings)

    @functools.cached_property
    def teacher_params(self) -> Any:
        """The teacher's parameters, restored from its own run on first use (None without a
        teacher, or for one that reads the train state)."""
        if self.teacher is None or self.teacher.from_state:
            return None
        return self.teacher.restore()

    def _permute_layers(self, state: TrainState, index: np.ndarray) -> TrainState:
        """Reorder the `layers` axis of every leaf that has one: out[i] = state[index[i]]."""
        def take(leaf, spec):
            if "layers" not in tuple(spec):
                return leaf
            return jax.numpy.take(leaf, index, axis=tuple(spec).index("layers"))
        return jax.tree.map(take, state, self.state_logical,
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))

    @property
    def checkpoint_abstract(self) -> TrainState:
        """The abstract state as checkpoints hold it (a LoRA run's: without its base)."""
        if self.trainable is None:
            return self.abstract_state
        return self.abstract_state.replace(params=self.trainable(self.abstract_state.params)[0])

    def to_checkpoint(self, state: TrainState) -> TrainState:
        """The state with layers in the natural order and without a LoRA run's frozen base
        (what checkpoints hold)."""
        if self.trainable is not None:  # LoRA runs have no pipeline: no layer order
            return state.replace(params=self.trainable(state.params)[0])
        if self.layer_perm is None:
            return state
        inverse = np.argsort(self.layer_perm)
        return jax.jit(lambda s: self._permute_layers(s, inverse),
                       out_shardings=self.state_shardings)(state)

    def from_checkpoint(self, state: TrainState) -> TrainState:
        """Inverse of `to_checkpoint`: layers back into this mesh's memory order, a LoRA
        run's frozen base (stored once in the run) attached."""
        if self.trainable is not None:
            return state.replace(params=lora.join(state.params, self.frozen_params))
        if self.layer_perm is None:
            return state
        perm = self.layer_perm
        return jax.jit(lambda s: self._permute_layers(s, perm),
                       out_shardings=self.state_shardings)(state)

    @functools.cached_property
    def frozen_params(self) -> Any:
        """A LoRA run's frozen base, restored from the run directory on first use."""
        return lora.restore_base(self.workdir, self.trainable(self.abstract_state.params)[1])

    def save_base(self, state: TrainState, source: dict[str, Any]) -> None:
        """Store a LoRA run's frozen base once in the run directory (training/lora.py)."""
        frozen = self.trainable(state.params)[1]
        lora.save_base(self.workdir, frozen, source)
        self.frozen_params = frozen

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
                               grad_accum_steps=self.config.train.grad_accum_steps,
                               seed=self.config.train.seed, objective=self.objective,
                               teacher=self.teacher,
                               skip_nonfinite=self.config.train.nan_policy == "skip",
                               trainable=self.trainable)
        step = step if self.pruning is None else with_pruning(step, self.pruning)
        if self.teacher is None or self.teacher.from_state:
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

    @functools.cached_property
    def pair_eval_step(self):
        """eval_step(params, batch) -> the sums of a per-pair objective (DPO, reward)."""
        step = make_pair_eval_step(self.graphdef, self.model_cfg, self.mesh, self.rules,
                                   self.objective, self.teacher)
        shardings = (self.state_shardings.params, self.batch_sharding)
        if self.teacher is None or self.teacher.from_state:
            return jax.jit(step, in_shardings=shardings)
        jitted = jax.jit(step, in_shardings=(*shardings, self.teacher.shardings))
        return _WithTeacher(jitted, lambda: self.teacher_params)

    # Data.
    def pair_eval_batches(self) -> Any:
        """The validation split of a preference set, in batches of whole pairs (the last
        padded), this process's rows of each."""
        train = self.config.train
        return pair_eval_batches(self.data.sources[0], seq_len=train.seq_len,
                                 global_batch=train.eval_batch_size,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())

    @property
    def packing(self) -> str:
        """`data.packing`, or `documents` for SFT data (data/packing.py resolve_packing)."""
        return resolve_packing(self.config.data.packing, self.data)

    def train_batches(self) -> Any:
        """This process's rows of every training batch: a checkpointable grain iterator
        (windows or packed documents of the run's sources; data/packing.py)."""
        train, data = self.config.train, self.config.data
        return train_batches(self.data, seq_len=train.seq_len, global_batch=train.batch_size,
                             seed=train.seed, packing=data.packing,
                             process_index=jax.process_index(),
                             process_count=jax.process_count(), prefetch=data.prefetch)

    def eval_sources(self, data: TokenData | np.ndarray | None = None) -> dict[str, Any]:
        """{source name: evaluation batches} covering every target once, with
        `target_bytes`: the run's validation split(s) (one per mixture source), another
        prepared set's, or the tokens of a text (windows)."""
        train = self.config.train
        kw = dict(seq_len=train.seq_len, global_batch=train.eval_batch_size,
                  process_index=jax.process_index(), process_count=jax.process_count(),
                  max_batches=train.eval_max_batches)
        if isinstance(data, np.ndarray):
            return {"text": EvalBatches(data, token_bytes=self.data.token_bytes, **kw)}
        return eval_sources(self.data if data is None else Mixture.of_set(data),
                            packing=self.config.data.packing, **kw)

    def to_device(self, batch: Batch, *, train: bool = False
                  ) -> tuple[dict[str, jax.Array], Batch]:
        """(the model's keys as global arrays, the host-side keys: `source`,
        `target_bytes`, `tokens_seen`). For training windows the keys equal to the
        defaults (WINDOW_DEFAULT_KEYS) stay on the host too."""
        model, host = split_row_info(batch)
        if train and self.packing == "windows":
            model = {k: v for k, v in model.items() if k not in WINDOW_DEFAULT_KEYS}
        return self.to_global(model), host

    def to_global(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows -> global arrays sharded over the batch axes."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
                for k, v in local_batch.items()}


class _WithTeacher:
    """train_step(state, batch) for a step whose third argument is the teacher's params."""

    def __init__(self, jitted: Any, teacher_params: Any):
        self.jitted, self.teacher_params = jitted, teacher_params

    def __call__(self, state: TrainState, batch: dict[str, jax.Array]):
        return self.jitted(state, batch, self.teacher_params())

    def lower(self, state: TrainState, batch: dict[str, jax.Array]):
        return self.jitted.lower(state, batch, self.teacher_params())
