"""GRPO steps: each step samples `grpo.group_size` completions of its prompts with the
policy's own parameters, scores them with the reward functions (training/rewards.py),
normalises the rewards within each group (losses/grpo.py) and takes one clipped
policy-gradient update: the run's jitted train step on the sampled batch, whose `grpo`
term (losses/objectives.py) computes the loss.

Sampling runs in the training process, on the train state's parameters as they are
sharded on the run's mesh (the KV-cache generator of inference/generate.py, jitted on
those arrays): nothing is copied or gathered, and the update that follows sees the very
weights that sampled.
"""

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Config
from jaxlm.data.sft import BadRecord, end_ids, generation_prompt, json_object
from jaxlm.inference.generate import Generator
from jaxlm.losses.grpo import group_advantages
from jaxlm.losses.objectives import split_objective_params
from jaxlm.training.rewards import Completions, check_rewards, score

KEY = "grpo.prompts"


@dataclasses.dataclass
class Prompts:
    records: list[dict[str, Any]]  # the JSON records, each with "prompt" and "answer"
    ids: list[np.ndarray]  # [BOS] prompt of each record


def load_prompts(config: Config, tok: Any) -> Prompts:
    """The prompts file of `grpo.prompts`; every record has a string `prompt` and an
    `answer`, and leaves `max_new_tokens` within seq_len."""
    path, g, seq_len = Path(config.grpo.prompts), config.grpo, config.train.seq_len
    if not path.is_file():
        raise ConfigError(KEY, f"no such file: {path}")
    records, ids = [], []
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json_object(line)
        except BadRecord as e:
            raise ConfigError(KEY, f"{where}: {e}") from None
        if not isinstance(record.get("prompt"), str) or not record["prompt"] \
                or "answer" not in record:
            raise ConfigError(KEY, f"{where}: a record needs a non-empty string 'prompt' "
                                   f"and an 'answer' (has: {', '.join(record) or 'nothing'})")
        try:
            prompt = generation_prompt(tok, record["prompt"])
        except ValueError as e:
            raise ConfigError(KEY, f"{where}: {e}") from None
        if len(prompt) + g.max_new_tokens > seq_len:
            raise ConfigError("grpo.max_new_tokens", f"{where}: a prompt of {len(prompt)} "
                              f"tokens and {g.max_new_tokens} new tokens do not fit seq_len "
                              f"{seq_len}; raise seq_len or lower grpo.max_new_tokens")
        records.append(record)
        ids.append(prompt)
    if not records:
        raise ConfigError(KEY, f"{path} holds no records")
    return Prompts(records, ids)


def step_prompts(num_records: int, step: int, per_step: int, seed: int) -> np.ndarray:
    """The record indices of step `step`: epochs of seeded permutations, read in order (a
    function of (seed, step) alone, so a resumed run samples what it would have)."""
    k = np.arange(step * per_step, (step + 1) * per_step)
    epochs = k // num_records
    return np.asarray([np.random.default_rng([seed, int(e)]).permutation(num_records)[i]
                       for e, i in zip(epochs, k % num_records)])


def cut_at_end(tokens: list[int], end: list[int]) -> tuple[list[int], bool]:
    """(the completion up to and including its first END, whether it has one)."""
    n = len(end)
    for i in range(len(tokens) - n + 1):
        if tokens[i:i + n] == end:
            return tokens[:i + n], True
    return tokens, False


def completion_batch(prompts: list[np.ndarray], completions: list[list[int]],
                     advantages: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """Rows [prompt completion] from position 0, right-padded: `inputs`, `targets`,
    `weights` (1 on the completion's targets) and the row's advantage at every position."""
    b = len(prompts)
    tokens = np.zeros((b, seq_len + 1), np.int32)
    weights = np.zeros((b, seq_len), np.float32)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        row = np.concatenate([p, np.asarray(c, np.int32)])
        tokens[r, :len(row)] = row
        weights[r, len(p) - 1:len(row) - 1] = 1.0
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights,
            "advantages": np.repeat(advantages[:, None], seq_len, axis=1).astype(np.float32)}


class GrpoSteps:
    """step_fn(state, step) -> (state, metrics): sample, score, one update. The metrics
    add the rewards (`grpo/reward`, `grpo/reward_std`, `grpo/rewards/<name>`), the share
    of groups whose rewards are all equal, and the completions' mean length and share that
    ended with END to the train step's (`grpo/kl`, `grpo/clip_fraction`)."""

    def __init__(self, exp: Any, prompts: Prompts):
        self.exp, self.prompts, self.config = exp, prompts, exp.config
        self.tok = exp.data.tokenizer
        meta_end = exp.data.sources[0].meta.get("end", "eos")
        self.end = end_ids(self.tok, *([] if meta_end == "eos" else [meta_end]))
        self.generator = Generator(exp.graphdef, exp.model_cfg, exp.config.train.seq_len)

    @classmethod
    def build(cls, exp: Any) -> "GrpoSteps":
        """Check the reward functions and read the prompts (before anything compiles)."""
        check_rewards(exp.config.grpo)
        if jax.process_count() > 1:
            raise ConfigError(KEY, "GRPO runs in one process: the completions are decoded "
                                   "and scored on its host")
        return cls(exp, load_prompts(exp.config, exp.data.tokenizer))

    def sample(self, params: Any, step: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Step `step`'s batch of scored completions and its host metrics."""
        g, train = self.config.grpo, self.config.train
        index = step_prompts(len(self.prompts.records), step, train.batch_size // g.group_size,
                             train.seed)
        rows = [i for i in index for _ in range(g.group_size)]
        prompt_ids = [self.prompts.ids[i] for i in rows]
        seed = int(np.random.SeedSequence([train.seed, step]).generate_state(1)[0] >> 1)
        new, _ = self.generator.generate(split_objective_params(params)[0], prompt_ids,
                                         g.max_new_tokens, g.sampling, seed)
        cut = [cut_at_end(t, self.end) for t in new]
        completions = [c for c, _ in cut]
        ended = [e for _, e in cut]
        texts = [self.tok.decode(c[:len(c) - len(self.end)] if e else c) for c, e in cut]
        records = [self.prompts.records[i] for i in rows]
        rewards, each = score(g, Completions([r["prompt"] for r in records], texts, records,
                                             ended))
        advantages = group_advantages(rewards, g.group_size)
        groups = rewards.reshape(-1, g.group_size)
        host = {"grpo/reward": float(rewards.mean()),
                "grpo/reward_std": float(rewards.std(ddof=1)),
                **{f"grpo/rewards/{k}": float(v.mean()) for k, v in each.items()},
                "grpo/frac_reward_zero_std": float(np.mean(groups.std(axis=1) == 0)),
                "grpo/completion_length": float(np.mean([len(c) for c in completions])),
                "grpo/ended": float(np.mean(ended))}
        return completion_batch(prompt_ids, completions, advantages, train.seq_len), host

    def __call__(self, state: Any, step: int) -> tuple[Any, dict[str, Any]]:
        batch, host = self.sample(state.params, step)
        state, metrics = self.exp.train_step(state, self.exp.to_global(batch))
        return state, {**metrics, **host}
