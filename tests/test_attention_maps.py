"""Attention maps: probabilities of the model's own attention (rows sum to 1, causal and
window masks, weights @ v is the layer's attention output), head statistics, eval.py."""

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.evaluation.attention_maps import attention_maps, blocks_in_order, head_statistics
from jaxlm.models.model import create_model, split_params
from tests.helpers import call_cli, model_config, step0_run

T = 12
DENSE_WINDOW = model_config(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                            d_ff=64, mlp="swiglu", sliding_window=5, init_std=0.2)
MOE_LEARNED = model_config(num_layers=2, d_model=32, num_heads=2, num_kv_heads=2, head_dim=16,
                           d_ff=64, position="learned", max_positions=32, init_std=0.2,
                           moe={"num_experts": 4, "top_k": 2, "every": 2})


def _walk(graphdef, params, tokens, num_heads, num_kv_heads):
    """The maps and logits, the model's own logits, and per layer o(weights @ v) beside
    the layer's attention output on the same input."""
    probs, logits = attention_maps(graphdef, params, tokens)
    model = nnx.merge(graphdef, params)
    positions = jnp.broadcast_to(jnp.arange(T)[None], tokens.shape)
    x = model.embed_tokens(tokens, positions)
    mixed, attended = [], []
    for layer, block in enumerate(blocks_in_order(model)):
        h = block.attn_norm(x)
        v = block.attn.qkv(h, positions)[2]
        v_per_head = jnp.repeat(v, num_heads // num_kv_heads, axis=2)  # head h reads h // R
        mixed.append(block.attn.o(jnp.einsum("bhts,bshk->bthk", probs[layer], v_per_head)))
        attended.append(block.attn(h, positions)[0])
        x = block(x, positions)[0]
    return probs, logits, model(tokens).logits, jnp.stack(mixed), jnp.stack(attended)


@pytest.mark.parametrize("cfg, window", [
    (DENSE_WINDOW, 5),
    pytest.param(MOE_LEARNED, None, marks=pytest.mark.slow)],
    ids=["gqa_window", "moe_every_2_learned_positions"])
def test_maps_are_the_model_attention(cfg, window):
    graphdef, params = split_params(create_model(cfg, 0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 65, (2, T)), jnp.int32)
    probs, logits, model_logits, mixed, attended = jax.jit(_walk, static_argnums=(0, 3, 4))(
        graphdef, params, tokens, cfg.model.num_heads, cfg.model.num_kv_heads)
    probs = np.asarray(probs)
    assert probs.shape == (cfg.model.num_layers, 2, cfg.model.num_heads, T, T)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    q, s = np.arange(T)[:, None], np.arange(T)[None, :]
    hidden = (s > q) | ((q - s >= window) if window else False)
    assert np.all(probs[..., hidden] == 0.0) and np.all(probs[..., ~hidden] > 0.0)
    np.testing.assert_allclose(logits, model_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mixed, attended, rtol=1e-5, atol=1e-6)
    assert np.abs(attended).max() > 1e-3  # not a vacuous comparison


def test_head_statistics_of_uniform_causal_attention():
    t = 6
    uniform = np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]
    sink = np.zeros((t, t))
    sink[:, 0] = 1.0
    stats = head_statistics(np.stack([uniform, sink])[None])  # [1 layer, 2 heads, t, t]
    rows = np.arange(1, t)
    np.testing.assert_allclose(stats["entropy"][0], [np.log(rows + 1).mean(), 0.0])
    np.testing.assert_allclose(stats["mean_distance"][0], [(rows / 2).mean(), rows.mean()])
    np.testing.assert_allclose(stats["first_token"][0], [(1 / (rows + 1)).mean(), 1.0])


def test_cli_attention_maps_take_one_prompt(tmp_path):
    res = call_cli(["eval.py", f"--workdir={tmp_path}", "--attention_maps", "--prompt=a",
                    "--prompt=b"])
    assert res.returncode == 1
    assert res.stderr.strip() == "error: attention_maps: maps one prompt; got 2 --prompt flags"


@pytest.mark.slow
def test_cli_writes_grids_and_head_table(tiny_config, tmp_path):
    run = step0_run(tiny_config, tmp_path / "run")
    res = call_cli(["eval.py", f"--workdir={run}", "--noeval", "--attention_maps",
                    "--prompt=ROMEO: O"])
    assert res.returncode == 0, res.stderr
    out = run / "eval" / "attention" / "step_0"
    layers, heads = tiny_config.model.num_layers, tiny_config.model.num_heads
    assert json.loads(res.stdout.splitlines()[-1]) == {
        "step": 0, "attention_maps": str(out), "layers": layers, "heads": heads}
    assert sorted(p.name for p in out.glob("*.png")) == [f"layer_{i:02d}.png"
                                                         for i in range(layers)]
    with open(out / "heads.csv") as f:
        rows = list(csv.DictReader(f))
    maps = np.load(out / "maps.npz")
    assert maps["probs"].shape == (layers, heads, 8, 8) and list(maps["tokens"]) == list("ROMEO: O")
    stats = head_statistics(maps["probs"])
    assert [float(r["entropy"]) for r in rows] == pytest.approx(stats["entropy"].ravel(),
                                                                rel=1e-5)
    too_long = "x" * (tiny_config.seq_len + 1)
    res = call_cli(["eval.py", f"--workdir={run}", "--noeval", "--attention_maps",
                    f"--prompt={too_long}"])
    assert res.returncode == 1
    assert res.stderr.startswith("error: prompt: a prompt of ") and \
        len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_imported_model_maps_equal_transformers_attentions(tmp_path):
    import torch
    from jaxlm.checkpoints.hf_import import import_hf
    from jaxlm.configs.base import get_base_config
    from jaxlm.evaluation.restore import restore_run
    from tests.test_hf_convert import build_hf
    model = build_hf("mistral_window_5", tmp_path / "hf")  # GQA and a sliding window
    import_hf(tmp_path / "hf", tmp_path / "run", get_base_config(), jax.devices()[:1])
    exp, state, _ = restore_run(tmp_path / "run", devices=jax.devices()[:1])
    tokens = np.random.default_rng(0).integers(0, 100, (1, T))
    ours = np.asarray(attention_maps(exp.graphdef, state.params, jnp.asarray(tokens))[0])
    model.config._attn_implementation = "eager"  # the implementation that returns weights
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(tokens), output_attentions=True).attentions
    np.testing.assert_allclose(ours, np.stack([a.numpy() for a in theirs]), atol=1e-5)
