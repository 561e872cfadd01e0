"""Sharded training on 8 fake CPU devices equals training on one device."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Mesh
from jaxlm.parallel.mesh import make_mesh
from jaxlm.training.layout import resolve_mesh_shape
from jaxlm.parallel.sharding import logical_to_spec
from tests.helpers import assert_trees_close, params_fast_only, run_steps

LAYOUTS = {
    "data8": dict(data=8),
    "fsdp8": dict(data=1, fsdp=8),
    "data2_fsdp4": dict(data=2, fsdp=4),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from jaxlm.configs.shakespeare_char import get_config
    c = _config(get_config("tiny"))
    c.mesh.data = 1
    losses, params, _, _ = run_steps(c, tmp_path_factory.mktemp("ref"), jax.devices()[:1])
    return losses, params


def _config(c):
    c.batch_size, c.steps, c.grad_accum_steps = 16, 3, 1
    c.eval_batch_size = 16
    return c


@pytest.mark.parametrize("layout", params_fast_only(sorted(LAYOUTS), fast={"data2_fsdp4"}))
def test_layout_matches_single_device(layout, reference, tiny_config, tmp_path):
    c = _config(tiny_config)
    for axis, size in LAYOUTS[layout].items():
        c.mesh[axis] = size
    losses, params, exp, state = run_steps(c, tmp_path, jax.devices())
    assert exp.mesh.devices.size == 8
    ref_losses, ref_params = reference
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_trees_close(params, ref_params, rtol=1e-4, atol=1e-6)


def test_fsdp_shards_params_and_optimizer_state(tiny_config, tmp_path):
    c = _config(tiny_config)
    c.mesh.data, c.mesh.fsdp = 2, 4
    _, _, exp, state = run_steps(c, tmp_path, jax.devices(), n=1)
    emb = state.params["embed"]["embedding"]  # [vocab, embed]: embed over fsdp
    assert emb.sharding.spec == P("tensor", "fsdp")
    assert emb.addressable_shards[0].data.shape == (128, 32 // 4)
    up = state.params["blocks"]["mlp"]["up"]["kernel"]  # [layers, embed, mlp]
    assert up.sharding.spec == P("pipeline", "fsdp", "tensor")  # pipeline has size 1
    assert up.addressable_shards[0].data.shape == (2, 8, 64)
    # AdamW moments follow their parameters; counts are replicated.
    adam = state.opt_state[1][0]
    mu = adam.mu["blocks"]["mlp"]["up"]["kernel"]
    assert mu.sharding.spec == up.sharding.spec
    assert mu.addressable_shards[0].data.shape == (2, 8, 64)
    assert adam.count.sharding.is_fully_replicated
    # The norm scales are replicated.
    assert state.params["final_norm"]["scale"].sharding.is_fully_replicated


def test_grad_accumulation_equals_one_big_batch(tiny_config, tmp_path):
    c = _config(tiny_config)
    c.mesh.data = 1
    dev = jax.devices()[:1]
    ref_losses, ref_params, _, _ = run_steps(c, tmp_path / "a", dev)
    c.grad_accum_steps = 4
    losses, params, _, _ = run_steps(c, tmp_path / "b", dev)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_trees_close(params, ref_params, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_grad_accumulation_with_data_parallel(tiny_config, tmp_path):
    c = _config(tiny_config)
    c.mesh.data = 1
    ref_losses, ref_params, _, _ = run_steps(c, tmp_path / "a", jax.devices()[:1])
    c.mesh.data, c.grad_accum_steps = 4, 2
    losses, params, _, _ = run_steps(c, tmp_path / "b", jax.devices()[:4])
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_trees_close(params, ref_params, rtol=1e-4, atol=1e-6)


def test_mesh_minus_one_takes_remaining_devices():
    assert resolve_mesh_shape(Mesh(data=-1, fsdp=2), 8)["data"] == 4
    mesh = make_mesh(resolve_mesh_shape(Mesh(data=2, fsdp=-1), 8), jax.devices())
    assert dict(mesh.shape) == {"pipeline": 1, "data": 2, "fsdp": 4, "expert": 1,
                                "context": 1, "tensor": 1}


@pytest.mark.parametrize("mesh_cfg, msg", [
    ({"data": 3}, "mesh: mesh product 3 (data=3) != device count 8"),
    ({"data": -1, "fsdp": 3}, "mesh.data: -1 cannot fill the mesh: 8 devices are not divisible "
                              "by the other axes' product 3"),
])
def test_a_mesh_the_devices_do_not_fill_is_rejected(mesh_cfg, msg):
    with pytest.raises(ConfigError) as err:
        resolve_mesh_shape(Mesh.parse(mesh_cfg), 8)
    assert str(err.value) == msg


def test_logical_rules_skip_mesh_axes_already_used():
    rules = (("a", ("data", "fsdp")), ("b", "fsdp"), ("c", None))
    assert logical_to_spec(("a", "b", "c"), rules) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("b", "a"), rules) == P("fsdp", "data")
    with pytest.raises(ValueError, match="no rule for logical axis 'zzz'"):
        logical_to_spec(("zzz",), rules)
