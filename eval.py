"""Evaluate a training run's checkpoint, and sample text from it.

  python eval.py --workdir=runs/shakespeare_char                 # latest checkpoint
  python eval.py --workdir=runs/shakespeare_char --step=1000
  python eval.py --workdir=runs/shakespeare_char --sample --prompt="ROMEO:" --length=300 \
      --temperature=0.8 --top_k=40
  python eval.py --workdir=runs/shakespeare_char --all_steps      # every kept checkpoint
  python eval.py --workdir=runs/shakespeare_char --data=other.txt  # a text or prepared dir
  python eval.py --workdir=runs/big --noeval --sample --temperature=0 \
      --draft_workdir=runs/small --draft_tokens=4                 # speculative decoding
  python eval.py --workdir=runs/shakespeare_char --quantize=int4   # real int4 weights
  python eval.py --workdir=runs/shakespeare_char --noeval --sample --num_beams=4 \
      --length_penalty=1.0 --early_stopping=false                 # beam search
  python eval.py --workdir=runs/shakespeare_char --noeval --generation_set=heldout.jsonl \
      --length=40 --stop=$'\n' --temperature=0                   # BLEU, chrF, ROUGE
  python eval.py --workdir=runs/shakespeare_char --noeval --attention_maps --prompt="ROMEO:"
  python eval.py --workdir=runs/shakespeare_char --noeval --lm_eval=TASKS \
      --lm_eval_include=DIR --num_fewshot=N --limit=N             # lm-evaluation-harness
  python eval.py --workdir=runs/shakespeare_char --quantize=int4 --quant_method=gptq \
      --quant_granularity=64 --calibration_batches=32              # GPTQ int4, groups of 64
  python eval.py --workdir=runs/rm --noeval --score_rewards=pairs.jsonl \
      [--output=scores.jsonl]                                     # a reward model's scores
  python eval.py --workdir=runs/shakespeare_char --prune=0.5 --prune_pattern=2:4  # 2:4 sparse
  python eval.py --workdir=runs/shakespeare_char --quantize=int4 --quant_method=gptq \
      --save=runs/shakespeare_char_int4                            # ... written as a run

Prints one JSON line with step, eval_loss, perplexity, num_tokens and bits_per_byte (the
summed loss in bits over the UTF-8 bytes of the evaluated targets, comparable across
tokenizers; per source too for a mixture), and writes it to WORKDIR/eval/step_<N>.json.
The run's saved config is used; no --config is needed. --all_steps prints one line per
checkpoint (char runs add bits_per_char) and writes WORKDIR/eval/summary.csv and
eval_loss.png; with --data=PATH (a text file, or a directory prepared with the run's
tokenizer: its validation split) the files go to WORKDIR/eval/<data name>/. Generated
text is decoded with the run's tokenizer, whatever its kind. With --quantize=int8|int4|int3
the weights are quantized after training (with the run's `quant` granularity and
symmetry unless overridden), stored as integers plus scales, and the line adds
`weight_bytes` (vs `float_weight_bytes`); the result goes to
WORKDIR/eval/step_<N>_int8.json (or _int4, _int3). --quant_method=gptq quantizes the
blocks' matrices with GPTQ, calibrated on --calibration_batches batches of the training
split (or of --data) (result: step_<N>_int4_gptq.json). --quantize=nf4 stores NF4 level
indices in blocks of 64 inputs with double-quantized absmax scales (QLoRA's format; the
line adds `bits_per_parameter`, about 4.127); see docs/quantization.md.
--score_rewards scores a JSON-lines file of {prompt, response} records (or chat
`messages`, or {prompt, chosen, rejected} pairs: pair accuracy and mean margin) with a
reward model run (loss.weights.reward) and writes one line per record to --output; see
docs/alignment.md. --prune=S [--prune_pattern=2:4] [--prune_scope=global] prunes the
linear weights once by magnitude and evaluates them; the line adds the sparsity, bytes and
a row per matrix (also printed as a table on stderr); the result goes to
step_<N>_prune_<S>_<pattern>.json; see docs/pruning.md. --save=NEW_RUN (with --quantize)
writes the quantized weights as a new run that eval.py, --draft_workdir, init.from_workdir
with lora.rank (QLoRA) and convert.py --to_hf read; see docs/quantization.md.
"""

import sys

from absl import app, flags, logging

from jaxlm.configs.cli import Launch, flags_parser
from jaxlm.configs.errors import ConfigError, RunError, exit_on_environment_error
from jaxlm.evaluation.modes import run
from jaxlm.evaluation.request import EvalRequest
from jaxlm.parallel.distributed import initialize

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
_NUM_BEAMS = flags.DEFINE_integer("num_beams", 1, "Beam search with this many beams (1 = "
                                  "sample as --temperature/--top_k/--top_p say).")
_LENGTH_PENALTY = flags.DEFINE_float("length_penalty", 1.0, "Beam search: a hypothesis "
                                     "scores sum logprob / length**this.")
_EARLY_STOPPING = flags.DEFINE_string("early_stopping", "false", "Beam search: true | "
                                      "false | never, as in transformers' generate.")
_ALL_STEPS = flags.DEFINE_bool("all_steps", False, "Evaluate every kept checkpoint; write "
                               "eval/summary.csv and eval/eval_loss.png.")
_DATA = flags.DEFINE_string("data", None, "Evaluate on this text file or prepared token "
                            "directory (its validation split) instead of the run's.")
_DRAFT_WORKDIR = flags.DEFINE_string("draft_workdir", None, "A smaller run with the same "
                                     "tokenizer: sample with speculative decoding.")
_DRAFT_STEP = flags.DEFINE_integer("draft_step", None, "The draft's checkpoint step.")
_DRAFT_TOKENS = flags.DEFINE_integer("draft_tokens", 4, "Tokens the draft proposes per round.")
_COMPARE = flags.DEFINE_bool("compare", True, "With --draft_workdir, also decode without the "
                             "draft and report the speed-up.")
_QUANTIZE = flags.DEFINE_string("quantize", None, "int8 | int4 | int3: evaluate with real "
                                "integer weights of this width; nf4: NormalFloat-4 with "
                                "double-quantized scales (QLoRA).")
_METHOD = flags.DEFINE_string("quant_method", "rtn", "rtn (round to nearest) | gptq "
                              "(calibrated on the training split, or on --data).")
_CALIBRATION = flags.DEFINE_integer("calibration_batches", 32, "GPTQ: calibration batches "
                                    "of train.batch_size windows.")
_DAMP = flags.DEFINE_float("gptq_damp", 0.01, "GPTQ: dampening, a fraction of the mean "
                           "Hessian diagonal.")
_ACT_ORDER = flags.DEFINE_bool("gptq_act_order", False, "GPTQ: quantize inputs by "
                               "decreasing Hessian diagonal.")
_SAVE = flags.DEFINE_string("save", None, "With --quantize: write the quantized weights as "
                            "a new run in this directory (evaluate it, draft with it, "
                            "LoRA-tune it, export it; docs/quantization.md).")
_GRANULARITY = flags.DEFINE_string("quant_granularity", None,
                                   "per_channel | per_tensor | a group size (default: the "
                                   "run's quant.granularity).")
_SYMMETRIC = flags.DEFINE_bool("quant_symmetric", None,
                               "Symmetric integers (default: the run's quant.symmetric).")
_PRUNE = flags.DEFINE_float("prune", None, "One-shot magnitude pruning to this sparsity "
                            "in [0, 1) of the linear weights, then evaluate.")
_PRUNE_PATTERN = flags.DEFINE_string("prune_pattern", "unstructured", "unstructured | N:M "
                                     "(e.g. 2:4, with --prune=0.5).")
_PRUNE_SCOPE = flags.DEFINE_string("prune_scope", "layer", "layer | global: unstructured "
                                   "sparsity per matrix or over all of them.")
_GENERATION_SET = flags.DEFINE_string("generation_set", None, "A JSON-lines file of prompts "
                                      "and references: generate, then score BLEU, chrF and "
                                      "ROUGE; writes eval/generation/<name>_step_<N>.json.")
_PROMPT_FIELD = flags.DEFINE_string("prompt_field", "prompt", "--generation_set's prompt key.")
_REFERENCE_FIELD = flags.DEFINE_string("reference_field", "reference",
                                       "--generation_set's reference key.")
_STOP = flags.DEFINE_string("stop", None, "A generation ends before this string (and at EOS).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Prompts generated at once.")
_ATTENTION_MAPS = flags.DEFINE_bool("attention_maps", False, "Write the --prompt's attention "
                                    "maps (a PNG per layer), heads.csv and maps.npz to "
                                    "eval/attention/step_<N>/.")
_LM_EVAL = flags.DEFINE_list("lm_eval", [], "lm-evaluation-harness tasks (comma-separated): "
                             "writes eval/lm_eval/step_<N>.json and prints the table.")
_LM_EVAL_INCLUDE = flags.DEFINE_string("lm_eval_include", None, "A directory of extra "
                                       "lm-eval task YAML files.")
_NUM_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "lm-eval few-shot examples "
                                    "(default: each task's own).")
_LIMIT = flags.DEFINE_float("limit", None, "lm-eval examples per task (< 1: a fraction).")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap_iters", 100000, "lm-eval stderr resamples "
                                  "(0 = none).")
_SCORE_REWARDS = flags.DEFINE_string("score_rewards", None, "A JSON-lines file of "
                                     "{prompt, response} (or preference) records: score "
                                     "them with the run's reward head.")
_OUTPUT = flags.DEFINE_string("output", None, "--score_rewards' scores file (default: "
                              "eval/rewards/<name>_step_<N>.jsonl).")
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
    try:
        request = EvalRequest.parse(dict(
            workdir=_WORKDIR.value, step=_STEP.value, evaluate=_EVAL.value,
            sample=_SAMPLE.value, prompts=tuple(_PROMPT.value),
            sampling={"temperature": _TEMPERATURE.value, "top_k": _TOP_K.value,
                      "top_p": _TOP_P.value},
            generate={"length": _LENGTH.value, "seed": _SEED.value,
                      "draft_tokens": _DRAFT_TOKENS.value, "num_beams": _NUM_BEAMS.value,
                      "length_penalty": _LENGTH_PENALTY.value,
                      "early_stopping": _EARLY_STOPPING.value},
            all_steps=_ALL_STEPS.value, data=_DATA.value, draft_workdir=_DRAFT_WORKDIR.value,
            draft_step=_DRAFT_STEP.value, compare=_COMPARE.value, quantize=_QUANTIZE.value,
            quant_granularity=_GRANULARITY.value, quant_symmetric=_SYMMETRIC.value,
            generation_set=_GENERATION_SET.value, prompt_field=_PROMPT_FIELD.value,
            reference_field=_REFERENCE_FIELD.value, stop=_STOP.value,
            batch_size=_BATCH_SIZE.value, attention_maps=_ATTENTION_MAPS.value,
            lm_eval=tuple(_LM_EVAL.value), lm_eval_include=_LM_EVAL_INCLUDE.value,
            num_fewshot=_NUM_FEWSHOT.value, limit=_LIMIT.value,
            bootstrap_iters=_BOOTSTRAP.value,
            quant_method=_METHOD.value, calibration_batches=_CALIBRATION.value,
            gptq_damp=_DAMP.value, gptq_act_order=_ACT_ORDER.value,
            score_rewards=_SCORE_REWARDS.value, output=_OUTPUT.value,
            prune=_PRUNE.value, prune_pattern=_PRUNE_PATTERN.value,
            prune_scope=_PRUNE_SCOPE.value, save=_SAVE.value))
        initialize(**Launch.parse(dict(
            cpu_devices=_CPU_DEVICES.value, coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)).to_dict())
        run(request)
    except (ConfigError, RunError) as e:
        sys.exit(f"error: {e}")
    except Exception as e:  # noqa: BLE001 -- a full disk or an unwritable path is one line
        exit_on_environment_error(e)


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser())
