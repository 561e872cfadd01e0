"""A frozen teacher for distillation: a finished run of this codebase, restored with its
own saved config (depth, width, heads, rules may differ from the student's).

The teacher's parameters are not part of the train state: they have no optimizer state,
are not saved in the student's checkpoints, and are restored from the teacher's own
workdir on every (re)start. They are sharded on the student's mesh by the teacher's own
logical rules and passed to the jitted train step as an extra, non-donated argument; the
teacher's forward pass runs inside that step, under `stop_gradient`.
"""

import dataclasses
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from configs.errors import ConfigError
from data.pipeline import TokenData, is_prepared
from models import ModelConfig, Output, abstract_model, param_logical_axes, split_params
from models.quant import QuantConfig
from parallel.sharding import Rules, check_divisible, constrain, tree_shardings, use_rules
from training.checkpoint import Checkpointer

KEY = "loss.distill.teacher_workdir"


def _rules(config: Any) -> Rules:
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.sharding.rules)


def _teacher_data(config: Any, workdir: Path) -> TokenData:
    path = Path(config.data.path) if config.data.path else None
    directory = path if path is not None and is_prepared(path) else workdir / "data"
    try:
        return TokenData.load(directory)
    except ConfigError as e:
        raise ConfigError(KEY, f"cannot read the teacher's tokenizer: {e}") from None


@dataclasses.dataclass
class Teacher:
    workdir: Path
    step: int
    config: ConfigDict  # the teacher run's own config
    model_cfg: ModelConfig
    graphdef: nnx.GraphDef
    mesh: Mesh
    rules: Rules  # the teacher's logical rules, on the student's mesh
    shardings: Any  # NamedShardings of the parameters
    abstract_params: Any  # ShapeDtypeStructs with shardings

    @classmethod
    def load(cls, config: Any, student_data: TokenData, student_model: ModelConfig,
             mesh: Mesh) -> "Teacher":
        """Check the teacher run (files, vocabulary, layout on `mesh`); loads no weights."""
        from training.evaluate import load_run_config  # noqa: PLC0415 (import cycle)
        d = config.loss.distill
        workdir = Path(d.teacher_workdir).absolute()
        if not workdir.is_dir():
            raise ConfigError(KEY, f"no such directory: {d.teacher_workdir}")
        try:
            tconfig = load_run_config(workdir)
        except ConfigError:
            raise ConfigError(KEY, f"{d.teacher_workdir} is not a training run "
                                   "(no config.json)") from None
        ckpt = Checkpointer(workdir / "checkpoints", read_only=True) \
            if (workdir / "checkpoints").is_dir() else None
        steps = ckpt.all_steps() if ckpt else []
        if ckpt:
            ckpt.close()
        if not steps:
            raise ConfigError(KEY, f"{d.teacher_workdir} has no checkpoints")
        step = d.teacher_step or steps[-1]
        if step not in steps:
            raise ConfigError("loss.distill.teacher_step", f"no checkpoint for step {step} in "
                                                           f"{d.teacher_workdir}; have {steps}")
        tdata = _teacher_data(tconfig, workdir)
        model_cfg = ModelConfig.from_config(tconfig.model, tdata.vocab_size)
        model_cfg = dataclasses.replace(
            model_cfg, dropout=0.0, quant=QuantConfig.from_config(tconfig.get("quant")))
        s_tok, t_tok = student_data.tokenizer.to_dict(), tdata.tokenizer.to_dict()
        if s_tok != t_tok or model_cfg.vocab_size != student_model.vocab_size:
            raise ConfigError(KEY, f"vocabulary mismatch: the teacher has "
                                   f"{model_cfg.vocab_size} tokens ({t_tok['kind']} tokenizer), "
                                   f"the student {student_model.vocab_size} "
                                   f"({s_tok['kind']} tokenizer); they must be the same")
        model = abstract_model(model_cfg)
        graphdef, abstract = split_params(model)
        axes = param_logical_axes(model)
        rules = _rules(tconfig)
        check_divisible(abstract, axes, mesh, rules, what="teacher parameter")
        shardings = tree_shardings(mesh, axes, rules)
        abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
            shardings)
        return cls(workdir=workdir, step=step, config=tconfig, model_cfg=model_cfg,
                   graphdef=graphdef, mesh=mesh, rules=rules, shardings=shardings,
                   abstract_params=abstract)

    def restore(self) -> Any:
        """The parameters only (not the optimizer state), sharded on the student's mesh."""
        path = self.workdir / "checkpoints" / str(self.step) / "state"
        item = {"params": self.abstract_params}
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), item)
        with ocp.PyTreeCheckpointer() as ckptr:
            out = ckptr.restore(path, args=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=True))
        return out["params"]

    def forward(self, params: Any, batch: dict[str, jax.Array], *, return_hidden: bool
                ) -> Output:
        """The teacher's logits (and block outputs), with no gradient to anything."""
        params = jax.lax.stop_gradient(params)
        with use_rules(self.mesh, self.rules):
            model = nnx.merge(self.graphdef, params)
            tokens = constrain(batch["inputs"], ("act_batch", "act_len"))
            out = model(tokens, segment_ids_BxL=batch.get("segment_ids"),
                        return_hidden=return_hidden)
        return jax.tree.map(jax.lax.stop_gradient, out._replace(cache=None))
