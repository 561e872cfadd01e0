"""Quantized runs (`eval.py --quantize=... --save=NEW_RUN`): the saved integers evaluate as
in-process, draft, serve as a QLoRA base bit-identically and export dequantized; what
cannot read one refuses it in one line. And GPTQ against round-to-nearest on an imported
tiny Llama."""

import json

import jax
import numpy as np
import pytest

from jaxlm.evaluation import quantized_run
from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Config, Quant, Sampling
from jaxlm.evaluation.restore import restore_run
from jaxlm.models.quant import QTensor
from jaxlm.storage import dirs
from jaxlm.training import rundir
from tests.helpers import assert_trees_close, call_cli

INT4_G16 = Quant(weight_bits=4, granularity="16")


# ----------------------------------------------------------------------------------------
# Fast: the marker and its one-line refusals.

@pytest.mark.parametrize("values,line", [
    ({"quant": {"ptq": True}}, "quant.ptq: marks a run whose weights are stored quantized; "
                               "it needs quant.weight_bits"),
    ({"quant": {"ptq": True, "weight_bits": 4}, "lora": {"rank": 4}},
     "quant.ptq: marks a quantized run written by eval.py --save; a LoRA run takes"),
])
def test_bad_quantized_run_configs_are_one_line(values, line):
    with pytest.raises(ConfigError) as err:
        Config.from_dict(values)
    assert str(err.value).startswith(line) and "\n" not in str(err.value)


def test_a_quantized_run_is_never_trained(tmp_path):
    saved = quantized_run.quantized_config(Config(), INT4_G16)
    assert saved.quant.ptq and saved.quant.weight_bits == 4
    rundir.save_config(saved, tmp_path)
    with pytest.raises(ConfigError, match=f"^workdir: {tmp_path} is a quantized run "
                                          r"\(eval.py --save\), whose weights do not train"):
        rundir.check_resume(Config(), tmp_path, None)
    with pytest.raises(ConfigError, match="^quant.ptq: marks a quantized run written by"):
        rundir.check_resume(saved, tmp_path / "new", None)


def test_save_needs_quantize_and_a_new_directory(tmp_path):
    res = call_cli(["eval.py", f"--workdir={tmp_path}", f"--save={tmp_path / 'q'}"])
    assert res.returncode == 1 and res.stderr.strip() == (
        "error: save: writes the quantized weights as a new run: add "
        "--quantize=int8|int4|int3|nf4"), res.stderr
    (tmp_path / "run").mkdir()
    rundir.save_config(Config(), tmp_path / "run")
    with pytest.raises(ConfigError, match="^save: .* is the run being quantized"):
        quantized_run.check_save(tmp_path / "run", tmp_path / "run")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="^save: .* is not empty"):
        with quantized_run.writing(tmp_path / "other"):
            pass
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "other" / dirs.LOCK_FILE).exists()


# ----------------------------------------------------------------------------------------
# Slow: an imported Llama, quantized by GPTQ and saved.

@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """(imported run, its GPTQ int4 run saved by eval.py, the result line eval.py printed):
    a tiny Llama built with `transformers` (random init, perturbed) and imported, quantized
    in groups of 16 on 2 calibration batches of its training split."""
    pytest.importorskip("transformers")
    from jaxlm.checkpoints.hf_import import import_hf
    from jaxlm.configs.base import get_base_config
    from tests.test_hf_convert import build_hf
    root = tmp_path_factory.mktemp("llama")
    build_hf("llama", root / "hf")
    c = get_base_config()
    c.batch_size, c.seq_len, c.eval_batch_size, c.eval_max_batches = 8, 32, 16, 2
    import_hf(root / "hf", root / "imported", c, jax.devices()[:1])
    res = call_cli(["eval.py", f"--workdir={root / 'imported'}", "--quantize=int4",
                    "--quant_method=gptq", "--quant_granularity=16",
                    "--calibration_batches=2", f"--save={root / 'int4'}"])
    assert res.returncode == 0, res.stderr[-2000:]
    return root / "imported", root / "int4", json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_gptq_int4_reconstructs_an_imported_llama_better_than_rounding_to_nearest(
        saved_llama):
    """A random-init model's eval loss says little about quantization (GPTQ's is below
    float's on this one), so this compares output reconstruction on the data GPTQ
    calibrated on: the logits of the saved GPTQ int4 run (groups of 16) are closer to the
    float model's than RTN int4's in the same groups and bytes."""
    from flax import nnx

    from jaxlm.evaluation.quantized import calibration_batches, quantize_run_params
    from jaxlm.models.quant import tree_bytes
    imported, saved, _ = saved_llama
    exp, state, _ = restore_run(imported, devices=jax.devices()[:1])
    gptq_exp, gptq_state, _ = restore_run(saved, devices=jax.devices()[:1])
    rtn_graphdef, rtn = quantize_run_params(exp, state.params, gptq_exp.config.quant)
    batches = calibration_batches(exp, 2)

    def logits(graphdef, params, tokens):
        return np.asarray(jax.jit(lambda p: nnx.merge(graphdef, p)(tokens).logits)(params))

    def mse(graphdef, params):
        return np.mean([np.mean((logits(graphdef, params, b["inputs"]) -
                                 logits(exp.graphdef, state.params, b["inputs"])) ** 2)
                        for b in batches])
    gptq_error, rtn_error = mse(gptq_exp.graphdef, gptq_state.params), mse(rtn_graphdef, rtn)
    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)
    assert tree_bytes(gptq_state.params) == tree_bytes(rtn)


def _kernels(params):
    return [x for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QTensor))
            if isinstance(x, QTensor)]


@pytest.mark.slow
def test_a_saved_gptq_run_evaluates_drafts_tunes_and_exports(saved_llama, tmp_path):
    import torch
    import transformers
    from flax import nnx

    from jaxlm.checkpoints.hf_export import export_hf
    from jaxlm.configs.finetune import get_config as finetune
    from jaxlm.evaluation.sampling import sample, sample_speculative
    from jaxlm.training import lora
    from jaxlm.training.evaluate import evaluate
    from jaxlm.training.trainer import train
    imported, saved, in_process = saved_llama
    # (a) It evaluates as the in-process --quantize did, from its integers.
    exp, state, step = restore_run(saved)
    assert step == 0 and exp.config.quant.ptq
    kernels = _kernels(state.params)
    assert kernels and all(k.qvalue.dtype in (np.int8, np.uint8) for k in kernels)
    np.testing.assert_allclose(evaluate(exp, state.params)["eval_loss"],
                               in_process["eval_loss"], rtol=1e-6)
    record = json.loads((saved / quantized_run.RECORD_FILE).read_text())
    assert (record["method"], record["granularity"], record["source"]["step"]) == (
        "gptq", "16", 0)
    assert record["calibration"]["batches"] == 2 and record["calibration"]["data"][0]["sha256"]
    # (b) A speculative draft: greedy decoding is the target's.
    target, target_state, _ = restore_run(imported)
    greedy = Sampling(temperature=0.0)
    plain, _ = sample(target, target_state.params, ["ROMEO:"], 8, greedy)
    spec, stats = sample_speculative(target, target_state.params, str(saved), ["ROMEO:"], 8,
                                     greedy)
    assert spec == plain and stats["acceptance_rate"] > 0
    # (d) Exported dequantized: transformers' logits are our quantized model's.
    export_hf(saved, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = np.random.default_rng(0).integers(0, 65, (2, 16))
    ours = np.asarray(nnx.merge(exp.graphdef, state.params)(tokens).logits)[..., :100]
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4 * np.abs(ours).max(), rtol=0)
    # (c) A QLoRA base: the saved integers, bit-identical after training.
    c = finetune(str(saved))
    c.lora.rank, c.batch_size, c.seq_len, c.steps, c.warmup_steps = 4, 8, 32, 2, 0
    c.learning_rate, c.eval_every, c.checkpoint_every = 1e-2, 0, 2
    train(c, tmp_path / "qlora", jax.devices()[:1])
    _, tuned, _ = restore_run(tmp_path / "qlora")
    assert_trees_close(jax.device_get(lora.split_trainable(tuned.params)[1]),
                       jax.device_get(state.params), rtol=0, atol=0)
    # Training it in any other way is one line.
    c.lora.rank = 0
    with pytest.raises(ConfigError, match="^init.from_workdir: .* is a quantized run"):
        train(c, tmp_path / "full", jax.devices()[:1])
    c.lora.rank, c.quant.granularity = 4, "32"
    with pytest.raises(ConfigError, match="^quant.granularity: is '32' here but '16' in the "
                                          "quantized run"):
        train(c, tmp_path / "other_groups", jax.devices()[:1])
    res = call_cli(["train.py", f"--workdir={saved}"])
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith(
        f"error: workdir: {saved} is a quantized run (eval.py --save)"), res.stderr[-2000:]
