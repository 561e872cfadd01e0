"""Optimizers and learning-rate schedules: training, schedule formulas, sharded states."""

import math

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Config, Updates
from tests.helpers import params_fast_only, run_steps
from jaxlm.training.experiment import Experiment
from jaxlm.training.optimizer import learning_rate_schedule, muon_dimension_numbers
from jaxlm.training.planner import _shard_bytes

# A peak learning rate per optimizer that trains the tiny model in a few steps.
LEARNING_RATES = {"adamw": 1e-2, "lion": 1e-3, "adafactor": 1e-2, "muon": 0.02, "sgd": 0.5}


def _config(tiny_config, name, steps=5):
    c = tiny_config
    c.steps, c.warmup_steps, c.mesh.data = steps, 1, 1
    c.optimizer.name = name
    c.optimizer.adafactor.min_dim_size_to_factor = 16  # factor the tiny model's matrices
    c.learning_rate = LEARNING_RATES[name]
    c.min_learning_rate = LEARNING_RATES[name] / 10
    return c


@pytest.mark.parametrize("name", params_fast_only(list(LEARNING_RATES), {"muon"}))
def test_each_optimizer_trains(name, tiny_config, tmp_path):
    losses, _, _, _ = run_steps(_config(tiny_config, name), tmp_path, jax.devices()[:1])
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("name", list(LEARNING_RATES))
def test_fsdp_shards_every_optimizer_state(name, tiny_config, tmp_path):
    """Every state leaf with the `embed` axis is split 8 ways on fsdp=8; the rest is whole;
    the total shrinks. Abstract states only: nothing is compiled."""
    c = _config(tiny_config, name)
    c.mesh.fsdp = 8
    exp = Experiment.build(c, tmp_path, jax.devices())
    leaves = jax.tree.leaves(exp.abstract_state.opt_state)
    specs = jax.tree.leaves(exp.state_logical.opt_state, is_leaf=lambda x: isinstance(x, P))
    assert len(leaves) == len(specs)
    sharded = 0
    for leaf, spec in zip(leaves, specs):
        shard = leaf.sharding.shard_shape(leaf.shape)
        if "embed" in spec:
            axis = tuple(spec).index("embed")
            assert shard[axis] * 8 == leaf.shape[axis], (spec, leaf.shape, shard)
            sharded += 1
        else:
            assert shard == leaf.shape
    assert sharded >= 4
    c.mesh.fsdp = 1
    whole = Experiment.build(c, tmp_path, jax.devices()[:1])
    assert _shard_bytes(exp.abstract_state.opt_state) < \
        _shard_bytes(whole.abstract_state.opt_state) / 4


def test_adafactor_factored_moments_drop_the_averaged_axis(tiny_config, tmp_path):
    exp = Experiment.build(_config(tiny_config, "adafactor"), tmp_path, jax.devices()[:1])
    state = exp.state_logical.opt_state[1][0]  # [clip, adafactor chain][1] -> factored rms
    # mlp.up is [layers 2, embed 32, mlp 64]: v_row drops mlp (largest), v_col drops embed.
    assert state.v_row["blocks"]["mlp"]["up"]["kernel"] == P("layers", "embed")
    assert state.v_col["blocks"]["mlp"]["up"]["kernel"] == P("layers", "mlp")
    assert state.v["blocks"]["mlp"]["up"]["kernel"] == P()  # a [1] placeholder
    # Norm scales [layers, norm] are not factored: v follows the parameter.
    assert state.v["blocks"]["attn_norm"]["scale"] == P("layers", "norm")


def test_muon_takes_the_hidden_matrices_with_their_input_axes():
    axes = {"embed": {"embedding": P("vocab", "embed")},
            "q": P("layers", "embed", "heads", "head_dim"),
            "o": P("layers", "heads", "head_dim", "embed"),
            "up": P("layers", "experts", "embed", "mlp"),
            "norm": P("layers", "norm"), "bias": P("heads", "head_dim")}
    dims = muon_dimension_numbers(axes)
    dn = optax.contrib.MuonDimensionNumbers
    assert dims["embed"]["embedding"] is None and dims["norm"] is None and dims["bias"] is None
    assert dims["q"] == dn((1,), (2, 3))
    assert dims["o"] == dn((1, 2), (3,))
    assert dims["up"] == dn((2,), (3,))


STEPS, WARMUP, PEAK, FLOOR = 100, 10, 1e-3, 1e-4


def _schedule(kind, **kw):
    return learning_rate_schedule(Updates(learning_rate=PEAK, min_learning_rate=FLOOR,
                                        warmup_steps=WARMUP, schedule=kind, **kw), STEPS)


@pytest.mark.parametrize("kind,step,want", [
    ("cosine", 55, FLOOR + (PEAK - FLOOR) * 0.5 * (1 + math.cos(math.pi * 45 / 90))),
    ("cosine", 100, FLOOR),
    ("linear", 55, PEAK + (FLOOR - PEAK) * 45 / 90),
    ("linear", 100, FLOOR),
    ("constant", 70, PEAK),
    ("rsqrt", 40, PEAK * math.sqrt(10 / 40)),
    ("rsqrt", 10_000, FLOOR),  # never below the floor
    ("wsd", 50, PEAK),  # stable until the last 20 steps
    ("wsd", 80, PEAK),
    ("wsd", 90, PEAK + (FLOOR - PEAK) * 10 / 20),
    ("wsd", 100, FLOOR),
])
def test_schedule_values_follow_their_formulas(kind, step, want):
    assert float(_schedule(kind)(step)) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("kind", ["cosine", "wsd", "linear", "constant", "rsqrt"])
def test_every_schedule_warms_up_linearly(kind):
    schedule = _schedule(kind)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(PEAK * 5 / 10, rel=1e-5)
    assert float(schedule(WARMUP)) == pytest.approx(PEAK, rel=1e-5)


def test_wsd_decay_fraction():
    schedule = _schedule("wsd", decay_fraction=0.5)
    assert float(schedule(50)) == pytest.approx(PEAK, rel=1e-5)
    assert float(schedule(75)) == pytest.approx((PEAK + FLOOR) / 2, rel=1e-5)


@pytest.mark.parametrize("key,value,message", [
    ("optimizer.name", "adam", "unknown value 'adam'"),
    ("schedule", "step", "unknown value 'step'"),
    ("decay_fraction", 0.0, "must be in (0, 1]"),
    ("optimizer.muon.ns_steps", 0, "must be a positive integer"),
])
def test_bad_optimizer_keys_name_the_key(key, value, message):
    with pytest.raises(ConfigError) as err:
        Config().replace(**{key: value})
    assert err.value.key == key and message in str(err.value)


def test_resuming_with_another_optimizer_is_refused(tmp_path):
    from jaxlm.training import rundir
    rundir.save_config(Config(), tmp_path)
    with pytest.raises(ConfigError) as err:
        rundir.check_resume(Config().replace(**{"optimizer.name": "lion"}), tmp_path, 100)
    assert err.value.key == "optimizer.name" and "use a new --workdir" in str(err.value)
    notices = rundir.check_resume(Config().replace(schedule="wsd"), tmp_path, 100)
    assert notices == ["Resuming with a changed schedule: schedule cosine -> wsd"]


def test_resuming_with_another_mesh_says_so(tmp_path):
    from jaxlm.training import rundir
    rundir.save_config(Config().replace(**{"mesh.fsdp": 4}), tmp_path)
    notices = rundir.check_resume(Config().replace(**{"mesh.context": 4}), tmp_path, 10)
    assert notices == [f"Resuming the run in {tmp_path} with changed settings: mesh.fsdp 4 -> "
                       f"1, mesh.context 1 -> 4"]
    assert rundir.check_resume(Config().replace(**{"mesh.fsdp": 4}), tmp_path, 10) == []


def test_the_shared_optimizer_keys_are_top_level_keys():
    """`--config.learning_rate`, and `learning_rate` in config.json: no section prefix."""
    saved = Config().replace(learning_rate=3e-4, schedule="wsd").to_dict()
    assert (saved["learning_rate"], saved["schedule"]) == (3e-4, "wsd")
    assert "updates" not in saved and "optim" not in saved
    assert Config.from_dict(saved).updates.learning_rate == 3e-4
