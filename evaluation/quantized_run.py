"""A quantized run: a new run directory holding a checkpoint's weights as quantized after
training (`eval.py --quantize=... [--quant_method=gptq] --save=NEW_RUN`).

    NEW_RUN/config.json        the source run's config, with `quant` the stored format and
                               `quant.ptq` true: the fact every reader of the run acts on
    NEW_RUN/checkpoints/N/     the source's step N: integers (or NF4 indices) plus scales,
                               the float norms, no optimizer state
    NEW_RUN/quantization.json  how they were made: method, bits, granularity, GPTQ's
                               settings and calibration data, the source run and its step
    NEW_RUN/fingerprints.json  its data and tokenizer (data/fingerprints.py); hf/ of an
                               imported run is copied

`eval.py --workdir=NEW_RUN` evaluates it, `--draft_workdir=NEW_RUN` drafts with it,
`init.from_workdir=NEW_RUN` with `lora.rank` takes its integers as a QLoRA base as they are,
and `convert.py --to_hf` exports it dequantized. It does not train (`training/rundir.py`
check_resume, `training/init_from.py`).
"""

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Config, Loss, Prune, Quant
from jaxlm.data import fingerprints
from jaxlm.storage import dirs
from jaxlm.training import rundir
from jaxlm.training.rundir import HF_DIR
from jaxlm.training.checkpoint import Checkpointer
from jaxlm.training.experiment import Experiment
from jaxlm.training.state import TrainState

RECORD_FILE = "quantization.json"
KEY = "save"


def quantized_config(config: Config, quant: Quant) -> Config:
    """The config of a quantized run made from `config`'s run: `quant` as stored and
    marked `quant.ptq`; no training objective, pruning schedule or init source (it does not
    train; pruned weights stay zero in the integers)."""
    values = config.model_copy(update={"loss": Loss(), "prune": Prune()}).to_dict()
    values["quant"] = {**quant.to_dict(), "ptq": True}
    values["init"] = {**values["init"], "from_workdir": "", "step": 0}
    return Config.from_dict(values)


def check_save(workdir: str | Path, output: str | Path) -> Path:
    """The absolute `output` of `--save`; ConfigError for the source run itself or a LoRA
    source (checked before anything is quantized)."""
    workdir, output = Path(workdir).absolute(), Path(output).absolute()
    if output == workdir:
        raise ConfigError(KEY, f"{output} is the run being quantized; save into a new "
                               "directory")
    if rundir.load_config(workdir).lora.rank:
        raise ConfigError(KEY, f"{workdir} is a LoRA run; merge it first (python convert.py "
                               "--merge_lora --workdir=RUN --output=NEW) and quantize that run")
    return output


def writing(output: Path) -> contextlib.AbstractContextManager[Path | None]:
    """Hold `output` as a new run while it is quantized and written (`storage/dirs.py`
    new_run: under its lock, new or empty, removed again on failure); process 0 only."""
    if jax.process_index() != 0:
        return contextlib.nullcontext()
    return dirs.new_run(output, KEY)


def write_quantized_run(exp: Experiment, qparams: Any, quant: Quant, step: int,
                        output: Path, record: dict[str, Any]) -> None:
    """Write `output` (held by `writing`) as the quantized run of `exp`'s checkpoint
    `step`: `qparams` (from `evaluation.quantized.quantize_run_params`) at that step and
    `record` (how they were made) beside the source's run and fingerprints."""
    config = quantized_config(exp.config, quant)
    new = Experiment.build(config, output, list(exp.mesh.devices.flat))
    state = TrainState(step=jnp.asarray(step, jnp.int32), params=qparams,
                       opt_state=new.optimizer.init({}))
    state = jax.device_put(state, new.state_shardings)
    if jax.process_index() == 0 and (Path(exp.workdir) / HF_DIR).is_dir():
        shutil.copytree(Path(exp.workdir) / HF_DIR, output / HF_DIR)
    with Checkpointer(rundir.checkpoint_dir(output)) as ckpt:
        ckpt.save(step, state, new.train_batches())
        ckpt.wait()
    if jax.process_index() == 0:  # last: a run with a config.json is complete
        source = {"workdir": str(Path(exp.workdir).absolute()), "step": step,
                  "fingerprints": fingerprints.read(exp.workdir)}
        made = {**record, "granularity": quant.granularity, "symmetric": quant.symmetric,
                "source": source}
        dirs.write_text_atomically(output / RECORD_FILE, json.dumps(made, indent=2) + "\n")
        fingerprints.write(output, config, exp.data.tokenizer)
        rundir.save_config(config, output)


def calibration_record(exp: Experiment, count: int, data: str | None) -> dict[str, Any]:
    """What GPTQ calibrated on: the batches, their windows and the data's fingerprints
    (the run's training split, or `--data`)."""
    paths = fingerprints.data_sources(exp.config) if data is None else [Path(data)]
    train = exp.config.train
    return {"batches": count, "windows": count * train.batch_size,
            "seq_len": train.seq_len, "split": "train" if data is None else "--data",
            "data": [fingerprints.data_fingerprint(p) for p in paths]}
