"""Evaluate a training run's checkpoint, and sample text from it.

  python eval.py --workdir=runs/shakespeare_char                 # latest checkpoint
  python eval.py --workdir=runs/shakespeare_char --step=1000
  python eval.py --workdir=runs/shakespeare_char --sample --prompt="ROMEO:" --length=300 \
      --temperature=0.8 --top_k=40

Prints one JSON line with step, eval_loss, perplexity and num_tokens, and writes it to
WORKDIR/eval/step_<N>.json. The run's saved config is used; no --config is needed.
"""

import json
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_EVAL = flags.DEFINE_bool("eval", True, "Evaluate on the full validation split.")
_SAMPLE = flags.DEFINE_bool("sample", False, "Generate text after evaluating.")
_PROMPT = flags.DEFINE_multi_string("prompt", ["\n"], "Prompt(s); several form a batch.")
_LENGTH = flags.DEFINE_integer("length", 500, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "Use N fake CPU devices.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if logging.get_verbosity() == logging.INFO:  # orbax logs every save step at INFO
        logging.set_verbosity(logging.WARNING)
    from parallel.distributed import initialize
    initialize(_CPU_DEVICES.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from configs.errors import ConfigError
    from inference.generate import SamplingParams
    from training.evaluate import evaluate, restore_run, sample, write_eval_result

    try:
        exp, state, step = restore_run(_WORKDIR.value, _STEP.value)
        if _EVAL.value:
            result = {"step": step, **evaluate(exp, state.params)}
            write_eval_result(_WORKDIR.value, result)
            print(json.dumps(result), flush=True)
        if _SAMPLE.value:
            sp = SamplingParams(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
            texts, stats = sample(exp, state.params, _PROMPT.value, _LENGTH.value, sp,
                                  _SEED.value)
            for prompt, text in zip(_PROMPT.value, texts):
                print(f"--- prompt {prompt!r}\n{prompt}{text}")
            print(json.dumps({k: round(v, 3) for k, v in stats.items()}), file=sys.stderr)
    except ConfigError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
