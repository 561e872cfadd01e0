"""LoRA runs: which parameters train, and the frozen base, stored once in the run.

With `lora.rank > 0` the trainable parameters are the adapters (and any objective
parameters, e.g. a distillation projection); everything else is the frozen base. The
train state holds both, but the optimizer sees only the trainable ones, and checkpoints
hold only them with the optimizer state: the base is written once, when the run starts,
to WORKDIR/lora_base/0 (as integers with `quant.weight_bits`: QLoRA), with its origin in
WORKDIR/lora_base.json, and the hash of its files in WORKDIR/fingerprints.json. Restoring a
checkpoint of a LoRA run reads the base from there, after checking that hash.
"""

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from jaxlm.configs.errors import RunError
from jaxlm.configs.sections import Config, Quant
from jaxlm.losses.objectives import OBJECTIVE_PARAMS, split_objective_params
from jaxlm.models.lora import join_trees, split_adapters
from jaxlm.models.ptq import quantize_params, quantized_axes
from jaxlm.data import fingerprints
from jaxlm.training.checkpoint import Checkpointer

BASE_DIR = "lora_base"
SOURCE_FILE = "lora_base.json"


def enabled(config: Config) -> bool:
    return config.lora.rank > 0


def base_quant(config: Config) -> Quant | None:
    """The format of weights held as integers (or NF4 indices) plus scales: a QLoRA run's
    frozen base, or a quantized run's weights (`quant.ptq`); None for float weights."""
    held = enabled(config) or config.quant.ptq
    return config.quant if held and config.quant.weight_bits else None


def split_trainable(tree: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapters and objective parameters, frozen base) of a tree shaped like the params."""
    model, objective = split_objective_params(tree)
    adapters, base = split_adapters(model)
    if objective is not None:
        adapters = {**adapters, OBJECTIVE_PARAMS: objective}
    return adapters, base


def join(trainable: dict[str, Any], frozen: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `split_trainable`."""
    return join_trees(trainable, frozen)


def base_dir(workdir: str | Path) -> Path:
    return Path(workdir).absolute() / BASE_DIR


def save_base(workdir: str | Path, frozen: Any, source: dict[str, Any]) -> None:
    """Write the frozen base once (replacing a base of a start that saved no checkpoint)
    and where it came from (`source`: workdir and step, or a random init)."""
    directory = base_dir(workdir)
    if jax.process_index() == 0 and directory.exists():
        shutil.rmtree(directory)
    with Checkpointer(directory, keep=1) as ckpt:
        ckpt.save(0, frozen)
        ckpt.wait()
    if jax.process_index() == 0:
        (Path(workdir) / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    fingerprints.record_base(workdir, directory)


def restore_base(workdir: str | Path, abstract_frozen: Any) -> Any:
    """The run's frozen base, sharded as `abstract_frozen` says; RunError if it is missing
    or does not match the run's config."""
    directory = base_dir(workdir)
    with Checkpointer(directory, read_only=True) as ckpt:
        if 0 not in ckpt.all_steps():
            raise RunError(f"{directory} is missing: a LoRA run's checkpoints hold only the "
                           "adapters, and their frozen base is stored there once; start the "
                           "run again in a new --workdir")
        fingerprints.check_base(workdir, directory)
        try:
            return ckpt.restore(0, abstract_frozen)
        except Exception as e:  # noqa: BLE001 -- orbax and tensorstore raise many types
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
            raise RunError(f"the frozen base in {directory} does not restore ({reason})"
                           ) from None


def base_format(config: Config, model: nnx.Module, params: Any, param_axes: Any
                ) -> tuple[Any, Any, Callable[[Any], Any] | None]:
    """(abstract params, their logical axes, `prepare`: fresh float params -> the state's)
    of a run: with a QLoRA base or in a quantized run, its weight matrices are integers
    plus scales."""
    quant = base_quant(config)
    if quant is None:
        return params, param_axes, None

    def prepare(p: Any) -> Any:
        return quantize_params(model, p, quant)
    return jax.eval_shape(prepare, params), quantized_axes(model, param_axes, quant), prepare
