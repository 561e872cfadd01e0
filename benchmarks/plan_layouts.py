"""Dry-run several parallel layouts of one config and print them side by side.

  python benchmarks/plan_layouts.py --config=configs/gpt_1b.py --cpu_devices=64
  python benchmarks/plan_layouts.py --config=configs/shakespeare_char.py:tiny --cpu_devices=8 \
      --layouts="data=8;tensor=8;pipeline=2,data=4"

Each layout is `axis=size,...` (axes: data, fsdp, tensor, pipeline, expert, plus
pipeline_microbatches and pipeline_repeats). Nothing is trained: each layout's train step
is compiled on abstract inputs and its per-device memory, FLOPs and collectives printed
as a Markdown table (and one JSON line per layout).
"""

import json
import os
import sys
import tempfile

from absl import app, flags
from ml_collections import config_flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_ROOT, "configs", "gpt_1b.py"), "Config file.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 64, "Fake CPU devices to plan for.")
_LAYOUTS = flags.DEFINE_string(
    "layouts", "data=64;fsdp=64;fsdp=8,tensor=8;pipeline=4,fsdp=16,pipeline_microbatches=8;"
               "pipeline=4,tensor=4,fsdp=4,pipeline_microbatches=8",
    "Semicolon-separated layouts.")


def _fmt_gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def main(argv):
    del argv
    from jaxlm.parallel.distributed import initialize
    initialize(_CPU_DEVICES.value)
    from jaxlm.training.planner import plan

    from jaxlm.configs.errors import ConfigError
    from jaxlm.configs.sections import MESH_AXES

    rows = []
    for layout in _LAYOUTS.value.split(";"):
        config = _CONFIG.value.copy_and_resolve_references()
        for k in MESH_AXES:
            config.mesh[k] = 1
        config.pipeline_microbatches, config.pipeline_repeats = 0, 1
        try:
            for item in layout.split(","):
                key, _, value = item.partition("=")
                if key.startswith("pipeline_"):
                    config[key] = int(value)
                elif key in MESH_AXES:
                    config.mesh[key] = int(value)
                else:
                    raise ConfigError("layouts", f"{item!r}: expected AXIS=SIZE with AXIS one "
                                                 f"of {', '.join(MESH_AXES)}")
            r = plan(config, tempfile.mkdtemp())
        except ValueError as e:
            sys.exit(f"error: layouts: {layout!r}: {e}")
        except ConfigError as e:  # checked before anything compiles, as train.py --dry_run
            sys.exit(f"error: layout {layout}: {e}")
        print(json.dumps({"layout": layout, **r}), flush=True)
        rows.append((layout, r))

    kinds = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
    short = {"all-gather": "AG", "reduce-scatter": "RS", "all-reduce": "AR", "all-to-all": "A2A",
             "collective-permute": "CP"}
    r0 = rows[0][1]
    print(f"\n{r0['config']}: {r0['num_params'] / 1e9:.2f}B parameters, "
          f"{r0['tokens_per_step']:,} tokens per step, {r0['devices']} devices; "
          "per-device figures (GiB; collectives: count / GiB per step)\n")
    header = ["layout", "params", "optimizer", "temporaries", "GFLOP/step"] + \
        [short[k] for k in kinds] + ["bubble"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for layout, r in rows:
        pd = r["per_device_bytes"]
        coll = r["collectives_per_device"]
        cells = [layout.replace(",", " x "), _fmt_gib(pd["parameters"]),
                 _fmt_gib(pd["optimizer"]), _fmt_gib(pd["temporaries"]),
                 f"{r['model_flops_per_step_per_device'] / 1e9:,.0f}"]
        cells += [f"{coll[k]['count']} / {coll[k]['bytes'] / 2**30:.2f}" for k in kinds]
        cells.append(f"{r['pipeline_bubble']:.1%}")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    app.run(main)
