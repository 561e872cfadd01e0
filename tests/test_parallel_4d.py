"""Tensor and pipeline parallelism combined with data and FSDP, multi-process runs, planner."""

import json
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxlm.configs.errors import ConfigError
from jaxlm.parallel.pipeline import bubble_fraction, stage_major_permutation
from tests.helpers import (ROOT, assert_trees_close, params_fast_only, run_cli, run_steps,
                           train_source)
from jaxlm.training import trainer
from jaxlm.evaluation.restore import restore_run
from jaxlm.training.evaluate import evaluate
from jaxlm.training.experiment import Experiment

LAYOUTS = {
    "tensor8": dict(tensor=8),
    "data2_tensor4": dict(data=2, tensor=4),
    "pipeline2_data4": dict(pipeline=2, data=4),
    "pipeline4_fsdp2_circular": dict(pipeline=4, fsdp=2, pipeline_repeats=2,
                                     pipeline_microbatches=4),
    "pipeline2_tensor2_fsdp2": dict(pipeline=2, tensor=2, fsdp=2),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
}


def model_config(c):
    """8 layers, 8 heads, 8 KV heads, d_ff 128: every layout above divides it."""
    c.batch_size, c.eval_batch_size, c.steps = 16, 16, 3
    c.model.num_layers, c.model.d_model, c.model.d_ff = 8, 64, 128
    c.model.num_heads = c.model.num_kv_heads = 8
    return c


def apply_layout(c, layout):
    c.mesh.data = 1
    for key, value in layout.items():
        if key.startswith("pipeline_"):
            c[key] = value
        else:
            c.mesh[key] = value
    return c


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from jaxlm.configs.shakespeare_char import get_config
    c = apply_layout(model_config(get_config("tiny")), {})
    losses, params, _, _ = run_steps(c, tmp_path_factory.mktemp("ref"), jax.devices()[:1])
    return losses, params


@pytest.mark.parametrize("layout", params_fast_only(
    sorted(LAYOUTS), fast={"data2_fsdp2_tensor2", "pipeline2_data4"}))
def test_layout_matches_single_device(layout, reference, tiny_config, tmp_path):
    c = apply_layout(model_config(tiny_config), LAYOUTS[layout])
    losses, params, exp, _ = run_steps(c, tmp_path, jax.devices())
    assert exp.mesh.devices.size == 8
    ref_losses, ref_params = reference
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_trees_close(params, ref_params, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_pipeline_with_grad_accumulation_and_no_remat(reference, tiny_config, tmp_path):
    c = apply_layout(model_config(tiny_config), dict(pipeline=2, data=2, fsdp=2))
    c.grad_accum_steps, c.pipeline_microbatches, c.model.remat = 2, 2, "none"
    losses, params, _, _ = run_steps(c, tmp_path, jax.devices())
    np.testing.assert_allclose(losses, reference[0], rtol=1e-5)
    assert_trees_close(params, reference[1], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_tensor8_puts_one_eighth_of_each_sharded_weight_on_each_device(tiny_config, tmp_path):
    c = apply_layout(model_config(tiny_config), dict(tensor=8))
    exp = Experiment.build(c, tmp_path, jax.devices())
    state = exp.init_state()
    p = state.params
    expected = {  # full shape -> per-device shard shape
        ("embed", "embedding"): ((128, 64), (16, 64)),  # vocab sharded
        ("blocks", "attn", "q", "kernel"): ((8, 64, 8, 8), (8, 64, 1, 8)),  # heads
        ("blocks", "attn", "k", "kernel"): ((8, 64, 8, 8), (8, 64, 1, 8)),  # kv heads
        ("blocks", "attn", "o", "kernel"): ((8, 8, 8, 64), (8, 1, 8, 64)),  # row-parallel
        ("blocks", "mlp", "up", "kernel"): ((8, 64, 128), (8, 64, 16)),  # column-parallel
        ("blocks", "mlp", "down", "kernel"): ((8, 128, 64), (8, 16, 64)),  # row-parallel
    }
    for path, (full, shard) in expected.items():
        leaf = p
        for k in path:
            leaf = leaf[k]
        assert leaf.shape == full
        assert {s.data.shape for s in leaf.addressable_shards} == {shard}, path


def test_vocab_sharded_logits_are_never_gathered(tiny_config, tmp_path):
    """With tensor=8 the compiled step holds no full [batch, seq, vocab] array."""
    c = apply_layout(model_config(tiny_config), dict(tensor=8))
    exp = Experiment.build(c, tmp_path, jax.devices())
    batch = exp.to_global(train_source(exp)[0])
    hlo = exp.train_step.lower(exp.init_state(), batch).compile().as_text()
    assert "f32[16,32,16]" in hlo  # the per-device logit shard
    assert "f32[16,32,128]" not in hlo


@pytest.mark.slow
def test_fsdp_state_bytes_shrink_with_the_fsdp_degree(tiny_config, tmp_path):
    c = model_config(tiny_config)
    c.model.num_layers, c.model.d_model, c.model.d_ff = 2, 128, 512
    sizes = {}
    for fsdp in (1, 2, 4, 8):
        c.mesh.data, c.mesh.fsdp = 1, fsdp
        exp = Experiment.build(c, tmp_path, jax.devices()[:fsdp])
        batch = {k: jax.ShapeDtypeStruct((16, 32), np.int32, sharding=exp.batch_sharding)
                 for k in ("inputs", "targets")}
        mem = exp.train_step.lower(exp.abstract_state, batch).compile().memory_analysis()
        sizes[fsdp] = mem.argument_size_in_bytes
    for fsdp in (2, 4, 8):
        ideal = sizes[1] / fsdp
        assert abs(sizes[fsdp] - ideal) / ideal < 0.15, (fsdp, sizes)


@pytest.mark.parametrize("layout", [dict(pipeline=2, data=4),
                                    dict(pipeline=2, fsdp=2, data=2, pipeline_repeats=2)])
@pytest.mark.slow
def test_pipelined_checkpoint_restores_on_data8(layout, tiny_config, tmp_path):
    c = apply_layout(model_config(tiny_config), layout)
    c.steps, c.eval_every, c.checkpoint_every = 3, 0, 3
    summary = trainer.train(c, tmp_path, jax.devices())
    exp, state, step = restore_run(tmp_path, devices=jax.devices())  # default mesh: data=8
    assert step == 3 and dict(exp.mesh.shape)["data"] == 8
    assert exp.model_cfg.pipeline_stages == 1
    assert evaluate(exp, state.params)["eval_loss"] == pytest.approx(summary["eval_loss"],
                                                                    rel=1e-5)


def test_circular_storage_order_round_trips():
    perm = stage_major_permutation(8, stages=2, repeats=2)
    # Stage 0 holds chunks 0 and 2 (layers 0,1 and 4,5); stage 1 chunks 1 and 3.
    np.testing.assert_array_equal(perm, [0, 1, 4, 5, 2, 3, 6, 7])
    np.testing.assert_array_equal(stage_major_permutation(8, 4, 1), np.arange(8))
    assert bubble_fraction(4, 8, 1) == pytest.approx(3 / 11)
    assert bubble_fraction(4, 8, 2) == pytest.approx(3 / 19)


@pytest.mark.parametrize("overrides, message", [
    (dict(pipeline=4, pipeline_repeats=3), "model.num_layers: 8 scanned layers are not divisible by "
                                           "pipeline stages x repeats = 4 x 3"),
    (dict(pipeline=2, pipeline_microbatches=3), "pipeline_microbatches: 3 micro-batches do "
                                                "not split batch_size 16"),
    (dict(pipeline=4, pipeline_repeats=2, pipeline_microbatches=2),
     "pipeline_microbatches: the circular schedule needs at least as many micro-batches"),
    (dict(tensor=8, num_heads=4), "model.num_heads: 4 is not divisible by the 8 shards"),
    (dict(tensor=8, d_ff=100), "model.d_ff: 100 is not divisible by the 8 shards of logical "
                               "axis 'mlp'"),
    (dict(pipeline=2, scan_layers=False), "model.scan_layers: pipeline parallelism needs "
                                          "scanned layers"),
])
def test_bad_parallel_configs_are_rejected(overrides, message, tiny_config, tmp_path):
    c = model_config(tiny_config)
    model_keys = {"num_heads", "d_ff", "scan_layers"}
    for key in model_keys & set(overrides):
        c.model[key] = overrides.pop(key)
    if c.model.num_heads == 4:
        c.model.num_kv_heads = 4
    apply_layout(c, overrides)
    c.mesh.data = -1
    with pytest.raises(ConfigError) as err:
        Experiment.build(c, tmp_path, jax.devices())
    assert message in str(err.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    args = ["train.py", "--config=configs/shakespeare_char.py:tiny", "--config.steps=4",
            "--config.batch_size=16", "--config.log_every=1", "--config.eval_every=0",
            "--config.checkpoint_every=4", "--config.mesh.data=8"]
    single = run_cli(args + ["--cpu_devices=8", f"--workdir={tmp_path / 'one'}"])
    assert single.returncode == 0, single.stderr

    port = _free_port()
    env = dict(**__import__("os").environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen(
        [sys.executable, *args, "--cpu_devices=4", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={i}", f"--workdir={tmp_path / 'two'}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err

    def losses(wd):
        recs = [json.loads(ln) for ln in (wd / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in recs if "loss" in r]

    assert len(losses(tmp_path / "two")) == 4
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
    # Only process 0 shows a progress bar; both wrote their checkpoint shards.
    assert "step/s" in outs[0][1] and "step/s" not in outs[1][1]
    assert (tmp_path / "two" / "checkpoints" / "4" / "state").is_dir()


@pytest.mark.slow
def test_dry_run_plans_a_64_device_mesh(tmp_path):
    out = tmp_path / "plan.json"
    res = run_cli(["train.py", "--config=configs/shakespeare_char.py:tiny", "--cpu_devices=64",
                   "--config.batch_size=64", "--config.eval_batch_size=64",
                   "--config.mesh.data=4", "--config.mesh.fsdp=4", "--config.mesh.pipeline=2",
                   "--config.mesh.tensor=2", "--config.model.num_heads=4",
                   "--config.model.num_kv_heads=2", "--config.model.num_layers=4",
                   "--dry_run", f"--dry_run_json={out}", f"--workdir={tmp_path}"])
    assert res.returncode == 0, res.stderr
    assert "collective-permute" in res.stdout and "Pipeline bubble: 33.3%" in res.stdout
    plan = json.loads(out.read_text())
    assert plan["devices"] == 64
    assert plan["mesh"] == {"pipeline": 2, "data": 4, "fsdp": 4, "tensor": 2}
    coll = plan["collectives_per_device"]
    assert coll["collective-permute"]["count"] > 0  # pipeline stage shifts
    assert coll["all-gather"]["count"] > 0  # FSDP weight gathers
    assert coll["all-reduce"]["count"] + coll["reduce-scatter"]["count"] > 0
    assert plan["per_device_bytes"]["temporaries"] > 0
    assert not (tmp_path / "checkpoints").exists()  # nothing trained
