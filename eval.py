"""Evaluate a training run's checkpoint, and sample text from it.

  python eval.py --workdir=runs/shakespeare_char                 # latest checkpoint
  python eval.py --workdir=runs/shakespeare_char --step=1000
  python eval.py --workdir=runs/shakespeare_char --sample --prompt="ROMEO:" --length=300 \
      --temperature=0.8 --top_k=40
  python eval.py --workdir=runs/shakespeare_char --all_steps      # every kept checkpoint
  python eval.py --workdir=runs/shakespeare_char --data=other.txt  # + bits per char/byte
  python eval.py --workdir=runs/big --noeval --sample --temperature=0 \
      --draft_workdir=runs/small --draft_tokens=4                 # speculative decoding
  python eval.py --workdir=runs/shakespeare_char --quantize=int4   # real int4 weights

Prints one JSON line with step, eval_loss, perplexity and num_tokens, and writes it to
WORKDIR/eval/step_<N>.json. The run's saved config is used; no --config is needed.
--all_steps prints one line per checkpoint and writes WORKDIR/eval/summary.csv and
eval_loss.png; with --data=PATH (a text file, a prepared token directory or one of its
.bin files) the lines add bits_per_char or bits_per_byte and the files go to
WORKDIR/eval/<data name>/. With --quantize=int8|int4 the weights are quantized after
training (with the run's `quant` granularity and symmetry unless overridden), stored as
integers plus scales, and the line adds `weight_bytes` (vs `float_weight_bytes`); the
result goes to WORKDIR/eval/step_<N>_int8.json (or _int4).
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
_ALL_STEPS = flags.DEFINE_bool("all_steps", False, "Evaluate every kept checkpoint; write "
                               "eval/summary.csv and eval/eval_loss.png.")
_DATA = flags.DEFINE_string("data", None, "Evaluate on this text file or prepared token "
                            "directory/file instead of the validation split.")
_DRAFT_WORKDIR = flags.DEFINE_string("draft_workdir", None, "A smaller run with the same "
                                     "tokenizer: sample with speculative decoding.")
_DRAFT_STEP = flags.DEFINE_integer("draft_step", None, "The draft's checkpoint step.")
_DRAFT_TOKENS = flags.DEFINE_integer("draft_tokens", 4, "Tokens the draft proposes per round.")
_COMPARE = flags.DEFINE_bool("compare", True, "With --draft_workdir, also decode without the "
                             "draft and report the speed-up.")
_QUANTIZE = flags.DEFINE_enum("quantize", None, ["int8", "int4"],
                              "Evaluate with real integer weights of this width.")
_GRANULARITY = flags.DEFINE_string("quant_granularity", None,
                                   "per_channel | per_tensor | a group size (default: the "
                                   "run's quant.granularity).")
_SYMMETRIC = flags.DEFINE_bool("quant_symmetric", None,
                               "Symmetric integers (default: the run's quant.symmetric).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "Use N fake CPU devices.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if logging.get_verbosity() == logging.INFO:  # orbax warns that read-only managers
        logging.set_verbosity(logging.ERROR)     # do not save: noise for an evaluation
    from parallel.distributed import initialize
    initialize(_CPU_DEVICES.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from configs.errors import ConfigError
    from inference.generate import SamplingParams
    from training.evaluate import evaluate, restore_run, sample, write_eval_result

    try:
        suite = _ALL_STEPS.value or _DATA.value
        if suite and _QUANTIZE.value:
            raise ConfigError("quantize", "evaluates one checkpoint on the validation split; "
                                          "drop --all_steps/--data")
        if suite:  # every checkpoint and/or other data: one JSON line per step
            from training.eval_suite import evaluate_checkpoints
            steps = "all" if _ALL_STEPS.value else "latest" if _STEP.value is None else \
                [_STEP.value]
            evaluate_checkpoints(_WORKDIR.value, steps, _DATA.value,
                                 on_result=lambda r: print(json.dumps(r), flush=True))
        if (_EVAL.value and not suite) or _SAMPLE.value:
            exp, state, step = restore_run(_WORKDIR.value, _STEP.value)
        if _EVAL.value and not suite and _QUANTIZE.value:
            from training.quantize import evaluate_quantized
            result = {"step": step, **evaluate_quantized(
                exp, state.params, _QUANTIZE.value, _GRANULARITY.value, _SYMMETRIC.value)}
            write_eval_result(_WORKDIR.value, result, suffix=f"_{_QUANTIZE.value}")
            print(json.dumps(result), flush=True)
        elif _EVAL.value and not suite:
            result = {"step": step, **evaluate(exp, state.params)}
            write_eval_result(_WORKDIR.value, result)
            print(json.dumps(result), flush=True)
        if _SAMPLE.value:
            sp = SamplingParams(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
            if _DRAFT_WORKDIR.value:
                from training.eval_suite import sample_speculative
                texts, stats = sample_speculative(
                    exp, state.params, _DRAFT_WORKDIR.value, _PROMPT.value, _LENGTH.value, sp,
                    _SEED.value, _DRAFT_TOKENS.value, _DRAFT_STEP.value, compare=_COMPARE.value)
            else:
                texts, stats = sample(exp, state.params, _PROMPT.value, _LENGTH.value, sp,
                                      _SEED.value)
            for prompt, text in zip(_PROMPT.value, texts):
                print(f"--- prompt {prompt!r}\n{prompt}{text}")
            print(json.dumps({k: round(v, 3) for k, v in stats.items()}), file=sys.stderr)
            print(speed_line(stats), file=sys.stderr)
    except ConfigError as e:
        sys.exit(f"error: {e}")


def speed_line(stats: dict[str, float]) -> str:
    line = (f"prefill {stats['prefill_tokens_per_sec']:,.0f} tokens/s, decode "
            f"{stats['decode_tokens_per_sec']:,.0f} tokens/s")
    if "acceptance_rate" in stats:
        line += (f"; speculative (K={stats['draft_tokens']}): acceptance rate "
                 f"{stats['acceptance_rate']:.1%}, {stats['tokens_per_round']:.2f} tokens per "
                 "target pass")
    if "speedup" in stats:
        line += (f", plain decoding {stats['plain_decode_tokens_per_sec']:,.0f} tokens/s: "
                 f"speed-up {stats['speedup']:.2f}x")
    return line


if __name__ == "__main__":
    app.run(main)
