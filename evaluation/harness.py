"""lm-evaluation-harness over a run directory: the `jaxlm` model of `lm_eval`.

`JaxlmLM` is a `TemplateLM`, the base of the harness's own `hf` model, so requests are
tokenized by the same rules (a context's trailing spaces move to the continuation; the
pair is encoded whole and split; an empty context becomes the prefix token; no special
tokens are added). With the run's tokenizer and seq_len as the context:
  loglikelihood          (context + continuation)[-(seq_len + 1):][:-1] in one forward
                         pass; the continuation's log-probabilities summed, and whether
                         each of its tokens is the argmax;
  loglikelihood_rolling  the harness's disjoint rolling windows of seq_len tokens;
  generate_until         the KV-cache generator (greedy unless the task samples), the
                         context cut to its last seq_len - max_gen_toks tokens; the text
                         ends at EOS or before the first `until` string.
Requests run `batch_size` rows at a time, longest first; rows are right-padded to a
power of two (at most seq_len), so few shapes compile.

The prefix token (for empty contexts and the first rolling window) is the tokenizer's
BOS, else its EOS, else its first token of "\\n".
"""

import contextlib
import difflib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import simple_evaluate
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager, get_task_dict

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Sampling
from jaxlm.evaluation.restore import restore_run, save_result
from jaxlm.inference.generate import Generator
from jaxlm.losses.cross_entropy import mask_padded_vocab
from jaxlm.losses.objectives import split_objective_params

DEFAULT_MAX_GEN_TOKS = 256  # the harness's default for generate_until tasks


def _token_logprobs(graphdef: nnx.GraphDef, vocab_size: int, params: Any,
                    tokens_BxT: jax.Array, targets_BxT: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """(log p(target) [B, T], target is the argmax [B, T]) of one forward pass."""
    logits = nnx.merge(graphdef, params)(tokens_BxT).logits
    logp = jax.nn.log_softmax(mask_padded_vocab(logits, vocab_size), axis=-1)
    picked = jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logp, axis=-1) == targets_BxT


@register_model("jaxlm")
class JaxlmLM(TemplateLM):
    """A run's checkpoint as an lm-eval model: `--model jaxlm --model_args
    workdir=RUN[,step=N,batch_size=B]`, or `JaxlmLM.from_run` on a restored run."""

    def __init__(self, workdir: str | None = None, step: int | None = None,
                 batch_size: int = 8, run: tuple[Any, Any] | None = None):
        super().__init__()
        if run is None:
            exp, state, _ = restore_run(workdir, None if step is None else int(step))
            run = (exp, state.params)
        self.exp, params = run
        self.params = split_objective_params(params)[0]
        self.tok = self.exp.data.tokenizer
        self.batch_size = int(batch_size)
        self.context = self.exp.config.train.seq_len
        self._forward = jax.jit(_token_logprobs, static_argnums=(0, 1))
        self._generator = Generator(self.exp.graphdef, self.exp.model_cfg, self.context)

    @classmethod
    def from_run(cls, exp: Any, params: Any, batch_size: int = 8) -> "JaxlmLM":
        return cls(batch_size=batch_size, run=(exp, params))

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id if self.tok.eos_id is not None else self.prefix_token_id

    @property
    def prefix_token_id(self) -> int:
        for token in (self.tok.bos_id, self.tok.eos_id):
            if token is not None:
                return token
        return int(self.tok.encode("\n")[0])

    @property
    def max_length(self) -> int:
        return self.context

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        try:
            ids = self.tok.encode(string).tolist()
        except ValueError as e:
            raise ConfigError("lm_eval", f"a request's text does not fit the run's "
                                         f"{self.tok.kind} tokenizer ({e})") from None
        if add_special_tokens and self.tok.bos_id is not None:
            ids = [self.tok.bos_id] + ids
        return ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any
                              ) -> list[tuple[float, bool]]:
        rows = []
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self.context + 1):]
            rows.append((whole[:-1], whole[1:], len(continuation)))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            width = min(self.context, 1 << (len(rows[chunk[0]][0]) - 1).bit_length())
            tokens = np.zeros((self.batch_size, width), np.int32)
            targets = np.zeros((self.batch_size, width), np.int32)
            for r, i in enumerate(chunk):
                inp, tgt, _ = rows[i]
                tokens[r, :len(inp)], targets[r, :len(tgt)] = inp, tgt
            logp, greedy = jax.device_get(self._forward(
                self.exp.graphdef, self.exp.model_cfg.vocab_size, self.params,
                jnp.asarray(tokens), jnp.asarray(targets)))
            for r, i in enumerate(chunk):
                n_in, n = len(rows[i][0]), rows[i][2]
                span = slice(n_in - n, n_in)
                results[i] = (float(np.sum(logp[r, span], dtype=np.float64)),
                              bool(np.all(greedy[r, span])))
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                              ) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window,
                                 lm_utils.get_rolling_token_windows(
                                     token_list=self.tok_encode(string),
                                     prefix_token=self.prefix_token_id,
                                     max_seq_len=self.context, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += logp
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for key, members in groups.items():
            kwargs = json.loads(key)
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            check_generation_length(max_gen, self.context, "a generate_until request")
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            sp = Sampling(temperature=temperature)
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-(self.context - max_gen):]
                           or [self.prefix_token_id] for i in chunk]
                tokens, _ = self._generator.generate(self.params, prompts, max_gen, sp)
                for i, toks in zip(chunk, tokens):
                    out[i] = _cut(self.tok_decode(_until_eos(toks, self.tok.eos_id)), until)
        return out


def _until_eos(tokens: list[int], eos_id: int | None) -> list[int]:
    return tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens


def _cut(text: str, until: list[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def check_generation_length(max_gen_toks: int, context: int, what: str) -> None:
    """A generation of `max_gen_toks` tokens must leave room for a context token."""
    if max_gen_toks >= context:
        raise ConfigError("lm_eval", f"{what} generates up to {max_gen_toks} tokens, but the "
                                     f"model's context is {context} tokens (seq_len); lower "
                                     "its generation_kwargs.max_gen_toks below the context")


def _leaf_tasks(task_dict: dict[Any, Any]) -> list[Any]:
    tasks = []
    for value in task_dict.values():
        tasks += _leaf_tasks(value) if isinstance(value, dict) else [value]
    return tasks


def _task_manager(names: list[str], include: str | None) -> Any:
    """The tasks of `include` alone when they hold every name (no scan of the built-in
    tasks), else the harness's full TaskManager."""
    if include is not None:
        local = TaskManager(include_path=include, include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    return TaskManager(include_path=include)


@contextlib.contextmanager
def _quietly() -> Iterator[None]:
    """No dataset progress bars, and only the harness's errors, while tasks load."""
    log = logging.getLogger("lm_eval")
    level, bars = log.level, datasets.utils.logging.is_progress_bar_enabled()
    log.setLevel(logging.ERROR)
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        log.setLevel(level)
        if bars:
            datasets.utils.logging.enable_progress_bar()


def load_tasks(names: list[str], include: str | None, context: int) -> Any:
    """The harness's TaskManager, after checking that every name is a task or group it
    knows and that no generation task needs more tokens than the context holds."""
    if include is not None and not Path(include).is_dir():
        raise ConfigError("lm_eval_include", f"{include} is not a directory of task YAML "
                                             "files")
    with _quietly():
        manager = _task_manager(names, include)
        known = manager.all_tasks
        for name in names:
            if name not in known:
                local = sorted(TaskManager(include_path=include, include_defaults=False)
                               .all_tasks) if include else []
                close = difflib.get_close_matches(name, known, n=5)
                raise ConfigError(
                    "lm_eval", f"unknown task {name!r}; "
                               f"{'close: ' + ', '.join(close) + '; ' if close else ''}"
                               f"tasks in --lm_eval_include: "
                               f"{', '.join(local) if local else '(none)'}; "
                               f"lm-eval knows {len(known)} tasks in all")
        for task in _leaf_tasks(get_task_dict(names, manager)):
            if task.OUTPUT_TYPE == "generate_until":
                max_gen = int((task.config.generation_kwargs or {}).get(
                    "max_gen_toks", DEFAULT_MAX_GEN_TOKS))
                check_generation_length(max_gen, context, f"task {task.config.task!r}")
    return manager


def run_harness(exp: Any, params: Any, names: list[str], include: str | None,
                num_fewshot: int | None, limit: float | None, batch_size: int,
                bootstrap_iters: int, manager: Any | None = None) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` of the tasks on this run; returns the harness's results
    (with per-sample records under "samples")."""
    manager = manager or load_tasks(names, include, exp.config.train.seq_len)
    lm = JaxlmLM.from_run(exp, params, batch_size)
    return simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                           task_manager=manager, bootstrap_iters=bootstrap_iters,
                           log_samples=True)


def write_harness_results(results: dict[str, Any], out: Path) -> None:
    """The results JSON (as the harness writes it) at `out`, and every task's samples as
    JSON lines beside it (`<out stem>_samples_<task>.jsonl`)."""
    samples = results.get("samples", {})
    body = {k: v for k, v in results.items() if k != "samples"}
    save_result(out, json.dumps(body, indent=2, default=lm_utils.handle_non_serializable,
                                ensure_ascii=False) + "\n")
    for task, records in samples.items():
        lines = "".join(json.dumps(r, default=lm_utils.handle_non_serializable,
                                   ensure_ascii=False) + "\n" for r in records)
        save_result(out.with_name(f"{out.stem}_samples_{task}.jsonl"), lines)


def summary_table(results: dict[str, Any]) -> str:
    table = lm_utils.make_table(results)
    if results.get("groups"):
        table += "\n" + lm_utils.make_table(results, "groups")
    return table
