"""Magnitude pruning: masks against a NumPy transcription, the cubic schedule, masks held
through updates, resumes and a sharded mesh, the eval path, and bad input."""

import json

import jax
import numpy as np
import pytest

from tests.helpers import assert_trees_close, call_cli, model_config, train_source
from jaxlm.configs import keys
from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Config, Prune
from jaxlm.evaluation.request import EvalRequest
from jaxlm.models.model import create_model, split_params
from jaxlm.models.prune import (Target, apply_masks, cubic_sparsity, magnitude_masks,
                                matrix_bytes, prune_due, prune_targets, subtree)
from jaxlm.training.checkpoint import Checkpointer
from jaxlm.training.experiment import Experiment


@pytest.fixture(scope="module")
def moe_model():
    """A 2-layer MoE model with an untied head: (model, params)."""
    cfg = model_config(num_layers=2, d_model=16, num_heads=2, num_kv_heads=2, d_ff=32,
                       tie_embeddings=False, moe={"num_experts": 2, "every": 2})
    model = create_model(cfg, 0)
    return model, split_params(model)[1]


def _np_matrices(w: np.ndarray, t: Target) -> np.ndarray:
    """[matrices, I, O] of a parameter."""
    i = int(np.prod(w.shape[t.lead:t.lead + t.in_ndim]))
    return w.reshape(-1, i, int(np.prod(w.shape[t.lead + t.in_ndim:])))


def _np_keep(scores: np.ndarray, k: int) -> np.ndarray:
    """False at the k smallest scores (ties: the earlier), of a flat array."""
    keep = np.ones(scores.size, bool)
    keep[np.argsort(scores, kind="stable")[:k]] = False
    return keep


def _np_masks(params, targets, pattern: str, scope: str, s: float) -> list[np.ndarray]:
    """A transcription of magnitude pruning: per matrix, over all of them, or N:M."""
    mats = [_np_matrices(np.abs(np.asarray(subtree(params, t.path))), t) for t in targets]
    if pattern == "2:4":
        out = []
        for m in mats:
            groups = m.reshape(m.shape[0], -1, 4, m.shape[2])  # 4 consecutive inputs
            largest = np.argsort(-groups, axis=2, kind="stable")[:, :, :2]
            keep = np.zeros(groups.shape, bool)
            np.put_along_axis(keep, largest, True, axis=2)
            out.append(keep.reshape(m.shape))
    elif scope == "layer":
        out = [np.stack([_np_keep(x.ravel(), int(np.floor(s * x.size))).reshape(x.shape)
                         for x in m]) for m in mats]
    else:
        flat = np.concatenate([m.ravel() for m in mats])
        keep = _np_keep(flat, int(np.floor(np.float32(s) * flat.size)))
        out, start = [], 0
        for m in mats:
            out.append(keep[start:start + m.size].reshape(m.shape))
            start += m.size
    return [o.reshape(np.shape(subtree(params, t.path))) for o, t in zip(out, targets)]


@pytest.mark.parametrize("pattern, scope, s", [
    ("unstructured", "layer", 0.37), ("unstructured", "global", 0.6), ("2:4", "layer", 0.5)])
def test_masks_equal_a_numpy_transcription(moe_model, pattern, scope, s):
    model, params = moe_model
    targets = prune_targets(model, include_head=True)
    names = {t.name for t in targets}
    assert {"lm_head.kernel", "blocks.layer_0.mlp.up.kernel", "blocks.layer_1.mlp.up"} \
        <= names  # the head, a dense MLP, expert weights
    assert not any("embed" in n or "norm" in n or "router" in n for n in names)
    cfg = Prune(sparsity=s, pattern=pattern, scope=scope)
    masks = magnitude_masks(params, targets, cfg)
    for t, want in zip(targets, _np_masks(params, targets, pattern, scope, s)):
        np.testing.assert_array_equal(np.asarray(subtree(masks, t.path)), want, t.name)
    pruned = apply_masks(params, masks)
    q = t = targets[0]
    kept = np.asarray(subtree(masks, q.path))
    np.testing.assert_array_equal(np.asarray(subtree(pruned, t.path)),
                                  np.where(kept, np.asarray(subtree(params, t.path)), 0))
    assert "lm_head" not in {t.path[0] for t in prune_targets(model)}  # by default


def test_pruned_weights_stay_pruned_when_masks_are_computed_again(moe_model):
    model, params = moe_model
    targets = prune_targets(model)
    first = magnitude_masks(params, targets, Prune(sparsity=0.3))
    grown = jax.tree.map(lambda w: w * 0 + 1.0, params)  # every magnitude equal now
    second = magnitude_masks(grown, targets, Prune(sparsity=0.5), masks=first)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        a, b = np.asarray(a), np.asarray(b)
        assert not np.any(b & ~a)  # nothing regrows
        assert abs((~b).mean() - 0.5) < 0.01


def test_cubic_schedule_equals_the_formula_and_prunes_on_its_steps():
    cfg = Prune(sparsity=0.8, initial_sparsity=0.1, schedule="cubic", start_step=10,
                end_step=45, every=10)
    t = np.arange(60)
    frac = np.clip((t - 10) / 35, 0.0, 1.0)
    want = 0.8 + (0.1 - 0.8) * (1 - frac) ** 3
    np.testing.assert_allclose(np.asarray(cubic_sparsity(t, cfg)), want, rtol=1e-6)
    assert list(np.flatnonzero(np.asarray(prune_due(t, cfg)))) == [10, 20, 30, 40, 45]
    oneshot = Prune(sparsity=0.5, start_step=3)
    assert list(np.flatnonzero(np.asarray(prune_due(t, oneshot)))) == [3]


def test_sparse_bytes_formulas():
    # 2:4 of a [8, 3] matrix: 6 groups x (2 float32 values + 2 2-bit indices) = 51 bytes.
    assert matrix_bytes(8, 3, 12, (2, 4)) == 6 * 2 * 4 + 3
    # Unstructured: a bitmask of 24 bits and the 10 kept values.
    assert matrix_bytes(8, 3, 10, None) == 3 + 40


def test_pruning_off_keeps_no_masks(tiny_config, tmp_path):
    exp = Experiment.build(tiny_config, tmp_path, jax.devices()[:1])
    assert exp.pruning is None
    assert not hasattr(exp.abstract_state, "masks") and not hasattr(exp.state_logical, "masks")


def _pruned(c, **prune):
    c = c.copy_and_resolve_references()
    for key, value in prune.items():
        keys.set_value(c, f"prune.{key}", value)
    return c


def _train(exp, state, steps, start=0):
    source, losses = train_source(exp), []
    for step in range(start, start + steps):
        state, m = exp.train_step(state, exp.to_global(source[step]))
        losses.append(float(m["loss"]))
    return state, np.array(losses)


def _assert_zeros_held(state):
    params, masks = jax.device_get((state.params, state.masks))
    for path, mask in jax.tree_util.tree_flatten_with_path(masks)[0]:
        w = subtree(params, tuple(k.key for k in path))
        assert not np.any(w[~mask]), jax.tree_util.keystr(path)


@pytest.mark.slow
def test_zeros_stay_zero_through_updates_and_a_resume(tiny_config, tmp_path):
    c = _pruned(tiny_config, sparsity=0.5, schedule="cubic", start_step=1, end_step=4,
                every=2)
    c.steps = 6
    exp = Experiment.build(c, tmp_path, jax.devices()[:1])
    state, losses = _train(exp, exp.init_state(), 4)  # pruned before updates 2 and 4
    q = np.asarray(state.masks["blocks"]["attn"]["q"]["kernel"])
    n = q[0].size  # one layer's matrix
    assert (~q).mean() == np.floor(float(cubic_sparsity(3, exp.config.prune)) * n) / n
    _assert_zeros_held(state)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(4, exp.to_checkpoint(state))
        ckpt.wait()
        resumed = exp.from_checkpoint(ckpt.restore(4, exp.checkpoint_abstract))
    for a, b in zip(jax.tree.leaves(state.masks), jax.tree.leaves(resumed.masks)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    straight, more = _train(exp, state, 2, start=4)  # pruned before update 5: the end
    again, more_resumed = _train(exp, resumed, 2, start=4)
    np.testing.assert_array_equal(more, more_resumed)
    for s in (straight, again):
        _assert_zeros_held(s)
        q = np.asarray(s.masks["blocks"]["attn"]["q"]["kernel"])
        assert (~q).mean() == 0.5
    assert_trees_close(straight.params, again.params, rtol=0, atol=0)


@pytest.mark.slow
def test_data2_fsdp2_tensor2_equals_one_device(tiny_config, tmp_path):
    def run(data, fsdp, tensor, devices):
        c = _pruned(tiny_config, sparsity=0.5, scope="global", schedule="cubic",
                    start_step=0, end_step=2, every=1)
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
        exp = Experiment.build(c, tmp_path / str(len(devices)), devices)
        state, losses = _train(exp, exp.init_state(), 4)
        _assert_zeros_held(state)
        return losses, jax.device_get((state.params, state.masks)), state

    l1, (p1, m1), _ = run(1, 1, 1, jax.devices()[:1])
    l8, (p8, m8), state = run(2, 2, 2, jax.devices())
    np.testing.assert_allclose(l8, l1, rtol=1e-4)
    assert_trees_close(p8, p1, rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m8)):
        np.testing.assert_array_equal(a, b)
    mask = state.masks["blocks"]["mlp"]["up"]["kernel"]  # [layers, embed, mlp]
    kernel = state.params["blocks"]["mlp"]["up"]["kernel"]
    assert mask.sharding.spec == kernel.sharding.spec
    assert tuple(mask.sharding.spec)[1:] == ("fsdp", "tensor")


@pytest.mark.slow
def test_eval_prunes_a_trained_run_and_reports_each_matrix(tiny_config, tmp_path):
    from jaxlm.training.trainer import train
    c = tiny_config.copy_and_resolve_references()
    c.steps, c.checkpoint_every, c.eval_batch_size, c.eval_max_batches = 30, 30, 32, 2
    train(c, tmp_path, jax.devices()[:1])
    losses = {}
    for flags in (["--prune=0"], ["--prune=0.5"], ["--prune=0.5", "--prune_pattern=2:4"],
                  ["--prune=0.9", "--prune_scope=global"]):
        out = call_cli(["eval.py", f"--workdir={tmp_path}", *flags])
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout.strip().splitlines()[-1])
        losses[" ".join(flags)] = result["eval_loss"]
        rows = result["matrices"]
        assert len(rows) == 2 * 6  # q, k, v, o, up, down of 2 layers
        assert "blocks.attn.q.kernel[1]" in out.stderr  # the table
        if "--prune=0.5" in flags:
            assert {r["sparsity"] for r in rows} == {0.5}
            assert result["sparsity"] == 0.5
            assert result["weight_bytes"] < result["float_weight_bytes"]
    assert losses["--prune=0"] < losses["--prune=0.5"] < losses["--prune=0.9 --prune_scope=global"]
    assert (tmp_path / "eval" / "step_30_prune_0.5_2of4.json").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"prune.sparsity": 1.0}, "prune.sparsity: must be in [0, 1), got 1.0"),
    ({"prune.sparsity": -0.1}, "prune.sparsity: must be in [0, 1), got -0.1"),
    ({"prune.sparsity": 0.5, "prune.pattern": "blocks"},
     "prune.pattern: 'blocks' is not unstructured or N:M (e.g. 2:4)"),
    ({"prune.sparsity": 0.5, "prune.pattern": "4:4"},
     "prune.pattern: 4:4: N:M keeps N of every M inputs and needs 0 < N < M"),
    ({"prune.sparsity": 0.4, "prune.pattern": "2:4"},
     "prune.sparsity: 2:4 sets 0.5 of each matrix to zero: set the sparsity to 0.5"),
    ({"prune.sparsity": 0.666667, "prune.pattern": "1:3"},
     "prune.pattern: 1:3 groups 3 inputs, which does not divide the 32 input features of "
     "attn.q/k/v, mlp.gate/up"),
    ({"prune.sparsity": 0.5, "prune.schedule": "cubic", "prune.start_step": 2,
      "prune.end_step": 2}, "prune.end_step: 2 must be after start_step 2"),
    ({"prune.sparsity": 0.5, "prune.schedule": "cubic", "prune.end_step": 4},
     "prune.end_step: 4 is not before steps 4"),
    ({"prune.sparsity": 0.5, "prune.start_step": 4}, "prune.start_step: 4 is not before"),
    ({"prune.sparsity": 0.5, "prune.pattern": "2:4", "prune.schedule": "cubic"},
     "prune.schedule: 2:4 has the one sparsity 1 - N/M"),
    ({"prune.sparsity": 0.5, "lora.rank": 2}, "prune.sparsity: prunes the trained weights"),
])
def test_bad_configs_are_one_line_errors(tiny_config, overrides, message):
    c = tiny_config.copy_and_resolve_references()
    for key, value in overrides.items():
        keys.set_value(c, key, value)
    with pytest.raises(ConfigError) as err:
        Config.from_dict(c)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("flags, message", [
    ({"prune": 1.5}, "prune: must be in [0, 1), got 1.5"),
    ({"prune": 0.5, "prune_pattern": "3:2"}, "prune_pattern: 3:2: N:M keeps N of every M"),
    ({"prune": 0.5, "prune_scope": "row"}, "prune_scope: unknown value 'row'; choose one of"),
    ({"prune": 0.4, "prune_pattern": "2:4"}, "prune: 2:4 sets 0.5 of each matrix to zero"),
    ({"prune": 0.5, "prune_pattern": "2:4", "prune_scope": "global"},
     "prune_scope: 2:4 keeps N of every M inputs inside each matrix"),
    ({"prune": 0.5, "quantize": "int4"}, "prune: evaluates one checkpoint pruned"),
])
def test_bad_eval_flags_are_one_line_errors(flags, message):
    with pytest.raises(ConfigError) as err:
        EvalRequest.parse({"workdir": "runs/x", **flags})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_eval_refuses_a_pattern_the_run_does_not_divide(tiny_config, tmp_path):
    from tests.helpers import step0_run
    run = step0_run(tiny_config, tmp_path)
    out = call_cli(["eval.py", f"--workdir={run}", "--prune=0.666667", "--prune_pattern=1:3"])
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith(
        "error: prune_pattern: 1:3 groups 3 inputs, which does not divide the 32")
