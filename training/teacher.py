"""A frozen teacher for distillation: a finished run of this codebase, restored with its
own saved config (depth, width, heads, rules may differ from the student's).

The teacher's parameters are not part of the train state: they have no optimizer state,
are not saved in the student's checkpoints, and are restored from the teacher's own
workdir on every (re)start, through its `Checkpointer` (params only). They are sharded
on the student's mesh by the teacher's own logical rules and passed to the jitted train
step as an extra, non-donated argument; the teacher's forward pass runs inside that
step, under `stop_gradient`.
"""

import dataclasses
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Config, Distill
from jaxlm.data.tokenizers import Tokenizer
from jaxlm.models.config import ModelConfig
from jaxlm.models.model import abstract_params
from jaxlm.models.transformer import Output
from jaxlm.parallel.sharding import Rules, constrain, tree_shardings, use_rules
from jaxlm.training import rundir
from jaxlm.training.checkpoint import Checkpointer
from jaxlm.training.state import abstract_with_shardings

KEY = "loss.distill.teacher_workdir"


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

    @classmethod
    def load(cls, distill: Distill, mesh: Mesh, student_rules: Rules = (),
             context_attention: str = "ring") -> "Teacher":
        """Find the teacher run and its checkpoint; loads no weights (`check_layout` checks
        its vocabulary and layout against the student's).

        The teacher reads the student's batches, so it splits the sequence as the student's
        rules do (`act_len`, the order of the tokens) and attends across the split by the
        student's `context_attention`."""
        workdir = Path(distill.teacher_workdir).absolute()
        if not workdir.is_dir():
            raise ConfigError(KEY, f"no such directory: {distill.teacher_workdir}")
        tconfig = rundir.load_config(workdir, key=KEY)
        if tconfig.lora.rank:
            raise ConfigError(KEY, f"{distill.teacher_workdir} is a LoRA run; teach from a "
                                   "merged copy (python convert.py --merge_lora "
                                   "--workdir=RUN --output=NEW)")
        with Checkpointer(rundir.checkpoint_dir(workdir), read_only=True) as ckpt:
            steps = ckpt.all_steps()
        step = rundir.pick_step(steps, distill.teacher_step or None, distill.teacher_workdir,
                                key="loss.distill.teacher_step", workdir_key=KEY)
        tdata = rundir.load_data(tconfig, workdir, key=KEY)
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
                   abstract_params=abstract_with_shardings(abstract, shardings))

    def restore(self) -> Any:
        """The parameters only (not the optimizer state), sharded on the student's mesh."""
        with Checkpointer(rundir.checkpoint_dir(self.workdir), read_only=True) as ckpt:
            return ckpt.restore_params(self.step, self.abstract_params)

    def forward(self, params: Any, batch: dict[str, jax.Array], *, return_hidden: bool
                ) -> Output:
        """The teacher's logits (and block outputs), with no gradient to anything."""
        params = jax.lax.stop_gradient(params)
        with use_rules(self.mesh, self.rules):
            model = nnx.merge(self.graphdef, params)
            tokens = constrain(batch["inputs"], ("act_batch", "act_len"))
            out = model(tokens, positions_BxL=batch.get("positions"),
                        segment_ids_BxL=batch.get("segment_ids"), return_hidden=return_hidden)
        return jax.tree.map(jax.lax.stop_gradient, out._replace(cache=None))
