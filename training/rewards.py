"""Reward functions for GRPO (`grpo.rewards`): Python functions of the sampled completions,
registered here by name, as the loss terms are in losses/objectives.py.

A reward function takes the step's `Completions` and returns one float per completion.
To add one: decorate it with `@register_reward("name")` (here, or in a module imported
before the run starts) and name it in `grpo.rewards`, e.g. `exact_match:1,format:0.1`.
What it returns is checked when it returns: one finite number per completion.
"""

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Grpo

KEY = "grpo.rewards"
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class Completions(NamedTuple):
    """One step's sampled completions, row i of a group of `group_size` rows per prompt."""
    prompts: list[str]  # the prompt text of each row
    completions: list[str]  # the completion text, without its END
    records: list[dict[str, Any]]  # the prompt's JSON record ({"prompt", "answer", ...})
    ended: list[bool]  # the completion stopped with END within max_new_tokens


RewardFn = Callable[[Completions], Sequence[float]]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register a reward function under `name` (for `grpo.rewards`)."""
    def deco(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn
    return deco


def check_rewards(grpo: Grpo) -> None:
    """Every reward function `grpo.rewards` names is registered."""
    for name in grpo.reward_weights:
        if name not in REWARDS:
            raise ConfigError(KEY, f"unknown reward function {name!r}; registered: "
                                   f"{sorted(REWARDS)} (training/rewards.py)")


def score(grpo: Grpo, batch: Completions) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(weighted sum of the rewards [N], {name: that function's rewards [N]}), each
    function's output checked: N finite numbers."""
    n = len(batch.completions)
    total, each = np.zeros(n), {}
    for name, weight in grpo.reward_weights.items():
        try:
            values = np.asarray(REWARDS[name](batch), np.float64)
        except (TypeError, ValueError) as e:
            raise ConfigError(KEY, f"reward function {name!r} did not return numbers: "
                                   f"{e}") from None
        if values.shape != (n,):
            raise ConfigError(KEY, f"reward function {name!r} returned shape "
                                   f"{values.shape} for {n} completions; return one number "
                                   "per completion")
        if not np.isfinite(values).all():
            bad = int(np.flatnonzero(~np.isfinite(values))[0])
            raise ConfigError(KEY, f"reward function {name!r} returned {values[bad]} for "
                                   f"completion {bad} ({batch.completions[bad]!r}); rewards "
                                   "must be finite")
        each[name] = values
        total = total + weight * values
    return total, each


def _number(text: str) -> float | None:
    match = NUMBER.search(text)
    return float(match.group()) if match else None


@register_reward("exact_match")
def exact_match(batch: Completions) -> list[float]:
    """1 where the completion's answer (its first number) equals the number in the
    record's `answer` field, else 0."""
    out = []
    for text, record in zip(batch.completions, batch.records):
        want, got = _number(str(record.get("answer", ""))), _number(text)
        out.append(float(want is not None and got is not None and got == want))
    return out


@register_reward("format")
def answer_format(batch: Completions) -> list[float]:
    """1 where the completion is one bare number closed by END within max_new_tokens,
    else 0: it rewards the answer's format and a short completion, not its value."""
    return [float(ended and NUMBER.fullmatch(text.strip()) is not None)
            for text, ended in zip(batch.completions, batch.ended)]
