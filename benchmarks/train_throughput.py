"""Training throughput for any config: step time, tokens/s, compile time, GFLOP/s, memory.

  python benchmarks/train_throughput.py                                  # default recipe
  python benchmarks/train_throughput.py --config=configs/shakespeare_char.py:large \
      --steps=20 --config.batch_size=16
  python benchmarks/train_throughput.py --cpu_devices=8 --config.mesh.fsdp=8

Times `--steps` jitted train steps after `--warmup` steps, on synthetic batches drawn
from the configured data. Prints one table and one JSON line.
"""

import json
import os
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "shakespeare_char.py"), "Config file.")
_STEPS = flags.DEFINE_integer("steps", 200, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 10, "Untimed steps after compilation.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats; the best is reported.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "Use N fake CPU devices.")


def model_flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (matmul params) + causal attention scores and values."""
    d, L = cfg.d_model, cfg.num_layers
    attn = d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = d * cfg.d_ff * (3 if cfg.mlp == "swiglu" else 2)
    head = d * cfg.padded_vocab
    matmul_params = L * (attn + mlp) + head
    attention = L * 2 * 2 * seq_len * cfg.num_heads * cfg.head_dim / 2  # causal: half
    return 6 * matmul_params + 3 * attention


def main(argv):
    del argv
    from parallel.distributed import initialize
    initialize(_CPU_DEVICES.value)
    import jax
    import numpy as np
    from training.experiment import Experiment

    config = _CONFIG.value
    t0 = time.perf_counter()
    exp = Experiment.build(config, tempfile.mkdtemp())
    state = exp.init_state()
    jax.block_until_ready(state)
    t_init = time.perf_counter() - t0

    source = exp.train_source()
    batches = [exp.to_global(source[i]) for i in range(8)]
    t0 = time.perf_counter()
    compiled = exp.train_step.lower(state, batches[0]).compile()
    t_compile = time.perf_counter() - t0
    mem = compiled.memory_analysis()

    for i in range(_WARMUP.value):
        state, metrics = compiled(state, batches[i % len(batches)])
    jax.block_until_ready(metrics)
    times = []
    for _ in range(_REPEATS.value):
        t0 = time.perf_counter()
        for i in range(_STEPS.value):
            state, metrics = compiled(state, batches[i % len(batches)])
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - t0) / _STEPS.value)
    step = min(times)

    tokens = config.batch_size * config.seq_len
    model_flops = model_flops_per_token(exp.model_cfg, config.seq_len) * tokens
    n_dev = exp.mesh.devices.size
    result = {
        "config": config.name, "devices": n_dev,
        "mesh": {k: v for k, v in exp.mesh.shape.items() if v > 1},
        "step_ms": round(step * 1e3, 3), "step_ms_median": round(float(np.median(times)) * 1e3, 3),
        "tokens_per_sec": round(tokens / step),
        "compile_s": round(t_compile, 2), "init_s": round(t_init, 2),
        "model_gflops_per_step": round(model_flops / 1e9, 3),
        "model_gflop_per_s": round(model_flops / step / 1e9, 1),  # all devices together
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


if __name__ == "__main__":
    app.run(main)
