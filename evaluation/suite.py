"""Every kept checkpoint, other data, bits per character or byte, and the plots."""

import csv
import dataclasses
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlm.configs.errors import ConfigError, RunError
from jaxlm.data.mixture import Mixture
from jaxlm.data.packing import resolve_packing
from jaxlm.data.pipeline import TokenData
from jaxlm.data.prepare import META, is_prepared
from jaxlm.data.tokenizers import first_vocabulary_difference
from jaxlm.evaluation.restore import json_line, load_run, restore_step, save_result
from jaxlm.training import rundir
from jaxlm.training.checkpoint import Checkpointer
from jaxlm.training.evaluate import NonFiniteEval, evaluate
from jaxlm.training.layout import check_documents, check_examples_fit
from jaxlm.training.metrics import read_metrics

LN2 = math.log(2.0)


# Data.

def load_eval_data(exp: Any, path: str | Path) -> tuple[TokenData | np.ndarray, str]:
    """(data, label) for `--data=PATH`, with the run's tokenizer.

    PATH is a text file (tokenized whole: an ndarray of ids), a prepared token directory
    (a TokenData whose validation split is evaluated, packed as the run packs), or the
    `train.bin` / `val.bin` of a prepared directory whose split is one file (that split).
    A prepared set must use the run's tokenizer: token ids mean nothing under another
    vocabulary.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError("data", f"no such file or directory: {path}")
    if path.is_file() and is_prepared(path.parent):
        if path.name not in ("train.bin", "val.bin"):
            raise ConfigError("data", f"{path} is not a split of {path.parent}: pass the "
                                      f"directory (its validation split), or its train.bin "
                                      f"or val.bin where a split is one file")
        data, label = _split(_prepared(exp, path.parent), path.stem), f"{path.parent.name}_"
        label += path.stem
    elif is_prepared(path):
        data, label = _prepared(exp, path), f"{path.name}_val"
    elif path.is_file():
        data, label = _text_tokens(exp, path), path.stem
    else:
        raise ConfigError("data", f"{path} is a directory but not a prepared token directory "
                                  f"(no {META})")
    _check_targets(exp, data, path)
    return data, re.sub(r"[^A-Za-z0-9._-]+", "_", label)


def _prepared(exp: Any, root: Path) -> TokenData:
    tok = exp.data.tokenizer
    data = TokenData.load(root)  # checks ids against its own vocabulary
    difference = first_vocabulary_difference(tok, data.tokenizer)
    if difference is not None:
        raise ConfigError("data", f"{root} was prepared with another tokenizer than the "
                                  f"run's ({difference})")
    return data


def _split(data: TokenData, split: str) -> TokenData:
    """The set with `split` in the place evaluation reads (the validation split)."""
    if split == "val":
        return data
    return dataclasses.replace(data, val=data.train, val_docs=data.train_docs)


def _text_tokens(exp: Any, path: Path) -> np.ndarray:
    tok = exp.data.tokenizer
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("data", f"{path} is not UTF-8 text ({e})") from None
    try:
        return tok.encode(text)
    except ValueError as e:
        raise ConfigError("data", f"{path}: {e} (the run's {tok.kind} tokenizer)") from None


def _check_targets(exp: Any, data: TokenData | np.ndarray, path: Path) -> None:
    """At least one target: 2 tokens of text, or of one validation document when packed
    (SFT examples no longer than seq_len)."""
    if isinstance(data, np.ndarray):
        if len(data) < 2:
            raise ConfigError("data", f"{path} has {len(data)} tokens; at least 2 are needed")
    elif resolve_packing(exp.config.data.packing, Mixture.of_set(data)) == "documents":
        check_documents(data, "val", "data")
        check_examples_fit(Mixture.of_set(data), exp.config.train.seq_len, ("val",))
    elif len(data.val) < 2:
        raise ConfigError("data", f"the validation split of {path} has {len(data.val)} "
                                  f"tokens; at least 2 are needed")


def with_bits(exp: Any, result: dict[str, Any]) -> dict[str, Any]:
    """`bits_per_byte` is in every result; char runs also get `bits_per_char` (one token
    per character: bits = nats / ln 2)."""
    if exp.data.tokenizer.kind != "char" or "eval_loss" not in result:
        return result
    return {**result, "bits_per_char": result["eval_loss"] / LN2}


# Checkpoints.

def evaluate_checkpoints(workdir: str | Path, steps: str | list[int] = "all",
                         data: str | None = None, devices: Any = None,
                         on_result=None) -> tuple[list[dict[str, Any]], Path]:
    """Evaluate checkpoints ("all" kept ones, the "latest", or a list of steps) on `data`
    or the run's validation split. Writes one JSON per step into WORKDIR/eval/ (or
    WORKDIR/eval/<data label>/), and for "all" also `summary.csv` and `eval_loss.png`.
    Returns (results, that directory).
    """
    workdir = Path(workdir)
    # Other data is evaluated whole; the validation split as in training (eval_max_batches).
    exp = load_run(workdir, devices, None if data is None else {"eval_max_batches": 0})
    other, label = (None, None) if data is None else load_eval_data(exp, data)
    out_dir = workdir / "eval" if label is None else workdir / "eval" / label
    results = []
    with Checkpointer(rundir.checkpoint_dir(workdir), read_only=True) as ckpt:
        for step, state, error in _checkpoints(ckpt, exp, workdir, steps):
            if state is not None:
                try:
                    result = with_bits(exp, {"step": step,
                                             **evaluate(exp, state.params, other)})
                except NonFiniteEval as e:
                    if steps != "all":
                        raise RunError(f"checkpoint step {step} in {workdir}: {e}; the run "
                                       "had diverged by then: evaluate an earlier --step"
                                       ) from None
                    state, error = None, f"checkpoint step {step}: {e}"
            if state is None:  # damaged or diverged: an error row, the others still run
                result = {"step": step, "error": error}
            elif label is not None:
                result["data"] = str(data)
            results.append(result)
            if on_result is not None:  # printed before it is saved
                on_result(result)
            if state is not None and jax.process_index() == 0:
                save_result(out_dir / f"step_{step}.json", json_line(result) + "\n")
    if steps == "all" and jax.process_index() == 0:
        write_summary(results, out_dir)
        plot_eval_loss(results, out_dir / "eval_loss.png",
                       training_evals=None if label else _training_evals(workdir),
                       title=f"{workdir.name}: eval loss on {label or 'the validation split'}")
    return results, out_dir


def _checkpoints(ckpt: Checkpointer, exp: Any, workdir: Path, steps: str | list[int]
                 ) -> Iterator[tuple[int, Any, str | None]]:
    """(step, state, None), or (step, None, why) for a step that does not restore, for
    "all" kept steps, the "latest" that restores, or the listed steps (a listed step that
    does not restore is an error)."""
    available = ckpt.all_steps()
    rundir.pick_step(available, None, workdir)  # a run without checkpoints is an error
    if steps == "latest":
        state, step = ckpt.restore_latest(exp.checkpoint_abstract,
                                          warn=lambda m: print(m, file=sys.stderr))
        yield step, exp.from_checkpoint(state), None
        return
    todo = available if steps == "all" else list(steps)
    for step in todo:
        rundir.pick_step(available, step, workdir)
    restored = 0
    for step in todo:
        try:
            state = exp.from_checkpoint(restore_step(ckpt, step, exp.checkpoint_abstract))
        except RunError as e:
            if steps != "all":
                raise
            yield step, None, str(e)
            continue
        restored += 1
        yield step, state, None
    if not restored:
        raise RunError(f"no checkpoint in {ckpt.directory} restores")


def write_summary(results: list[dict[str, Any]], out_dir: Path) -> Path:
    """summary.csv: one row per step; bits per character for char runs, per-source columns
    for mixtures, an error column when a step did not restore."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "summary.csv"
    keys = {k for r in results for k in r}
    cols = ["step", "eval_loss", "perplexity", "bits_per_byte"]
    cols += ["bits_per_char"] if "bits_per_char" in keys else []
    cols += ["num_tokens", *sorted(k for k in keys if "/" in k)]
    cols += ["error"] if "error" in keys else []
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in sorted(results, key=lambda r: r["step"]):
            w.writerow(r)
    return path


def _training_evals(workdir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["eval_loss"]) for r in read_metrics(workdir)[1]]


def plot_eval_loss(results: list[dict[str, Any]], out: Path,
                   training_evals: list[tuple[int, float]] | None = None,
                   title: str = "eval loss") -> Path:
    # Deferred: matplotlib takes ~0.5 s to import and only --all_steps draws.
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if training_evals:
        ax.plot(*zip(*sorted(training_evals)), color="0.6", lw=1, marker=".",
                label="during training (metrics.jsonl)")
    pts = sorted((r["step"], r["eval_loss"]) for r in results if "eval_loss" in r)
    ax.plot(*zip(*pts), color="C0", marker="o", lw=1.5, label="checkpoints (eval.py)")
    for r in results:
        if "error" in r:
            ax.axvline(r["step"], color="C3", lw=1, ls=":")
    ax.set(title=title, xlabel="step", ylabel="eval loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
