"""Score responses with a trained reward model: `eval.py --score_rewards=FILE`.

Every record of a JSON-lines file (`data.preference.make_scored`: {prompt, response},
{messages}, or a preference record {prompt, chosen, rejected}) is rendered as the run's
preference data were prepared: its tokenizer, the chat template and end its prepared
data directory recorded, BOS and END as in SFT. Each response is one row, padded to the
run's seq_len, scored in batches of `train.eval_batch_size` rows on the run's mesh; its
reward is the value head of `loss.weights.reward` on the row's last response position
(`losses.preference.reward_values`), as in training. A preference record adds its pair's
margin, and the summary its pair accuracy (chosen > rejected) and mean margin.

A record longer than seq_len + 1 tokens is counted by reason (with its first line) and
skipped: its output line names the reason and holds no score. Any other bad record, an
empty file and a run without a reward head are ConfigErrors before anything compiles.
The scores file has one JSON line per record, in the file's order, and is written
atomically; an existing file is replaced only when it is a scores file itself.
"""

import dataclasses
import json
import math
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlm.configs.errors import ConfigError
from jaxlm.data.pipeline import process_rows
from jaxlm.data.prepare.formats import META
from jaxlm.data.prepare.runs import prepared_directory_of, reuse_tokenizer
from jaxlm.data.preference import document_rows, make_scored
from jaxlm.data.readers import open_binary
from jaxlm.data.sft import (DEFAULT_END_TEXT, BadRecord, ChatTemplate, Example,
                            saved_template)
from jaxlm.data.tokenizers import Tokenizer
from jaxlm.losses.objectives import split_objective_params
from jaxlm.losses.preference import reward_values
from jaxlm.training import rundir
from jaxlm.training.experiment import Experiment
from jaxlm.training.teacher import frozen_forward

KEY = "score_rewards"


@dataclasses.dataclass
class ScoringSet:
    """The records of a scoring file: what each became, and what was skipped."""
    path: Path
    lines: list[int]  # 1-based line of each record
    records: list[Any]  # each record's JSON value, as written back beside its scores
    examples: list[list[Example]]  # each record's responses ([] when skipped)
    skipped: dict[str, dict[str, Any]]  # reason -> {count, line, detail} (its first)
    reasons: dict[int, tuple[str, str]]  # record index -> (reason, detail), when skipped


def require_reward_head(workdir: str | Path) -> None:
    """Refuse a run that trained no reward head (loss.weights.reward 0)."""
    if rundir.load_config(workdir).loss.weights.reward <= 0:
        raise ConfigError("workdir", f"the run {workdir} has no reward head "
                                     "(loss.weights.reward is 0); train a reward model on "
                                     "a preference set with --config.loss.weights.reward=1 "
                                     "(docs/alignment.md)")


def run_rendering(workdir: str | Path) -> tuple[Tokenizer, ChatTemplate | None, str]:
    """(tokenizer, chat template, end text) of the data the run was prepared with."""
    directory = prepared_directory_of(workdir, "workdir")
    tok, meta = reuse_tokenizer(directory, "workdir")
    end = meta.get("end")
    end_text = end if isinstance(end, str) and end != "eos" else DEFAULT_END_TEXT
    return tok, saved_template(meta, directory / META), end_text


def run_scoring_set(workdir: str | Path, path: str | Path) -> ScoringSet:
    """The records of `path` as the reward-model run in `workdir` reads them (refused for
    a run without a reward head)."""
    require_reward_head(workdir)
    tok, template, end_text = run_rendering(workdir)
    return load_scoring_set(path, tok, template, rundir.load_config(workdir).train.seq_len,
                            end_text)


def _read_lines(path: Path) -> list[tuple[int, bytes]]:
    """(1-based line, line) of every non-blank line (.gz and .zst are decompressed)."""
    if not path.is_file():
        raise ConfigError(KEY, f"no such file: {path}; give a JSON-lines file of records "
                               "to score")
    try:
        with open_binary(path) as f:
            return [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    except (OSError, EOFError, zlib.error) as e:
        raise ConfigError(KEY, f"cannot read {path} ({e})") from None


def load_scoring_set(path: str | Path, tok: Tokenizer, template: ChatTemplate | None,
                     seq_len: int, end_text: str = DEFAULT_END_TEXT) -> ScoringSet:
    """Every record of `path` as SFT examples; one with a response longer than
    seq_len + 1 tokens is skipped (`too_long`)."""
    path = Path(path)
    out = ScoringSet(path, [], [], [], {}, {})
    for n, line in _read_lines(path):
        try:
            examples = make_scored(line, tok, template, seq_len=None, end_text=end_text)
        except BadRecord as e:
            raise ConfigError(KEY, f"{path}:{n}: {e.reason}: {e.detail}") from None
        longest = max(len(e.tokens) for e in examples)
        if longest > seq_len + 1:
            detail = (f"{longest} tokens, more than the run's seq_len + 1 = {seq_len + 1}")
            out.reasons[len(out.records)] = ("too_long", detail)
            entry = out.skipped.setdefault("too_long", {"count": 0, "line": n,
                                                        "detail": detail})
            entry["count"] += 1
            examples = []
        out.lines.append(n)
        out.records.append(json.loads(line))
        out.examples.append(examples)
    if not out.records:
        raise ConfigError(KEY, f"{path} holds no records")
    if not any(out.examples):
        raise ConfigError(KEY, f"no record of {path} fits the run's seq_len + 1 = "
                               f"{seq_len + 1} tokens: {_skipped_text(out)}")
    if out.skipped:
        print(f"skipped, longer than seq_len + 1 = {seq_len + 1} tokens: "
              f"{_skipped_text(out)}", file=sys.stderr)
    return out


def _skipped_text(s: ScoringSet) -> str:
    return ", ".join(f"{reason} {b['count']} (first {s.path}:{b['line']})"
                     for reason, b in sorted(s.skipped.items()))


def reward_step(exp: Experiment) -> Any:
    """step(params, batch) -> [B] rewards, replicated on every device."""
    def step(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        model_params, objective_params = split_objective_params(params)
        out = frozen_forward(exp.graphdef, exp.mesh, exp.rules, model_params, batch,
                             return_hidden=True)
        return reward_values(objective_params["reward"], out.hidden[-1], batch["weights"])
    return jax.jit(step, in_shardings=(exp.state_shardings.params, exp.batch_sharding),
                   out_shardings=NamedSharding(exp.mesh, P()))


def score_examples(exp: Experiment, params: Any, examples: list[Example]) -> np.ndarray:
    """float32 [n] the reward of each example, in batches of train.eval_batch_size rows
    (this process's rows of each)."""
    seq_len, rows = exp.config.train.seq_len, exp.config.train.eval_batch_size
    tokens = np.concatenate([e.tokens for e in examples])
    weights = np.concatenate([e.weights for e in examples])
    offsets = np.concatenate([[0], np.cumsum([len(e.tokens) for e in examples])])
    mine = process_rows(rows, jax.process_index(), jax.process_count())
    step, out = reward_step(exp), []
    for start in range(0, len(examples), rows):
        docs_B = np.arange(start, start + rows)
        docs_B[docs_B >= len(examples)] = -1
        batch = document_rows(tokens, weights, offsets, docs_B[mine], seq_len)
        out.append(np.asarray(step(params, exp.to_global(batch))))
    return np.concatenate(out)[:len(examples)].astype(np.float32)


def score_records(exp: Experiment, params: Any, s: ScoringSet
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(one output line per record, the summary) of the scoring set."""
    started = time.perf_counter()
    flat = [e for examples in s.examples for e in examples]
    rewards = iter(score_examples(exp, params, flat).tolist())
    seconds = time.perf_counter() - started
    lines, singles, pairs = [], [], []
    for i, (n, record, examples) in enumerate(zip(s.lines, s.records, s.examples)):
        if not examples:
            reason, detail = s.reasons[i]
            lines.append({"line": n, "skipped": reason, "detail": detail, "record": record})
        elif len(examples) == 1:
            singles.append(next(rewards))
            lines.append({"line": n, "reward": singles[-1], "record": record})
        else:
            pairs.append((next(rewards), next(rewards)))
            c, r = pairs[-1]
            lines.append({"line": n, "reward/chosen": c, "reward/rejected": r,
                          "reward/margin": c - r, "record": record})
    print(f"scored {len(flat)} responses in {seconds:.2f} s, compilation included "
          f"({len(flat) / seconds:,.0f} responses/s)", file=sys.stderr)
    return lines, _summary(s, singles, pairs)


def _summary(s: ScoringSet, singles: list[float], pairs: list[tuple[float, float]]
             ) -> dict[str, Any]:
    every = np.asarray(singles + [r for pair in pairs for r in pair], np.float64)
    out: dict[str, Any] = {"records": len(s.records),
                           "skipped": sum(b["count"] for b in s.skipped.values()),
                           "responses": int(every.size), "reward/mean": float(every.mean()),
                           "reward/std": float(every.std()), "reward/min": float(every.min()),
                           "reward/max": float(every.max())}
    if pairs:
        c, r = np.asarray(pairs, np.float64).T
        out.update({"pairs": len(pairs), "reward/accuracy": float(np.mean(c > r)),
                    "reward/margin": float(np.mean(c - r)), "reward/chosen": float(c.mean()),
                    "reward/rejected": float(r.mean())})
    if s.skipped:
        out["skipped_reasons"] = {k: {"count": b["count"], "first": f"{s.path}:{b['line']}"}
                                  for k, b in sorted(s.skipped.items())}
    return out


def default_output(workdir: str | Path, source: str | Path, step: int) -> Path:
    """WORKDIR/eval/rewards/<file name>_step_<N>.jsonl."""
    name = Path(source).name.split(".")[0]
    return Path(workdir) / "eval" / "rewards" / f"{name}_step_{step}.jsonl"


def is_scores_file(path: Path) -> bool:
    """Whether `path` holds scores this module wrote (its first line is one of them)."""
    try:
        with open(path, "rb") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and isinstance(first.get("line"), int) and \
        "record" in first and any(k in first for k in ("reward", "reward/chosen", "skipped"))


def check_output(output: Path, source: Path) -> None:
    """Refuse an output that is the input, a directory, or a file of something else."""
    if output.is_dir():
        raise ConfigError("output", f"{output} is a directory; give the scores file's path")
    if output.exists() and source.exists() and output.samefile(source):
        raise ConfigError("output", f"{output} is the --score_rewards input; choose another "
                                    "--output")
    if output.exists() and not is_scores_file(output):
        raise ConfigError("output", f"{output} exists and is not a scores file of "
                                    "--score_rewards (which alone it replaces); choose "
                                    "another --output")


def scores_text(lines: list[dict[str, Any]]) -> str:
    """The scores file: one JSON line per record (a non-finite score is null; the record
    is written back as it was read)."""
    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v
    return "".join(json.dumps({k: clean(v) for k, v in line.items()}, ensure_ascii=False)
                   + "\n" for line in lines)
