"""Train a language model.

  python train.py                                   # the embedded default: tiny Shakespeare
  python train.py --config=configs/shakespeare_char.py --workdir=runs/x --config.steps=500
  python train.py --config=configs/shakespeare_char.py:tiny --cpu_devices=8 --config.mesh.fsdp=4

Running the same command again resumes from the latest checkpoint in --workdir.
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from configs.errors import ConfigError
from configs.sections import Config
from parallel.distributed import initialize
from training.planner import format_plan, plan
from training.trainer import log, train

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "shakespeare_char.py"),
    "Config file, optionally with a preset after a colon.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "Use N fake CPU devices.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile the train step for the mesh and print "
                             "per-device memory, FLOPs and collectives; do not train.")
_DRY_RUN_JSON = flags.DEFINE_string("dry_run_json", None, "Also write the dry run as JSON.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if logging.get_verbosity() == logging.INFO:  # orbax logs every save step at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        config = Config.from_dict(_CONFIG.value)  # the one place the ConfigDict is resolved
        workdir = _WORKDIR.value or os.path.join("runs", config.name)
        initialize(_CPU_DEVICES.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                   _PROCESS_ID.value)
        if _DRY_RUN.value or _DRY_RUN_JSON.value:
            result = plan(config, workdir)
            print(format_plan(result))
            if _DRY_RUN_JSON.value:
                with open(_DRY_RUN_JSON.value, "w") as f:
                    json.dump(result, f, indent=2)
            return
        summary = train(config, workdir)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    log(json.dumps(summary))
    if not summary["interrupted"]:
        log(f"Checkpoints: {summary['checkpoints']}\nMetrics: {summary['metrics']} "
            f"(TensorBoard: tensorboard --logdir {summary['workdir']}/tensorboard)\n"
            f"Evaluate and sample: python eval.py --workdir={workdir} --sample")


if __name__ == "__main__":
    app.run(main)
