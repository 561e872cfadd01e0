"""Merge a LoRA run's adapters into its base: the parameters of a plain model computing
the same function, for export (`convert.py --to_hf`) or as a new run
(`convert.py --merge_lora --workdir=RUN --output=NEW`).

Each adapted kernel becomes `kernel + (alpha / rank) * A B` in float32; a QLoRA run's
integer base is dequantized first, so the merged run is a float run whose `quant` and
`lora` sections are off.
"""

import contextlib
import shutil
from pathlib import Path
from typing import Any

import jax

from jaxlm.checkpoints.hf_import import HF_DIR
from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Config
from jaxlm.evaluation.restore import restore_run
from jaxlm.losses.objectives import split_objective_params
from jaxlm.models.model import abstract_model
from jaxlm.models.lora import merge_adapters
from jaxlm.storage import dirs
from jaxlm.data import fingerprints
from jaxlm.training import rundir
from jaxlm.training.checkpoint import Checkpointer
from jaxlm.training.experiment import Experiment
from jaxlm.training.lora import base_quant
from jaxlm.training.state import make_state_fn


def merged_config(config: Config) -> Config:
    """The config of the merged run: no adapters, a float base, no init source."""
    overrides = {"lora.rank": 0, "init.from_workdir": "", "init.step": 0}
    if base_quant(config) is not None:
        overrides["quant.weight_bits"] = 0
        overrides["quant.weight_format"] = "int"
        overrides["quant.ptq"] = False
    return config.replace(**overrides)


def merge_lora(exp: Experiment, params: Any) -> tuple[Config, Any]:
    """(merged config, merged model parameters) of a LoRA run's restored parameters (of a
    quantized run's: its weights dequantized)."""
    model = abstract_model(exp.model_cfg)
    model_params, _ = split_objective_params(params)
    merged = jax.jit(lambda p: merge_adapters(model, p))(model_params)
    return merged_config(exp.config), merged


def merge_run(workdir: str | Path, output: str | Path, step: int | None = None,
              devices: list[jax.Device] | None = None) -> dict[str, Any]:
    """Write `output` as a plain run holding the merged parameters of `workdir`'s
    checkpoint (default: the latest) at the same step, with a fresh optimizer state.
    `output` must be new or empty; it is written under its lock, and a failed merge
    removes what it wrote (`storage/dirs.py`)."""
    workdir, output = Path(workdir).absolute(), Path(output).absolute()
    if not rundir.load_config(workdir).lora.rank:
        raise ConfigError("workdir", f"{workdir} is not a LoRA run (lora.rank is 0): "
                                     "nothing to merge")
    if output == workdir:
        raise ConfigError("output", f"{output} is the LoRA run itself; merge into a new "
                                    "directory")
    with dirs.new_run(output, "output") if jax.process_index() == 0 else \
            contextlib.nullcontext():
        exp, state, step = restore_run(workdir, step, devices)
        config, params = merge_lora(exp, state.params)
        new = Experiment.build(config, output, devices)
        build = make_state_fn(new.optimizer, config.train.seed,
                              new.objective and new.objective.init_params)
        merged = jax.jit(build, out_shardings=new.state_shardings, donate_argnums=0)(params)
        merged = merged.replace(step=jax.device_put(merged.step + step, merged.step.sharding))
        if jax.process_index() == 0 and (workdir / HF_DIR).is_dir():
            shutil.copytree(workdir / HF_DIR, output / HF_DIR)
        with Checkpointer(rundir.checkpoint_dir(output)) as ckpt:
            ckpt.save(step, merged, new.train_batches())
            ckpt.wait()
        if jax.process_index() == 0:  # last: a run with a config.json is complete
            fingerprints.write(output, config, exp.data.tokenizer)
            rundir.save_config(config, output)
    return {"workdir": str(workdir), "output": str(output), "step": step,
            "num_params": sum(int(x.size) for x in jax.tree.leaves(merged.params))}
