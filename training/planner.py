"""Dry-run planner: compile the train step for a mesh and report what it would cost.

No data is read and nothing runs: the step is lowered on abstract, sharded inputs and
compiled. Per device it reports parameter, optimizer, batch and temporary bytes (the
last from `compiled.memory_analysis()`: activations and workspace), FLOPs, and the
collectives in the compiled HLO (each counted as often as the loops around it run). With
the sequence split (context parallelism) it adds each device's causal attention FLOPs
under the zig-zag order and under a contiguous split, to show the balance.
"""

import math
import re
from collections import Counter
from typing import Any

import jax
import numpy as np

from jaxlm.configs.sections import Config
from jaxlm.models.config import ModelConfig
from jaxlm.models.model import count_params
from jaxlm.parallel.context import zigzag_order
from jaxlm.parallel.pipeline import bubble_fraction
from jaxlm.parallel.sharding import mesh_axes_size, named_sharding
from jaxlm.training.experiment import BATCH_AXES, Experiment
from jaxlm.training.flops import model_flops_per_token
from jaxlm.training.layout import sequence_split

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
               "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def causal_pairs_per_shard(length: int, n: int, window: int | None = None,
                           order: str = "zigzag") -> np.ndarray:
    """[n]: the query-key pairs causal attention (with a window, if any) computes for the
    queries each shard holds, under the zig-zag order or a contiguous split."""
    if order == "zigzag":
        places = zigzag_order(length, n).reshape(n, -1)
    elif order == "contiguous":
        places = np.arange(length).reshape(n, -1)
    else:
        raise ValueError(f"unknown order {order!r}")
    keys = places + 1
    if window is not None:
        keys = np.minimum(keys, window)
    return keys.sum(axis=1)


def computed_pairs_per_shard(length: int, n: int) -> int:
    """Query-key pairs the context-parallel block loop computes on every shard (masked
    ones included): (2c)^2 on the diagonal and 2c^2 for each of the other n-1 blocks."""
    c = length // (2 * n)
    return 4 * c * c + (n - 1) * 2 * c * c


def attention_flops_per_pair(cfg: ModelConfig) -> float:
    """Training FLOPs of one causal query-key pair, all layers and heads: QK^T and PV
    forward (2 x 2K) and their four backward matmuls (4 x 2K)."""
    return 12.0 * cfg.model.num_layers * cfg.model.num_heads * cfg.head_dim


def context_plan(exp: Experiment, batch_size: int, seq_len: int) -> dict[str, Any] | None:
    """The sequence split and each of its devices' attention work (None when unsplit)."""
    axes, n = sequence_split(exp.mesh, exp.rules)
    if n == 1:
        return None
    rows = batch_size // mesh_axes_size(exp.mesh, "act_batch", exp.rules)  # per device
    mc = exp.model_cfg
    flops = attention_flops_per_pair(mc) * rows
    window = mc.window
    return {
        "devices": n, "axes": list(axes), "attention": mc.model.context_attention,
        "chunk_tokens": seq_len // (2 * n),
        "attention_flops_per_device": [
            float(x) * flops for x in causal_pairs_per_shard(seq_len, n, window)],
        "contiguous_attention_flops_per_device": [
            float(x) * flops for x in causal_pairs_per_shard(seq_len, n, window, "contiguous")],
        "computed_attention_flops_per_device": computed_pairs_per_shard(seq_len, n) * flops,
    }


def _shard_bytes(tree: Any) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def _array_bytes(type_str: str, is_async_start: bool) -> int:
    """Bytes a collective produces, from its HLO result type, e.g. `(f32[8,4], f32[2])`.

    A combined (tuple) collective produces every array of its tuple; an async `-start`
    op's tuple also holds its operands, so only its largest array is counted.
    """
    sizes = []
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", type_str):
        if dtype in _DTYPE_BYTES:
            n = math.prod(int(x) for x in dims.split(",") if x) if dims else 1
            sizes.append(n * _DTYPE_BYTES[dtype])
    if not sizes:
        return 0
    return max(sizes) if is_async_start else sum(sizes)


def collective_stats(hlo: str) -> dict[str, dict[str, int]]:
    """Count and bytes of each collective kind per step, loops unrolled by trip count."""
    bodies: dict[str, list[str]] = {}
    name = None
    entry = None
    for line in hlo.splitlines():
        m = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m:
            name = m.group(2)
            bodies[name] = []
            if m.group(1):
                entry = name
        elif name is not None:
            bodies[name].append(line)
    # How many times each computation runs per step.
    runs: Counter = Counter({entry: 1})
    order = [entry]
    for comp in order:
        for line in bodies.get(comp, []):
            trip = 1
            if " while(" in line:
                t = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                trip = int(t.group(1)) if t else 1
            for ref_kind, callee in re.findall(
                    r"(body|condition|calls|to_apply|branch_computations)=\{?%([\w.\-]+)", line):
                mult = trip if ref_kind == "body" else 1
                if callee in bodies:
                    if callee not in runs:
                        order.append(callee)
                    runs[callee] += runs[comp] * mult
    stats = {k: {"count": 0, "bytes": 0} for k in COLLECTIVES}
    for comp, lines in bodies.items():
        for line in lines:
            m = re.search(r"= (.+?) (" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
            if m:
                stats[m.group(2)]["count"] += runs[comp]
                stats[m.group(2)]["bytes"] += runs[comp] * _array_bytes(m.group(1),
                                                                        bool(m.group(3)))
    return stats


def plan(config: Any, workdir: str, devices: list[jax.Device] | None = None) -> dict[str, Any]:
    """Compile the train step for `config` (a Config or ConfigDict) on `devices` and report
    its per-device cost."""
    config = Config.from_dict(config)
    exp = Experiment.build(config, workdir, devices)
    b, t = config.train.batch_size, config.train.seq_len
    batch_sharding = named_sharding(exp.mesh, BATCH_AXES, exp.rules)
    keys = {"inputs": np.int32, "targets": np.int32}
    if exp.packing == "documents":  # the step packed documents compile
        keys.update(segment_ids=np.int32, positions=np.int32, weights=np.float32)
    batch = {k: jax.ShapeDtypeStruct((b, t), dtype, sharding=batch_sharding)
             for k, dtype in keys.items()}
    compiled = exp.train_step.lower(exp.abstract_state, batch).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else (cost or {})
    mc = exp.model_cfg
    n_params = count_params(exp.abstract_state.params)
    trained = exp.trainable(exp.abstract_state.params)[0] if exp.trainable else None
    fpt = model_flops_per_token(mc, t)
    n_dev = exp.mesh.devices.size
    result = {
        "config": config.name,
        "devices": n_dev,
        "mesh": {k: v for k, v in exp.mesh.shape.items() if v > 1} or {"data": 1},
        "num_params": n_params,
        "trainable_params": n_params if trained is None else count_params(trained),
        "tokens_per_step": b * t,
        "per_device_bytes": {
            "parameters": _shard_bytes(exp.abstract_state.params),
            "optimizer": _shard_bytes(exp.abstract_state.opt_state),
            "batch": _shard_bytes(batch),
            "temporaries": int(mem.temp_size_in_bytes) if mem else None,
            "arguments": int(mem.argument_size_in_bytes) if mem else None,
        },
        "xla_flops_per_device": float(cost.get("flops", 0.0)),
        "model_flops_per_token": fpt,
        "model_flops_per_step_per_device": fpt * b * t / n_dev,
        "collectives_per_device": collective_stats(compiled.as_text()),
        "pipeline_bubble": bubble_fraction(mc.pipeline_stages, mc.pipeline_microbatches,
                                           mc.pipeline_repeats),
        "pipeline": exp.describe_pipeline(),
        "context": context_plan(exp, b, t),
    }
    return result


def _mib(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{int(n)} B"


def format_plan(r: dict[str, Any]) -> str:
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    pd = r["per_device_bytes"]
    lines = [
        f"Dry run of {r['config']}: {r['num_params']:,} parameters on {r['devices']} devices "
        f"({mesh}), {r['tokens_per_step']:,} tokens per step."
        + (f" LoRA: {r['trainable_params']:,} trainable (the rest frozen, no optimizer "
           "state)." if r["trainable_params"] != r["num_params"] else ""),
        "Per device:",
        f"  parameters     {_mib(pd['parameters'])}",
        f"  optimizer      {_mib(pd['optimizer'])}",
        f"  batch          {_mib(pd['batch'])}",
        f"  temporaries    {_mib(pd['temporaries'])}   (activations and workspace, "
        "memory_analysis)",
        f"  model FLOPs    {r['model_flops_per_step_per_device'] / 1e9:,.2f} GFLOP per step "
        f"({r['model_flops_per_token'] / 1e6:,.2f} MFLOP per token)",
        f"  XLA FLOPs      {r['xla_flops_per_device'] / 1e9:,.2f} GFLOP (cost analysis; "
        "loop bodies counted once)",
        "  collectives per step:",
    ]
    for kind, s in r["collectives_per_device"].items():
        lines.append(f"    {kind:<19} {s['count']:>6} ops  {_mib(s['bytes']):>14}")
    lines.append(f"Pipeline bubble: {r['pipeline_bubble']:.1%}"
                 + (f" ({r['pipeline']})" if r["pipeline"] else " (no pipeline)"))
    if r.get("context"):
        lines += format_context(r["context"])
    return "\n".join(lines)


def format_context(c: dict[str, Any]) -> list[str]:
    """The sequence split's lines of the dry-run report."""
    scale, unit = (1e9, "GFLOP") if max(c["attention_flops_per_device"]) >= 1e8 else (1e6, "MFLOP")

    def spread(flops: list[float]) -> str:
        lo, hi, mean = min(flops), max(flops), sum(flops) / len(flops)
        return f"{lo / scale:,.3f}-{hi / scale:,.3f} {unit}, max/mean {hi / mean:.2f}"
    return [
        f"Context parallelism: {c['attention']} attention over {c['devices']} devices "
        f"({' x '.join(c['axes'])}), zig-zag chunks of {c['chunk_tokens']} tokens.",
        f"  causal attention per device   {spread(c['attention_flops_per_device'])}",
        f"  with a contiguous split       {spread(c['contiguous_attention_flops_per_device'])}",
        f"  computed by the block loop    "
        f"{c['computed_attention_flops_per_device'] / scale:,.3f} {unit} on every device "
        "(masked halves of the diagonal blocks included)",
    ]
