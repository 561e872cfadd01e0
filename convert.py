"""Import a Hugging Face model as a run directory, or export a run as a Hugging Face model.

  python convert.py --from_hf=DIR --workdir=RUN [--config.KEY=VALUE ...] [--cpu_devices=N]
  python convert.py --to_hf=DIR --workdir=RUN [--step=N] [--dtype=bfloat16] [--overwrite]
  python convert.py --merge_lora --workdir=RUN --output=NEW [--step=N]

--from_hf reads DIR/config.json (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM or GPT2LMHeadModel) and its safetensors files, and writes RUN as a run
that trained for 0 steps: config.json (the model section from DIR, every other key from
configs/imported.py and your --config overrides, e.g. the mesh and the data), a step-0
checkpoint built shard by shard on the mesh, and DIR's tokenizer and config files in
RUN/hf/. eval.py, distillation (loss.distill.teacher_workdir), speculative decoding and
init.from_workdir then take RUN as any other run.

--to_hf writes DIR for transformers.AutoModelForCausalLM.from_pretrained: safetensors,
config.json, and the tokenizer files of a run imported from Hugging Face. A LoRA run's
adapters are merged into the exported weights. DIR must be new or empty; an earlier export
is replaced only with --overwrite, and a run directory never.

Each command owns what it writes (storage/dirs.py): RUN and NEW must be new or empty and
are written under their lock (the one train.py holds), DIR is built beside itself and
renamed into place, and a failed command leaves nothing that blocks running it again.

--merge_lora writes NEW as a plain run (no adapters, a float base) whose checkpoint at
the same step holds RUN's adapters merged into its base weights, with a fresh optimizer.
"""

import json
import sys

from absl import app, flags, logging

from jaxlm.checkpoints.hf_export import export_hf
from jaxlm.checkpoints.hf_import import import_hf
from jaxlm.checkpoints.lora_merge import merge_run
from jaxlm.configs.cli import define_config_flag, flags_parser
from jaxlm.configs.errors import ConfigError, RunError, exit_on_environment_error
from jaxlm.configs.imported import get_config
from jaxlm.configs.sections import Config
from jaxlm.parallel.distributed import initialize

_DEFAULT_CONFIG = get_config()
_CONFIG = define_config_flag(_DEFAULT_CONFIG, "Import: every key but the model's (mesh, data, "
                                              "training).")
_FROM_HF = flags.DEFINE_string("from_hf", None, "Import this Hugging Face model directory.")
_TO_HF = flags.DEFINE_string("to_hf", None, "Export into this directory.")
_MERGE_LORA = flags.DEFINE_bool("merge_lora", False, "Merge a LoRA run's adapters into a new "
                                "plain run in --output.")
_OUTPUT = flags.DEFINE_string("output", None, "--merge_lora: the new run directory.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Export and merge: checkpoint step (default: the "
                             "latest).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Export: replace an earlier export in "
                                "--to_hf.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Export: float32 | bfloat16 | float16.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "Use N fake CPU devices.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if logging.get_verbosity() == logging.INFO:  # orbax logs every save step at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        if sum((bool(_FROM_HF.value), bool(_TO_HF.value), _MERGE_LORA.value)) != 1:
            raise ConfigError("from_hf", "give exactly one of --from_hf=DIR (import), "
                                         "--to_hf=DIR (export) and --merge_lora")
        if _MERGE_LORA.value and not _OUTPUT.value:
            raise ConfigError("output", "--merge_lora needs --output=NEW (a new run directory)")
        config = Config.from_dict(_CONFIG.value)
        initialize(_CPU_DEVICES.value)
        if _MERGE_LORA.value:
            summary = merge_run(_WORKDIR.value, _OUTPUT.value, _STEP.value)
        elif _FROM_HF.value:
            summary = import_hf(_FROM_HF.value, _WORKDIR.value, config)
        else:
            summary = export_hf(_WORKDIR.value, _TO_HF.value, _STEP.value, _DTYPE.value,
                                overwrite=_OVERWRITE.value)
    except (ConfigError, RunError) as e:
        sys.exit(f"error: {e}")
    except Exception as e:  # noqa: BLE001 -- a full disk or an unwritable path is one line
        exit_on_environment_error(e)
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser(_DEFAULT_CONFIG))
