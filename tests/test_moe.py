"""Mixture of experts: routing, dispatch, auxiliary losses, expert parallelism, configs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.configs.errors import ConfigError
from jaxlm.models.model import active_params, count_params, create_model, split_params
from jaxlm.models.moe import (CapacityGroups, aux_statistics, capacity, capacity_groups,
                              capacity_slots, dispatch_capacity, dispatch_dropless, expert_ffn,
                              load_balance_loss, moe_tokens, route)
from jaxlm.parallel.pipeline import _merge_microbatches, _split_microbatches
from tests.helpers import assert_trees_close, model_config, run_steps, train_source
from jaxlm.training.experiment import Experiment
from jaxlm.training.steps import split_microbatches

CFG = model_config(num_layers=2, d_model=16, num_heads=2, num_kv_heads=2, head_dim=8, d_ff=32,
                   mlp="swiglu", moe={"num_experts": 4, "top_k": 2, "d_ff": 24})


def expert_weights(cfg, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    shape_up = (cfg.model.moe.num_experts, cfg.model.d_model, cfg.expert_d_ff)
    return {"gate": jax.random.normal(k[0], shape_up) * 0.3,
            "up": jax.random.normal(k[1], shape_up) * 0.3,
            "down": jax.random.normal(k[2], (cfg.model.moe.num_experts, cfg.expert_d_ff,
                                             cfg.model.d_model)) * 0.3}


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
    _, kept_jax = capacity_slots(r.experts_TxA, 4, cap)
    np.testing.assert_array_equal(kept_jax, kept)
    assert not kept.all()  # the case really drops something


def test_capacity_groups_are_runs_of_positions_or_whole_sequences():
    # 3 sequences of 8 tokens; group_size 0 = one sequence, 4 = half a sequence.
    for size, expected in ((0, np.arange(24).reshape(3, 8)), (8, np.arange(24).reshape(3, 8)),
                           (4, np.arange(24).reshape(6, 4))):
        g = capacity_groups(3, 8, size, 2, 4, 1.0)
        np.testing.assert_array_equal(g.token_PxQ, expected)
        assert g.full and list(g.capacity_P) == [capacity(expected.shape[1], 2, 4, 1.0)] * len(
            expected)
    g = capacity_groups(4, 8, 16, 2, 4, 1.0)  # two whole sequences per group
    np.testing.assert_array_equal(g.token_PxQ, np.arange(32).reshape(2, 16))
    # Decoding sees fewer tokens: shorter groups get the capacity of the tokens they have.
    g = capacity_groups(2, 5, 4, 2, 4, 1.0)  # 5 tokens per sequence, runs of 4
    np.testing.assert_array_equal(g.token_PxQ, [[0, 1, 2, 3], [4, 10, 10, 10],
                                                [5, 6, 7, 8], [9, 10, 10, 10]])
    assert list(g.capacity_P) == [2, 1, 2, 1] and not g.full
    # One new token per sequence (training seq_len 8): groups keep their sequences.
    g = capacity_groups(3, 1, 4, 2, 4, 1.0, seq_len=8)  # runs of 4 positions: alone
    np.testing.assert_array_equal(g.token_PxQ, [[0], [1], [2]])
    g = capacity_groups(3, 1, 16, 2, 4, 1.0, seq_len=8)  # two sequences per group
    np.testing.assert_array_equal(g.token_PxQ, [[0, 1], [2, 3]])
    assert list(g.capacity_P) == [1, 1]


def test_capacity_per_group_matches_a_numpy_loop_per_group():
    logits = np.asarray(jax.random.normal(jax.random.key(0), (4 * 12, 4)) * 2)
    groups = capacity_groups(4, 12, 6, 2, 4, 0.75)  # 8 groups of 6 tokens, capacity 3
    r = route(jnp.asarray(logits), 2)
    _, kept = dispatch_capacity(jnp.zeros((48, CFG.model.d_model)), r, expert_weights(CFG), CFG,
                                groups)
    expected = np.concatenate([numpy_routing(logits[i:i + 6], 2, 3)[2]
                               for i in range(0, 48, 6)])
    np.testing.assert_array_equal(kept, expected)
    assert not expected.all()
    # Padding places (decoding) take no slot: a group's real tokens route as if alone.
    _, kept_pad = capacity_slots(jnp.array([[[1, 4], [4, 4], [1, 2]]]), 4, [1])
    np.testing.assert_array_equal(kept_pad, [[[True, False], [False, False], [False, True]]])


@pytest.mark.parametrize("group_size", [0, 8, 32])
def test_the_same_tokens_drop_whether_the_batch_is_whole_or_split_in_halves(group_size):
    """The root property: a device's share of the batch does not change the routing."""
    rows, length, factor = 4, 16, 0.75
    x = jax.random.normal(jax.random.key(1), (rows * length, CFG.model.d_model))
    w = expert_weights(CFG)
    r = route(jax.random.normal(jax.random.key(2), (rows * length, 4)) * 2, 2)

    def run(lo, hi, groups):
        part = jax.tree.map(lambda a: a[lo:hi], r)
        return dispatch_capacity(x[lo:hi], part, w, CFG, groups)

    def grouped(n):
        return capacity_groups(n // length, length, group_size, 2, 4, factor)

    def single(n):  # one group per share of the batch, as if a device's tokens were one
        return CapacityGroups.single(n, capacity(n, 2, 4, factor))

    half = rows * length // 2
    y, kept = run(0, 2 * half, grouped(2 * half))
    y0, kept0 = run(0, half, grouped(half))
    y1, kept1 = run(half, 2 * half, grouped(half))
    np.testing.assert_array_equal(np.concatenate([kept0, kept1]), kept)
    np.testing.assert_allclose(np.concatenate([y0, y1]), y, rtol=1e-6, atol=1e-6)
    assert not kept.all()
    # One group per share of the batch (capacity from the share's token count) would not.
    _, whole = run(0, 2 * half, single(2 * half))
    halves = np.concatenate([run(0, half, single(half))[1], run(half, 2 * half,
                                                                single(half))[1]])
    assert not np.array_equal(whole, halves)


def test_micro_batches_keep_blocks_of_rows_together():
    x = jnp.arange(16)[:, None]
    np.testing.assert_array_equal(split_microbatches({"x": x}, 2)["x"][0, :, 0],
                                  [0, 2, 4, 6, 8, 10, 12, 14])
    np.testing.assert_array_equal(split_microbatches({"x": x}, 2, block=2)["x"][0, :, 0],
                                  [0, 1, 4, 5, 8, 9, 12, 13])
    for block in (1, 2, 4):
        mb = _split_microbatches(x, 2, block)
        np.testing.assert_array_equal(mb, split_microbatches({"x": x}, 2, block)["x"])
        np.testing.assert_array_equal(_merge_microbatches(mb, block), x)


def test_topk_softmax_order_renormalises_over_the_chosen_logits():
    logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
    r = route(logits, 2, "topk_softmax")
    np.testing.assert_array_equal(r.experts_TxA, [[0, 1]])
    np.testing.assert_allclose(r.weights_TxA, jax.nn.softmax(jnp.array([[2.0, 1.0]])))


def dense_reference(x, r, w, cfg):
    """Run every expert on every token, then gather the chosen ones."""
    all_out = expert_ffn(jnp.broadcast_to(x, (cfg.model.moe.num_experts, *x.shape)), w, cfg.model.mlp)
    chosen = all_out[r.experts_TxA, jnp.arange(x.shape[0])[:, None]]  # [T, K, D]
    return jnp.einsum("tk,tkd->td", r.weights_TxA, chosen)


@pytest.mark.parametrize("impl", [pytest.param("ragged_dot", marks=pytest.mark.slow), "blocks"])
def test_dropless_equals_dense_reference(impl):
    cfg = CFG.replace_model(moe={"grouped_matmul": impl})
    x = jax.random.normal(jax.random.key(1), (40, CFG.model.d_model))
    w = expert_weights(CFG)
    r = route(jax.random.normal(jax.random.key(2), (40, 4)) * 2, 2)
    np.testing.assert_allclose(dispatch_dropless(x, r, w, cfg), dense_reference(x, r, w, cfg),
                               rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda w: dispatch_dropless(x, r, w, cfg).sum())(w)
    ref = jax.grad(lambda w: dense_reference(x, r, w, cfg).sum())(w)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads,
                 ref)


def test_capacity_large_enough_to_drop_nothing_equals_dropless():
    x = jax.random.normal(jax.random.key(1), (40, CFG.model.d_model))
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
    x = jax.random.normal(jax.random.key(1), (32, CFG.model.d_model))
    router = jax.random.normal(jax.random.key(2), (CFG.model.d_model, 4))
    w = expert_weights(CFG)
    y, aux = moe_tokens(x, router, w, CFG)
    np.testing.assert_allclose(aux["load"].sum(), 1.0, rtol=1e-6)
    assert float(aux["drop_fraction"]) == 0.0
    assert 0 < float(aux["router_entropy"]) <= np.log(4) + 1e-6
    jittery = CFG.replace_model(moe={"jitter": 0.5})
    y2, _ = moe_tokens(x, router, w, jittery, jitter_key=jax.random.key(0))
    assert not np.allclose(y, y2)


@pytest.mark.parametrize("every, shared", [pytest.param(1, 0, marks=pytest.mark.slow), (2, 1)])
def test_moe_model_runs_scanned_and_unrolled_alike(every, shared):
    cfg = CFG.replace_model(num_layers=4, moe={"every": every,
                                                  "num_shared_experts": shared})
    graphdef, params = split_params(create_model(cfg, 0))
    toks = jax.random.randint(jax.random.key(0), (2, 8), 0, 65)
    out = nnx.merge(graphdef, params)(toks)
    assert set(out.aux) == {"load_balance", "z_loss", "router_entropy", "drop_fraction",
                            "load"}
    unrolled = cfg.replace_model(scan_layers=False)
    gd2, _ = split_params(create_model(unrolled, 0))
    out2 = nnx.merge(gd2, params)(toks)
    np.testing.assert_allclose(out.logits, out2.logits, rtol=1e-5, atol=1e-5)
    if every == 2:  # units of (dense, MoE): the scan runs over 2 units
        assert params["blocks"]["layer_1"]["mlp"]["up"].shape == (2, 4, 16, 24)
        assert params["blocks"]["layer_0"]["mlp"]["up"]["kernel"].shape == (2, 16, 32)


def test_active_parameters_count_top_k_experts():
    cfg = CFG.replace_model(mlp="gelu")
    total = count_params(split_params(create_model(cfg, 0))[1])
    per_expert = cfg.model.d_model * cfg.expert_d_ff * 2
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
    from jaxlm.configs.shakespeare_char import get_config
    losses, params, _, _ = run_steps(moe_config(get_config("tiny")),
                                     tmp_path_factory.mktemp("moe"), jax.devices()[:1])
    return losses, params


@pytest.mark.parametrize("layout", [pytest.param(dict(expert=8), marks=pytest.mark.slow),
                                    dict(expert=4, data=2), dict(expert=2, fsdp=2, tensor=2)])
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


@pytest.mark.slow
def test_moe_trains_with_metrics_and_pipeline(tiny_config, tmp_path):
    c = moe_config(tiny_config)
    c.model.num_layers, c.model.moe.every = 4, 2
    c.mesh.pipeline, c.mesh.expert, c.mesh.data = 2, 2, 2
    losses, _, exp, _ = run_steps(c, tmp_path, jax.devices())
    assert np.all(np.isfinite(losses))
    state = exp.init_state()
    _, metrics = exp.train_step(state, exp.to_global(train_source(exp)[0]))
    assert metrics["moe_load"].shape == (8,)
    assert float(metrics["moe_load_balance"]) >= 1.0 - 1e-5
    assert float(metrics["moe_drop_fraction"]) == 0.0


def run_with_drops(config, workdir, devices):
    """Train config.steps steps; returns (losses, drop fractions, parameters on host)."""
    exp = Experiment.build(config, workdir, devices)
    state, source = exp.init_state(), train_source(exp)
    losses, drops = [], []
    for step in range(config.steps):
        state, metrics = exp.train_step(state, exp.to_global(source[step]))
        losses.append(float(metrics["loss"]))
        drops.append(float(metrics["moe_drop_fraction"]))
    return np.array(losses), np.array(drops), jax.device_get(exp.to_checkpoint(state).params)


def capacity_config(c, layout, group_size=0, grad_accum_steps=1):
    """moe_config at capacity 1.25, which drops a few percent of the assignments."""
    c = moe_config(c, capacity_factor=1.25)
    c.model.moe.group_size = group_size
    c.grad_accum_steps = grad_accum_steps
    for k, v in layout.items():
        c.mesh[k] = v
    return c


_CAPACITY_REFERENCES = {}


def capacity_reference(group_size=0, grad_accum_steps=1, tmp_path_factory=None):
    """One device's (losses, drops, params) at capacity 1.25, computed once per setting."""
    key = (group_size, grad_accum_steps)
    if key not in _CAPACITY_REFERENCES:
        from jaxlm.configs.shakespeare_char import get_config
        c = capacity_config(get_config("tiny"), {}, group_size, grad_accum_steps)
        _CAPACITY_REFERENCES[key] = run_with_drops(c, tmp_path_factory.mktemp("cap"),
                                                   jax.devices()[:1])
    return _CAPACITY_REFERENCES[key]


def assert_same_run(got, ref):
    losses, drops, params = got
    np.testing.assert_allclose(losses, ref[0], rtol=1e-5)
    np.testing.assert_allclose(drops, ref[1], rtol=1e-5, atol=1e-7)
    assert_trees_close(params, ref[2], rtol=1e-4, atol=1e-6)
    assert np.all(ref[1] > 0)  # the runs really drop assignments


@pytest.mark.parametrize("layout, group_size", [
    pytest.param(dict(expert=4, data=2), 0, id="expert4_data2"),
    pytest.param(dict(expert=2, tensor=2, data=2), 0, id="expert2_tensor2_data2",
                 marks=pytest.mark.slow),
    pytest.param(dict(data=8), 0, id="data8", marks=pytest.mark.slow),
    pytest.param(dict(expert=4, data=2), 64, id="expert4_data2_two_sequence_groups",
                 marks=pytest.mark.slow),
    pytest.param(dict(expert=8), 8, id="expert8_quarter_sequence_groups",
                 marks=pytest.mark.slow),
])
def test_capacity_layouts_match_one_device(layout, group_size, tiny_config, tmp_path,
                                           tmp_path_factory):
    """With a capacity factor, every layout drops the same tokens as one device."""
    ref = capacity_reference(group_size, tmp_path_factory=tmp_path_factory)
    c = capacity_config(tiny_config, layout, group_size)
    assert_same_run(run_with_drops(c, tmp_path, jax.devices()), ref)


@pytest.mark.slow
@pytest.mark.parametrize("group_size", [0, 64])
def test_capacity_pipeline_matches_one_device_with_the_same_micro_batches(
        group_size, tiny_config, tmp_path, tmp_path_factory):
    """pipeline=2 x expert=2 x data=2 (2 micro-batches) equals one device accumulating 2
    micro-batches: the load-balance loss is per micro-batch in both."""
    ref = capacity_reference(group_size, grad_accum_steps=2,
                             tmp_path_factory=tmp_path_factory)
    fresh = tiny_config.copy_and_resolve_references()
    c = capacity_config(tiny_config, dict(pipeline=2, expert=2, data=2), group_size)
    assert_same_run(run_with_drops(c, tmp_path, jax.devices()), ref)
    # Gradient accumulation on the mesh splits the same way.
    c = capacity_config(fresh, dict(expert=2, tensor=2, data=2), group_size, grad_accum_steps=2)
    assert_same_run(run_with_drops(c, tmp_path / "accum", jax.devices()), ref)


@pytest.mark.parametrize("group_size", [0, 4, 32])
def test_capacity_model_decodes_with_a_kv_cache(group_size):
    """Decoding runs the layer on a few tokens: groups of the tokens present."""
    from jaxlm.configs.sections import Sampling
    from jaxlm.inference.generate import Generator
    cfg = dataclasses.replace(CFG.replace_model(moe={"capacity_factor": 1.25,
                                                   "group_size": group_size}), seq_len=16)
    graphdef, params = split_params(create_model(cfg, 0))
    out, _ = Generator(graphdef, cfg, 16).generate(params, [[5, 9, 13], [1, 2, 3, 4, 5, 6, 7]],
                                                   20, Sampling(temperature=1.0))
    assert [len(o) for o in out] == [20, 20]


@pytest.mark.parametrize("key, value, message", [
    ("top_k", 9, "model.moe.top_k: top_k 9 > num_experts 8"),
    ("load_balance_weight", -0.1, "model.moe.load_balance_weight: must be >= 0"),
    ("z_loss_weight", -1.0, "model.moe.z_loss_weight: must be >= 0"),
    ("every", 3, "model.moe.every: num_layers 2 is not divisible by every=3"),
    ("group_size", -1, "model.moe.group_size: must be >= 0"),
    ("group_size", 48, ("model.moe.group_size: 48 tokens neither divide seq_len 32 nor are a "
                        "multiple of it")),
])
def test_bad_moe_configs_are_rejected(key, value, message, tiny_config, tmp_path):
    c = moe_config(tiny_config)
    c.model.moe[key] = value
    with pytest.raises(ConfigError, match=message):
        Experiment.build(c, tmp_path, jax.devices()[:1])


@pytest.mark.parametrize("key, value, rows", [("batch_size", 16, "2 rows"),
                                               ("eval_batch_size", 8, "1 row")])
def test_capacity_groups_must_not_straddle_devices(key, value, rows, tiny_config, tmp_path):
    c = capacity_config(tiny_config, dict(expert=8), group_size=64)  # 2 sequences
    c.eval_batch_size = 64
    c[key] = value
    if key == "batch_size":
        c.model.moe.group_size = 128
    tokens = int(rows.split()[0]) * 32
    with pytest.raises(ConfigError, match=rf"model.moe.group_size: \d+ tokens do not divide "
                                          rf"the {tokens} tokens a device holds per "
                                          rf"micro-batch of {key} \({rows} x seq_len 32\)"):
        Experiment.build(c, tmp_path, jax.devices())


def test_experts_must_divide_over_the_expert_axis(tiny_config, tmp_path):
    c = moe_config(tiny_config)
    c.model.moe.num_experts, c.model.moe.top_k = 6, 2
    c.mesh.expert = 4
    with pytest.raises(ConfigError, match="model.moe.num_experts: 6 is not divisible by the 4 "
                                          "shards of logical axis 'experts'"):
        Experiment.build(c, tmp_path, jax.devices()[:4])


def test_moe_sweep_keeps_active_parameters_equal():
    from jaxlm.configs import sweep_moe
    variants = sweep_moe.get_sweep()
    assert len(variants) == 8
    for _, overrides in variants:
        assert overrides["model.moe.top_k"] * overrides["model.moe.d_ff"] == 512
    assert {v.overrides["model.moe.capacity_factor"] for v in variants} == {0.0, 1.25}


def test_router_softmax_and_logsumexp_differentiate_in_a_pipeline_stage():
    """compat.softmax/logsumexp equal jax.nn's and take gradients inside a shard_map in a
    stage vmap (spmd_axis_name) inside a scan: the MoE layer's place in a pipeline."""
    from jax.sharding import AxisType, PartitionSpec as P
    from jaxlm.parallel.compat import logsumexp, softmax
    mesh = jax.make_mesh((2, 4), ("pipeline", "data"), axis_types=(AxisType.Auto,) * 2,
                         devices=jax.devices()[:8])

    def stat(fn_softmax, fn_lse, x):
        return jnp.sum(fn_softmax(x) * jnp.arange(x.shape[-1])) + jnp.sum(fn_lse(x) ** 2)

    def stage(x_TxE, w_NxExE):  # a stage's scan over its layers, each in a shard_map
        layer = jax.shard_map(lambda x, w: x + 0.01 * stat(softmax, logsumexp, x @ w), mesh=mesh,
                              axis_names={"pipeline", "data"}, in_specs=(P("data"), P()),
                              out_specs=P("data"))
        return jax.lax.scan(lambda x, w: (layer(x, w), None), x_TxE, w_NxExE)[0]

    def staged(x_SxTxE, w_SxNxExE):  # the pipeline's scan over iterations
        stages = jax.vmap(stage, spmd_axis_name="pipeline")
        out, _ = jax.lax.scan(lambda x, _: (stages(x, w_SxNxExE), None), x_SxTxE, jnp.arange(2))
        return jnp.sum(out)

    x = jax.random.normal(jax.random.key(0), (2, 8, 6))
    w = 0.3 * jax.random.normal(jax.random.key(1), (2, 2, 6, 6))
    with jax.set_mesh(mesh):
        grad = jax.jit(jax.grad(staged, argnums=(0, 1)))(x, w)
    assert all(np.all(np.isfinite(g)) and float(jnp.max(jnp.abs(g))) > 0 for g in grad)
    ours = jax.value_and_grad(lambda x: stat(softmax, logsumexp, x))(x)
    ref = jax.value_and_grad(lambda x: stat(jax.nn.softmax,
                                            lambda a: jax.nn.logsumexp(a, axis=-1), x))(x)
    assert_trees_close(ours, ref, rtol=1e-6, atol=1e-6)
