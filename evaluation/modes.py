"""What `eval.py` does, one function per mode; `run` picks the mode from the request.

  evaluate     the validation loss of one checkpoint (the default; with --quantize, real
               int8/int4/int3 weights, rounded to nearest or by GPTQ calibrated on --data
               or the training split; with --prune, magnitude-pruned weights)
  checkpoints  every kept checkpoint and/or other data (--all_steps, --data)
  sample       generate text (--sample; beam search with --num_beams > 1), after
               evaluating unless --noeval
  speculative  generate with a draft model (--sample --draft_workdir)
  generation   generate for a prompt/reference set and score BLEU, chrF, ROUGE
               (--generation_set)
  attention    the prompt's attention maps and head statistics (--attention_maps)
  lm_eval      lm-evaluation-harness tasks (--lm_eval, evaluation/harness.py)
  rewards      score a JSON-lines file of responses with a reward model (--score_rewards,
               evaluation/rewards.py)

Results are JSON lines on stdout (and files under WORKDIR/eval/); generated text goes to
stdout and speed figures to stderr.
"""

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from jaxlm.evaluation import quantized_run
from jaxlm.configs.errors import RunError
from jaxlm.evaluation.request import EvalRequest
from jaxlm.evaluation.pruned import evaluate_pruned, matrices_table
from jaxlm.evaluation.quantized import evaluate_quantized
from jaxlm.evaluation.restore import json_line, restore_run, save_result
from jaxlm.evaluation import rewards
from jaxlm.evaluation.attention_maps import heads_table, prompt_attention
from jaxlm.evaluation.generation_set import cut_at_stop, generation_report, load_generation_set
from jaxlm.evaluation.sampling import beam_search, continue_prompts, sample, sample_speculative
from jaxlm.evaluation.suite import evaluate_checkpoints, load_eval_data
from jaxlm.training import rundir
from jaxlm.training.evaluate import NonFiniteEval, evaluate


def write_eval_result(workdir: str | Path, result: dict[str, Any], suffix: str = "") -> Path:
    """Save an eval result under WORKDIR/eval/ (process 0 only)."""
    out = Path(workdir) / "eval" / f"step_{result['step']}{suffix}.json"
    if jax.process_index() == 0:
        save_result(out, json_line(result) + "\n")
    return out


def _print_result(result: dict[str, Any]) -> None:
    print(json_line(result), flush=True)


def _evaluate_one(req: EvalRequest, exp: Any, state: Any, step: int) -> None:
    """The validation loss (with integer weights if --quantize): printed, then saved (a
    result that cannot be saved is still printed)."""
    try:
        if req.quantize:
            result = {"step": step, **_evaluate_quantized(req, exp, state, step)}
        elif req.pruning is not None:
            result = {"step": step, **evaluate_pruned(exp, state.params, req.pruning)}
            print(matrices_table(result["matrices"]), file=sys.stderr)
        else:
            result = {"step": step, **evaluate(exp, state.params)}
    except NonFiniteEval as e:
        raise RunError(f"checkpoint step {step} in {req.workdir}: {e}; the run had diverged "
                       "by then: evaluate an earlier --step") from None
    _print_result(result)
    write_eval_result(req.workdir, result, suffix=quantized_suffix(req))


def _evaluate_quantized(req: EvalRequest, exp: Any, state: Any, step: int) -> dict[str, Any]:
    """--quantize's result; with --save, the quantized weights are also written as a new
    run (evaluation/quantized_run.py)."""
    calibration = load_eval_data(exp, req.data)[0] if req.data else None
    args = (exp, state.params, req.quantize, req.quant_granularity, req.quant_symmetric,
            req.gptq, req.calibration_batches, calibration)
    if not req.save:
        return evaluate_quantized(*args)
    output = quantized_run.check_save(req.workdir, req.save)
    record: dict[str, Any] = {"quantize": req.quantize, "method": req.quant_method}
    if req.gptq is not None:
        record.update(damp=req.gptq_damp, act_order=req.gptq_act_order,
                      calibration=quantized_run.calibration_record(
                          exp, req.calibration_batches, req.data))
    with quantized_run.writing(output):
        return evaluate_quantized(*args, save=lambda qparams, quant: (
            quantized_run.write_quantized_run(exp, qparams, quant, step, output, record)))


def quantized_suffix(req: EvalRequest) -> str:
    """The result file's suffix: `_int4`, `_int4_gptq`, `_prune_0.5_layer`,
    `_prune_0.5_2of4`, ... ('' for float weights)."""
    if req.pruning is not None:
        p = req.pruning
        return f"_prune_{p.sparsity:g}_" + (p.scope if p.nm is None else "{}of{}".format(*p.nm))
    if not req.quantize:
        return ""
    return f"_{req.quantize}" + ("" if req.quant_method == "rtn" else f"_{req.quant_method}")


def _print_samples(req: EvalRequest, texts: list[str], stats: dict[str, float]) -> None:
    for prompt, text in zip(req.prompts, texts):
        print(f"--- prompt {prompt!r}\n{prompt}{text}")
    print(json.dumps({k: round(v, 3) for k, v in stats.items()}), file=sys.stderr)
    print(speed_line(stats), file=sys.stderr)


def evaluate_mode(req: EvalRequest) -> None:
    """One checkpoint on the validation split (float, or integer weights with --quantize)."""
    _evaluate_one(req, *restore_run(req.workdir, req.step))


def checkpoints_mode(req: EvalRequest) -> None:
    steps = "all" if req.all_steps else "latest" if req.step is None else [req.step]
    evaluate_checkpoints(req.workdir, steps, req.data, on_result=_print_result)


def sample_mode(req: EvalRequest) -> None:
    exp, state, step = restore_run(req.workdir, req.step)
    if req.evaluate or req.quantize:
        _evaluate_one(req, exp, state, step)
    g = req.generate
    if g.num_beams > 1:
        texts, stats = beam_search(exp, state.params, list(req.prompts), g.length,
                                   g.num_beams, g.length_penalty, g.early_stopping_value())
    else:
        texts, stats = sample(exp, state.params, list(req.prompts), g.length, req.sampling,
                              g.seed)
    _print_samples(req, texts, stats)


def speculative_mode(req: EvalRequest) -> None:
    exp, state, step = restore_run(req.workdir, req.step)
    if req.evaluate or req.quantize:
        _evaluate_one(req, exp, state, step)
    g = req.generate
    texts, stats = sample_speculative(exp, state.params, req.draft_workdir, list(req.prompts),
                                      g.length, req.sampling, g.seed, g.draft_tokens,
                                      req.draft_step, compare=req.compare)
    _print_samples(req, texts, stats)


def decoding_settings(req: EvalRequest) -> dict[str, Any]:
    """How the generations were decoded, as saved beside their scores."""
    g, sp = req.generate, req.sampling
    settings: dict[str, Any] = {"max_new_tokens": g.length, "stop": req.stop,
                                "batch_size": req.batch_size}
    if g.num_beams > 1:
        return {"method": "beam", "num_beams": g.num_beams, "length_penalty": g.length_penalty,
                "early_stopping": g.early_stopping_value(), **settings}
    if sp.temperature <= 0.0:
        return {"method": "greedy", **settings}
    return {"method": "sample", "temperature": sp.temperature, "top_k": sp.top_k,
            "top_p": sp.top_p, "seed": g.seed, **settings}


def generation_set_mode(req: EvalRequest) -> None:
    """Generate for every prompt of --generation_set and score against its references."""
    examples = load_generation_set(req.generation_set, req.prompt_field, req.reference_field)
    exp, state, step = restore_run(req.workdir, req.step)
    if req.evaluate:
        _evaluate_one(req, exp, state, step)
    texts = continue_prompts(exp, state.params, [e["prompt"] for e in examples], req.generate,
                             req.sampling, req.batch_size)
    report = generation_report(examples, [cut_at_stop(t, req.stop) for t in texts],
                               decoding_settings(req))
    name = Path(req.generation_set).name.split(".")[0]
    result = {"step": step, "generation_set": str(req.generation_set), **report}
    _print_result({k: v for k, v in result.items() if k != "examples"})
    if jax.process_index() == 0:
        save_result(Path(req.workdir) / "eval" / "generation" / f"{name}_step_{step}.json",
                    json.dumps(result, indent=1) + "\n")


def attention_maps_mode(req: EvalRequest) -> None:
    """The prompt's attention maps and head statistics under WORKDIR/eval/attention/."""
    exp, state, step = restore_run(req.workdir, req.step)
    if req.evaluate:
        _evaluate_one(req, exp, state, step)
    out = Path(req.workdir) / "eval" / "attention" / f"step_{step}"
    stats = prompt_attention(exp, state.params, req.prompts[0], out)
    print(heads_table(stats))
    _print_result({"step": step, "attention_maps": str(out),
                   "layers": int(stats["entropy"].shape[0]),
                   "heads": int(stats["entropy"].shape[1])})


def lm_eval_mode(req: EvalRequest) -> None:
    """lm-evaluation-harness tasks on one checkpoint: the table on stdout, the results
    JSON under WORKDIR/eval/lm_eval/."""
    # Deferred: the `lm_eval` package is optional (the `eval` extra) and slow to import.
    from jaxlm.evaluation import harness
    context = rundir.load_config(req.workdir).train.seq_len
    manager = harness.load_tasks(list(req.lm_eval), req.lm_eval_include, context)
    exp, state, step = restore_run(req.workdir, req.step)
    if req.evaluate:
        _evaluate_one(req, exp, state, step)
    limit = None if req.limit is None else int(req.limit) if req.limit >= 1 else req.limit
    results = harness.run_harness(exp, state.params, list(req.lm_eval), req.lm_eval_include,
                                  req.num_fewshot, limit, req.batch_size,
                                  req.bootstrap_iters, manager)
    print(harness.summary_table(results), flush=True)
    if jax.process_index() == 0:
        harness.write_harness_results(
            results, Path(req.workdir) / "eval" / "lm_eval" / f"step_{step}.json")


def rewards_mode(req: EvalRequest) -> None:
    """Score every record of --score_rewards with the run's reward head: the summary on
    stdout, one line per record in --output (default WORKDIR/eval/rewards/)."""
    scoring = rewards.run_scoring_set(req.workdir, req.score_rewards)
    if req.output:
        rewards.check_output(Path(req.output), Path(req.score_rewards))
    exp, state, step = restore_run(req.workdir, req.step)
    if req.evaluate:
        _evaluate_one(req, exp, state, step)
    out = Path(req.output) if req.output else rewards.default_output(req.workdir,
                                                                      req.score_rewards, step)
    lines, summary = rewards.score_records(exp, state.params, scoring)
    _print_result({"step": step, "score_rewards": str(req.score_rewards), "output": str(out),
                   **summary})
    if jax.process_index() == 0:
        save_result(out, rewards.scores_text(lines))


def pick_mode(req: EvalRequest) -> Callable[[EvalRequest], None]:
    if req.score_rewards:
        return rewards_mode
    if req.lm_eval:
        return lm_eval_mode
    if req.generation_set:
        return generation_set_mode
    if req.attention_maps:
        return attention_maps_mode
    if req.all_steps or (req.data and req.gptq is None):
        return checkpoints_mode
    if req.sample:
        return speculative_mode if req.draft_workdir else sample_mode
    return evaluate_mode


def run(req: EvalRequest) -> None:
    pick_mode(req)(req)


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
