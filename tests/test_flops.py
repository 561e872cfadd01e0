"""The model FLOP count, the peak table and MFU in the training records."""

import json

import jax
import jax.numpy as jnp
import pytest

from jaxlm.configs import keys
from jaxlm.configs.sections import Config, Model
from jaxlm.models.config import ModelConfig
from jaxlm.training.experiment import Experiment
from jaxlm.training.flops import (mean_keys_per_query, model_flops_per_token, peak_flops_per_device,
                                  throughput_fields)
from jaxlm.training.hooks import Metrics, WriteRecords
from jaxlm.training.loop import TrainLoop
from jaxlm.training.metrics import read_metrics
from jaxlm.training.planner import plan
from jaxlm.training.trainer import train
from tests.helpers import call_cli


def _model(**kw):
    return ModelConfig.from_section(Model(**kw), 65)


def test_dense_flops_are_six_n_plus_causal_attention():
    """The default model: 4 layers, d 128, 4 heads of 64... counted by hand."""
    cfg = _model()
    d, layers, seq = 128, 4, 64
    n_matmul = layers * (4 * d * d + 2 * d * 512) + d * 128  # q k v o, gelu MLP, head
    attention = layers * 4 * d * (seq + 1) / 2  # heads x head_dim = d; mean keys (L+1)/2
    assert model_flops_per_token(cfg, seq) == 6 * n_matmul + 3 * attention


def test_moe_counts_the_active_experts_and_the_router():
    dense = model_flops_per_token(_model(), 64)
    moe = model_flops_per_token(_model(moe={"num_experts": 8, "top_k": 2, "d_ff": 256}), 64)
    assert moe - dense == 6 * 4 * 128 * 8  # same active MLP; plus the router's d x E


def test_sliding_window_counts_the_visible_keys():
    assert mean_keys_per_query(8) == 4.5
    assert mean_keys_per_query(8, window=3) == sum(min(i + 1, 3) for i in range(8)) / 8
    assert mean_keys_per_query(8, window=100) == 4.5


def test_peak_table_and_configured_peak():
    assert peak_flops_per_device(0, "NVIDIA H100 80GB HBM3") == 989.5e12
    assert peak_flops_per_device(0, "NVIDIA H100 PCIe") == 756.5e12
    assert peak_flops_per_device(0, "NVIDIA H200") == 989.5e12
    assert peak_flops_per_device(0, "NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_per_device(0, "NVIDIA B200") == 2250e12
    assert peak_flops_per_device(0, "TPU v5 lite") == 197e12
    assert peak_flops_per_device(0, "TPU v5") == 459e12
    assert peak_flops_per_device(0, "TPU v6 lite") == 918e12
    assert peak_flops_per_device(0, "TPU v4") == 275e12
    assert peak_flops_per_device(0, "cpu") is None
    assert peak_flops_per_device() is None  # these CPU devices
    assert peak_flops_per_device(5e11) == 5e11


class _Writer:
    def __init__(self):
        self.records = []

    def write(self, step, **values):
        self.records.append((step, values))


def test_records_carry_model_flops_per_device_and_mfu():
    writer = _Writer()
    metrics = Metrics(log_every=1, tokens_per_step=768, start_time=0.0,
                      flops_per_token=3.0e6, num_devices=4, peak_flops=2.0e9)
    TrainLoop(lambda s, b: (s + 1, {"loss": jnp.asarray(1.0), "learning_rate": jnp.asarray(0.0)}),
              lambda: None, 4, [metrics, WriteRecords(writer)]).run(0, 0)
    timed = [values for _, values in writer.records if "tokens_per_sec" in values]
    assert len(timed) == 3  # every record after the first (compiling) step
    for values in timed:
        per_device = values["tokens_per_sec"] * 3.0e6 / 4
        assert values["flops_per_sec_per_device"] == pytest.approx(per_device, rel=1e-12)
        assert values["mfu"] == pytest.approx(per_device / 2.0e9, rel=1e-12)
    assert throughput_fields(100.0, 10.0, 2, None) == {"flops_per_sec_per_device": 500.0}


def _flops_in_records(workdir, num_devices: int) -> float:
    """Model FLOPs per token behind the MFU of a run's records."""
    record = next(r for r in read_metrics(workdir)[0] if "tokens_per_sec" in r)
    return record["flops_per_sec_per_device"] * num_devices / record["tokens_per_sec"]


def _benchmark(overrides: list[str]) -> dict:
    """The JSON line of benchmarks/train_throughput.py (one timed step)."""
    res = call_cli(["benchmarks/train_throughput.py", "--config=configs/shakespeare_char.py:tiny",
                    "--steps=1", "--warmup=1", "--repeats=1", "--synthetic", *overrides])
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    {}, {"model.mlp": "swiglu", "model.sliding_window": 8, "model.moe.num_experts": 4,
         "model.moe.every": 2}])
def test_mfu_the_planner_and_the_benchmark_count_the_same_flops(overrides, tiny_config,
                                                                 tmp_path):
    """The FLOPs per token behind the records' MFU, the dry-run plan and the throughput
    benchmark are the count of training/flops.py for the run's model."""
    tiny_config.steps, tiny_config.seq_len = 2, 32
    for key, value in overrides.items():
        keys.set_value(tiny_config, key, value)
    config = Config.from_dict(tiny_config)
    train(config, tmp_path / "run", jax.devices()[:1])
    exp = Experiment.build(config, tmp_path / "run", jax.devices()[:1])
    expected = model_flops_per_token(exp.model_cfg, 32)
    assert _flops_in_records(tmp_path / "run", 1) == pytest.approx(expected, rel=1e-6)
    assert plan(config, str(tmp_path / "run"), jax.devices()[:1])["model_flops_per_token"] \
        == expected
    flags = [f"--config.{k}={v}" for k, v in {"steps": 2, "seq_len": 32, **overrides}.items()]
    line = _benchmark(flags)
    tokens = line["batch_size"] * line["seq_len"]
    assert line["model_gflops_per_step"] == round(expected * tokens / 1e9, 3)
