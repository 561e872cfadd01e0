"""Start a new run from another run's parameters (`init.from_workdir`, `init.step`).

The source is any run directory: trained here on any mesh, or imported from Hugging Face
with `convert.py`. Its model must be the new run's (the keys of `configs.sections.Model`,
except those in `Model.EXECUTION_KEYS`, and the resolved vocabulary). Only its parameters
are read (`Checkpointer.restore_params`), straight into the new run's shardings; the
optimizer starts fresh and the step is 0. `check_source` runs before anything compiles.
"""

import dataclasses
from pathlib import Path
from typing import Any

import jax

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Config
from jaxlm.data.tokenizers import Tokenizer, first_vocabulary_difference
from jaxlm.losses.objectives import split_objective_params
from jaxlm.models.config import ModelConfig, first_model_difference
from jaxlm.models.model import abstract_params
from jaxlm.parallel.sharding import tree_shardings
from jaxlm.training import lora, rundir
from jaxlm.training.checkpoint import Checkpointer
from jaxlm.training.experiment import Experiment
from jaxlm.training.state import TrainState, abstract_with_shardings, make_init_fn, make_state_fn

KEY = "init.from_workdir"


@dataclasses.dataclass(frozen=True)
class InitSource:
    """A checked source run: its directory and the checkpoint step to start from."""
    workdir: Path
    step: int


def check_source(config: Config, model_cfg: ModelConfig,
                 tokenizer: Tokenizer | None = None) -> InitSource:
    """The source run of `config.init`; ConfigError if it is missing, has no such step, its
    model differs from `model_cfg`'s (naming the first differing key) or its tokenizer
    from `tokenizer` (the new run's data's)."""
    init = config.init
    workdir = Path(init.from_workdir).absolute()
    if not workdir.is_dir():
        raise ConfigError(KEY, f"no such directory: {init.from_workdir}")
    source = rundir.load_config(workdir, key=KEY)
    if source.lora.rank:
        raise ConfigError(KEY, f"{init.from_workdir} is a LoRA run; start from a merged copy "
                               "(python convert.py --merge_lora --workdir=RUN --output=NEW)")
    diff = first_model_difference(config.model, source.model)
    if diff is not None:
        key, ours, theirs = diff
        raise ConfigError(KEY, f"model.{key} is {ours!r} here but {theirs!r} in "
                               f"{init.from_workdir}; the model must match")
    source_data = rundir.load_data(source, workdir, key=KEY)
    vocab = source_data.vocab_size
    difference = None if tokenizer is None else \
        first_vocabulary_difference(source_data.tokenizer, tokenizer)
    if difference is not None:
        raise ConfigError("data.tokenizer", f"the data's tokenizer is not the one "
                                            f"{init.from_workdir} was trained with "
                                            f"({difference}); set data.tokenizer="
                                            f"from:{init.from_workdir} to encode the data "
                                            f"with the base's vocabulary")
    theirs = ModelConfig.from_section(source.model, vocab)
    if (theirs.vocab_size, theirs.padded_vocab) != (model_cfg.vocab_size,
                                                    model_cfg.padded_vocab):
        raise ConfigError(KEY, f"model.vocab_size: {model_cfg.vocab_size} here (padded to "
                               f"{model_cfg.padded_vocab}) but {theirs.vocab_size} (padded to "
                               f"{theirs.padded_vocab}) in {init.from_workdir}; the model "
                               "must match")
    with Checkpointer(rundir.checkpoint_dir(workdir), read_only=True) as ckpt:
        step = rundir.pick_step(ckpt.all_steps(), init.step or None, init.from_workdir,
                                key="init.step", workdir_key=KEY)
    return InitSource(workdir, step)


def restore_initial_state(exp: Experiment, source: InitSource) -> TrainState:
    """A step-0 train state: the source's parameters on this run's mesh, fresh optimizer
    (and fresh objective parameters, e.g. a distillation projection). A LoRA run takes
    them as its frozen base (as integers for QLoRA), with fresh adapters."""
    if exp.trainable is not None:
        return _lora_initial_state(exp, source)
    abstract, _ = split_objective_params(exp.abstract_state.params)
    with Checkpointer(rundir.checkpoint_dir(source.workdir), read_only=True) as ckpt:
        params = ckpt.restore_params(source.step, abstract)
    build = make_state_fn(exp.optimizer, exp.config.train.seed,
                          exp.objective and exp.objective.init_params)
    state = jax.jit(build, out_shardings=exp.state_shardings, donate_argnums=0)(params)
    return exp.from_checkpoint(state)  # checkpoints hold layers in model order


def _lora_initial_state(exp: Experiment, source: InitSource) -> TrainState:
    """The source's float parameters as the frozen base, fresh adapters (A random, B zero)
    and a fresh optimizer for them."""
    model_cfg = dataclasses.replace(exp.model_cfg, lora=None, quant=None)
    _, abstract, axes = abstract_params(model_cfg)
    shardings = tree_shardings(exp.mesh, axes, exp.rules)
    with Checkpointer(rundir.checkpoint_dir(source.workdir), read_only=True) as ckpt:
        base = ckpt.restore_params(source.step, abstract_with_shardings(abstract, shardings))
    init_fn = make_init_fn(exp.model_cfg, exp.optimizer, exp.config.train.seed,
                           exp.objective and exp.objective.init_params, exp.trainable)

    def build(base: Any) -> TrainState:
        fresh = init_fn()  # its random base is unused: XLA leaves it out
        params = lora.join(exp.trainable(fresh.params)[0], base)
        return fresh.replace(params=params if exp.prepare is None else exp.prepare(params))
    donate = (0,) if exp.prepare is None else ()  # integers cannot reuse the float buffers
    return jax.jit(build, out_shardings=exp.state_shardings, donate_argnums=donate)(base)
