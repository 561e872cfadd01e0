"""Distillation from a teacher run with another architecture; QAT + distillation sharded."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.configs import keys
from jaxlm.configs.errors import ConfigError
from jaxlm.models.model import count_params
from tests.helpers import no_compilation, run_cli, run_steps, train_source
from jaxlm.training.experiment import Experiment


def _tiny(c):
    c.batch_size, c.steps, c.eval_batch_size, c.eval_max_batches = 16, 3, 16, 1
    c.eval_every, c.checkpoint_every, c.log_every = 0, 0, 1
    return c


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A finished teacher run: 3 layers, d_model 48, 4 heads / 2 KV heads of 12 (the
    student: 2 layers, d_model 32, heads of 8), SwiGLU, untied embeddings."""
    from jaxlm.configs.shakespeare_char import get_config
    from jaxlm.training.trainer import train
    c = _tiny(get_config("tiny"))
    c.steps = 2
    m = c.model
    m.num_layers, m.d_model, m.d_ff, m.mlp, m.tie_embeddings = 3, 48, 96, "swiglu", False
    workdir = tmp_path_factory.mktemp("teacher")
    train(c, workdir, jax.devices()[:1])
    return workdir


def _student(config, teacher_dir, **weights):
    c = _tiny(config)
    c.loss.distill.teacher_workdir = str(teacher_dir)
    for k, v in weights.items():
        c.loss.weights[k] = v
    return c


def test_teacher_with_another_architecture_trains_a_student(tiny_config, teacher_dir,
                                                            tmp_path):
    from jaxlm.training.trainer import train
    c = _student(tiny_config, teacher_dir, distill=1.0, feature=0.5)
    c.loss.feature.layer_map = "0:1,1:2"
    c.loss.distill.kind = "reverse_kl"
    c.loss.distill.temperature, c.loss.distill.temperature_schedule = 2.0, "cosine"
    c.loss.distill.weight_schedule, c.loss.distill.weight_final = "linear", 0.0
    summary = train(c, tmp_path, jax.devices()[:1])
    records = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert len(train_records) == 3
    for r in train_records:  # every term logged separately; the total is their weighted sum
        total = r["loss/ce"] + r["weight/distill"] * r["loss/distill"] + 0.5 * r["loss/feature"]
        np.testing.assert_allclose(r["loss"], total, rtol=1e-5)
        assert r["loss/distill"] > 0 and r["loss/feature"] > 0
    assert train_records[0]["weight/distill"] == 1.0
    assert train_records[0]["distill/temperature"] == 2.0
    assert np.isfinite(summary["eval_loss"])

    # The learned projection (student width 32 -> teacher 48, two layer pairs) is trained
    # and checkpointed with the student; the teacher is not in the student's state.
    from jaxlm.evaluation.restore import restore_run
    exp, state, _ = restore_run(tmp_path, devices=jax.devices()[:1])
    proj = state.params["objective"]["feature"]["projection"]
    assert proj.shape == (2, 32, 48)
    init = exp.init_state().params["objective"]["feature"]["projection"]
    assert float(jnp.max(jnp.abs(proj - init))) > 0
    student_only = {k: v for k, v in state.params.items() if k != "objective"}
    assert count_params(state.params) == count_params(student_only) + 2 * 32 * 48
    assert exp.teacher.model_cfg.model.num_layers == 3 and exp.teacher.model_cfg.model.d_model == 48


def test_no_gradient_reaches_the_teacher(tiny_config, teacher_dir, tmp_path):
    from jaxlm.training.steps import make_loss_fn
    c = _student(tiny_config, teacher_dir, distill=1.0, feature=1.0)
    exp = Experiment.build(c, tmp_path, jax.devices()[:1])
    params, t_params = exp.init_state().params, exp.teacher_params
    batch = exp.to_global(train_source(exp)[0])
    loss_fn = make_loss_fn(exp.graphdef, exp.model_cfg, exp.objective)

    def total(params, t_params):
        t_out = exp.teacher.forward(t_params, batch, return_hidden=True)
        return loss_fn(params, batch, None, t_out, 0)[0]

    g_student, g_teacher = jax.jit(jax.grad(total, argnums=(0, 1)))(params, t_params)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(g_teacher))
    assert float(jnp.max(jnp.abs(g_student["blocks"]["mlp"]["up"]["kernel"]))) > 0


@pytest.mark.slow
def test_distillation_with_qat_sharded_equals_one_device(tiny_config, teacher_dir, tmp_path):
    """data x fsdp x tensor = 2 x 2 x 2: same losses as one device."""
    c = _student(tiny_config, teacher_dir, distill=0.7, feature=0.3)
    c.quant.weight_bits, c.quant.activation_bits, c.quant.granularity = 4, 8, "16"
    c.mesh.data = 1
    ref, _, _, _ = run_steps(c, tmp_path / "one", jax.devices()[:1])
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    losses, _, exp, state = run_steps(c, tmp_path / "eight", jax.devices())
    assert dict(exp.mesh.shape) == {"pipeline": 1, "data": 2, "fsdp": 2, "expert": 1,
                                    "context": 1, "tensor": 2}
    up = exp.teacher_params["blocks"]["mlp"]["up"]["kernel"]  # the teacher is sharded too
    assert up.addressable_shards[0].data.shape == (3, 48 // 2, 96 // 2)
    np.testing.assert_allclose(losses, ref, rtol=2e-4)


def _set(c, key, value):
    if key == "loss.weights.focal":  # a key the config does not declare (a config file can add it)
        c.loss.weights[key.rpartition(".")[2]] = value
    else:
        keys.set_value(c, key, value)


@pytest.mark.parametrize("overrides, message", [
    ({"loss.weights.distill": 1.0, "loss.distill.teacher_workdir": "/no/such/run"},
     "loss.distill.teacher_workdir: no such directory: /no/such/run"),
    ({"loss.weights.distill": 1.0, "loss.distill.teacher_workdir": ""},
     "loss.distill.teacher_workdir: required by loss.weights.distill > 0"),
    ({"loss.weights.distill": 1.0, "data.tokenizer": "byte"},
     "loss.distill.teacher_workdir: vocabulary mismatch: the teacher has 65 tokens (char "
     "tokenizer), the student 256 (byte tokenizer)"),
    ({"quant.weight_bits": 2}, "quant.weight_bits: unknown value 2; choose one of [0, 3, 4, 8]"),
    ({"quant.activation_bits": 4}, "quant.activation_bits: unknown value 4; choose one of [0, 8]"),
    ({"quant.weight_bits": 4, "quant.granularity": "12"},
     "quant.granularity: group size 12 does not divide the 32 input features of embed"),
    ({"loss.weights.focal": 1.0}, "loss.weights.focal: unknown loss term; loss terms:"),
    ({"loss.weights.distill": -0.5}, "loss.weights.distill: must be >= 0, got -0.5"),
    ({"loss.weights.ce": 0.0}, "loss.weights: every term has weight 0"),
    ({"loss.weights.distill": 1.0, "loss.distill.kind": "js"},
     "loss.distill.kind: unknown value 'js'"),
    ({"loss.weights.feature": 1.0, "loss.feature.layer_map": "0:3"},
     "loss.feature.layer_map: teacher layer 3 is out of range: the teacher has 3 layers"),
])
def test_bad_config_is_a_clear_error_before_compiling(overrides, message, tiny_config,
                                                      teacher_dir, tmp_path):
    c = tiny_config
    c.loss.distill.teacher_workdir = str(teacher_dir)
    for key, value in overrides.items():
        _set(c, key, value)
    with no_compilation() as compiled, pytest.raises(ConfigError) as err:
        Experiment.build(c, tmp_path, jax.devices()[:1])
    assert message in str(err.value)
    assert compiled == []


@pytest.mark.slow
def test_cli_distill_flags_and_quantized_eval(teacher_dir, tmp_path):
    res = run_cli(["train.py", "--config=configs/shakespeare_char.py:tiny", "--cpu_devices=1",
                   f"--workdir={tmp_path}", "--config.steps=2", "--config.eval_max_batches=1",
                   "--config.loss.weights.distill=0.5",
                   "--config.loss.distill.kind=skew_forward_kl",
                   f"--config.loss.distill.teacher_workdir={teacher_dir}",
                   "--config.quant.weight_bits=8"])
    assert res.returncode == 0, res.stderr
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-2])
    assert {"loss", "loss/ce", "loss/distill"} <= set(last)
    res = run_cli(["eval.py", f"--workdir={tmp_path}", "--quantize=int4", "--cpu_devices=1"])
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["quantize"] == "int4" and out["weight_bytes"] < out["float_weight_bytes"] / 4
    assert (tmp_path / "eval" / "step_2_int4.json").is_file()
    res = run_cli(["eval.py", f"--workdir={tmp_path}", "--quantize=int2", "--cpu_devices=1"])
    assert res.returncode != 0


def test_a_teacher_whose_prepared_data_was_rebuilt_since_is_refused(tiny_config, tmp_path):
    """The teacher's tokenizer is the one it was trained with, not its data's today."""
    from jaxlm.data.prepare import prepare_corpus
    from jaxlm.training.trainer import train
    lines = "".join(f"{i} To be, or not to be, that is the question.\n\n" for i in range(60))
    prepared, text = tmp_path / "prepared", tmp_path / "docs.txt"

    def build(content: str) -> None:
        text.write_text(content, encoding="utf-8")
        prepare_corpus([text], prepared, tokenizer="char", workers=0, progress=False,
                       overwrite=True, split_blank_lines=True)
    build(lines)
    c = _tiny(tiny_config)
    c.steps, c.warmup_steps, c.data.path = 1, 0, str(prepared)
    train(c, tmp_path / "teacher", jax.devices()[:1])
    build(lines.replace("e", "\u00e9"))  # as many characters
    c = _student(c, tmp_path / "teacher", distill=1.0)
    with no_compilation() as compiled, pytest.raises(ConfigError) as err:
        Experiment.build(c, tmp_path / "student", jax.devices()[:1])
    assert str(err.value).startswith(
        f"loss.distill.teacher_workdir: the tokenizer of {prepared} is not the one the run in "
        f"{tmp_path / 'teacher'} was trained with (characters '\u00e9' added, 'e' missing)")
    assert compiled == []
