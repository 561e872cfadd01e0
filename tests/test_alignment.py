"""Preference optimisation: DPO and its variants against TRL, metrics, references, errors."""

import json
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.configs.base import get_base_config
from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Config
from jaxlm.losses.preference import Pairs, pair_losses, pairs, token_logps
from jaxlm.training import rundir
from jaxlm.training.experiment import Experiment
from jaxlm.training.steps import make_loss_fn
from jaxlm.training.teacher import Teacher

VOCAB, LENGTH = 100, 12
TINY_LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def preference_batch(seed: int = 0, n_pairs: int = 3):
    """(ids [2P, L], completion mask [2P, L]) in TRL's order (chosen rows, then rejected),
    with a shared prompt per pair and right padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (2 * n_pairs, LENGTH))
    mask = np.zeros((2 * n_pairs, LENGTH), np.int64)
    for i in range(n_pairs):
        prompt = 3 + i
        ids[n_pairs + i, :prompt] = ids[i, :prompt]
        for row, end in ((i, LENGTH - i), (n_pairs + i, LENGTH - 2 * i - 1)):
            mask[row, prompt:end] = 1
            ids[row, end:] = 0
    return ids, mask


def interleaved(ids, mask):
    """Our batch: pair i in rows 2i (chosen) and 2i+1 (rejected), next-token targets."""
    n = ids.shape[0] // 2
    order = np.stack([np.arange(n), np.arange(n) + n], 1).reshape(-1)
    ids, mask = ids[order], mask[order]
    return {"inputs": jnp.asarray(ids[:, :-1], jnp.int32),
            "targets": jnp.asarray(ids[:, 1:], jnp.int32),
            "weights": jnp.asarray(mask[:, 1:], jnp.float32)}


# ----------------------------------------------------------------------------------------
# Fast: the loss functions and the config.

def test_pairs_sum_response_tokens_and_drop_padding_pairs():
    logps = jnp.asarray([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0], [-1.0, -1.0, -1.0],
                         [-1.0, -1.0, -1.0]])
    weights = jnp.asarray([[0, 1, 1], [0, 1, 0], [0, 0, 0], [1, 1, 1]], jnp.float32)
    p = pairs(logps, weights)
    np.testing.assert_allclose(p.chosen, [-5.0, 0.0])
    np.testing.assert_allclose(p.rejected, [-0.5, -3.0])
    np.testing.assert_allclose(p.valid, [1.0, 0.0])  # the second pair has no chosen tokens


def test_dpo_loss_rewards_and_gradient_direction():
    policy = Pairs(*(jnp.asarray([x]) for x in (-4.0, -6.0, 2.0, 3.0, 1.0)))
    reference = Pairs(*(jnp.asarray([x]) for x in (-5.0, -5.0, 2.0, 3.0, 1.0)))
    loss, chosen, rejected = pair_losses(policy, reference, loss_type="sigmoid", beta=0.5)
    np.testing.assert_allclose(chosen, [0.5])
    np.testing.assert_allclose(rejected, [-0.5])
    np.testing.assert_allclose(loss, [np.log1p(np.exp(-1.0))], rtol=1e-6)
    # The loss falls as the chosen response gains probability and the rejected loses it.
    grad = jax.grad(lambda c, r: pair_losses(policy._replace(chosen=c, rejected=r), reference,
                                             loss_type="sigmoid", beta=0.5)[0].sum(),
                    argnums=(0, 1))(policy.chosen, policy.rejected)
    assert grad[0][0] < 0 < grad[1][0]
    # Label smoothing e: (1-e) L(d) + e L(-d).
    smooth = pair_losses(policy, reference, loss_type="sigmoid", beta=0.5, label_smoothing=0.2)
    np.testing.assert_allclose(smooth[0], [0.8 * np.log1p(np.exp(-1.0))
                                           + 0.2 * np.log1p(np.exp(1.0))], rtol=1e-6)


def test_token_logps_ignore_the_padded_vocabulary():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 8)).astype(np.float32)
    targets = rng.integers(0, 6, (2, 3))
    padded = logits.copy()
    padded[..., 6:] += 50.0
    expected = jax.nn.log_softmax(logits[..., :6])
    expected = np.take_along_axis(np.asarray(expected), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(token_logps(jnp.asarray(padded), targets, 6), expected,
                               rtol=1e-6)


def test_the_reward_reads_each_rows_last_response_position():
    from jaxlm.losses.preference import last_response_hidden
    hidden = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3) + 1.0
    weights = jnp.asarray([[0, 1, 1, 0], [0, 0, 0, 1]], jnp.float32)
    out = last_response_hidden(hidden, weights)
    for row, pos in ((0, 2), (1, 3)):
        h = np.asarray(hidden[row, pos])
        np.testing.assert_allclose(out[row], h / np.sqrt(np.mean(h ** 2)), rtol=1e-5)


def dpo_config(**overrides):
    c = get_base_config()
    c.loss.weights.ce, c.loss.weights.dpo = 0.0, 1.0
    c.loss.dpo.loss_type = "simpo"
    for key, value in overrides.items():
        node, *path = key.split(".")
        target = c
        for part in [node, *path][:-1]:
            target = getattr(target, part)
        setattr(target, [node, *path][-1], value)
    return c


@pytest.mark.parametrize("overrides, message", [
    ({"loss.dpo.beta": 0.0}, "loss.dpo.beta: must be > 0"),
    ({"loss.weights.ce": 1.0}, "loss.weights.ce: loss.weights.dpo is a mean over preference"),
    ({"loss.dpo.loss_type": "sigmoid"}, "loss.dpo.reference_workdir: loss_type='sigmoid'"),
    ({"batch_size": 6, "grad_accum_steps": 2}, "batch_size: 6 rows do not split"),
    ({"loss.dpo.label_smoothing": 0.5}, "loss.dpo.label_smoothing: must be in [0, 0.5)"),
    ({"loss.weights.reward": 1.0}, "loss.weights.reward: loss.weights.dpo is a mean over"),
])
def test_bad_preference_configs_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        Config.from_dict(dpo_config(**overrides))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------
# Fast: preference data.

def write_preferences(path: Path, n: int = 24, bad: bool = True) -> Path:
    """n arithmetic pairs (the right sum chosen), then one bad record of each kind."""
    lines = [json.dumps({"prompt": f"{i}+{i % 7}=", "chosen": str(i + i % 7),
                         "rejected": str(i + i % 7 + 1)}) for i in range(n)]
    if bad:
        lines += [json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "2"}),
                  json.dumps({"prompt": "1+1=", "chosen": "", "rejected": "3"}),
                  "{not json",
                  json.dumps({"prompt": "9" * 40, "chosen": "1", "rejected": "2"})]
    path.write_text("\n".join(lines) + "\n")
    return path


def prepare_preferences(tmp_path, **kw):
    from jaxlm.data.prepare import prepare_sft
    src = write_preferences(tmp_path / "pairs.jsonl", **kw.pop("records", {}))
    return prepare_sft([src], tmp_path / "prepared", tokenizer="byte", seq_len=16,
                       record_format="preference", progress=False, val_fraction=0.25, **kw)


def test_preference_records_become_pairs_and_bad_ones_are_counted(tmp_path):
    from jaxlm.data.pipeline import TokenData
    from jaxlm.data.preference import pair_rows
    data = TokenData.load(prepare_preferences(tmp_path))
    meta = data.meta
    assert {r: b["count"] for r, b in meta["bad"].items()} == {
        "identical_responses": 1, "empty_completion": 1, "invalid_json": 1, "too_long": 1}
    assert data.is_preference and meta["records"] == 28
    assert sum(meta["examples"].values()) == 2 * 24  # two examples a pair, same split
    assert all(n % 2 == 0 for n in meta["examples"].values())
    batch = pair_rows(data, "train", seq_len=16, global_batch=4, seed=0,
                      rows=slice(None))[0]
    for c, r in ((0, 1), (2, 3)):
        inputs, weights = batch["inputs"], batch["weights"]
        prompt = int(np.argmax(weights[c] > 0))  # the first target that is a response token
        assert prompt > 0 and weights[c, :prompt].sum() == 0 == weights[r, :prompt].sum()
        np.testing.assert_array_equal(inputs[c, :prompt + 1], inputs[r, :prompt + 1])
        text = lambda row: bytes(int(t) for t, w in zip(batch["targets"][row], batch["weights"][row]) if w).decode()  # noqa: E731
        a, b = text(c).strip(), text(r).strip()
        assert int(b) == int(a) + 1  # the chosen sum is right, the rejected one off by one


def test_chat_preference_records_use_the_sft_template():
    from jaxlm.data.preference import make_pair
    from jaxlm.data.sft import BadRecord
    from jaxlm.data.tokenizers import ByteTokenizer
    tok = ByteTokenizer()
    prompt = [{"role": "user", "content": "2+2?"}]
    line = json.dumps({"prompt": prompt, "chosen": "4",
                       "rejected": [{"role": "assistant", "content": "5"}]}).encode()
    chosen, rejected = make_pair(line, tok, None, seq_len=None)
    text = lambda ex, w: bytes(int(t) for t, x in zip(ex.tokens, ex.weights) if x == w)  # noqa: E731
    assert text(chosen, 0) == text(rejected, 0) == b"user: 2+2?\nassistant: "
    assert (text(chosen, 1), text(rejected, 1)) == (b"4\n", b"5\n")
    assert chosen.key == rejected.key
    same = json.dumps({"messages": prompt, "chosen": "4",
                       "rejected": [{"role": "assistant", "content": "4"}]}).encode()
    with pytest.raises(BadRecord, match="identical_responses"):
        make_pair(same, tok, None, seq_len=None)
    with pytest.raises(BadRecord, match="too_long: rejected: "):
        make_pair(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "2" * 30}).encode(),
                  tok, None, seq_len=16)


def test_strict_refuses_the_first_bad_preference_record(tmp_path):
    with pytest.raises(ConfigError) as e:
        prepare_preferences(tmp_path, strict=True)
    assert str(e.value).startswith("--input: ") and "pairs.jsonl:25: identical_responses" in \
        str(e.value)


# ----------------------------------------------------------------------------------------
# Slow: equality with TRL on a tiny Hugging Face model.

def _hf_llama(seed: int, out: Path):
    import torch
    import transformers
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    return model


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """(policy, reference): tiny random Llamas, saved and imported as run directories."""
    pytest.importorskip("transformers")
    from jaxlm.checkpoints.hf_import import import_hf
    root = tmp_path_factory.mktemp("dpo_hf")
    out = {}
    for name, seed in (("policy", 0), ("reference", 1)):
        model = _hf_llama(seed, root / f"{name}_hf")
        import_hf(root / f"{name}_hf", root / name, get_base_config(), devices=jax.devices()[:1])
        out[name] = (model, root / name)
    return out


def _trl_loss(policy, reference, ids, mask, loss_type, beta, label_smoothing):
    """TRL's DPOTrainer._compute_loss on the batch, and the policy's gradients."""
    import collections
    import torch
    from trl import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head
    for model, fields in ((policy, ("log_probs", "entropy", "mean_logits", "is_top1")),
                          (reference, ("log_probs",))):
        if not getattr(model, "_fused_for_test", False):
            add_fused_lm_head(model, outputs=fields)
            model._fused_for_test = True
    identity = lambda x: x  # noqa: E731
    fake = SimpleNamespace(
        model=policy.train(), ref_model=reference.eval(), aux_loss_enabled=False,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=identity,
                                    gather=identity, unwrap_model=identity),
        ld_alpha=None, precompute_ref_logps=False, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=label_smoothing, use_weighting=False,
        _metrics={"train": collections.defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None))
    policy.zero_grad()
    inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.ones_like(torch.tensor(ids)),
              "completion_mask": torch.tensor(mask)}
    loss = DPOTrainer._compute_loss(fake, policy, inputs, False)
    loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in policy.named_parameters()}
    return float(loss), grads, {k: v[-1] for k, v in fake._metrics["train"].items()}


def _trl_simpo(policy, ids, mask, beta, label_smoothing, gamma):
    """TRL's CPOTrainer SimPO loss (its average log-probabilities) and the gradients."""
    import torch
    from trl.experimental.cpo import CPOTrainer
    fake = SimpleNamespace(alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=gamma,
                           label_smoothing=label_smoothing,
                           accelerator=SimpleNamespace(device=torch.device("cpu")))
    policy.zero_grad()
    ids_t = torch.tensor(ids)
    logits = policy.train()(input_ids=ids_t, attention_mask=torch.ones_like(ids_t)).logits
    labels = ids_t.masked_fill(torch.tensor(mask) == 0, -100)
    logps = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    chosen, rejected = logps.chunk(2)
    losses, chosen_r, rejected_r = CPOTrainer.cpo_loss(fake, chosen, rejected)
    loss = losses.mean()
    loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in policy.named_parameters()}
    margin = float((chosen_r - rejected_r).mean())
    return float(loss), grads, {"rewards/chosen": float(chosen_r.mean()),
                                "rewards/rejected": float(rejected_r.mean()),
                                "rewards/margins": margin,
                                "rewards/accuracies": float((chosen_r > rejected_r).float().mean())}


def _our_loss(runs, batch, **dpo):
    """Our objective on the imported runs: the policy's loss, gradients and metrics."""
    from jaxlm.losses.objectives import build_objective
    from jaxlm.parallel.mesh import make_mesh
    from jaxlm.training.layout import resolve_mesh_shape
    run = runs["policy"][1]
    config = rundir.load_config(run).replace(**{
        "loss.weights.ce": 0.0, "loss.weights.dpo": 1.0, "init.from_workdir": str(run),
        "seq_len": LENGTH - 1, **{f"loss.dpo.{k}": v for k, v in dpo.items()}})
    devices = jax.devices()[:1]
    mesh = make_mesh(resolve_mesh_shape(config.mesh, 1), devices)
    policy = Teacher.from_run(str(run), 0, mesh)  # the restored run, as a frozen model
    reference = Teacher.from_run(str(runs["reference"][1]), 0, mesh, role="reference")
    objective = build_objective(config, policy.model_cfg)
    ref_out = None if not config.loss.dpo.needs_reference else reference.forward(
        reference.restore(), batch, return_hidden=False)  # SimPO has no reference
    loss_fn = make_loss_fn(policy.graphdef, policy.model_cfg, objective)
    (total, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        policy.restore(), batch, None, ref_out)
    n = stats["weight_sum"]
    return float(total / n), jax.tree.map(lambda g: np.asarray(g / n), grads), \
        {k: float(v / n) for k, v in stats.items()}


@pytest.mark.slow
@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("ipo", 0.0),
                                                  ("robust", 0.2), ("simpo", 0.1)])
def test_dpo_loss_and_gradient_equal_trl(hf_pair, loss_type, smoothing):
    pytest.importorskip("trl")
    ids, mask = preference_batch()
    beta, gamma = 0.3, 0.4
    if loss_type == "simpo":
        theirs, t_grads, t_metrics = _trl_simpo(hf_pair["policy"][0], ids, mask, beta,
                                                smoothing, gamma)
    else:
        theirs, t_grads, t_metrics = _trl_loss(hf_pair["policy"][0], hf_pair["reference"][0],
                                               ids, mask, loss_type, beta, smoothing)
    ours, grads, metrics = _our_loss(hf_pair, interleaved(ids, mask), loss_type=loss_type,
                                     beta=beta, label_smoothing=smoothing, simpo_gamma=gamma)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    for name, ours_g in (("model.embed_tokens.weight", grads["embed"]["embedding"]),
                         ("lm_head.weight", grads["lm_head"]["kernel"].T)):
        g = t_grads[name]
        np.testing.assert_allclose(ours_g[:VOCAB], g, atol=1e-5 * np.abs(g).max())
    for ours_key, trl_key in (("dpo/rewards/chosen", "rewards/chosen"),
                              ("dpo/rewards/rejected", "rewards/rejected"),
                              ("dpo/rewards/accuracy", "rewards/accuracies"),
                              ("dpo/rewards/margin", "rewards/margins"),
                              ("dpo/logps/chosen", "logps/chosen"),
                              ("dpo/logps/rejected", "logps/rejected")):
        if trl_key not in t_metrics:  # CPOTrainer.cpo_loss returns the rewards only
            continue
        np.testing.assert_allclose(metrics[ours_key], t_metrics[trl_key], rtol=1e-5, atol=1e-6)


def _trl_reward(policy, ids, mask, center):
    """TRL's RewardTrainer.compute_loss with a sequence classifier on the policy's weights
    (its reward: `score` on the last token it is given), and its gradients."""
    import collections
    import torch
    import transformers
    from trl import RewardTrainer
    config = transformers.LlamaConfig(**TINY_LLAMA, num_labels=1, pad_token_id=0)
    model = transformers.LlamaForSequenceClassification(config)
    model.model.load_state_dict(policy.model.state_dict())
    torch.manual_seed(2)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.3)
    # Our reward reads the hidden state that has read the response but not its END (the
    # last weighted target): TRL's sequence stops there, the rest is padding.
    ids = ids.copy()
    ends = mask.shape[1] - np.argmax(mask[:, ::-1], axis=1)
    for row, end in enumerate(ends):
        ids[row, end - 1:] = 0
    identity = lambda x: x  # noqa: E731
    fake = SimpleNamespace(
        model=model.train(), args=SimpleNamespace(center_rewards_coefficient=center),
        accelerator=SimpleNamespace(gather_for_metrics=identity, gather=identity),
        _metrics={"train": collections.defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    ids_t = torch.tensor(ids)
    loss, outputs = RewardTrainer.compute_loss(
        fake, model, {"input_ids": ids_t, "attention_mask": (ids_t != 0).long()},
        return_outputs=True)
    loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
    metrics = {k: v[-1] for k, v in fake._metrics["train"].items()}
    return (float(loss.detach()), outputs.logits[:, 0].detach().numpy(), grads, metrics,
            model.score.weight.detach().numpy()[0])


@pytest.mark.slow
def test_reward_model_loss_rewards_and_gradient_equal_trl(hf_pair):
    pytest.importorskip("trl")
    from jaxlm.losses.objectives import build_objective
    from jaxlm.losses.preference import reward_values
    from jaxlm.parallel.mesh import make_mesh
    from jaxlm.training.layout import resolve_mesh_shape
    from jaxlm.training.teacher import frozen_forward
    ids, mask = preference_batch()
    center = 0.05
    theirs, t_rewards, t_grads, t_metrics, score = _trl_reward(hf_pair["policy"][0], ids,
                                                               mask, center)
    # Their score reads the final norm's output: our head is w = norm weight * score, b = 0.
    norm = hf_pair["policy"][0].model.norm.weight.detach().numpy()
    run = hf_pair["policy"][1]
    config = rundir.load_config(run).replace(**{
        "loss.weights.ce": 0.0, "loss.weights.reward": 1.0, "seq_len": LENGTH - 1,
        "loss.reward.center_coefficient": center})
    mesh = make_mesh(resolve_mesh_shape(config.mesh, 1), jax.devices()[:1])
    policy = Teacher.from_run(str(run), 0, mesh)
    head = {"w": jnp.asarray(norm * score), "b": jnp.zeros((), jnp.float32)}
    params = {**policy.restore(), "objective": {"reward": head}}
    batch = interleaved(ids, mask)
    loss_fn = make_loss_fn(policy.graphdef, policy.model_cfg,
                           build_objective(config, policy.model_cfg))
    (total, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, None)
    n = float(stats["weight_sum"])
    np.testing.assert_allclose(float(total) / n, theirs, rtol=1e-5)
    out = frozen_forward(policy.graphdef, mesh, policy.rules, policy.restore(), batch,
                         return_hidden=True)
    rewards = np.asarray(reward_values(head, out.hidden[-1], batch["weights"]))
    p = len(ids) // 2
    np.testing.assert_allclose(rewards[0::2], t_rewards[:p], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rewards[1::2], t_rewards[p:], rtol=1e-5, atol=1e-6)
    for ours_key, trl_key in (("reward/accuracy", "accuracy"), ("reward/margin", "margin")):
        np.testing.assert_allclose(float(stats[ours_key]) / n, t_metrics[trl_key], rtol=1e-5,
                                   atol=1e-6)
    g = t_grads["model.embed_tokens.weight"]
    np.testing.assert_allclose(np.asarray(grads["embed"]["embedding"])[:VOCAB] / n, g,
                               atol=1e-5 * np.abs(g).max())
    g = t_grads["score.weight"][0]  # d/d score = norm weight * d/d w
    np.testing.assert_allclose(norm * np.asarray(grads["objective"]["reward"]["w"]) / n, g,
                               atol=1e-5 * np.abs(g).max())


# ----------------------------------------------------------------------------------------
# Slow: training steps, references, layouts.

def _preference_run(tiny_config, tmp_path, kind):
    c = tiny_config.copy_and_resolve_references()
    c.data.path, c.data.tokenizer = str(prepare_preferences(tmp_path, records={"bad": False})), "byte"
    c.loss.weights.ce, c.loss.weights.dpo = 0.0, 1.0
    c.loss.dpo.beta, c.learning_rate, c.warmup_steps, c.grad_accum_steps = 0.5, 3e-3, 0, 2
    c.seq_len, c.batch_size = 16, 8
    if kind == "lora":
        c.lora.rank = 4
    else:  # the reference is the run the policy starts from (the same seed: its init)
        from tests.helpers import step0_run
        base = tiny_config.copy_and_resolve_references()
        (tmp_path / "text.txt").write_text("0+0=0\n1+2=3\n" * 50)
        base.data.path, base.data.tokenizer = str(tmp_path / "text.txt"), "byte"
        c.init.from_workdir = str(step0_run(base, tmp_path / "base"))
    return c


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "reference_run"])
def test_dpo_starts_at_log2_learns_and_data2_fsdp2_tensor2_equals_one_device(
        tiny_config, tmp_path, kind):
    c = _preference_run(tiny_config, tmp_path, kind)

    def train(data, fsdp, tensor, devices):
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
        exp = Experiment.build(c, tmp_path / f"run{len(devices)}", devices)
        batch, _ = exp.to_device(next(exp.train_batches()), train=True)
        state, out = exp.init_state(), []
        for _ in range(3):
            state, m = exp.train_step(state, batch)
            out.append({k: float(v) for k, v in m.items()})
        return out

    one = train(1, 1, 1, jax.devices()[:1])
    eight = train(2, 2, 2, jax.devices())
    # The policy starts as its reference: every reward is 0 and the loss is log 2.
    assert one[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert one[0]["dpo/rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert one[0]["dpo/kl"] == pytest.approx(0.0, abs=1e-6)
    # Training on the pairs raises the margin, the accuracy and the KL, lowers the loss.
    assert one[-1]["loss"] < one[0]["loss"] and one[-1]["dpo/rewards/margin"] > 0
    assert one[-1]["dpo/rewards/accuracy"] > 0.5 and one[-1]["dpo/kl"] > 0
    for a, b in zip(one, eight):
        for key in ("loss", "grad_norm", "dpo/rewards/margin", "dpo/logps/chosen", "dpo/kl"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_reward_model_learns_pairs_and_data2_fsdp2_tensor2_equals_one_device(tiny_config,
                                                                               tmp_path):
    c = _preference_run(tiny_config, tmp_path, "lora")  # the head trains with the adapters
    c.loss.weights.dpo, c.loss.weights.reward, c.learning_rate = 0.0, 1.0, 1e-2

    def train(data, fsdp, tensor, devices):
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
        exp = Experiment.build(c, tmp_path / f"reward{len(devices)}", devices)
        batch, _ = exp.to_device(next(exp.train_batches()), train=True)
        state, out = exp.init_state(), []
        for _ in range(6):
            state, m = exp.train_step(state, batch)
            out.append({k: float(v) for k, v in m.items()})
        head = exp.trainable(state.params)[0]["objective"]["reward"]
        return out, jax.device_get(head)

    one, head1 = train(1, 1, 1, jax.devices()[:1])
    eight, head8 = train(2, 2, 2, jax.devices())
    # Bradley-Terry: loss = mean softplus(-margin); training separates the pairs.
    assert one[-1]["loss"] < one[0]["loss"]
    assert one[-1]["reward/margin"] > one[0]["reward/margin"]
    assert one[-1]["reward/accuracy"] >= one[0]["reward/accuracy"]
    for a, b in zip(one, eight):
        for key in ("loss", "grad_norm", "reward/margin", "reward/chosen"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(head8["w"], head1["w"], rtol=1e-4, atol=1e-6)


def test_dpo_needs_preference_data_and_preference_data_needs_dpo(tiny_config, tmp_path):
    c = tiny_config.copy_and_resolve_references()
    c.loss.weights.ce, c.loss.weights.dpo, c.loss.dpo.loss_type = 0.0, 1.0, "simpo"
    with pytest.raises(ConfigError, match="^data.path: loss.weights.dpo trains on"):
        Experiment.build(c, tmp_path / "a", jax.devices()[:1])
    c = tiny_config.copy_and_resolve_references()
    c.data.path, c.data.tokenizer = str(prepare_preferences(tmp_path)), "byte"
    c.seq_len = 16
    with pytest.raises(ConfigError, match="^loss.weights.dpo: data.path holds preference"):
        Experiment.build(c, tmp_path / "b", jax.devices()[:1])


@pytest.mark.slow
def test_a_reference_run_with_another_model_is_refused_before_compiling(tiny_config, tmp_path):
    from tests.helpers import step0_run
    other = tiny_config.copy_and_resolve_references()
    other.model.d_ff = 48
    (tmp_path / "text.txt").write_text("0+0=0\n1+2=3\n" * 50)
    other.data.path, other.data.tokenizer = str(tmp_path / "text.txt"), "byte"
    reference = step0_run(other, tmp_path / "reference")
    c = _preference_run(tiny_config, tmp_path, "lora")
    c.lora.rank = 0
    c.loss.dpo.reference_workdir = str(reference)
    with pytest.raises(ConfigError) as e:
        Experiment.build(c, tmp_path / "run", jax.devices()[:1])
    assert str(e.value).startswith("loss.dpo.reference_workdir: model.d_ff is ")
    assert "in the reference" in str(e.value)


@pytest.mark.slow
def test_held_out_pairs_give_the_objective_metrics(tiny_config, tmp_path):
    from jaxlm.training.evaluate import evaluate
    c = _preference_run(tiny_config, tmp_path, "lora")
    c.loss.dpo.loss_type, c.eval_batch_size = "simpo", 8  # 4 pairs a batch: a padded last
    exp = Experiment.build(c, tmp_path / "run", jax.devices()[:1])
    state = exp.init_state()
    result = evaluate(exp, state.params)
    n = (len(exp.data.sources[0].docs("val")) - 1) // 2
    assert n % 4 and {"eval_dpo", "eval_dpo/rewards/accuracy"} <= set(result)
    # The same means as the pairs' own objective computed in one batch.
    from jaxlm.data.preference import pair_rows
    batch = pair_rows(exp.data.sources[0], "val", seq_len=c.seq_len, global_batch=2 * n,
                      seed=0, rows=slice(None), num_epochs=1)[0]
    stats = exp.pair_eval_step(state.params, exp.to_global(batch))
    assert float(stats["weight_sum"]) == n
    np.testing.assert_allclose(result["eval_dpo"], float(stats["loss/dpo"]) / n, rtol=1e-5)
