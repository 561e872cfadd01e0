"""LoRA and QLoRA: adapters that start as the identity, a frozen base that never changes
and has no optimizer state, merging, layouts, checkpoints that hold the adapters, and
one-line errors for configs that cannot work."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm.checkpoints.lora_merge import merge_lora, merge_run
from jaxlm.configs import keys
from jaxlm.configs.errors import ConfigError, RunError
from jaxlm.configs.sections import Config, Sampling
from jaxlm.evaluation.restore import restore_run
from jaxlm.evaluation.sampling import sample, sample_speculative
from jaxlm.models.model import abstract_model
from jaxlm.models.lora import merge_adapters
from jaxlm.models.quant import QTensor
from tests.helpers import assert_trees_close, call_cli, params_fast_only, run_cli, train_source
from jaxlm.training import lora, rundir, trainer
from jaxlm.training.evaluate import evaluate
from jaxlm.training.experiment import Experiment

ALL = "q,k,v,o,gate,up,down"


def _lora(c, rank=4, targets=ALL, bits=0):
    """The tiny model (SwiGLU, so every projection exists) with adapters, on a constant
    learning rate high enough to move them in a few steps."""
    c.model.mlp = "swiglu"
    c.batch_size, c.steps, c.warmup_steps = 8, 4, 0
    c.schedule, c.learning_rate, c.min_learning_rate = "constant", 1e-2, 1e-2
    c.lora.rank, c.lora.targets = rank, targets
    c.quant.weight_bits = bits
    return c


def _tokens(seed=0, shape=(2, 32), vocab=65):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _logits(exp, params, tokens):
    return np.asarray(jax.jit(lambda p, t: nnx.merge(exp.graphdef, p)(t).logits)(params,
                                                                                   tokens))


def _has_adapter(path) -> bool:
    return any(getattr(k, "key", None) in ("lora_a", "lora_b") for k in path)


def _train(exp, state, steps, same_batch=False):
    source = train_source(exp)
    losses = []
    for step in range(steps):
        state, metrics = exp.train_step(state, exp.to_global(source[0 if same_batch else step]))
        losses.append(float(metrics["loss"]))
    return state, losses


def test_zero_initialised_b_gives_the_base_model_exactly(tiny_config, tmp_path):
    config = Config.from_dict(_lora(tiny_config))
    exp = Experiment.build(config, tmp_path, jax.devices()[:1])
    base_exp = Experiment.build(config.replace(**{"lora.rank": 0}), tmp_path,
                                jax.devices()[:1])
    base = jax.device_get(base_exp.init_state().params)
    adapters, _ = lora.split_trainable(jax.device_get(exp.init_state().params))
    q = adapters["blocks"]["attn"]["q"]
    assert np.abs(q["lora_a"]).max() > 0 and np.abs(q["lora_b"]).max() == 0
    assert q["lora_a"].shape == (2, 32, 4) and q["lora_b"].shape == (2, 4, 4, 8)
    tokens = _tokens()
    np.testing.assert_array_equal(_logits(exp, lora.join(adapters, base), tokens),
                                  _logits(base_exp, base, tokens))


def test_frozen_base_is_bit_identical_and_only_adapters_have_optimizer_state(tiny_config,
                                                                            tmp_path):
    exp = Experiment.build(_lora(tiny_config), tmp_path, jax.devices()[:1])
    state = exp.init_state()
    before = jax.device_get(state.params)
    state, _ = _train(exp, state, 3)
    after = jax.device_get(state.params)
    trained0, frozen0 = lora.split_trainable(before)
    trained1, frozen1 = lora.split_trainable(after)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(frozen0)[0],
                            jax.tree.leaves(frozen1)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(trained0),
                                                         jax.tree.leaves(trained1))]
    assert min(moved) > 0  # every adapter trained (B left zero, A got gradients through B)
    opt_leaves = jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
    big = [(p, x) for p, x in opt_leaves if np.ndim(x) > 0]
    assert big and all(_has_adapter(p) for p, _ in big)
    n_adapter = sum(x.size for x in jax.tree.leaves(trained0))
    assert sum(x.size for _, x in big) == 2 * n_adapter  # AdamW: mu and nu, adapters only
    # The checkpoint form holds the adapters only.
    saved = exp.to_checkpoint(state).params
    assert all(_has_adapter(p) for p, _ in jax.tree_util.tree_flatten_with_path(saved)[0])


@pytest.mark.parametrize("bits", params_fast_only([0, 4], fast=[0]))
def test_merged_parameters_give_the_unmerged_logits(tiny_config, tmp_path, bits):
    exp = Experiment.build(_lora(tiny_config, bits=bits), tmp_path, jax.devices()[:1])
    state, _ = _train(exp, exp.init_state(), 2)
    config, merged = merge_lora(exp, state.params)
    assert not config.lora.rank and not config.quant.weight_bits
    plain = Experiment.build(config, tmp_path, jax.devices()[:1])
    assert jax.tree.structure(merged) == jax.tree.structure(plain.abstract_state.params)
    tokens = _tokens(1)
    ours = _logits(exp, state.params, tokens)
    np.testing.assert_allclose(_logits(plain, merged, tokens), ours, atol=1e-5, rtol=0)
    # ... and the adapters matter: the base alone differs.
    base = merge_adapters(abstract_model(plain.model_cfg), lora.split_trainable(
        state.params)[1]) if bits else lora.split_trainable(state.params)[1]
    assert np.abs(_logits(plain, base, tokens) - ours).max() > 1e-4


@pytest.mark.parametrize("bits, dtype", [(4, np.uint8), (8, np.int8)])
def test_qlora_base_is_integer_unchanged_and_training_lowers_the_loss(tiny_config, tmp_path,
                                                                      bits, dtype):
    exp = Experiment.build(_lora(tiny_config, bits=bits), tmp_path, jax.devices()[:1])
    state = exp.init_state()
    q = state.params["blocks"]["attn"]["q"]["kernel"]
    assert isinstance(q, QTensor) and q.qvalue.dtype == dtype
    rows = 32 // 2 if bits == 4 else 32  # int4: two values per byte
    assert q.qvalue.shape == (2, rows, 32)
    assert isinstance(state.params["embed"]["embedding"], QTensor)
    frozen0 = jax.device_get(lora.split_trainable(state.params)[1])
    state, losses = _train(exp, state, 8, same_batch=True)
    frozen1 = jax.device_get(lora.split_trainable(state.params)[1])
    for a, b in zip(jax.tree.leaves(frozen0), jax.tree.leaves(frozen1)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert losses[-1] < losses[0] - 0.05  # one batch, 8 steps: 4.16 -> 4.03


@pytest.mark.slow
def test_data2_fsdp2_tensor2_equals_one_device(tiny_config, tmp_path):
    def config(data, fsdp, tensor):
        c = _lora(tiny_config.copy_and_resolve_references())
        c.warmup_steps, c.schedule = 2, "cosine"  # the usual, smaller steps
        c.learning_rate, c.min_learning_rate = 1e-3, 1e-4
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
        return c

    def train(c, devices):
        exp = Experiment.build(c, tmp_path / str(len(devices)), devices)
        state, source, out = exp.init_state(), train_source(exp), []
        for step in range(3):
            state, m = exp.train_step(state, exp.to_global(source[step]))
            out.append((float(m["loss"]), float(m["grad_norm"])))  # adapter gradients
        return np.array(out), jax.device_get(state.params), state

    m1, p1, _ = train(config(1, 1, 1), jax.devices()[:1])
    m8, p8, state = train(config(2, 2, 2), jax.devices())
    np.testing.assert_allclose(m8, m1, rtol=1e-5)
    assert_trees_close(lora.split_trainable(p8)[0], lora.split_trainable(p1)[0],
                       rtol=1e-4, atol=1e-6)
    a = state.params["blocks"]["attn"]["q"]["lora_a"]  # [layers, embed, lora_rank]
    assert tuple(a.sharding.spec)[1:] == ("fsdp", None)
    b = state.params["blocks"]["attn"]["q"]["lora_b"]  # [layers, lora_rank, heads, head_dim]
    assert tuple(b.sharding.spec)[1:] == (None, "tensor", None)


@pytest.mark.parametrize("overrides, message", [
    ({"lora.rank": -1}, "lora.rank: must be >= 0, got -1"),
    ({"lora.targets": "q,x"}, "lora.targets: unknown target 'x'; choose from"),
    ({"lora.targets": "q,q"}, "lora.targets: a target is named twice in 'q,q'"),
    ({"lora.alpha": 0.0}, "lora.alpha: must be > 0, got 0.0"),
    ({"lora.dropout": 1.0}, "lora.dropout: must be in [0, 1), got 1.0"),
    ({"model.mlp": "gelu"}, ("lora.targets: 'gate' is not in this model: model.mlp='gelu' "
                             "has no gate projection")),
    ({"model.moe.num_experts": 4}, ("lora.targets: gate,up,down: adapters on MoE expert "
                                    "projections are not supported")),
    ({"mesh.pipeline": 2}, "lora.rank: LoRA is not supported with pipeline parallelism"),
    ({"quant.activation_bits": 8}, "lora.rank: LoRA trains float adapters on a frozen base"),
])
def test_bad_configs_are_one_line_errors(tiny_config, overrides, message):
    c = _lora(tiny_config)
    for key, value in overrides.items():
        keys.set_value(c, key, value)
    with pytest.raises(ConfigError) as err:
        Config.from_dict(c)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_cli_error_before_compiling(tmp_path):
    out = call_cli(["train.py", "--config=configs/shakespeare_char.py:tiny",
                    f"--workdir={tmp_path}", "--config.lora.rank=4",
                    "--config.lora.targets=q,gate"])
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        "error: lora.targets: 'gate' is not in this model: model.mlp='gelu' has no gate "
        "projection")


def _fast(c):
    c.eval_every, c.log_every, c.eval_batch_size, c.eval_max_batches = 0, 1, 8, 1
    return c


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A plain tiny SwiGLU run with a step-2 checkpoint."""
    from jaxlm.configs.shakespeare_char import get_config
    c = _fast(_lora(get_config("tiny"), rank=0))
    c.steps, c.checkpoint_every = 2, 2
    workdir = tmp_path_factory.mktemp("base")
    trainer.train(c, workdir, jax.devices()[:1])
    return workdir


@pytest.mark.slow
def test_lora_run_from_a_base_run_resumes_evaluates_samples_and_merges(base_run, tmp_path):
    # Deferred: torch and transformers load slowly; only this test needs them.
    import torch
    import transformers

    from jaxlm.configs.finetune import get_config as finetune
    c = _fast(_lora(finetune(str(base_run)), targets="q,v,down", bits=4))
    c.steps, c.checkpoint_every, c.seq_len = 4, 2, 32
    c.data.tokenizer = "char"
    straight = trainer.train(c, tmp_path / "a", jax.devices()[:1])
    # Resume: stop after step 2 (its checkpoint), then continue to 4.
    c2 = c.copy_and_resolve_references()
    c2.steps = 2
    trainer.train(c2, tmp_path / "b", jax.devices()[:1])
    trainer.train(c, tmp_path / "b", jax.devices()[:1], allow_schedule_change=True)
    exp_a, state_a, step = restore_run(tmp_path / "a")
    _, state_b, _ = restore_run(tmp_path / "b")
    assert step == 4 and straight["step"] == 4
    assert_trees_close(jax.device_get(state_b.params), jax.device_get(state_a.params),
                       rtol=0, atol=0)
    metrics = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").open()]
    resumed = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").open()]
    assert [m["loss"] for m in metrics if "loss" in m] == [
        m["loss"] for m in resumed if "loss" in m]
    # The base is stored once, as integers; checkpoints hold the adapters.
    source = json.loads((tmp_path / "a" / lora.SOURCE_FILE).read_text())
    assert source == {"workdir": str(base_run), "step": 2}
    meta = json.loads((rundir.checkpoint_dir(tmp_path / "a") / "4" / "state" / "_METADATA"
                       ).read_text())["tree_metadata"]
    saved = [k for k in meta if k.startswith("('params'")]
    assert saved and all("'lora_a'" in k or "'lora_b'" in k for k in saved)
    # Evaluation, sampling and speculative decoding (the base run as the draft).
    trained_eval = [m["eval_loss"] for m in metrics if "eval_loss" in m][-1]
    np.testing.assert_allclose(evaluate(exp_a, state_a.params)["eval_loss"], trained_eval,
                               rtol=1e-6)
    greedy = Sampling(temperature=0.0)
    texts, _ = sample(exp_a, state_a.params, ["ROMEO:"], 8, greedy)
    spec, stats = sample_speculative(exp_a, state_a.params, str(base_run), ["ROMEO:"], 8,
                                     greedy)
    assert spec == texts and stats["matches_plain"] == 1.0
    # Merged run: a plain run with the LoRA run's logits.
    summary = merge_run(tmp_path / "a", tmp_path / "merged", devices=jax.devices()[:1])
    exp_m, state_m, step_m = restore_run(tmp_path / "merged")
    assert step_m == 4 and summary["step"] == 4 and not exp_m.config.lora.rank
    tokens = _tokens(2)
    np.testing.assert_allclose(_logits(exp_m, state_m.params, tokens),
                               _logits(exp_a, state_a.params, tokens), atol=1e-5, rtol=0)
    # The command line: eval.py's modes, and the export, whose weights are merged.
    run = str(tmp_path / "a")
    for args in ([], ["--noeval", "--sample", "--prompt=ROMEO:", "--length=8",
                      "--temperature=0", f"--draft_workdir={base_run}"]):
        r = run_cli(["eval.py", f"--workdir={run}", *args])
        assert r.returncode == 0, (args, r.stderr[-2000:])
    r = run_cli(["convert.py", f"--to_hf={tmp_path / 'hf'}", f"--workdir={run}"])
    assert r.returncode == 0, r.stderr[-2000:]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, _logits(exp_a, state_a.params, tokens)[..., :65],
                               atol=1e-4, rtol=0)
    r = run_cli(["eval.py", f"--workdir={run}", "--quantize=int8"])
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        "error: quantize: the run's frozen base is already int4 (QLoRA); evaluate it "
        "without --quantize")
    r = run_cli(["convert.py", "--merge_lora", f"--workdir={run}"])
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        "error: output: --merge_lora needs --output=NEW (a new run directory)")
    # A missing base is a clear error.
    (tmp_path / "b" / lora.BASE_DIR).rename(tmp_path / "elsewhere")
    with pytest.raises(RunError, match="lora_base is missing: a LoRA run's checkpoints hold "
                                       "only the adapters"):
        restore_run(tmp_path / "b")


@pytest.mark.slow
def test_lora_student_distils_from_its_base_run(base_run, tmp_path):
    """Logit and feature distillation need only the student's own outputs: they work
    with adapters, and no gradient reaches the frozen base."""
    from jaxlm.configs.finetune import get_config as finetune
    c = _fast(_lora(finetune(str(base_run)), targets="q,v"))
    c.loss.weights.distill, c.loss.weights.feature = 1.0, 1.0
    c.loss.distill.teacher_workdir = str(base_run)
    exp = Experiment.build(c, tmp_path, jax.devices()[:1])
    state = exp.init_state()
    frozen0 = jax.device_get(lora.split_trainable(state.params)[1])
    source = train_source(exp)
    for step in range(2):
        state, metrics = exp.train_step(state, exp.to_global(source[step]))
    assert np.isfinite(float(metrics["loss/distill"])) and float(metrics["loss/feature"]) > 0
    for a, b in zip(jax.tree.leaves(frozen0),
                    jax.tree.leaves(jax.device_get(lora.split_trainable(state.params)[1]))):
        np.testing.assert_array_equal(a, b)


def test_rules_saved_before_the_rank_axis_existed_still_load():
    rules = [list(r) for r in Config().sharding.rules if r[0] != "lora_rank"]
    config = Config.from_dict({"sharding": {"rules": rules}})
    assert ("lora_rank", None) in config.sharding.rules


def test_another_base_of_the_same_shapes_is_refused_by_eval_resume_and_merge(tiny_config,
                                                                              tmp_path):
    """WORKDIR/lora_base/ replaced by the base of another run with the same model."""
    import shutil
    c = _fast(_lora(tiny_config, rank=2, targets="q,v"))
    c.steps, c.checkpoint_every = 2, 2
    trainer.train(c, tmp_path / "a", jax.devices()[:1])
    other = c.copy_and_resolve_references()
    other.seed = 7  # another random base
    trainer.train(other, tmp_path / "b", jax.devices()[:1])
    restore_run(tmp_path / "a", devices=jax.devices()[:1])  # its own base restores
    shutil.rmtree(tmp_path / "a" / lora.BASE_DIR)
    shutil.copytree(tmp_path / "b" / lora.BASE_DIR, tmp_path / "a" / lora.BASE_DIR)
    message = (f"workdir: {tmp_path / 'a' / lora.BASE_DIR} is not the frozen base the LoRA "
               f"run in {tmp_path / 'a'} stored (sha256 ")
    c.steps = 4
    for use in (lambda: restore_run(tmp_path / "a", devices=jax.devices()[:1]),
                lambda: trainer.train(c, tmp_path / "a", jax.devices()[:1],
                                      allow_schedule_change=True),
                lambda: merge_run(tmp_path / "a", tmp_path / "merged", devices=jax.devices()[:1])):
        with pytest.raises(ConfigError) as err:
            use()
        assert str(err.value).startswith(message)
    assert not (tmp_path / "merged" / "checkpoints").exists()
