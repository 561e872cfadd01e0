"""A frozen teacher for distillation: a finished run of this codebase, restored with its
own saved config (depth, width, heads, rules may differ from the student's).

The teacher's parameters are not part of the train state: they have no optimizer state,
are not saved in the student's checkpoints, and are restored from the teacher's own
workdir on every (re)start, through its `Checkpointer` (params only). They are sharded
on the student's mesh by the teacher's own logical rules and passed to the jitted train
step as an extra, non-donated argument; the teacher's forward pass runs inside that
step, under `stop_gradient`.

The same mechanism gives a preference objective (DPO) its frozen reference model
(`load_reference`): `loss.dpo.reference_workdir`, by default the run the policy starts
from (`init.from_workdir`); a LoRA run's reference is its own base with the adapters
off (`LoraBase`), computed from the train state, so it costs no second copy of the weights.
"""

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Config, Distill
from jaxlm.data.tokenizers import Tokenizer
from jaxlm.losses.objectives import split_objective_params
from jaxlm.models.config import ModelConfig
from jaxlm.models.lora import join_trees, split_adapters
from jaxlm.models.model import abstract_params
from jaxlm.models.transformer import Output
from jaxlm.parallel.sharding import Rules, constrain, tree_shardings, use_rules
from jaxlm.training import rundir
from jaxlm.training.checkpoint import Checkpointer
from jaxlm.training.state import abstract_with_shardings

KEY = "loss.distill.teacher_workdir"
REFERENCE_KEY = "loss.dpo.reference_workdir"


@dataclasses.dataclass
class Teacher:
    workdir: Path
    step: int
    config: Config  # the teacher run's own config
    tokenizer: Tokenizer
    model_cfg: ModelConfig
    graphdef: nnx.GraphDef
    mesh: Mesh
    rules: Rules  # the teacher's logical rules on the student's mesh (length split: student's)
    param_axes: Any  # logical PartitionSpecs of the parameters
    shardings: Any  # NamedShardings of the parameters
    abstract_params: Any  # ShapeDtypeStructs with shardings
    key: str = KEY  # the config key that named this run (for errors)
    role: str = "teacher"  # "teacher" (distillation) or "reference" (DPO)
    from_state = False  # its parameters are a third argument of the train step

    @classmethod
    def load(cls, distill: Distill, mesh: Mesh, student_rules: Rules = (),
             context_attention: str = "ring") -> "Teacher":
        """Find the teacher run and its checkpoint; loads no weights (`check_layout` checks
        its vocabulary and layout against the student's).

        The teacher reads the student's batches, so it splits the sequence as the student's
        rules do (`act_len`, the order of the tokens) and attends across the split by the
        student's `context_attention`."""
        return cls.from_run(distill.teacher_workdir, distill.teacher_step, mesh,
                            student_rules, context_attention)

    @classmethod
    def from_run(cls, path: str, step: int, mesh: Mesh, student_rules: Rules = (),
                 context_attention: str = "ring", *, key: str = KEY,
                 step_key: str = "loss.distill.teacher_step", role: str = "teacher"
                 ) -> "Teacher":
        """The frozen run at `path` (checkpoint `step`, 0 = latest), named by `key`."""
        workdir = Path(path).absolute()
        if not workdir.is_dir():
            raise ConfigError(key, f"no such directory: {path}")
        tconfig = rundir.load_config(workdir, key=key)
        if tconfig.lora.rank:
            raise ConfigError(key, f"{path} is a LoRA run; use a merged copy as the {role} "
                                   "(python convert.py --merge_lora --workdir=RUN "
                                   "--output=NEW)")
        if tconfig.quant.ptq:
            raise ConfigError(key, f"{path} is a quantized run (eval.py --save); use the "
                                   f"float run it came from as the {role}")
        with Checkpointer(rundir.checkpoint_dir(workdir), read_only=True) as ckpt:
            steps = ckpt.all_steps()
        step = rundir.pick_step(steps, step or None, path, key=step_key, workdir_key=key)
        tdata = rundir.load_data(tconfig, workdir, key=key)
        model = tconfig.model.model_copy(update={"dropout": 0.0,
                                                 "context_attention": context_attention})
        model_cfg = ModelConfig.from_section(model, tdata.vocab_size, quant=tconfig.quant,
                                             seq_len=tconfig.train.seq_len)
        graphdef, abstract, axes = abstract_params(model_cfg)
        student_len = [rule for rule in student_rules if rule[0] == "act_len"][:1]
        rules = tuple(student_len) + tuple(tconfig.sharding.rules)  # the first rule wins
        shardings = tree_shardings(mesh, axes, rules)
        return cls(workdir=workdir, step=step, config=tconfig, tokenizer=tdata.tokenizer,
                   model_cfg=model_cfg, graphdef=graphdef, mesh=mesh, rules=rules,
                   param_axes=axes, shardings=shardings,
                   abstract_params=abstract_with_shardings(abstract, shardings), key=key,
                   role=role)

    def restore(self) -> Any:
        """The parameters only (not the optimizer state), sharded on the student's mesh."""
        with Checkpointer(rundir.checkpoint_dir(self.workdir), read_only=True) as ckpt:
            return ckpt.restore_params(self.step, self.abstract_params)

    def forward(self, params: Any, batch: dict[str, jax.Array], *, return_hidden: bool
                ) -> Output:
        """The teacher's logits (and block outputs), with no gradient to anything."""
        return frozen_forward(self.graphdef, self.mesh, self.rules, params, batch,
                              return_hidden=return_hidden)


@dataclasses.dataclass
class LoraBase:
    """A LoRA run's own base model with the adapters off: its DPO reference. It reads the
    train state's parameters (`from_state`), so the base is not held twice."""
    graphdef: nnx.GraphDef  # the run's own
    mesh: Mesh
    rules: Rules
    from_state = True

    def forward(self, params: Any, batch: dict[str, jax.Array], *, return_hidden: bool
                ) -> Output:
        """The base's outputs: every adapter zeroed, so `x A B` adds exactly 0."""
        model_params, _ = split_objective_params(params)
        adapters, base = split_adapters(model_params)
        off = jax.tree.map(jnp.zeros_like, adapters)
        return frozen_forward(self.graphdef, self.mesh, self.rules, join_trees(off, base),
                              batch, return_hidden=return_hidden)


def frozen_forward(graphdef: nnx.GraphDef, mesh: Mesh, rules: Rules, params: Any,
                   batch: dict[str, jax.Array], *, return_hidden: bool) -> Output:
    """A frozen model's outputs (eval mode), with no gradient to anything."""
    params = jax.lax.stop_gradient(params)
    with use_rules(mesh, rules):
        model = nnx.merge(graphdef, params)
        tokens = constrain(batch["inputs"], ("act_batch", "act_len"))
        out = model(tokens, positions_BxL=batch.get("positions"),
                    segment_ids_BxL=batch.get("segment_ids"), return_hidden=return_hidden)
    return jax.tree.map(jax.lax.stop_gradient, out._replace(cache=None))


def load_reference(config: Config, mesh: Mesh, rules: Rules, graphdef: nnx.GraphDef
                   ) -> "Teacher | LoraBase":
    """A preference objective's frozen reference: `loss.dpo.reference_workdir`, else a
    LoRA run's own base, else the run the policy starts from (`init.from_workdir`)."""
    dpo, attention = config.loss.dpo, config.model.context_attention
    if dpo.reference_workdir:
        return Teacher.from_run(dpo.reference_workdir, dpo.reference_step, mesh, rules,
                                attention, key=REFERENCE_KEY,
                                step_key="loss.dpo.reference_step", role="reference")
    if config.lora.rank:
        return LoraBase(graphdef, mesh, rules)
    return Teacher.from_run(config.init.from_workdir, config.init.step, mesh, rules, attention,
                            key="init.from_workdir", step_key="init.step", role="reference")
