"""Bad input: one clear error naming the key or file, before anything compiles."""

import jax
import pytest

from jaxlm.configs import keys
from jaxlm.configs.errors import ConfigError
from tests.helpers import no_compilation, run_cli
from jaxlm.training.experiment import Experiment

CASES = {
    "mesh_product": ({"mesh.data": 3}, "mesh: mesh product 3"),
    "kv_heads": ({"model.num_kv_heads": 3}, "model.num_kv_heads: num_heads 4 is not divisible"),
    "batch_vs_dp": ({"batch_size": 12, "mesh.data": 8}, "batch_size: batch_size is not divisible "
                                                        "by the data-parallel size 8"),
    "attention_impl": ({"model.attention_impl": "flash9"}, "model.attention_impl: unknown value"),
    "missing_file": ({"data.path": "/no/such/file.txt"}, "data.path: no such file or directory: "
                                                         "/no/such/file.txt"),
    "seq_len": ({"seq_len": 200_000}, "seq_len: seq_len 200000 is longer than the val split"),
    "accum": ({"grad_accum_steps": 3}, "grad_accum_steps: batch_size 8 is not divisible"),
    "negative_lr": ({"learning_rate": -1.0}, "learning_rate: must be >= 0"),
    "unknown_axis_rule": ({"sharding.rules": (("embed", "fsdp"),)}, "sharding.rules: no rule"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_raises_before_compiling(case, tiny_config, tmp_path):
    overrides, message = CASES[case]
    c = tiny_config
    c.batch_size = 8
    c.mesh.data = -1
    for key, value in overrides.items():
        keys.set_value(c, key, value)
    with no_compilation() as compiled, pytest.raises(ConfigError) as err:
        Experiment.build(c, tmp_path, jax.devices()[:8] if "mesh.data" in overrides
                         else jax.devices()[:1])
    assert message in str(err.value)
    assert compiled == []


def test_token_ids_beyond_model_vocab_are_rejected(tiny_config, tmp_path):
    tiny_config.model.vocab_size = 50
    with pytest.raises(ConfigError, match="model.vocab_size: 50 is smaller than the data's "
                                          "vocabulary 65"):
        Experiment.build(tiny_config, tmp_path, jax.devices()[:1])


def test_tensor_size_must_divide_sharded_dims(tiny_config, tmp_path):
    tiny_config.batch_size = 8
    tiny_config.mesh.data, tiny_config.mesh.tensor = 1, 8  # 4 heads over 8 devices
    with pytest.raises(ConfigError, match=r"model.num_heads: 4 is not divisible by the 8 "
                                          r"shards of logical axis 'heads'"):
        Experiment.build(tiny_config, tmp_path, jax.devices())


@pytest.mark.parametrize("flag, message", [
    ("--config.mesh.data=3", "error: mesh: mesh product 3 (data=3) != device count 8"),
    ("--config.model.num_kv_heads=3", "error: model.num_kv_heads: num_heads 4 is not divisible "
                                      "by num_kv_heads 3"),
    ("--config.data.path=/no/such/file.txt", "error: data.path: no such file or directory"),
    ("--config.batch_size=12", "error: batch_size: batch_size is not divisible by the "
                               "data-parallel size 8"),
])
@pytest.mark.slow
def test_cli_prints_one_line_and_exits_nonzero(flag, message, tmp_path):
    res = run_cli(["train.py", "--config=configs/shakespeare_char.py:tiny", "--cpu_devices=8",
                   f"--workdir={tmp_path}", flag])
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith(message), res.stderr
    assert sum(ln.startswith("error:") for ln in lines) == 1


def test_compilation_listener_sees_compiles():
    """Guards the check above: the listener must notice a real compilation."""
    with no_compilation() as compiled:
        jax.jit(lambda x: x * 3 + 1)(jax.numpy.ones(7)).block_until_ready()
    assert compiled
