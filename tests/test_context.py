"""Context parallelism: the zig-zag order, ring and all-gather attention against full
attention, every layout with a split sequence against one device, errors, the planner."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.configs.base import DEFAULT_RULES
from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Config
from jaxlm.losses.cross_entropy import mask_padded_vocab
from jaxlm.models.config import ModelConfig
from jaxlm.models.model import create_model
from jaxlm.models.attention import xla_attention
from jaxlm.parallel import context
from jaxlm.parallel.mesh import make_mesh
from jaxlm.parallel.sharding import use_rules
from tests.helpers import (assert_trees_close, no_compilation, params_fast_only, run_cli,
                           train_source)
from jaxlm.training.experiment import Experiment
from jaxlm.training.planner import causal_pairs_per_shard


def _segments(tokens: np.ndarray) -> np.ndarray:
    """Packed documents from the data: a new segment after every token id divisible by 7
    (uneven lengths, different in every row)."""
    return np.cumsum(tokens % 7 == 0, axis=1).astype(np.int32)


# ----------------------------------------------------------------------------------------
# The order.

def test_zigzag_order_round_trips_and_balances_causal_work():
    order = context.zigzag_order(16, 4)  # chunks of 2: device r holds chunks r and 7 - r
    np.testing.assert_array_equal(order[:4], [0, 1, 14, 15])
    np.testing.assert_array_equal(order[-4:], [6, 7, 8, 9])
    x = jnp.arange(2 * 16 * 3).reshape(2, 16, 3)
    np.testing.assert_array_equal(context._reorder_chunks(x, context.chunk_order(4), 1),
                                  x[:, order])
    np.testing.assert_array_equal(context.from_context_order(x[:, order], 4), x)
    for n in (2, 4, 8):
        zigzag = causal_pairs_per_shard(64, n)
        contiguous = causal_pairs_per_shard(64, n, order="contiguous")
        assert zigzag.sum() == contiguous.sum() == 64 * 65 // 2
        assert len(set(zigzag)) == 1  # every device the same causal work
        # The last device the most: about (2n - 1) / n times the mean.
        assert contiguous[-1] / contiguous.mean() == pytest.approx((2 * n - 1) / n, abs=0.02)
    windowed = causal_pairs_per_shard(64, 4, window=8)
    assert windowed.sum() == sum(min(p + 1, 8) for p in range(64))
    with pytest.raises(ValueError, match="does not split into 2 x 4 chunks"):
        context.zigzag_order(20, 4)


# ----------------------------------------------------------------------------------------
# Attention: forward and backward against full attention, directly.

ATTENTION_CASES = {  # mesh, implementation, mode, segment ids, window
    "context8-xla-ring": (dict(context=8), "xla", "ring", False, None),
    "context4-data2-xla-allgather-seg-window": (dict(context=4, data=2), "xla", "allgather",
                                                True, 5),
    "context2-tensor2-data2-xla-ring-seg-window": (dict(context=2, tensor=2, data=2), "xla",
                                                   "ring", True, 7),
    "context4-data2-pallas-ring-seg-window": (dict(context=4, data=2), "pallas_interpret",
                                              "ring", True, 5),
    "context2-data4-pallas-allgather-seg": (dict(context=2, data=4), "pallas_interpret",
                                            "allgather", True, None),
}


@pytest.mark.parametrize("case", params_fast_only(
    sorted(ATTENTION_CASES), fast={"context8-xla-ring", "context4-data2-xla-allgather-seg-window"}))
def test_context_attention_matches_full_attention(case):
    """Queries, keys and values of whole sequences put in the zig-zag order, attended by
    the ring (or the all-gather) on 8 devices, then put back: the output and the gradients
    of q, k, v equal full causal attention's on one device (GQA 4/2)."""
    sizes, impl, mode, segments, window = ATTENTION_CASES[case]
    mesh, n = make_mesh(sizes), sizes["context"]
    b, length, h, g, d = 2, 32, 4, 2, 8
    kq, kk, kv, ko = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (b, length, h, d))
    k, v = (jax.random.normal(key, (b, length, g, d)) for key in (kk, kv))
    do = jax.random.normal(ko, (b, length, h, d))
    seg = jnp.asarray(_segments(np.asarray(jax.random.randint(kq, (b, length), 0, 50)))) \
        if segments else None
    order = context.zigzag_order(length, n)

    def full(q, k, v):
        o = xla_attention(q, k, v, segment_ids_BxL=seg, window=window)
        return jnp.sum(o * do), o

    def split(q, k, v):
        with use_rules(mesh, DEFAULT_RULES):
            assert context.context_shards() == n
            o = context.context_attention(
                q[:, order], k[:, order], v[:, order], impl=impl, mode=mode,
                segment_ids_BxL=None if seg is None else seg[:, order], window=window)
        o = context.from_context_order(o, n)
        return jnp.sum(o * do), o

    grad = functools.partial(jax.value_and_grad, argnums=(0, 1, 2), has_aux=True)
    (_, o_full), g_full = jax.jit(grad(full))(q, k, v)
    (_, o_split), g_split = jax.jit(grad(split))(q, k, v)
    np.testing.assert_allclose(o_split, o_full, atol=2e-6)
    for name, a, c in zip("qkv", g_split, g_full):
        np.testing.assert_allclose(a, c, atol=1e-5, err_msg=f"d{name}")


# ----------------------------------------------------------------------------------------
# Training: every layout with a split sequence gives one device's losses and parameters.

LAYOUTS = {
    "context8": dict(context=8),
    "context4_data2": dict(context=4, data=2),
    "context2_fsdp2_tensor2": dict(context=2, fsdp=2, tensor=2),
    "context2_pipeline2_data2": dict(context=2, pipeline=2, data=2),
}
VARIANTS = {  # attention across the split, packed documents
    "ring-segments": ("ring", True),
    "allgather-causal": ("allgather", False),
}


def _config(c, layout=None, variant="ring-segments"):
    """The tiny model (2 layers, GQA 4/2, full remat), 3 steps of batch 16 x 32 tokens."""
    c.batch_size, c.eval_batch_size, c.steps = 16, 16, 3
    c.eval_every = c.checkpoint_every = 0
    c.mesh.data = 1
    c.model.context_attention = VARIANTS[variant][0]
    for key, value in (layout or {}).items():
        c.mesh[key] = value
    return c


def _train(config, workdir, devices, segments: bool, n: int | None = None):
    """(losses, parameters on the host, stats per step) of `config.steps` steps, with
    segment ids from the data when `segments`."""
    exp = Experiment.build(config, workdir, devices)
    state = exp.init_state()
    source = train_source(exp)
    losses, stats = [], []
    for step in range(config.steps if n is None else n):
        batch = dict(source[step])
        if segments:
            batch["segment_ids"] = _segments(batch["inputs"])
        state, metrics = exp.train_step(state, exp.to_global(batch))
        losses.append(float(metrics["loss"]))
        stats.append({k: float(v) for k, v in metrics.items() if k.startswith("moe_drop")})
    return np.array(losses), jax.device_get(exp.to_checkpoint(state).params), stats


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One device's run per variant, computed once for every layout."""
    from jaxlm.configs.shakespeare_char import get_config
    cache = {}

    def get(variant):
        if variant not in cache:
            c = _config(get_config("tiny"), variant=variant)
            cache[variant] = _train(c, tmp_path_factory.mktemp("ref"), jax.devices()[:1],
                                    VARIANTS[variant][1])[:2]
        return cache[variant]
    return get


@pytest.mark.parametrize("layout,variant", [
    pytest.param(lay, var, marks=[] if (lay, var) == ("context8", "ring-segments")
                 else [pytest.mark.slow]) for lay in sorted(LAYOUTS) for var in sorted(VARIANTS)])
def test_layout_matches_single_device(layout, variant, references, tiny_config, tmp_path):
    c = _config(tiny_config, LAYOUTS[layout], variant)
    losses, params, _ = _train(c, tmp_path, jax.devices(), VARIANTS[variant][1])
    ref_losses, ref_params = references(variant)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_trees_close(params, ref_params, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_pallas_kernel_with_grad_accumulation_and_no_remat(references, tiny_config, tmp_path):
    """The Pallas kernel (interpreted) on context 4 x data 2, two micro-batches, no remat."""
    c = _config(tiny_config, dict(context=4, data=2))
    c.model.attention_impl, c.model.remat, c.grad_accum_steps = "pallas_interpret", "none", 2
    losses, params, _ = _train(c, tmp_path, jax.devices(), segments=True)
    ref_losses, ref_params = references("ring-segments")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_trees_close(params, ref_params, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_moe_capacity_groups_drop_the_same_tokens(tiny_config, tmp_path):
    """MoE with capacity groups of 4 tokens (half a zig-zag chunk) on context 2 x expert 2
    x data 2: the tokens of each shard route where they are, the same tokens drop, and the
    losses and parameters are one device's."""
    def moe(c, layout=None):
        c = _config(c, layout)
        c.model.moe.num_experts, c.model.moe.top_k = 4, 2
        c.model.moe.capacity_factor, c.model.moe.group_size = 1.0, 4
        return c
    from jaxlm.configs.shakespeare_char import get_config
    one = _train(moe(get_config("tiny")), tmp_path / "one", jax.devices()[:1], True)
    split = _train(moe(tiny_config, dict(context=2, expert=2, data=2)), tmp_path / "eight",
                   jax.devices(), True)
    np.testing.assert_allclose(split[0], one[0], rtol=1e-5)
    assert_trees_close(split[1], one[1], rtol=1e-4, atol=1e-6)
    drops = [s["moe_drop_fraction"] for s in one[2]]
    assert min(drops) > 0  # tokens are dropped, and the same ones
    np.testing.assert_allclose([s["moe_drop_fraction"] for s in split[2]], drops, atol=1e-6)


@pytest.mark.slow
def test_distillation_teacher_runs_under_the_same_split(tiny_config, tmp_path):
    """A student distilling from a teacher run (trained on one device, its saved rules
    without a split) gets one device's losses on context 4 x data 2: the teacher reads the
    zig-zag batch and splits its sequences like the student."""
    from jaxlm.configs.shakespeare_char import get_config
    from jaxlm.training.trainer import train
    teacher = _config(get_config("tiny"))
    teacher.steps, teacher.model.num_layers = 2, 3
    teacher.sharding.rules = [(n, None) if n == "act_len" else (n, a) for n, a in DEFAULT_RULES]
    train(teacher, tmp_path / "teacher", jax.devices()[:1])

    def student(c, layout=None):
        c = _config(c, layout)
        c.loss.distill.teacher_workdir = str(tmp_path / "teacher")
        c.loss.weights.distill = 1.0
        return c
    one = _train(student(get_config("tiny")), tmp_path / "one", jax.devices()[:1], True)
    split = _train(student(tiny_config, dict(context=4, data=2)), tmp_path / "eight",
                   jax.devices(), True)
    np.testing.assert_allclose(split[0], one[0], rtol=1e-5)
    assert_trees_close(split[1], one[1], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------
# The order is undone exactly at the logits.

def test_logits_in_zigzag_order_give_the_unsplit_token_losses(tiny_config):
    """The model on context 8 reads the batch in zig-zag order (positions included) and
    returns logits in that order; undone, every token's loss is the unsplit model's."""
    cfg = ModelConfig.from_section(Config.from_dict(_config(tiny_config)).model, 65, seq_len=32)
    model = create_model(cfg, seed=0)
    tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, 65)
    targets = jnp.roll(tokens, -1, axis=1)
    mesh = make_mesh(dict(context=8))

    def token_losses(logits, targets):
        logits = mask_padded_vocab(logits, 65)
        return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None],
                                                                  -1)[..., 0]

    def split(tokens):
        with use_rules(mesh, DEFAULT_RULES):
            batch = context.to_context_order({"inputs": tokens, "targets": targets})
            logits = model(batch["inputs"], positions_BxL=batch["positions"]).logits
            return logits, token_losses(logits, batch["targets"])

    ref = jax.jit(lambda t: token_losses(model(t).logits, targets))(tokens)
    logits, split_losses = jax.jit(split)(tokens)
    assert not np.allclose(logits, model(tokens).logits, atol=1e-3)  # really reordered
    got = context.from_context_order(token_losses(logits, context._reorder_chunks(
        targets, context.chunk_order(8), 1)), 8)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(context.from_context_order(split_losses, 8), ref, rtol=1e-5,
                               atol=1e-6)


# ----------------------------------------------------------------------------------------
# Errors and the planner.

@pytest.mark.parametrize("overrides, key, message", [
    (dict(context=8, seq_len=40), "seq_len", "40 is not divisible by 2 x 8 = 16: the sequence "
                                             "is split over 8 devices (context=8)"),
    (dict(context=2, attention_impl="cudnn", dtype="bfloat16"), "model.attention_impl",
     "'cudnn' cannot attend across a sequence split over 2 devices (context=2)"),
    (dict(context=2, num_experts=4, capacity_factor=1.0), "model.moe.group_size",
     "capacity groups of one sequence (0) straddle devices"),
    (dict(context=2, num_experts=4, capacity_factor=1.0, group_size=16),
     "model.moe.group_size", "capacity groups of 16 tokens straddle devices: the sequence is "
                             "split over 2 devices (context=2) in chunks of 8 tokens"),
    (dict(context=2, rules="no context"), "mesh.context",
     "2 devices would split nothing: no sharding rule maps a logical axis to 'context'"),
])
def test_bad_context_configs_are_rejected_before_compiling(overrides, key, message,
                                                           tiny_config, tmp_path):
    c = _config(tiny_config)
    c.mesh.data = -1
    c.mesh.context = overrides.pop("context")
    if "seq_len" in overrides:
        c.seq_len = overrides.pop("seq_len")
    if overrides.pop("rules", None):
        c.sharding.rules = [(n, None) if n == "act_len" else (n, a) for n, a in DEFAULT_RULES]
    for name in ("num_experts", "capacity_factor", "group_size"):
        if name in overrides:
            c.model.moe[name] = overrides.pop(name)
    for name, value in overrides.items():
        c.model[name] = value
    with no_compilation() as compiled, pytest.raises(ConfigError) as err:
        Experiment.build(c, tmp_path, jax.devices())
    assert err.value.key == key
    assert message in str(err.value)
    assert compiled == []


@pytest.mark.slow
def test_cli_prints_one_line_for_a_length_that_does_not_split(tmp_path):
    res = run_cli(["train.py", "--config=configs/shakespeare_char.py:tiny", "--cpu_devices=8",
                   f"--workdir={tmp_path}", "--config.mesh.context=8", "--config.seq_len=40"])
    assert res.returncode == 1 and "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines[-1] == ("error: seq_len: 40 is not divisible by 2 x 8 = 16: the sequence is "
                         "split over 8 devices (context=8), two chunks each")


def test_planner_shows_balanced_attention_and_the_ring(tiny_config, tmp_path):
    from jaxlm.training.planner import format_plan, plan
    c = _config(tiny_config, dict(context=4, data=2))
    c.seq_len = 64
    r = plan(c, str(tmp_path))
    ctx = r["context"]
    assert ctx["devices"] == 4 and ctx["attention"] == "ring" and ctx["chunk_tokens"] == 8
    zigzag = ctx["attention_flops_per_device"]
    contiguous = ctx["contiguous_attention_flops_per_device"]
    assert max(zigzag) == min(zigzag)
    assert max(contiguous) / (sum(contiguous) / 4) == pytest.approx(1.75, abs=0.02)
    assert sum(zigzag) == pytest.approx(sum(contiguous))
    # K/V blocks pass around the ring: [8 rows, 16 tokens, 2 KV heads, 8] float32 = 8 KiB
    # each, forward and backward in both layers; no activation is all-gathered.
    permute = r["collectives_per_device"]["collective-permute"]
    assert permute["count"] > 0 and permute["bytes"] >= 2 * 2 * 3 * 2 * 8 * 1024
    assert r["collectives_per_device"]["all-gather"]["bytes"] < 8 * 1024  # token ids only
    assert "max/mean 1.00" in format_plan(r)


@pytest.mark.slow
def test_parameters_sharded_over_context_by_a_rule(references, tiny_config, tmp_path):
    """ZeRO-3 over the sequence split too: the rule embed -> (fsdp, context)."""
    c = _config(tiny_config, dict(context=4, fsdp=2), "allgather-causal")
    c.sharding.rules = [("embed", ("fsdp", "context")) if name == "embed" else (name, axes)
                        for name, axes in DEFAULT_RULES]
    exp = Experiment.build(c, tmp_path / "plan", jax.devices())
    q = exp.state_shardings.params["blocks"]["attn"]["q"]["kernel"]
    assert "context" in str(q.spec)
    losses, params, _ = _train(c, tmp_path, jax.devices(), segments=False)
    ref_losses, ref_params = references("allgather-causal")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_trees_close(params, ref_params, rtol=1e-4, atol=1e-6)


def test_a_context_parallel_run_evaluates_on_one_device(tiny_config, tmp_path):
    """eval.py restores on the devices it has: every mesh axis but data becomes 1."""
    from jaxlm.configs.sections import Config
    from jaxlm.evaluation.restore import load_run
    from jaxlm.training import rundir
    tiny_config.mesh.context, tiny_config.mesh.data = 4, 2
    rundir.save_config(Config.from_dict(tiny_config), tmp_path)
    exp = load_run(tmp_path, jax.devices()[:1])
    assert exp.config.mesh.context == 1 and exp.mesh.devices.size == 1
