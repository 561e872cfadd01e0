"""Mixture of experts: routing, dispatch, auxiliary losses, expert parallelism, configs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.errors import ConfigError
from models import ModelConfig, active_params, count_params, create_model, split_params
from models.moe import (aux_statistics, capacity, dispatch_capacity, dispatch_dropless,
                        expert_ffn, load_balance_loss, moe_tokens, route)
from tests.helpers import assert_trees_close, run_steps
from training.experiment import Experiment

CFG = ModelConfig(vocab_size=65, padded_vocab=128, num_layers=2, d_model=16, num_heads=2,
                  num_kv_heads=2, head_dim=8, d_ff=32, mlp="swiglu", moe_num_experts=4,
                  moe_top_k=2, moe_d_ff=24)


def expert_weights(cfg, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    shape_up = (cfg.moe_num_experts, cfg.d_model, cfg.moe_d_ff)
    return {"gate": jax.random.normal(k[0], shape_up) * 0.3,
            "up": jax.random.normal(k[1], shape_up) * 0.3,
            "down": jax.random.normal(k[2], (cfg.moe_num_experts, cfg.moe_d_ff,
                                             cfg.d_model)) * 0.3}


def numpy_routing(logits, top_k, cap):
    """Loop reference: softmax, top-k (renormalised), GShard capacity priority."""
    t, e = logits.shape
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    experts = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(probs, experts, -1)
    weights /= weights.sum(-1, keepdims=True)
    fill = np.zeros(e, int)
    kept = np.zeros((t, top_k), bool)
    for choice in range(top_k):  # all first choices, then all second choices
        for tok in range(t):
            ex = experts[tok, choice]
            if fill[ex] < cap:
                kept[tok, choice] = True
            fill[ex] += 1
    return experts, weights, kept


def test_routing_and_capacity_match_a_numpy_loop():
    logits = np.asarray(jax.random.normal(jax.random.key(0), (24, 4)) * 2)
    cap = capacity(24, 2, 4, 0.75)
    assert cap == 9  # ceil(24 * 2 / 4 * 0.75)
    r = route(jnp.asarray(logits), 2)
    experts, weights, kept = numpy_routing(logits, 2, cap)
    np.testing.assert_array_equal(r.experts_TxA, experts)
    np.testing.assert_allclose(r.weights_TxA, weights, rtol=1e-6)
    from models.moe import capacity_slots
    _, kept_jax = capacity_slots(r.experts_TxA, 4, cap)
    np.testing.assert_array_equal(kept_jax, kept)
    assert not kept.all()  # the case really drops something


def test_topk_softmax_order_renormalises_over_the_chosen_logits():
    logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
    r = route(logits, 2, "topk_softmax")
    np.testing.assert_array_equal(r.experts_TxA, [[0, 1]])
    np.testing.assert_allclose(r.weights_TxA, jax.nn.softmax(jnp.array([[2.0, 1.0]])))


def dense_reference(x, r, w, cfg):
    """Run every expert on every token, then gather the chosen ones."""
    all_out = expert_ffn(jnp.broadcast_to(x, (cfg.moe_num_experts, *x.shape)), w, cfg.mlp)
    chosen = all_out[r.experts_TxA, jnp.arange(x.shape[0])[:, None]]  # [T, K, D]
    return jnp.einsum("tk,tkd->td", r.weights_TxA, chosen)


@pytest.mark.parametrize("impl", ["ragged_dot", "blocks"])
def test_dropless_equals_dense_reference(impl):
    cfg = dataclasses.replace(CFG, moe_grouped_matmul=impl)
    x = jax.random.normal(jax.random.key(1), (40, CFG.d_model))
    w = expert_weights(CFG)
    r = route(jax.random.normal(jax.random.key(2), (40, 4)) * 2, 2)
    np.testing.assert_allclose(dispatch_dropless(x, r, w, cfg), dense_reference(x, r, w, cfg),
                               rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda w: dispatch_dropless(x, r, w, cfg).sum())(w)
    ref = jax.grad(lambda w: dense_reference(x, r, w, cfg).sum())(w)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads,
                 ref)


def test_capacity_large_enough_to_drop_nothing_equals_dropless():
    x = jax.random.normal(jax.random.key(1), (40, CFG.d_model))
    w = expert_weights(CFG)
    r = route(jax.random.normal(jax.random.key(2), (40, 4)) * 3, 2)
    cap = capacity(40, 2, 4, 4.0)  # = 40: an expert can take every token
    y, kept = dispatch_capacity(x, r, w, CFG, cap)
    assert kept.all()
    np.testing.assert_allclose(y, dispatch_dropless(x, r, w, CFG), rtol=1e-5, atol=1e-5)
    # A small capacity drops assignments; a dropped token gets nothing from that expert.
    y_small, kept_small = dispatch_capacity(x, r, w, CFG, 5)
    assert not kept_small.all()
    fully_dropped = ~kept_small.any(-1)
    np.testing.assert_array_equal(y_small[fully_dropped], 0.0)


def test_load_balance_loss_is_one_for_uniform_top1_routing_and_larger_when_skewed():
    e = 4
    uniform = route(jax.nn.one_hot(jnp.arange(16) % e, e) * 5.0, 1)
    stats = aux_statistics(uniform, e, None)
    assert float(load_balance_loss(stats["load"], stats["mean_prob"])) == pytest.approx(1.0)
    skewed = route(jnp.tile(jnp.array([[5.0, 0.0, 0.0, 0.0]]), (16, 1)), 1)
    stats = aux_statistics(skewed, e, None)
    assert float(load_balance_loss(stats["load"], stats["mean_prob"])) > 1.5


def test_load_balance_gradient_moves_probability_off_the_overloaded_expert():
    logits = jax.random.normal(jax.random.key(0), (32, 4)) * 0.1
    logits = logits.at[:, 0].add(2.0)  # expert 0 takes most tokens

    def lb(lg):
        s = aux_statistics(route(lg, 1), 4, None)
        return load_balance_loss(s["load"], s["mean_prob"])

    g = jax.grad(lb)(logits)
    assert float(g[:, 0].mean()) > 0  # descent lowers expert 0's logits
    assert float(g[:, 1:].mean()) < 0


def test_z_loss_matches_its_formula():
    logits = jax.random.normal(jax.random.key(3), (10, 4)) * 3
    z = aux_statistics(route(logits, 2), 4, None)["z_loss"]
    expected = np.mean(np.log(np.exp(np.asarray(logits)).sum(-1)) ** 2)
    assert float(z) == pytest.approx(expected, rel=1e-5)


def test_moe_layer_statistics_and_jitter():
    x = jax.random.normal(jax.random.key(1), (32, CFG.d_model))
    router = jax.random.normal(jax.random.key(2), (CFG.d_model, 4))
    w = expert_weights(CFG)
    y, aux = moe_tokens(x, router, w, CFG)
    np.testing.assert_allclose(aux["load"].sum(), 1.0, rtol=1e-6)
    assert float(aux["drop_fraction"]) == 0.0
    assert 0 < float(aux["router_entropy"]) <= np.log(4) + 1e-6
    jittery = dataclasses.replace(CFG, moe_jitter=0.5)
    y2, _ = moe_tokens(x, router, w, jittery, jitter_key=jax.random.key(0))
    assert not np.allclose(y, y2)


@pytest.mark.parametrize("every, shared", [(1, 0), (2, 1)])
def test_moe_model_runs_scanned_and_unrolled_alike(every, shared):
    cfg = dataclasses.replace(CFG, num_layers=4, moe_every=every,
                              moe_num_shared_experts=shared)
    graphdef, params = split_params(create_model(cfg, 0))
    toks = jax.random.randint(jax.random.key(0), (2, 8), 0, 65)
    out = nnx.merge(graphdef, params)(toks)
    assert set(out.aux) == {"load_balance", "z_loss", "router_entropy", "drop_fraction",
                            "load"}
    unrolled = dataclasses.replace(cfg, scan_layers=False)
    gd2, _ = split_params(create_model(unrolled, 0))
    out2 = nnx.merge(gd2, params)(toks)
    np.testing.assert_allclose(out.logits, out2.logits, rtol=1e-5, atol=1e-5)
    if every == 2:  # units of (dense, MoE): the scan runs over 2 units
        assert params["blocks"]["layer_1"]["mlp"]["up"].shape == (2, 4, 16, 24)
        assert params["blocks"]["layer_0"]["mlp"]["up"]["kernel"].shape == (2, 16, 32)


def test_active_parameters_count_top_k_experts():
    cfg = dataclasses.replace(CFG, mlp="gelu")
    total = count_params(split_params(create_model(cfg, 0))[1])
    per_expert = cfg.d_model * cfg.moe_d_ff * 2
    assert active_params(cfg, total) == total - 2 * (4 - 2) * per_expert


def moe_config(c, capacity_factor=0.0):
    c.batch_size, c.eval_batch_size, c.steps = 16, 16, 3
    c.model.d_ff = 64
    c.model.moe.num_experts, c.model.moe.top_k = 8, 2
    c.model.moe.capacity_factor = capacity_factor
    c.mesh.data = 1
    return c


@pytest.fixture(scope="module")
def moe_reference(tmp_path_factory):
    from configs.shakespeare_char import get_config
    losses, params, _, _ = run_steps(moe_config(get_config("tiny")),
                                     tmp_path_factory.mktemp("moe"), jax.devices()[:1])
    return losses, params


@pytest.mark.parametrize("layout", [dict(expert=8), dict(expert=4, data=2),
                                    dict(expert=2, fsdp=2, tensor=2)])
def test_expert_parallel_layouts_match_one_device(layout, moe_reference, tiny_config,
                                                  tmp_path):
    c = moe_config(tiny_config)
    for k, v in layout.items():
        c.mesh[k] = v
    losses, params, exp, state = run_steps(c, tmp_path, jax.devices())
    np.testing.assert_allclose(losses, moe_reference[0], rtol=1e-5)
    assert_trees_close(params, moe_reference[1], rtol=1e-4, atol=1e-6)
    up = state.params["blocks"]["mlp"]["up"]  # [layers, experts, embed, mlp]
    shard = up.addressable_shards[0].data.shape
    assert shard[1] == 8 // layout["expert"]
    assert shard[2] == 32 // layout.get("fsdp", 1) and shard[3] == 64 // layout.get("tensor", 1)


def test_moe_trains_with_metrics_and_pipeline(tiny_config, tmp_path):
    c = moe_config(tiny_config)
    c.model.num_layers, c.model.moe.every = 4, 2
    c.mesh.pipeline, c.mesh.expert, c.mesh.data = 2, 2, 2
    losses, _, exp, _ = run_steps(c, tmp_path, jax.devices())
    assert np.all(np.isfinite(losses))
    state = exp.init_state()
    _, metrics = exp.train_step(state, exp.to_global(exp.train_source()[0]))
    assert metrics["moe_load"].shape == (8,)
    assert float(metrics["moe_load_balance"]) >= 1.0 - 1e-5
    assert float(metrics["moe_drop_fraction"]) == 0.0


@pytest.mark.parametrize("key, value, message", [
    ("top_k", 9, "model.moe.top_k: top_k 9 > num_experts 8"),
    ("load_balance_weight", -0.1, "model.moe.load_balance_weight: must be >= 0"),
    ("z_loss_weight", -1.0, "model.moe.z_loss_weight: must be >= 0"),
    ("every", 3, "model.moe.every: num_layers 2 is not divisible by every=3"),
])
def test_bad_moe_configs_are_rejected(key, value, message, tiny_config, tmp_path):
    c = moe_config(tiny_config)
    c.model.moe[key] = value
    with pytest.raises(ConfigError, match=message):
        Experiment.build(c, tmp_path, jax.devices()[:1])


def test_experts_must_divide_over_the_expert_axis(tiny_config, tmp_path):
    c = moe_config(tiny_config)
    c.model.moe.num_experts, c.model.moe.top_k = 6, 2
    c.mesh.expert = 4
    with pytest.raises(ConfigError, match="model.moe.num_experts: 6 is not divisible by the 4 "
                                          "shards of logical axis 'experts'"):
        Experiment.build(c, tmp_path, jax.devices()[:4])


def test_moe_sweep_keeps_active_parameters_equal():
    from configs import sweep_moe
    variants = sweep_moe.get_sweep()
    assert len(variants) == 8
    for _, overrides in variants:
        assert overrides["model.moe.top_k"] * overrides["model.moe.d_ff"] == 512
    assert {v.overrides["model.moe.capacity_factor"] for v in variants} == {0.0, 1.25}
