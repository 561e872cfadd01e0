"""Loss terms as pure functions: KL variants, temperature, masks, features, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.losses.distill import distill_loss, feature_loss, token_feature_distance, token_kl
from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Feature
from jaxlm.losses.objectives import TERMS, make_schedule
from tests.helpers import train_source

P = np.array([0.7, 0.2, 0.1])
Q = np.array([0.2, 0.5, 0.3])


def kl(a, b):
    return float(np.sum(a * np.log(a / b)))


def logits(p):
    return jnp.asarray(np.log(p)[None, None], jnp.float32) + 3.0  # any shift: same softmax


@pytest.mark.parametrize("kind, expected", [
    ("forward_kl", kl(P, Q)),
    ("reverse_kl", kl(Q, P)),
    ("skew_forward_kl", kl(P, 0.3 * P + 0.7 * Q)),
    ("skew_reverse_kl", kl(Q, 0.3 * Q + 0.7 * P)),
])
def test_kl_variants_equal_hand_computed_values(kind, expected):
    student, teacher = logits(Q), logits(P)
    got = token_kl(student, teacher, kind=kind, skew=0.3)
    np.testing.assert_allclose(float(got[0, 0]), expected, rtol=1e-5)
    # Student == teacher: every divergence is zero.
    same = token_kl(teacher, teacher, kind=kind, skew=0.3)
    np.testing.assert_allclose(float(same[0, 0]), 0.0, atol=1e-6)


def test_skew_zero_is_plain_kl():
    s, t = logits(Q), logits(P)
    np.testing.assert_allclose(token_kl(s, t, kind="skew_forward_kl", skew=0.0),
                               token_kl(s, t, kind="forward_kl"), rtol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_temperature_scaling(temperature):
    rng = np.random.default_rng(0)
    s = jnp.asarray(rng.normal(size=(2, 3, 7)) * 3, jnp.float32)
    t = jnp.asarray(rng.normal(size=(2, 3, 7)) * 3, jnp.float32)
    loss = distill_loss(s, t, None, kind="forward_kl", temperature=temperature)
    p = jax.nn.softmax(t / temperature)
    q = jax.nn.softmax(s / temperature)
    expected = temperature ** 2 * jnp.sum(p * (jnp.log(p) - jnp.log(q)))
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
    # The gradient w.r.t. the student logits is T * (q_T - p_T): T^2 makes up for 1/T^2.
    grad = jax.grad(lambda s: distill_loss(s, t, None, kind="forward_kl",
                                           temperature=temperature))(s)
    np.testing.assert_allclose(grad, temperature * (q - p), atol=1e-5)


def test_masks_padding_tokens_and_padded_vocab():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(2, 4, 8)).astype(np.float32)
    t = rng.normal(size=(2, 4, 8)).astype(np.float32)
    w = np.array([[1, 1, 0, 0], [1, 0, 1, 0]], np.float32)
    base = distill_loss(s, t, w, kind="reverse_kl", vocab_size=6)
    s2, t2 = s.copy(), t.copy()
    s2[w == 0] += 5.0  # padded tokens
    t2[..., 6:] += 9.0  # padded vocabulary entries
    s2[..., 6:] -= 9.0
    np.testing.assert_allclose(distill_loss(s2, t2, w, kind="reverse_kl", vocab_size=6), base,
                               rtol=1e-6)
    per_token = token_kl(s, t, kind="reverse_kl", vocab_size=6)
    np.testing.assert_allclose(base, np.sum(per_token * w), rtol=1e-6)
    # Differently padded vocabularies (student 8, teacher 7) compare the real entries.
    np.testing.assert_allclose(distill_loss(s, t[..., :7], w, kind="reverse_kl", vocab_size=6),
                               base, rtol=1e-6)


def test_feature_distances():
    s = jnp.array([[[1.0, 0.0], [2.0, 2.0]]])
    t = jnp.array([[[0.0, 1.0], [1.0, 1.0]]])
    np.testing.assert_allclose(token_feature_distance(s, t, "mse"), [[1.0, 1.0]])
    np.testing.assert_allclose(token_feature_distance(s, t, "cosine"), [[1.0, 0.0]], atol=1e-6)
    # A projection maps student width 2 to teacher width 3; pairs are averaged.
    proj = jnp.array([[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])  # swap, pad
    t3 = jnp.concatenate([s[..., ::-1], jnp.zeros((1, 2, 1))], -1)
    np.testing.assert_allclose(feature_loss([s], [t3], None, kind="mse",
                                            projection=proj), 0.0, atol=1e-6)
    w = jnp.array([[1.0, 0.0]])
    np.testing.assert_allclose(feature_loss([s, s], [t, t], w, kind="mse"), 1.0)


@pytest.mark.parametrize("kind, mid, end", [("constant", 2.0, 2.0), ("linear", 1.25, 0.5),
                                             ("cosine", 1.25, 0.5)])
def test_schedules(kind, mid, end):
    f = make_schedule(kind, 2.0, 0.5, 100)
    np.testing.assert_allclose(float(f(0)), 2.0, rtol=1e-6)
    np.testing.assert_allclose(float(f(50)), mid, rtol=1e-6)
    np.testing.assert_allclose(float(f(100)), end, rtol=1e-6)
    np.testing.assert_allclose(float(f(500)), end, rtol=1e-6)


def test_layer_map():
    assert Feature(layer_map="").layer_pairs(2, 6) == [(1, 5)]
    assert Feature(layer_map="0:2,-1:-1").layer_pairs(2, 6) == [(0, 2), (1, 5)]
    with pytest.raises(ConfigError, match="teacher layer 6 is out of range"):
        Feature(layer_map="0:6").layer_pairs(2, 6)
    with pytest.raises(ConfigError, match="loss.feature.layer_map: '0-6' is not STUDENT"):
        Feature.parse({"layer_map": "0-6"}, prefix="loss.feature")


def test_terms_are_registered_once_with_their_needs():
    assert {"ce", "distill", "feature"} <= set(TERMS)
    assert not TERMS["ce"].needs_teacher
    assert TERMS["distill"].needs_teacher and TERMS["feature"].needs_teacher


def test_moe_router_losses_are_registered_terms(tiny_config, tmp_path):
    """MoE aux losses plug in as terms weighted by model.moe.*_weight; dense models skip
    them; they combine with distillation-style terms through the same objective."""
    from jaxlm.training.experiment import Experiment
    c = tiny_config
    c.batch_size, c.eval_batch_size = 8, 8
    dense = Experiment.build(c, tmp_path / "dense", jax.devices()[:1])
    assert set(dense.objective.terms) == {"ce"}  # moe weights are set, but no experts
    c.model.moe.num_experts, c.model.moe.top_k = 4, 2
    c.model.moe.load_balance_weight, c.model.moe.z_loss_weight = 0.5, 0.1
    exp = Experiment.build(c, tmp_path / "moe", jax.devices()[:1])
    assert set(exp.objective.terms) == {"ce", "moe_load_balance", "moe_z_loss"}
    state = exp.init_state()
    _, m = exp.train_step(state, exp.to_global(train_source(exp)[0]))
    total = m["loss/ce"] + 0.5 * m["loss/moe_load_balance"] + 0.1 * m["loss/moe_z_loss"]
    np.testing.assert_allclose(float(m["loss"]), float(total), rtol=1e-6)
    np.testing.assert_allclose(float(m["loss/moe_load_balance"]),
                               float(m["moe_load_balance"]), rtol=1e-6)
