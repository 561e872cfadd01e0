"""Start a new run from another run's parameters (`init.from_workdir`, `init.step`).

The source is any run directory: trained here on any mesh, or imported from Hugging Face
with `convert.py`. Its model must be the new run's (the keys of `configs.sections.Model`,
except those in `Model.EXECUTION_KEYS`, and the resolved vocabulary). Only its parameters
are read (`Checkpointer.restore_params`), straight into the new run's shardings; the
optimizer starts fresh and the step is 0. `check_source` runs before anything compiles.
Without `init.step`, a damaged latest checkpoint of the source is reported and the newest
that restores is used; the source run is never changed.
"""

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from jaxlm.configs.errors import ConfigError, RunError
from jaxlm.configs.sections import Config, Quant
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
    """A checked source run: its directory and the checkpoint step to start from (None:
    the newest that restores)."""
    workdir: Path
    step: int | None
    quantized: bool = False  # a quantized run (quant.ptq): its integers are the QLoRA base


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
    if source.quant.ptq:
        _check_quantized_source(config, source)
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
        rundir.pick_step(ckpt.all_steps(), init.step or None, init.from_workdir,
                         key="init.step", workdir_key=KEY)
    return InitSource(workdir, init.step or None, quantized=source.quant.ptq)


def _check_quantized_source(config: Config, source: Config) -> None:
    """A quantized run starts only a LoRA run whose base format (`quant`) is its own: the
    integers are taken as they are stored."""
    name = config.init.from_workdir
    if not config.lora.rank:
        raise ConfigError(KEY, f"{name} is a quantized run (eval.py --save), whose weights do "
                               "not train; fine-tune it with LoRA (lora.rank=N: its integers "
                               "are the frozen base) or start from the float run it came from")
    if source.quant.activation_bits:
        raise ConfigError(KEY, f"{name} is a quantized run that also quantizes activations "
                               f"(quant.activation_bits={source.quant.activation_bits}), "
                               "which a LoRA run does not; quantize its float run without "
                               "activation bits for QLoRA")
    for key in Quant.FORMAT_KEYS:
        ours, theirs = getattr(config.quant, key), getattr(source.quant, key)
        if ours != theirs:
            raise ConfigError(f"quant.{key}", f"is {ours!r} here but {theirs!r} in the "
                                              f"quantized run {name}, whose integers are the "
                                              f"frozen base as stored: set quant.{key}="
                                              f"{theirs} (configs/finetune.py copies it)")


def restore_initial_state(exp: Experiment, source: InitSource,
                          warn: Callable[[str], None] = print) -> tuple[TrainState, int]:
    """(a step-0 train state, the source step it came from): the source's parameters on this
    run's mesh, fresh optimizer (and fresh objective parameters, e.g. a distillation
    projection). A LoRA run takes them as its frozen base (as integers for QLoRA), with
    fresh adapters. `warn` gets the line for a damaged source checkpoint passed over."""
    if exp.trainable is not None:
        return _lora_initial_state(exp, source, warn)
    abstract, _ = split_objective_params(exp.abstract_state.params)
    params, step = source_params(source, abstract, warn)
    build = make_state_fn(exp.optimizer, exp.config.train.seed,
                          exp.objective and exp.objective.init_params,
                          masks=exp.pruning and exp.pruning.initial_masks)
    state = jax.jit(build, out_shardings=exp.state_shardings, donate_argnums=0)(params)
    return exp.from_checkpoint(state), step  # checkpoints hold layers in model order


def source_params(source: InitSource, abstract: Any, warn: Callable[[str], None]
                  ) -> tuple[Any, int]:
    """(the source's parameters sharded as `abstract` says, their step): `source.step`, else
    the newest checkpoint that restores; RunError (one line) when it does not restore."""
    with Checkpointer(rundir.checkpoint_dir(source.workdir), read_only=True) as ckpt:
        if source.step is not None:
            return ckpt.restore_given(source.step, lambda s: ckpt.restore_params(s, abstract)), \
                source.step
        restored = ckpt.restore_latest_params(abstract, warn=warn)
    if restored is None:  # checked by check_source; gone since
        raise RunError(f"{source.workdir} has no checkpoints")
    return restored


def _lora_initial_state(exp: Experiment, source: InitSource, warn: Callable[[str], None]
                        ) -> tuple[TrainState, int]:
    """The source's parameters as the frozen base (a quantized run's integers as they are,
    float parameters quantized for QLoRA), fresh adapters (A random, B zero) and a fresh
    optimizer for them."""
    if source.quantized:
        abstract = exp.trainable(exp.abstract_state.params)[1]
    else:
        model_cfg = dataclasses.replace(exp.model_cfg, lora=None, quant=None)
        _, abstract, axes = abstract_params(model_cfg)
        abstract = abstract_with_shardings(abstract, tree_shardings(exp.mesh, axes, exp.rules))
    base, step = source_params(source, abstract, warn)
    prepare = None if source.quantized else exp.prepare
    init_fn = make_init_fn(exp.model_cfg, exp.optimizer, exp.config.train.seed,
                           exp.objective and exp.objective.init_params, exp.trainable)

    def build(base: Any) -> TrainState:
        fresh = init_fn()  # its random base is unused: XLA leaves it out
        params = lora.join(exp.trainable(fresh.params)[0], base)
        return fresh.replace(params=params if prepare is None else prepare(params))
    donate = (0,) if prepare is None else ()  # integers cannot reuse the float buffers
    return jax.jit(build, out_shardings=exp.state_shardings, donate_argnums=donate)(base), step
