"""Import a Hugging Face model directory as a run directory of this codebase.

`import_hf(hf_dir, workdir, config)` reads `config.json`, sets the `model` section from
it (the other sections are `config`'s: data, mesh, training), checks every tensor's name
and shape, then builds each parameter shard by shard on the run's mesh: a device's
shard is read from the memory-mapped safetensors files and converted (transposed,
split, padded) on the host a block of rows at a time, then copied to its devices, so the
host holds one shard (at most one parameter) plus one block, never the whole model. It writes the run's `config.json`, a step-0 checkpoint (the
parameters, a fresh optimizer state and the data position, as a run that trained for 0
steps would) and copies the tokenizer and config files into `workdir/hf/`.
"""

import contextlib
import functools
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlm.checkpoints.architectures import KEY, Tensor, hf_shape, model_section, tensor_table
from jaxlm.checkpoints.safetensors_io import CHUNK_BYTES, DAMAGED, SafetensorsReader
from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Config
from jaxlm.losses.objectives import OBJECTIVE_PARAMS
from jaxlm.storage import dirs
from jaxlm.training import rundir
from jaxlm.training.checkpoint import Checkpointer
from jaxlm.training.experiment import Experiment
from jaxlm.training.state import make_state_fn

HF_DIR = rundir.HF_DIR
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
            "added_tokens.json")


def imported_config(hf_dir: Path, config: Config) -> tuple[str, Config]:
    """(architecture, `config` with the model section from `hf_dir/config.json`)."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConfigError(KEY, f"{hf_dir} has no config.json: not a Hugging Face model "
                               "directory")
    try:
        hf = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(KEY, f"{path} is not JSON ({e})") from None
    arch, section = model_section(hf)
    values = config.to_dict()
    section["rope_scaling"] = {**values["model"]["rope_scaling"], **section.get("rope_scaling",
                                                                                {})}
    values["model"] = {**values["model"], **section}
    if values["name"] == Config().name:
        values["name"] = hf_dir.name
    return arch, Config.from_dict(values)


def _leaves(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(tree, dict):
        return [item for k, v in tree.items() for item in _leaves(v, (*prefix, k))]
    return [(prefix, tree)]


def _resolve(reader: SafetensorsReader, name: str) -> str | None:
    """The stored name: as given, or without GPT-2's `transformer.` prefix (as OpenAI's
    original checkpoints store it)."""
    if name in reader:
        return name
    short = name.removeprefix("transformer.")
    return short if short in reader else None


def tensor_names(reader: SafetensorsReader, t: Tensor, shape: tuple[int, ...], layers: int,
                 vocab_size: int) -> list[str]:
    """The stored tensor of each layer (one for unstacked parameters), shapes checked."""
    per_layer = shape[1:] if t.stacked else shape
    names = []
    for i in range(layers if t.stacked else 1):
        wanted = t.name.format(i=i)
        name = _resolve(reader, wanted)
        if name is None:
            raise ConfigError(KEY, f"the checkpoint has no tensor {wanted}")
        want = hf_shape(t, per_layer, vocab_size)
        if reader.shape(name) != want:
            raise ConfigError(KEY, f"tensor {name} has shape {list(reader.shape(name))}, but "
                                   f"config.json implies {list(want)}")
        if not reader.is_float(name):
            raise ConfigError(KEY, f"tensor {name} in {reader.file(name)} has dtype "
                                   f"{reader.dtype(name)}, but model weights are floating "
                                   f"point; {DAMAGED}")
        names.append(name)
    return names


def _as_ours(x: np.ndarray, t: Tensor, shape: list[int]) -> np.ndarray:
    """Stored rows of an HF tensor as a view in our layout, `shape` (one layer)."""
    if t.part is not None:
        k, n = t.part
        width = x.shape[-1] // n
        x = x[..., k * width:(k + 1) * width]
    return (x.T if t.linear else x).reshape(shape)


def _row_axis(t: Tensor, per_layer: tuple[int, ...]) -> tuple[int, int]:
    """(our axis that the stored tensor's rows run along, stored rows per index of it).

    A torch Linear stores [out, in], so its rows are our output axes; otherwise the rows
    are our input axes."""
    axis = t.in_ndim if t.linear else 0
    last = len(per_layer) if t.linear else t.in_ndim
    return axis, math.prod(per_layer[axis + 1:last])


def _check_finite(reader: SafetensorsReader, name: str, block: np.ndarray) -> None:
    if not np.isfinite(block).all():
        raise ConfigError(KEY, f"tensor {name} in {reader.file(name)} holds NaN or infinite "
                               f"values; {DAMAGED}")


def fill_layer(reader: SafetensorsReader, name: str, t: Tensor, per_layer: tuple[int, ...],
               ranges: tuple[tuple[int, int], ...], out: np.ndarray) -> None:
    """Write `ranges` of one layer of our parameter into `out`, mapping at most
    CHUNK_BYTES of the file at a time. Rows past the stored vocabulary stay zero. A
    value that is not finite is an error."""
    if t.in_ndim == 0:  # a vector (small; a fused one splits along its rows)
        view = _as_ours(reader.view(name), t, list(per_layer))
        out[...] = view[tuple(slice(*r) for r in ranges)]
        _check_finite(reader, name, out)
        return
    axis, per_row = _row_axis(t, per_layer)
    lo, hi = ranges[axis]
    stop = min(hi, reader.shape(name)[0] // per_row)
    step = max(1, CHUNK_BYTES // max(1, per_row * reader.row_bytes(name)))
    for a in range(lo, stop, step):
        b = min(a + step, stop)
        shape = list(per_layer)
        shape[axis] = b - a
        view = _as_ours(reader.view(name, a * per_row, b * per_row), t, shape)
        src = tuple(slice(0, b - a) if d == axis else slice(*r) for d, r in enumerate(ranges))
        dst = tuple(slice(a - lo, b - lo) if d == axis else slice(None)
                    for d in range(len(ranges)))
        out[dst] = view[src]
        _check_finite(reader, name, out[dst])
        del view  # unmaps this block


def build_shard(reader: SafetensorsReader, t: Tensor, names: list[str],
                shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """The shard `index` of our parameter (float32), from the memory-mapped files."""
    ranges = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
    out = np.zeros([hi - lo for lo, hi in ranges], np.float32)
    if not t.stacked:
        fill_layer(reader, names[0], t, shape, ranges, out)
        return out
    for j, i in enumerate(range(*ranges[0])):
        fill_layer(reader, names[i], t, shape[1:], ranges[1:], out[j])
    return out


def place(shape: tuple[int, ...], sharding: Any,
          build: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """A sharded jax.Array built one distinct shard at a time: each shard is made on the
    host, copied to the devices that hold it, and dropped before the next."""
    groups: dict[Any, tuple[tuple[slice, ...], list[jax.Device]]] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        groups.setdefault(key, (index, []))[1].append(device)
    arrays = []
    for index, devices in groups.values():
        host = build(index)
        arrays += [jax.device_put(host, d) for d in devices]
        jax.block_until_ready(arrays[-1])
        del host
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def place_params(exp: Experiment, reader: SafetensorsReader, arch: str) -> dict[str, Any]:
    """Every parameter as a sharded jax.Array on the run's mesh, one at a time."""
    table = {t.path: t for t in tensor_table(arch)}
    cfg = exp.model_cfg
    shardings = dict(_leaves(exp.state_shardings.params))
    plan = []
    for path, leaf in _leaves(exp.abstract_state.params):
        if path not in table:
            raise ConfigError(KEY, f"no {arch} tensor holds parameter {'.'.join(path)}")
        t = table[path]
        names = tensor_names(reader, t, leaf.shape, cfg.model.num_layers, cfg.vocab_size)
        plan.append((path, leaf.shape, t, names))
    params: dict[str, Any] = {}
    for path, shape, t, names in plan:  # every name and shape is checked first
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = place(shape, shardings[path],
                               functools.partial(build_shard, reader, t, names, shape))
    return params


def copy_hf_files(hf_dir: Path, workdir: Path) -> list[str]:
    """Copy the tokenizer and config files into `workdir/hf/`; returns their names."""
    out = workdir / HF_DIR
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in HF_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, out / name)
            copied.append(name)
    return copied


def import_hf(hf_dir: str | Path, workdir: str | Path, config: Any,
              devices: list[jax.Device] | None = None) -> dict[str, Any]:
    """Write the run directory `workdir` for the Hugging Face model in `hf_dir`.

    `config`: a Config or ConfigDict for everything but the model (mesh, data, training).
    `workdir` must be new or empty; it is written under its lock (the one `train.py`
    holds), and a failed import removes what it wrote (`storage/dirs.py`). Returns a
    summary: architecture, parameters, step, files."""
    hf_dir, workdir = Path(hf_dir), Path(workdir).absolute()
    arch, config = imported_config(hf_dir, Config.from_dict(config))
    reader = SafetensorsReader(hf_dir)
    with dirs.new_run(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
        return _write_run(hf_dir, workdir, arch, config, reader, devices)


def _write_run(hf_dir: Path, workdir: Path, arch: str, config: Config,
               reader: SafetensorsReader, devices: list[jax.Device] | None
               ) -> dict[str, Any]:
    """The import's files in `workdir`: hf/, data/, the step-0 checkpoint, config.json."""
    copied = copy_hf_files(hf_dir, workdir) if jax.process_index() == 0 else []
    if (workdir / HF_DIR / "tokenizer.json").is_file() and config.data.tokenizer == "char":
        # The model's own tokenizer (kept in the run) encodes the data, prompts and samples.
        config = config.replace(**{"data.tokenizer": f"hf:{workdir / HF_DIR / 'tokenizer.json'}"})
    exp = Experiment.build(config, workdir, devices)
    if OBJECTIVE_PARAMS in exp.abstract_state.params:
        raise ConfigError("loss.weights", "an imported run has no objective parameters; set "
                                          "the loss terms when you start from it")
    params = place_params(exp, reader, arch)
    build = make_state_fn(exp.optimizer, config.train.seed)
    state = jax.jit(build, out_shardings=exp.state_shardings, donate_argnums=0)(params)
    data_iter = exp.train_batches()
    with Checkpointer(rundir.checkpoint_dir(workdir)) as ckpt:
        ckpt.save(0, state, data_iter)
        ckpt.wait()
    if jax.process_index() == 0:  # last: a run with a config.json is complete
        rundir.save_config(config, workdir)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    return {"architecture": arch, "workdir": str(workdir), "step": 0,
            "num_params": n_params, "vocab_size": exp.model_cfg.vocab_size,
            "padded_vocab": exp.model_cfg.padded_vocab, "hf_files": copied}
