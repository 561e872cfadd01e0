"""Train a language model.

  python train.py                                   # the embedded default: tiny Shakespeare
  python train.py --config=configs/shakespeare_char.py --workdir=runs/x --config.steps=500
  python train.py --config=configs/shakespeare_char.py:tiny --cpu_devices=8 --config.mesh.fsdp=4

Running the same command again resumes from the latest checkpoint in --workdir.
"""

import importlib.util
import json
import os
import sys

from absl import app, flags, logging

from jaxlm.configs.cli import Launch, config_value, define_config_flag, flags_parser
from jaxlm.configs.errors import ConfigError, RunError, exit_on_environment_error
from jaxlm.configs.sections import Config
from jaxlm.parallel.distributed import initialize
from jaxlm.training.planner import format_plan, plan
from jaxlm.training.trainer import describe_devices, log, train

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_CONFIG = os.path.join(_HERE, "configs", "shakespeare_char.py")
_CONFIG = define_config_flag(_DEFAULT_CONFIG,
                             "Config file, optionally with a preset after a colon.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "Use N fake CPU devices.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile the train step for the mesh and print "
                             "per-device memory, FLOPs and collectives; do not train.")
_DRY_RUN_JSON = flags.DEFINE_string("dry_run_json", None, "Also write the dry run as JSON.")
_ALLOW_SCHEDULE_CHANGE = flags.DEFINE_bool(
    "allow_schedule_change", False, "Resume with a different --config.steps (the learning-rate "
    "schedule is recomputed for the new length).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if logging.get_verbosity() == logging.INFO:  # orbax logs every save step at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        # The one place the ConfigDict is resolved into typed sections.
        config = Config.from_dict(config_value(_CONFIG, sys.argv, _DEFAULT_CONFIG))
        workdir = _WORKDIR.value or os.path.join("runs", config.name)
        initialize(**Launch.parse(dict(
            cpu_devices=_CPU_DEVICES.value, coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)).to_dict())
        if _DRY_RUN.value or _DRY_RUN_JSON.value:
            result = plan(config, workdir)
            print(format_plan(result))
            if _DRY_RUN_JSON.value:
                with open(_DRY_RUN_JSON.value, "w") as f:
                    json.dump(result, f, indent=2)
            return
        log(describe_devices())
        summary = train(config, workdir, allow_schedule_change=_ALLOW_SCHEDULE_CHANGE.value)
    except (ConfigError, RunError) as e:
        sys.exit(f"error: {e}")
    except Exception as e:  # noqa: BLE001 -- a full disk or an unwritable path is one line
        exit_on_environment_error(e)
    except KeyboardInterrupt:
        sys.exit("interrupted: exited at once (run the same command to resume from the last "
                 "checkpoint)")
    log(json.dumps(summary))
    if not summary["interrupted"]:
        board = f"tensorboard --logdir {summary['workdir']}/tensorboard"
        if importlib.util.find_spec("tensorboard") is None:
            board = f"pip install tensorboard, then {board}"
        log(f"Checkpoints: {summary['checkpoints']}\nMetrics: {summary['metrics']} "
            f"(TensorBoard: {board})\n"
            f"Evaluate and sample: python eval.py --workdir={workdir} --sample")


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser(_DEFAULT_CONFIG))
