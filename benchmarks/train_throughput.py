"""Training throughput for any config: step time, tokens/s, compile time, model FLOP/s and
MFU per device, memory.

  python benchmarks/train_throughput.py                                  # default recipe
  python benchmarks/train_throughput.py --config=configs/shakespeare_char.py:large \
      --steps=20 --config.batch_size=16
  python benchmarks/train_throughput.py --cpu_devices=8 --config.mesh.fsdp=8
  python benchmarks/train_throughput.py --config=configs/gpt_1b.py --synthetic \
      --config.batch_size=8 --steps=10 --json_out=results.jsonl

Times `--steps` jitted train steps after `--warmup` steps, on batches of the configured
data, or with `--synthetic` on uniformly random token ids over the model's vocabulary
(`model.vocab_size`, or the data's when it is 0). Model FLOPs are `training.flops`'s count;
MFU divides them by the device's peak (`--peak_flops_per_device`, else the table in
`training/flops.py`; none on CPU). Prints one table and one JSON line (also appended to
`--json_out`).
"""

import json
import os
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags


_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "shakespeare_char.py"), "Config file.")
_STEPS = flags.DEFINE_integer("steps", 200, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 10, "Untimed steps after compilation.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats; the best is reported.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "Use N fake CPU devices.")
_SYNTHETIC = flags.DEFINE_bool("synthetic", False, "Random token ids over model.vocab_size "
                               "instead of the configured data.")
_PEAK = flags.DEFINE_float("peak_flops_per_device", 0.0, "Peak FLOP/s for MFU; 0 = the "
                           "device table (none on CPU).")
_LABEL = flags.DEFINE_string("label", None, "Name of this row in the JSON (default: the "
                             "config name).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Append the JSON line to this file.")


def _batches(exp, synthetic: bool, n: int = 8):
    """`n` global batches: the data's first windows, or random ids over the vocabulary."""
    import numpy as np
    train = exp.config.train
    if not synthetic:
        it = exp.train_batches()
        return [exp.to_device(next(it), train=True)[0] for _ in range(n)]
    rng = np.random.default_rng(0)
    shape = (train.batch_size, train.seq_len)
    return [exp.to_global({k: rng.integers(0, exp.model_cfg.vocab_size, shape, np.int32)
                           for k in ("inputs", "targets")}) for _ in range(n)]


def main(argv):
    del argv
    from jaxlm.parallel.distributed import initialize
    initialize(_CPU_DEVICES.value)
    import jax
    import numpy as np
    from jaxlm.training.experiment import Experiment
    from jaxlm.training.flops import model_flops_per_token, peak_flops_per_device, throughput_fields

    config = _CONFIG.value
    t0 = time.perf_counter()
    exp = Experiment.build(config, tempfile.mkdtemp())
    state = exp.init_state()
    jax.block_until_ready(state)
    t_init = time.perf_counter() - t0

    batches = _batches(exp, _SYNTHETIC.value)
    t0 = time.perf_counter()
    compiled = exp.train_step.lower(state, batches[0]).compile()
    t_compile = time.perf_counter() - t0
    mem = compiled.memory_analysis()

    for i in range(_WARMUP.value):
        state, metrics = compiled(state, batches[i % len(batches)])
    jax.block_until_ready(state)
    times = []
    for _ in range(_REPEATS.value):
        t0 = time.perf_counter()
        for i in range(_STEPS.value):
            state, metrics = compiled(state, batches[i % len(batches)])
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - t0) / _STEPS.value)
    step = min(times)

    tokens = config.batch_size * config.seq_len
    flops_per_token = model_flops_per_token(exp.model_cfg, config.seq_len)
    model_flops = flops_per_token * tokens
    n_dev = exp.mesh.devices.size
    peak = peak_flops_per_device(_PEAK.value, exp.mesh.devices.flat[0].device_kind)
    per_device = throughput_fields(tokens / step, flops_per_token, n_dev, peak)
    result = {
        "config": _LABEL.value or config.name, "devices": n_dev,
        "device_kind": exp.mesh.devices.flat[0].device_kind,
        "num_params": sum(int(x.size) for x in jax.tree.leaves(state.params)),
        "dtype": config.model.dtype, "batch_size": config.batch_size,
        "seq_len": config.seq_len, "synthetic": _SYNTHETIC.value,
        "mesh": {k: v for k, v in exp.mesh.shape.items() if v > 1},
        "step_ms": round(step * 1e3, 3), "step_ms_median": round(float(np.median(times)) * 1e3, 3),
        "tokens_per_sec": round(tokens / step),
        "compile_s": round(t_compile, 2), "init_s": round(t_init, 2),
        "model_gflops_per_step": round(model_flops / 1e9, 3),
        "model_gflop_per_s": round(model_flops / step / 1e9, 1),  # all devices together
        "model_tflop_per_s_per_device": round(per_device["flops_per_sec_per_device"] / 1e12, 4),
        "peak_tflop_per_s_per_device": round(peak / 1e12, 1) if peak else None,
        "mfu": round(per_device["mfu"], 4) if "mfu" in per_device else None,
        "memory_per_device_mb": {
            "arguments": round(mem.argument_size_in_bytes / 2**20, 2),
            "outputs": round(mem.output_size_in_bytes / 2**20, 2),
            "temporaries": round(mem.temp_size_in_bytes / 2**20, 2),
            "aliased": round(mem.alias_size_in_bytes / 2**20, 2),
        } if mem is not None else None,
    }
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")
    print(json.dumps(result))
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    app.run(main)
