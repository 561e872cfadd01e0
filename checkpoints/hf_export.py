"""Export a run's checkpoint as a Hugging Face model directory.

`export_hf(workdir, out_dir)` picks the architecture that expresses the run's model
exactly (`checkpoints.architectures.architecture_for`; a model none expresses is an
error naming the key), restores the parameters on one device, then streams the
safetensors files one tensor at a time: each tensor is one layer's slice of a parameter,
copied to the host only while it is written. The padded vocabulary is cut to
`model.vocab_size` (the padding rows' logits are masked, so this is exact). It writes
`config.json`, and the tokenizer and generation files of the run's tokenizer
(`checkpoints.hf_tokenizer`).
"""

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from jaxlm.checkpoints.architectures import Tensor, architecture_for, hf_config, hf_shape, \
    tensor_table
from jaxlm.checkpoints.hf_tokenizer import origin_hf_dir, write_tokenizer_files
from jaxlm.checkpoints.lora_merge import merge_lora
from jaxlm.checkpoints.safetensors_io import write_sharded
from jaxlm.configs.errors import ConfigError
from jaxlm.data.tokenizers import Tokenizer
from jaxlm.evaluation.restore import print_warning, restore_run
from jaxlm.models.config import ModelConfig
from jaxlm.models.model import abstract_params
from jaxlm.parallel.mesh import make_mesh
from jaxlm.parallel.sharding import tree_shardings
from jaxlm.storage import dirs
from jaxlm.training import rundir
from jaxlm.training.checkpoint import Checkpointer
from jaxlm.training.state import abstract_with_shardings

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
MAX_SHARD_BYTES = 5 * 2**30
OUT_KEY = "to_hf"  # the flag naming the output directory


def _as_hf(x: np.ndarray, t: Tensor, vocab_size: int) -> np.ndarray:
    """One layer of our parameter in the HF layout (one part of a fused tensor)."""
    if t.vocab_axis is not None:  # a view: the padding rows are left out
        x = x[(slice(None),) * t.vocab_axis + (slice(0, vocab_size),)]
    if t.in_ndim == 0:
        return x.reshape(-1)
    x = x.reshape(int(np.prod(x.shape[:t.in_ndim])), -1)
    return x.T if t.linear else x


def _get(params: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        params = params[key]
    return params


def _has(params: Any, path: tuple[str, ...]) -> bool:
    for key in path:
        if not isinstance(params, dict) or key not in params:
            return False
        params = params[key]
    return True


def tensor_plan(arch: str, params: Any, num_layers: int, vocab_size: int, dtype: Any
                ) -> list[tuple[str, Any, tuple[int, ...], Callable[[], np.ndarray]]]:
    """(name, dtype, shape, producer) of every HF tensor, in the usual order: embeddings,
    layer 0, layer 1, ..., final norm, output head. A producer copies only its layer."""
    groups: dict[str, list[Tensor]] = {}
    for t in tensor_table(arch):
        if _has(params, t.path):
            groups.setdefault(t.name, []).append(t)
    per_layer = [n for n in groups if "{i}" in n]
    head = [n for n, ts in groups.items() if ts[0].path[0] in ("embed", "pos_embed")]
    tail = [n for n in groups if "{i}" not in n and n not in head]
    plan = []

    def entry(name: str, ts: list[Tensor], layer: int | None):
        def produce() -> np.ndarray:
            parts = []
            for t in sorted(ts, key=lambda t: t.part or (0, 1)):
                leaf = _get(params, t.path)
                x = np.asarray(jax.device_get(leaf if layer is None else leaf[layer]))
                parts.append(_as_hf(x, t, vocab_size))
            return np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
        leaf = _get(params, ts[0].path)
        shape = leaf.shape[1:] if layer is not None else leaf.shape
        return (name.format(i=layer), dtype, hf_shape(ts[0], shape, vocab_size), produce)

    plan += [entry(n, groups[n], None) for n in head]
    for i in range(num_layers):
        plan += [entry(n, groups[n], i) for n in per_layer]
    plan += [entry(n, groups[n], None) for n in tail]
    return plan


def _token_ids(origin: Path | None, tok: Tokenizer) -> dict[str, Any]:
    """bos/eos/pad ids for config.json: an imported run's own, else the tokenizer's."""
    saved = None if origin is None else origin / "config.json"
    if saved is not None and saved.is_file():
        hf = json.loads(saved.read_text())
        return {k: hf[k] for k in TOKEN_ID_KEYS if hf.get(k) is not None}
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    return {k: v for k, v in ids.items() if v is not None}


def restore_run_params(workdir: Path, step: int | None, devices: list[jax.Device]
                       ) -> tuple[Any, ModelConfig, Any, int]:
    """(the run's Config, ModelConfig, parameters on one device, step); a LoRA run's
    adapters merged into its base, a quantized run's weights dequantized (and the config
    of that float model)."""
    config = rundir.load_config(workdir)
    architecture_for(config.model)  # refuse before reading anything
    if config.quant.ptq and config.quant.activation_bits:
        raise ConfigError("quant", "the quantized run also quantizes activations, which no "
                                   "Hugging Face architecture here does")
    if config.lora.rank or config.quant.ptq:
        exp, state, step = restore_run(workdir, step, devices[:1])
        config, params = merge_lora(exp, state.params)
        return config, dataclasses.replace(exp.model_cfg, lora=None, quant=None), params, step
    if config.quant.enabled:
        raise ConfigError("quant", "a quantization-aware run computes with fake-quantized "
                                   "weights and activations, which no Hugging Face "
                                   "architecture here does")
    vocab = rundir.load_data(config, workdir).vocab_size
    model_cfg = ModelConfig.from_section(config.model, vocab)
    _, abstract, axes = abstract_params(model_cfg)
    mesh = make_mesh({}, devices[:1])
    shardings = tree_shardings(mesh, axes, config.sharding.rules)
    abstract = abstract_with_shardings(abstract, shardings)
    with Checkpointer(rundir.checkpoint_dir(workdir), read_only=True) as ckpt:
        rundir.pick_step(ckpt.all_steps(), step, workdir)  # refuses a missing step
        if step is None:  # the newest that restores (a damaged one is reported, not moved)
            params, step = ckpt.restore_latest_params(abstract, warn=print_warning)
        else:
            params = ckpt.restore_given(step, lambda s: ckpt.restore_params(s, abstract))
    return config, model_cfg, params, step


def is_hf_model_dir(path: Path) -> bool:
    """A Hugging Face model directory: its config.json names a model type or architecture."""
    try:
        hf = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(hf, dict) and ("model_type" in hf or "architectures" in hf)


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """A new or empty `out_dir`, or an earlier export with `overwrite`; never a run."""
    dirs.check_output(out_dir, OUT_KEY, "a Hugging Face model directory", is_hf_model_dir,
                      overwrite)


def export_hf(workdir: str | Path, out_dir: str | Path, step: int | None = None,
              dtype: str = "float32", devices: list[jax.Device] | None = None,
              max_shard_bytes: int = MAX_SHARD_BYTES, overwrite: bool = False
              ) -> dict[str, Any]:
    """Write the Hugging Face model directory `out_dir` for a checkpoint of `workdir`
    (default: the latest); an earlier export there is replaced only with `overwrite`, a
    run directory never. Built in a staging directory renamed into place at the end
    (`storage/dirs.py`). Returns a summary: architecture, step, files."""
    workdir, out_dir = Path(workdir).absolute(), Path(out_dir).absolute()
    if dtype not in DTYPES:
        raise ConfigError("dtype", f"unknown value {dtype!r}; choose one of {list(DTYPES)}")
    _check_out_dir(out_dir, overwrite)  # before anything is read
    config, model_cfg, params, step = restore_run_params(
        workdir, step, list(jax.devices() if devices is None else devices))
    arch = architecture_for(config.model)
    tok = rundir.load_data(config, workdir).tokenizer
    if tok.vocab_size > model_cfg.vocab_size:
        raise ConfigError("model.vocab_size", f"the run's tokenizer has {tok.vocab_size} "
                                              f"tokens, beyond the model's vocabulary of "
                                              f"{model_cfg.vocab_size}")
    plan = tensor_plan(arch, params, config.model.num_layers, model_cfg.vocab_size,
                       DTYPES[dtype])
    hf = hf_config(config.model, model_cfg.vocab_size, config.train.seq_len)
    hf.update(_token_ids(origin_hf_dir(workdir, config, tok), tok), torch_dtype=dtype)
    with dirs.output_lock(out_dir, OUT_KEY):
        _check_out_dir(out_dir, overwrite)  # again, now that it is ours
        with dirs.staged(out_dir) as tmp:
            files = write_sharded(tmp, plan, max_shard_bytes)
            (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
            copied = write_tokenizer_files(workdir, config, tok, tmp, config.train.seq_len)
    return {"architecture": arch, "step": step, "out_dir": str(out_dir),
            "files": files + ["config.json"] + copied, "dtype": dtype}
