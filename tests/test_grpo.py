"""GRPO: advantages and the per-token loss against TRL, the reward functions, the sampled
batch, layouts and bad input."""

import collections
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxlm.configs.base import get_base_config
from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Config, Grpo
from jaxlm.losses.grpo import group_advantages, token_losses
from jaxlm.losses.objectives import build_objective
from jaxlm.training import rewards
from jaxlm.training.grpo import completion_batch, cut_at_end, load_prompts, step_prompts

from tests.helpers import model_config

B, G, T, VOCAB = 6, 3, 5, 11
REWARDS = np.array([1.0, 0.0, 1.0, 0.5, 0.5, 0.5], np.float32)  # a group of equal rewards
LENGTHS = [5, 3, 1, 4, 2, 5]


def completion_mask() -> np.ndarray:
    return (np.arange(T)[None, :] < np.asarray(LENGTHS)[:, None]).astype(np.float32)


# ----------------------------------------------------------------------------------------
# Against TRL 1.16: GRPOTrainer's own code on fixed rewards, log-probabilities and masks
# (slow tier: importing trl and torch alone takes ~20 s).

class _Fake:
    """Stands in for a GRPOTrainer: every attribute not set is None (features off)."""

    def __getattr__(self, name):
        return None


def _trl_trainer(beta: float, epsilon: float, temperature: float = 1.0):
    import torch
    identity = lambda x: x
    fake = _Fake()
    fake.accelerator = SimpleNamespace(device=torch.device("cpu"), gather=identity,
                                       process_index=0, num_processes=1,
                                       reduce=lambda x, reduction: x)
    fake.model = SimpleNamespace(training=True, is_gradient_checkpointing=False)
    fake.args = SimpleNamespace(per_device_train_batch_size=B, steps_per_generation=1,
                                gradient_accumulation_steps=1, gradient_checkpointing_kwargs=None,
                                delta=None, use_bias_correction_kl=False)
    fake.num_iterations, fake.num_generations, fake.beta = 1, G, beta
    fake.epsilon_low = fake.epsilon_high = epsilon
    fake.temperature, fake.top_entropy_quantile = temperature, 1.0
    fake.loss_type, fake.importance_sampling_level = "dapo", "token"  # TRL 1.16's defaults
    fake.multi_objective_aggregation, fake.scale_rewards = "sum_then_normalize", "group"
    fake.reward_weights, fake.reward_func_names = torch.tensor([1.0]), ["r"]
    fake.current_gradient_accumulation_steps = 1
    fake._metrics = {"train": collections.defaultdict(list)}
    fake._logs = {"prompt": [], "completion": [], "rewards": collections.defaultdict(list),
                  "advantages": [], "extra": collections.defaultdict(list)}
    fake._pending_extra_logs, fake._pending_metrics = {}, {}
    fake._tokenizer, fake.tools, fake.eos_token_ids = SimpleNamespace(pad_token_id=0), [], [2]
    return fake


def _trl_advantages() -> np.ndarray:
    """GRPOTrainer._generate_and_score_completions on fixed completions and rewards."""
    import torch
    from trl import GRPOTrainer
    fake = _trl_trainer(beta=0.0, epsilon=0.2)
    completions = [[7] * n for n in LENGTHS]
    fake._generate = lambda prompts: ([[5, 6]] * B, completions, None, ["c"] * B, None, None,
                                      None, None)
    fake._calculate_rewards = lambda *args: torch.tensor(REWARDS)[:, None]
    out = GRPOTrainer._generate_and_score_completions(fake, [{"prompt": "p"}] * B)
    np.testing.assert_array_equal(out["completion_mask"].numpy(), completion_mask())
    return out["advantages"].numpy()


def _trl_loss(logps, old, ref, advantages, mask, *, beta, epsilon):
    """GRPOTrainer._compute_loss on given per-token log-probabilities: (loss, its gradient
    with respect to them, the logged KL and clip fraction)."""
    import torch
    from trl import GRPOTrainer
    fake = _trl_trainer(beta, epsilon)
    logps_t = torch.tensor(np.asarray(logps), requires_grad=True)
    fake._get_per_token_logps_and_entropies = lambda *a, **k: (
        logps_t, torch.zeros_like(logps_t), None)
    mask_t = torch.tensor(mask).long()
    inputs = {"prompt_ids": torch.zeros((B, 2), dtype=torch.long),
              "prompt_mask": torch.ones((B, 2), dtype=torch.long),
              "completion_ids": torch.zeros((B, T), dtype=torch.long),
              "completion_mask": mask_t, "advantages": torch.tensor(advantages),
              "num_items_in_batch": mask_t.sum()}
    if old is not None:
        inputs["old_per_token_logps"] = torch.tensor(np.asarray(old))
    if ref is not None:
        inputs["ref_per_token_logps"] = torch.tensor(np.asarray(ref))
    loss = GRPOTrainer._compute_loss(fake, None, inputs)
    loss.backward()
    m = fake._metrics["train"]
    return float(loss.detach()), logps_t.grad.numpy(), m.get("kl", [0.0])[-1], \
        m["clip_ratio/region_mean"][-1]


@pytest.mark.slow
def test_advantages_equal_trl():
    pytest.importorskip("trl")
    ours = group_advantages(REWARDS, G)
    np.testing.assert_allclose(ours, _trl_advantages(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours[3:], 0.0)  # a group of equal rewards teaches nothing


@pytest.mark.slow
def test_per_token_loss_gradient_kl_and_clipping_equal_trl():
    """Off-policy old log-probabilities (the ratio moves past both clip bounds) with a KL
    to a reference: the loss, its gradient per token, the KL and the clipped share."""
    pytest.importorskip("trl")
    rng = np.random.default_rng(0)
    logps = -rng.uniform(0.1, 3.0, (B, T)).astype(np.float32)
    old = logps + rng.normal(0, 0.4, (B, T)).astype(np.float32)
    ref = logps + rng.normal(0, 0.3, (B, T)).astype(np.float32)
    adv, mask = group_advantages(REWARDS, G), completion_mask()
    theirs, t_grad, t_kl, t_clip = _trl_loss(logps, old, ref, adv, mask, beta=0.04,
                                             epsilon=0.2)

    def ours(lp):
        per_token, kl, clipped = token_losses(lp, old, ref, jnp.asarray(adv)[:, None]
                                              * jnp.ones((B, T)), epsilon=0.2, beta=0.04)
        n = mask.sum()
        return jnp.sum(per_token * mask) / n, (jnp.sum(kl * mask) / n,
                                               jnp.sum(clipped * mask) / n)

    (loss, (kl, clip)), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(logps))
    assert 0 < float(clip) < 1
    np.testing.assert_allclose(float(loss), theirs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), t_grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(kl), t_kl, rtol=1e-5)
    np.testing.assert_allclose(float(clip), t_clip, rtol=1e-6)


@pytest.mark.slow
def test_the_grpo_term_equals_trl_on_logits():
    """The registered term (old policy = the current one, log-probabilities at the sampling
    temperature): its loss and gradient with respect to the logits equal TRL's."""
    pytest.importorskip("trl")
    import torch
    temperature, beta = 0.7, 0.1
    c = get_base_config()
    c.loss.weights.ce, c.grpo.prompts, c.init.from_workdir = 0.0, "p.jsonl", "ref"
    c.grpo.group_size, c.grpo.beta, c.grpo.temperature, c.batch_size = G, beta, temperature, B
    objective = build_objective(Config.from_dict(c), model_config(VOCAB))
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1.5, (B, T, VOCAB)).astype(np.float32)
    ref_logits = logits + rng.normal(0, 0.5, (B, T, VOCAB)).astype(np.float32)
    targets = rng.integers(0, VOCAB, (B, T)).astype(np.int32)
    adv, mask = group_advantages(REWARDS, G), completion_mask()
    batch = {"targets": jnp.asarray(targets), "weights": jnp.asarray(mask),
             "advantages": jnp.asarray(np.repeat(adv[:, None], T, 1))}

    def ours(x):
        total, (count, _, metrics) = objective(SimpleNamespace(logits=x), batch,
                                               SimpleNamespace(logits=jnp.asarray(ref_logits)),
                                               None, jnp.int32(0))
        return total / count, metrics["grpo/kl"] / count

    (loss, kl), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(logits))

    def logps(x):
        return torch.log_softmax(x / temperature, -1).gather(
            -1, torch.tensor(targets).long()[..., None])[..., 0]

    logits_t = torch.tensor(logits, requires_grad=True)
    from trl import GRPOTrainer
    fake = _trl_trainer(beta, 0.2, temperature)
    lp = logps(logits_t)
    fake._get_per_token_logps_and_entropies = lambda *a, **k: (lp, torch.zeros_like(lp), None)
    mask_t = torch.tensor(mask).long()
    theirs = GRPOTrainer._compute_loss(fake, None, {
        "prompt_ids": torch.zeros((B, 1), dtype=torch.long),
        "prompt_mask": torch.ones((B, 1), dtype=torch.long),
        "completion_ids": torch.zeros((B, T), dtype=torch.long), "completion_mask": mask_t,
        "advantages": torch.tensor(adv), "num_items_in_batch": mask_t.sum(),
        "ref_per_token_logps": logps(torch.tensor(ref_logits)).detach()})
    theirs.backward()
    np.testing.assert_allclose(float(loss), float(theirs.detach()), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grad), logits_t.grad.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(kl), fake._metrics["train"]["kl"][-1], rtol=1e-5)


# ----------------------------------------------------------------------------------------
# Reward functions, prompts and the sampled batch.

def _completions(texts, answers, ended=None):
    records = [{"prompt": "1+1=", "answer": a} for a in answers]
    return rewards.Completions(["1+1="] * len(texts), texts, records,
                               ended or [True] * len(texts))


def test_exact_match_and_format_rewards():
    batch = _completions(["2", " 2", "3", "", "2 or 3", "2"], ["2", 2, "2", "2", "2", "2"],
                         [True, True, True, True, True, False])
    assert rewards.exact_match(batch) == [1, 1, 0, 0, 1, 1]
    assert rewards.answer_format(batch) == [1, 1, 1, 0, 0, 0]  # unfinished: no format
    grpo = Grpo(rewards="exact_match:1,format:0.5")
    total, each = rewards.score(grpo, batch)
    np.testing.assert_allclose(total, [1.5, 1.5, 0.5, 0, 1, 1])
    assert set(each) == {"exact_match", "format"}


@pytest.mark.parametrize("returned, message", [
    ([1.0, float("nan")], "reward function 'bad' returned nan for completion 1 ('3')"),
    ([1.0, 2.0, 3.0], "reward function 'bad' returned shape (3,) for 2 completions"),
    (["x", 1.0], "reward function 'bad' did not return numbers"),
])
def test_a_reward_function_returning_bad_values_is_one_line(monkeypatch, returned, message):
    monkeypatch.setitem(rewards.REWARDS, "bad", lambda batch: returned)
    with pytest.raises(ConfigError) as e:
        rewards.score(Grpo(rewards="bad"), _completions(["2", "3"], ["2", "2"]))
    assert str(e.value).startswith(f"grpo.rewards: {message}") and "\n" not in str(e.value)


def test_completions_stop_at_end_and_batch_weights_cover_them():
    assert cut_at_end([5, 6, 9, 7, 9], [9]) == ([5, 6, 9], True)
    assert cut_at_end([5, 6, 7], [9]) == ([5, 6, 7], False)
    assert cut_at_end([5, 8, 9, 8, 9], [8, 9]) == ([5, 8, 9], True)
    prompts = [np.array([1, 2, 3], np.int32), np.array([4], np.int32)]
    batch = completion_batch(prompts, [[5, 9], [6, 7, 8]], np.array([0.5, -1.0]), seq_len=6)
    np.testing.assert_array_equal(batch["inputs"], [[1, 2, 3, 5, 9, 0], [4, 6, 7, 8, 0, 0]])
    np.testing.assert_array_equal(batch["targets"], [[2, 3, 5, 9, 0, 0], [6, 7, 8, 0, 0, 0]])
    # Exactly the completion tokens (END included) are targets with weight 1.
    np.testing.assert_array_equal(batch["weights"], [[0, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(batch["advantages"][:, 0], [0.5, -1.0])


def test_step_prompts_read_every_record_once_an_epoch_and_depend_on_the_step_alone():
    first = np.concatenate([step_prompts(10, s, 5, seed=3) for s in range(2)])
    assert sorted(first) == list(range(10))
    np.testing.assert_array_equal(step_prompts(10, 3, 5, seed=3), step_prompts(10, 3, 5, 3))
    assert not np.array_equal(step_prompts(10, 2, 5, seed=3), step_prompts(10, 0, 5, seed=3))


# ----------------------------------------------------------------------------------------
# Bad input: one line, before anything compiles.

def grpo_config(**overrides):
    c = get_base_config()
    c.loss.weights.ce, c.grpo.prompts, c.init.from_workdir = 0.0, "prompts.jsonl", "runs/sft"
    c.batch_size, c.grpo.group_size = 8, 4
    for key, value in overrides.items():
        *path, last = key.split(".")
        target = c
        for part in path:
            target = getattr(target, part)
        setattr(target, last, value)
    return c


@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": 6}, "grpo.group_size: 4 completions per prompt do not divide batch_size 6"),
    ({"grpo.group_size": 1}, "grpo.group_size: must be >= 2"),
    ({"loss.weights.ce": 1.0}, "loss.weights.ce: grpo.prompts trains on GRPO's"),
    ({"init.from_workdir": ""}, "grpo.beta: the KL penalty compares with a frozen reference"),
    ({"grpo.rewards": "exact_match:x"}, "grpo.rewards: 'exact_match:x' is not NAME"),
    ({"grpo.epsilon": 0.0}, "grpo.epsilon: must be in (0, 1), got 0.0"),
])
def test_bad_grpo_configs_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        Config.from_dict(grpo_config(**overrides))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_no_reference_is_needed_without_the_kl_or_with_lora():
    Config.from_dict(grpo_config(**{"init.from_workdir": "", "grpo.beta": 0.0}))
    Config.from_dict(grpo_config(**{"init.from_workdir": "", "lora.rank": 4}))


def test_unknown_reward_function_is_one_line():
    with pytest.raises(ConfigError, match=r"^grpo.rewards: unknown reward function 'exact'; "
                                          r"registered: \['exact_match', 'format'"):
        rewards.check_rewards(Grpo(rewards="exact_match,exact"))


@pytest.mark.parametrize("lines, message", [
    (None, "grpo.prompts: no such file"),
    ([], "grpo.prompts: {path} holds no records"),
    (['{"prompt": "1+1=", "answer": "2"}', "[1]"], "grpo.prompts: {path}:2: not_an_object"),
    (['{"prompt": "1+1="}'], "grpo.prompts: {path}:1: a record needs a non-empty string"),
    (['{"prompt": "' + "9" * 12 + '", "answer": 1}'],
     ("grpo.max_new_tokens: {path}:1: a prompt of 12 tokens and 8 new tokens do not fit "
      "seq_len 16")),
])
def test_bad_prompt_files_are_one_line_errors(tmp_path, lines, message):
    from jaxlm.data.tokenizers import ByteTokenizer
    path = tmp_path / "prompts.jsonl"
    if lines is not None:
        path.write_text("".join(line + "\n" for line in lines))
    config = Config.from_dict(grpo_config(**{"grpo.prompts": str(path), "seq_len": 16}))
    with pytest.raises(ConfigError) as e:
        load_prompts(config, ByteTokenizer())
    assert str(e.value).startswith(message.format(path=path)) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------
# Slow: one GRPO update on a mesh equals one device.

@pytest.mark.slow
def test_grpo_update_on_data2_fsdp2_tensor2_equals_one_device(tiny_config, tmp_path):
    """Fixed sampled completions and advantages; the reference is the run the policy starts
    from (a step-0 run of the same seed: its init), so the first KL is 0 and the second not."""
    from jaxlm.training.experiment import Experiment

    from tests.helpers import step0_run
    (tmp_path / "text.txt").write_text("0+0=0\n1+2=3\n" * 50)
    base = tiny_config.copy_and_resolve_references()
    base.data.path, base.data.tokenizer = str(tmp_path / "text.txt"), "byte"
    c = base.copy_and_resolve_references()
    c.init.from_workdir = str(step0_run(base, tmp_path / "base"))
    c.loss.weights.ce, c.grpo.prompts, c.grpo.group_size, c.grpo.beta = 0.0, "unused", 4, 0.1
    c.seq_len, c.batch_size, c.learning_rate, c.warmup_steps, c.grad_accum_steps = \
        16, 8, 3e-3, 0, 2
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 200, rng.integers(2, 6)).astype(np.int32) for _ in range(8)]
    completions = [rng.integers(1, 200, rng.integers(1, 9)).tolist() for _ in range(8)]
    advantages = group_advantages(rng.uniform(0, 1, 8), 4)
    batch = completion_batch(prompts, completions, advantages, seq_len=16)

    def train(data, fsdp, tensor, devices):
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
        exp = Experiment.build(c, tmp_path / f"run{len(devices)}", devices)
        state, out = exp.init_state(), []
        for _ in range(2):
            state, m = exp.train_step(state, exp.to_global(batch))
            out.append({k: float(v) for k, v in m.items()})
        return out

    one = train(1, 1, 1, jax.devices()[:1])
    eight = train(2, 2, 2, jax.devices())
    assert one[0]["grpo/kl"] == pytest.approx(0.0, abs=1e-7) and one[1]["grpo/kl"] > 0
    assert one[0]["grad_norm"] > 0
    for a, b in zip(one, eight):
        for key in ("loss", "grad_norm", "grpo/kl", "grpo/clip_fraction"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_train_py_runs_grpo_logs_its_metrics_and_resumes_the_same(tiny_config, tmp_path):
    """Through train(): a GRPO run from an SFT-shaped run logs the reward metrics every
    step, and 2 + 2 steps (a resume) write the records of 4 uninterrupted steps."""
    from jaxlm.training.trainer import train

    from tests.helpers import step0_run
    (tmp_path / "text.txt").write_text("1+1=2\n2+2=4\n" * 50)
    base = tiny_config.copy_and_resolve_references()
    base.data.path, base.data.tokenizer, base.seq_len = str(tmp_path / "text.txt"), "byte", 16
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+1=", "answer": a + 1}) + "\n"
                               for a in range(6)))
    c = base.copy_and_resolve_references()
    c.init.from_workdir = str(step0_run(base, tmp_path / "sft"))
    c.loss.weights.ce, c.grpo.prompts, c.grpo.group_size = 0.0, str(prompts), 2
    c.grpo.max_new_tokens, c.grpo.rewards = 3, "exact_match,format:0.5"
    c.batch_size, c.steps, c.checkpoint_every, c.warmup_steps = 4, 4, 2, 0
    c.schedule = "constant"  # the same learning rates for a run of 2 steps and one of 4

    def records(workdir):
        rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if "loss" in r]  # not the final eval record

    train(c, tmp_path / "full", jax.devices()[:1])
    full = records(tmp_path / "full")
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    for key in ("grpo/reward", "grpo/reward_std", "grpo/rewards/exact_match",
                "grpo/rewards/format", "grpo/kl", "grpo/clip_fraction",
                "grpo/completion_length", "loss"):
        assert all(np.isfinite(r[key]) for r in full), key
    c.steps = 2
    train(c, tmp_path / "resumed", jax.devices()[:1])
    c.steps = 4
    train(c, tmp_path / "resumed", jax.devices()[:1], allow_schedule_change=True)
    for a, b in zip(full, records(tmp_path / "resumed")):
        for key in ("loss", "grpo/reward", "grpo/kl", "grpo/completion_length"):
            assert a[key] == b[key], (a["step"], key)
