"""Hugging Face import and export: equality with `transformers` on tiny random models built
here (no downloads), round trips, sharded placement, training, distillation and the CLI."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm.checkpoints.architectures import architecture_for, hf_config, model_section
from jaxlm.checkpoints.hf_export import export_hf
from jaxlm.checkpoints.hf_import import import_hf
from jaxlm.checkpoints.safetensors_io import SafetensorsReader, write_sharded
from jaxlm.configs.base import get_base_config
from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Config, Model
from jaxlm.configs.sections import Sampling
from jaxlm.evaluation.restore import restore_run
from jaxlm.inference.generate import Generator
from tests.helpers import assert_trees_close, call_cli, run_cli, step0_run, train_source
from jaxlm.training.experiment import Experiment
from jaxlm.training.init_from import check_source, restore_initial_state
from jaxlm.training.trainer import train

VOCAB = 100  # padded to 128 in the imported runs: the padding must change nothing
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
VARIANTS = {
    "llama": ("LlamaConfig", dict(TINY, rope_scaling=LLAMA3, rope_theta=500000.0,
                                   attention_bias=True, mlp_bias=True)),
    "mistral_window_5": ("MistralConfig", dict(TINY, sliding_window=5)),
    "mistral_window_64": ("MistralConfig", dict(TINY, sliding_window=64)),
    "qwen2": ("Qwen2Config", dict(TINY, tie_word_embeddings=True, use_sliding_window=True,
                                  sliding_window=7, max_window_layers=0)),
    "qwen3": ("Qwen3Config", dict(TINY, head_dim=16)),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                n_positions=64)),
}


def build_hf(variant: str, out: Path):
    """A tiny random `transformers` model of `variant`, saved with save_pretrained. Every
    parameter is perturbed so norms and biases are not their trivial initial values."""
    import torch
    import transformers
    torch.manual_seed(0)
    name, kwargs = VARIANTS[variant]
    model = transformers.AutoModelForCausalLM.from_config(
        getattr(transformers, name)(**kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    return model


def hf_logits(model, tokens, mask):
    import torch
    positions = np.maximum(mask.cumsum(1) - 1, 0)
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions)).logits.numpy()


def our_logits(exp, params, tokens, mask):
    model = nnx.merge(exp.graphdef, params)
    positions = np.maximum(mask.cumsum(1) - 1, 0)
    return np.asarray(model(tokens, positions_BxL=positions, segment_ids_BxL=mask).logits)


def batch(seed=0, length=20):
    """Random tokens, the second row left-padded by 6."""
    tokens = np.random.default_rng(seed).integers(0, VOCAB, (2, length))
    mask = np.ones((2, length), np.int64)
    mask[1, :6] = 0
    return tokens, mask


def assert_close(ours, theirs, mask):
    valid = mask.astype(bool)
    scale = np.abs(theirs[valid]).max()
    assert np.abs(ours[valid][..., :VOCAB] - theirs[valid]).max() <= 1e-4 * scale


# ----------------------------------------------------------------------------------------
# Fast: formats and config mappings.

def test_safetensors_reader_and_streamed_writer_agree_with_the_library(tmp_path):
    import ml_dtypes
    from safetensors import safe_open
    from safetensors.numpy import save_file
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 7)).astype(np.float32)
    b = rng.normal(size=(3,)).astype(np.float16)
    save_file({"a": a, "b": b}, str(tmp_path / "model.safetensors"))
    reader = SafetensorsReader(tmp_path)
    np.testing.assert_array_equal(reader.view("a")[1:3, 2:5], a[1:3, 2:5])
    np.testing.assert_array_equal(reader.view("b"), b)
    bf = rng.normal(size=(4, 6)).astype(ml_dtypes.bfloat16)
    tensors = [("x", np.float32, (5, 7), lambda: a), ("y", ml_dtypes.bfloat16, (4, 6), lambda: bf),
               ("z", np.float16, (3,), lambda: b)]
    out = tmp_path / "sharded"
    out.mkdir()
    assert len(write_sharded(out, tensors, max_shard_bytes=150)) == 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    loaded = {}
    for name in sorted(set(index["weight_map"].values())):
        with safe_open(str(out / name), framework="numpy") as f:
            # The library's NumPy API cannot hold bfloat16: y is checked below.
            loaded.update({key: f.get_tensor(key) for key in f.keys() if key != "y"})
    np.testing.assert_array_equal(loaded["x"], a)
    np.testing.assert_array_equal(loaded["z"], b)
    reader = SafetensorsReader(out)
    np.testing.assert_array_equal(reader.view("y").astype(np.float32), bf.astype(np.float32))
    np.testing.assert_array_equal(reader.view("z"), b)


def _llama_hf(**overrides):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100,
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, **overrides}


@pytest.mark.parametrize("hf, message", [
    ({"architectures": ["FalconForCausalLM"]}, "architecture ['FalconForCausalLM'] is not "
                                               "supported"),
    (_llama_hf(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
     "rope_scaling type 'yarn' is not supported"),
    (_llama_hf(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
     "rope_scaling type 'dynamic' is not supported"),
    (_llama_hf(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    ({**_llama_hf(), "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True,
      "sliding_window": 8, "max_window_layers": 1}, "sliding-window attention in some layers"),
])
def test_unsupported_configs_are_one_line_errors(hf, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as err:
        model_section(hf)
    assert str(err.value).startswith("from_hf: ") and "\n" not in str(err.value)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_json_round_trips_through_the_model_section(variant):
    import transformers
    name, kwargs = VARIANTS[variant]
    hf = getattr(transformers, name)(**kwargs).to_dict()
    hf["architectures"] = [name.replace("Config", "ForCausalLM" if name != "GPT2Config"
                                        else "LMHeadModel")]
    arch, section = model_section(hf)
    model = Config.from_dict({"model": {**Model().to_dict(), **section,
                                        "rope_scaling": {**Model().rope_scaling.to_dict(),
                                                         **section["rope_scaling"]}
                                        if "rope_scaling" in section else
                                        Model().rope_scaling.to_dict()}}).model
    assert architecture_for(model) == arch
    again = model_section(hf_config(model, VOCAB, 64))[1]
    assert again == section


@pytest.mark.parametrize("override, message", [
    ({}, "model.mlp: 'gelu' (an ungated MLP) with RoPE"),
    ({"mlp": "swiglu", "moe": {"num_experts": 4}}, "model.moe.num_experts: Mixture-of-Experts"),
    ({"mlp": "swiglu", "norm": "layernorm"}, "model.norm: 'layernorm' with RoPE"),
    ({"position": "learned", "max_positions": 64}, "model.norm: 'rmsnorm' where GPT-2 has"),
])
def test_export_refuses_a_model_no_architecture_expresses(override, message):
    values = {**Model().to_dict(), **override}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        architecture_for(Model.parse(values))


def test_cli_errors_are_one_line(tmp_path):
    r = call_cli(["convert.py", f"--from_hf={tmp_path / 'nothing'}", f"--workdir={tmp_path / 'r'}"])
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        f"error: from_hf: {tmp_path / 'nothing'} has no config.json: not a Hugging Face "
        "model directory")
    r = call_cli(["convert.py", f"--workdir={tmp_path / 'r'}"])
    assert r.returncode == 1 and "error: from_hf: give exactly one of" in r.stderr


# ----------------------------------------------------------------------------------------
# Slow: equality with transformers.

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """variant -> (transformers model, its directory, our imported run directory)."""
    cache = {}

    def get(variant):
        if variant not in cache:
            root = tmp_path_factory.mktemp(variant)
            model = build_hf(variant, root / "hf")
            c = get_base_config()
            c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 4, 2  # placed shard by shard
            import_hf(root / "hf", root / "run", c)
            cache[variant] = (model, root / "hf", root / "run")
        return cache[variant]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_import_equals_transformers_and_export_round_trips(variant, runs, tmp_path):
    import torch
    import transformers
    model, _, run = runs(variant)
    exp, state, step = restore_run(run, devices=jax.devices()[:1])
    assert step == 0 and exp.model_cfg.padded_vocab == 128
    tokens, mask = batch()
    theirs = hf_logits(model, tokens, mask)
    assert_close(our_logits(exp, state.params, tokens, mask), theirs, mask)

    # Greedy generation of 32 tokens, left-padded batch, KV cache on both sides.
    prompts = [tokens[0, :9].tolist(), tokens[1, :4].tolist()]
    ours, _ = Generator(exp.graphdef, exp.model_cfg, 64).generate(
        state.params, prompts, 32, Sampling(temperature=0.0))
    ids = torch.tensor([prompts[0], [0] * 5 + prompts[1]])
    attn = torch.tensor([[1] * 9, [0] * 5 + [1] * 4])
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=32,
                             do_sample=False)
    assert ours == out[:, 9:].tolist()

    export_hf(run, tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(again) is type(model)
    np.testing.assert_array_equal(hf_logits(again, tokens, mask), theirs)


@pytest.mark.slow
def test_sharded_checkpoints_and_bfloat16_import(tmp_path, monkeypatch):
    """A bfloat16 model saved in several files with an index imports exactly, read a few
    rows at a time."""
    import torch
    import transformers
    from jaxlm.checkpoints import hf_import
    monkeypatch.setattr(hf_import, "CHUNK_BYTES", 200)
    build_hf("qwen3", tmp_path / "f32").to(torch.bfloat16).save_pretrained(
        tmp_path / "bf16", max_shard_size="20KB")
    assert (tmp_path / "bf16" / "model.safetensors.index.json").is_file()
    import_hf(tmp_path / "bf16", tmp_path / "run", get_base_config(), jax.devices()[:1])
    exp, state, _ = restore_run(tmp_path / "run", devices=jax.devices()[:1])
    tokens, mask = batch()
    model = transformers.AutoModelForCausalLM.from_pretrained(  # the bf16 values, in f32
        tmp_path / "bf16", dtype=torch.float32).eval()
    theirs = hf_logits(model, tokens, mask)
    assert_close(our_logits(exp, state.params, tokens, mask), theirs, mask)


@pytest.mark.slow
def test_an_imported_model_trains_alike_on_8_devices_and_on_one(runs, tmp_path):
    _, _, run = runs("qwen2")

    def train_on(mesh, devices):
        c = get_base_config()
        for key, value in rundir_model(run).items():
            c.model[key] = value
        c.init.from_workdir = str(run)
        c.batch_size, c.steps, c.warmup_steps, c.mesh.data = 8, 3, 1, 1
        c.mesh.fsdp, c.mesh.tensor = mesh
        config = Config.from_dict(c)
        exp = Experiment.build(config, tmp_path / f"{mesh}", devices)
        state, _ = restore_initial_state(exp, check_source(config, exp.model_cfg))
        losses, source = [], train_source(exp)
        for s in range(3):
            state, metrics = exp.train_step(state, exp.to_global(source[s]))
            losses.append(float(metrics["loss"]))
        return np.array(losses), jax.device_get(state.params)

    one, one_params = train_on((1, 1), jax.devices()[:1])
    eight, eight_params = train_on((4, 2), jax.devices())
    np.testing.assert_allclose(eight, one, rtol=1e-5)
    assert_trees_close(eight_params, one_params, rtol=1e-4, atol=1e-6)


def rundir_model(run: Path) -> dict:
    model = json.loads((run / "config.json").read_text())["model"]
    return {k: v for k, v in model.items() if not isinstance(v, dict)}


@pytest.mark.slow
def test_distillation_from_an_imported_teacher(runs, tiny_config, tmp_path):
    _, _, run = runs("llama")
    c = tiny_config
    c.steps, c.warmup_steps, c.batch_size = 2, 1, 8
    c.model.vocab_size = VOCAB  # the teacher's vocabulary
    c.loss.weights.distill = 1.0
    c.loss.distill.teacher_workdir = str(run)
    summary = train(c, tmp_path / "student", jax.devices()[:1])
    assert summary["step"] == 2
    records = [json.loads(ln) for ln in (tmp_path / "student" / "metrics.jsonl").read_text()
               .splitlines()]
    assert all(np.isfinite(r["loss/distill"]) and r["loss/distill"] > 0 for r in records
               if "loss/distill" in r)


@pytest.mark.slow
def test_cli_import_on_8_devices_then_eval_sample_quantize_draft_export(tmp_path):
    import transformers
    model = build_hf("gpt2", tmp_path / "hf")
    run = tmp_path / "run"
    r = run_cli(["convert.py", f"--from_hf={tmp_path / 'hf'}", f"--workdir={run}",
                 "--cpu_devices=8", "--config.mesh.fsdp=8", "--config.mesh.data=1"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["architecture"] == "GPT2LMHeadModel"
    text = tmp_path / "text.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 3)
    for args in ([], [f"--data={text}"], ["--quantize=int8"],
                 ["--noeval", "--sample", "--prompt=ROMEO:", "--length=8", "--temperature=0"],
                 ["--noeval", "--sample", "--prompt=ROMEO:", "--length=8", "--temperature=0",
                  f"--draft_workdir={run}"]):
        r = run_cli(["eval.py", f"--workdir={run}", *args])
        assert r.returncode == 0, (args, r.stderr[-2000:])
    r = run_cli(["convert.py", f"--to_hf={tmp_path / 'out'}", f"--workdir={run}", "--step=0"])
    assert r.returncode == 0, r.stderr[-2000:]
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens, mask = batch()
    np.testing.assert_array_equal(hf_logits(again, tokens, mask), hf_logits(model, tokens, mask))


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_an_export_carries_the_run_tokenizer(kind, tiny_config, tmp_path):
    """AutoTokenizer on an export encodes and decodes as the run's own tokenizer does, and
    GenerationConfig reads its end-of-text id."""
    import transformers
    from jaxlm.training import rundir
    tiny_config.data.tokenizer, tiny_config.model.mlp = kind, "swiglu"  # Llama's MLP
    run = step0_run(tiny_config, tmp_path / "run")
    export_hf(run, tmp_path / "out", devices=jax.devices()[:1])
    ours = rundir.load_data(rundir.load_config(run), run).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "ROMEO:\nWhat light through yonder window breaks?  It is the east.\n\n"
    ids = theirs(text)["input_ids"]
    assert ids == ours.encode(text).tolist()
    assert theirs.decode(ids) == text and len(theirs) == ours.vocab_size
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "out")
    assert generation.eos_token_id == ours.eos_id
    assert json.loads((tmp_path / "out" / "config.json").read_text()).get(
        "eos_token_id") == ours.eos_id


def _gpt2_with_tokenizer(out: Path, vocab: int = 300) -> None:
    """A tiny GPT-2 saved with a byte-level BPE tokenizer of `vocab` ids trained here."""
    import torch
    import transformers
    from jaxlm.data.prepare import EMBEDDED_CORPUS
    from jaxlm.data.tokenizers import BPE_EOS, train_bpe
    out.mkdir(parents=True)
    eos = train_bpe([EMBEDDED_CORPUS.read_text()[:20000]], vocab, out / "tokenizer.json").eos_id
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"),
                                         eos_token=BPE_EOS).save_pretrained(out)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=1, n_head=4, n_positions=64, bos_token_id=eos,
        eos_token_id=eos)).save_pretrained(out)


@pytest.mark.slow
def test_finetuning_an_import_keeps_its_tokenizer_through_training_and_export(tiny_config,
                                                                              tmp_path):
    import transformers
    from jaxlm.configs.finetune import get_config as finetune_config
    _gpt2_with_tokenizer(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "gpt2", get_base_config(), jax.devices()[:1])
    text = tmp_path / "corpus.txt"
    text.write_text("Before we proceed any further, hear me speak.\n" * 200)
    c = finetune_config(str(tmp_path / "gpt2"))
    c.data.path, c.steps, c.warmup_steps, c.batch_size = str(text), 2, 1, 4
    c.eval_every = c.checkpoint_every = 0
    train(c, tmp_path / "ft", jax.devices()[:1])
    from jaxlm.training import rundir
    tuned = rundir.load_data(rundir.load_config(tmp_path / "ft"), tmp_path / "ft").tokenizer
    assert tuned.kind == "hf" and tuned.vocab_size == 300
    export_hf(tmp_path / "ft", tmp_path / "out", devices=jax.devices()[:1])
    base = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    sample = "First Citizen: hear me speak."
    assert exported(sample)["input_ids"] == base(sample)["input_ids"] == \
        tuned.encode(sample).tolist()
    assert exported.eos_token == base.eos_token
    assert (tmp_path / "out" / "generation_config.json").is_file()
