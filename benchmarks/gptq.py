"""Post-training quantization of a trained run: eval loss, bytes, time and peak memory of
float, RTN and GPTQ weights in one table; and the GPTQ Hessians' sizes for any config.

  python benchmarks/gptq.py --workdir=runs/shakespeare_char --granularity=32
  python benchmarks/gptq.py --plan_config=configs/gpt_1b.py

With --workdir, each row is one evaluation of the run's latest checkpoint on its
validation split (`evaluation/quantized.py`, as `eval.py --quantize` runs it); the peak
resident memory is the process's after that row (it only grows). With --plan_config,
nothing runs: the script prints, per block, the [I, I] float32 Hessian of every Linear's
inputs that GPTQ accumulates, and the FLOPs per calibration token that accumulating them
costs (2 I^2 per matrix).
"""

import dataclasses
import json
import resource

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run.")
_GRANULARITY = flags.DEFINE_string("granularity", "32", "Group size, or per_channel.")
_CALIBRATION = flags.DEFINE_integer("calibration_batches", 32, "GPTQ calibration batches.")
_METHODS = flags.DEFINE_string("methods", "int8:rtn,int4:rtn,int4:gptq,int3:rtn,int3:gptq",
                               "bits:method pairs, comma-separated.")
_PLAN = flags.DEFINE_string("plan_config", None, "A config file: print its GPTQ Hessians.")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(workdir: str) -> None:
    from jaxlm.evaluation.quantized import evaluate_quantized
    from jaxlm.evaluation.restore import restore_run
    from jaxlm.models.gptq import GptqSettings
    from jaxlm.training.evaluate import evaluate
    exp, state, step = restore_run(workdir)
    print(f"step {step}; calibration: {_CALIBRATION.value} batches of "
          f"{exp.config.train.batch_size} x {exp.config.train.seq_len} tokens")
    print("| weights | method | eval loss | bits per byte | weight bytes | quantize s | "
          "peak RSS MiB |\n| --- | --- | --- | --- | --- | --- | --- |")
    r = evaluate(exp, state.params)
    print(f"| float32 | - | {r['eval_loss']:.4f} | {r['bits_per_byte']:.4f} | - | - | "
          f"{peak_rss_mib():,.0f} |")
    for pair in _METHODS.value.split(","):
        bits, method = pair.split(":")
        gptq = GptqSettings() if method == "gptq" else None
        r = evaluate_quantized(exp, state.params, bits, _GRANULARITY.value, gptq=gptq,
                               calibration_count=_CALIBRATION.value)
        print(f"| {bits} g{_GRANULARITY.value} | {method} | {r['eval_loss']:.4f} | "
              f"{r['bits_per_byte']:.4f} | {r['weight_bytes']:,} | {r['quantize_seconds']:.1f}"
              f" | {peak_rss_mib():,.0f} |", flush=True)


def plan(config_path: str) -> None:
    from jaxlm.configs.cli import load_config_file
    from jaxlm.configs.sections import Config
    from jaxlm.models.config import ModelConfig
    from jaxlm.models.layers import Linear
    from jaxlm.models.model import abstract_model
    config = Config.from_dict(load_config_file(config_path))
    cfg = ModelConfig.from_section(config.model, 256, seq_len=config.train.seq_len)
    model = abstract_model(dataclasses.replace(cfg, quant=None))
    rows, total, flops = [], 0, 0
    for path, m in model.blocks.iter_modules():
        if isinstance(m, Linear):
            shape = m.kernel.get_value().shape[1:]  # drop the layers axis
            i = 1
            for d in shape[:m.in_ndim]:
                i *= d
            rows.append({"matrix": ".".join(map(str, path)), "inputs": i,
                         "hessian_mib": i * i * 4 / 2**20})
            total += i * i * 4
            flops += 2 * i * i
    for r in rows:
        print(json.dumps(r))
    print(json.dumps({"config": config_path, "layers": cfg.model.num_layers,
                      "hessians_per_block_mib": round(total / 2**20, 1),
                      "gram_flops_per_token_per_block": flops}))


def main(argv: list[str]) -> None:
    del argv
    if _PLAN.value:
        plan(_PLAN.value)
    if _WORKDIR.value:
        measure(_WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
