"""Attention maps of one prompt: every layer's per-head probabilities, heatmaps, and head
statistics.

The prompt runs through the model block by block (the blocks of the scanned units in
order, MoE blocks included); each block's attention probabilities come from
`Attention.weights`, i.e. `kernels.reference.attention_weights`, the probabilities of
the "xla" attention the model trains with, under the same causal mask and sliding
window. Head statistics average over query positions 1..L-1 (position 0 sees only
itself):
  entropy        -sum_s p log p, in nats (0: one key; log(n): n keys alike);
  mean_distance  sum_s p (q - s): how far back the head looks, in tokens;
  first_token    p(q attends to position 0): the "attention sink" share.
"""

import csv
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.configs.sections import Sampling
from jaxlm.evaluation.sampling import encode_prompts
from jaxlm.losses.objectives import split_objective_params
from jaxlm.models.transformer import BlockGroup

STATS = ("entropy", "mean_distance", "first_token")


def blocks_in_order(model: Any) -> list[Any]:
    """The model's blocks, first to last, as modules (units unstacked, groups split)."""
    state = nnx.state(model.blocks)
    blocks = []
    for u in range(model.cfg.num_units):
        unit = nnx.merge(model.blocks_graphdef, jax.tree.map(lambda a, u=u: a[u], state))
        if isinstance(unit, BlockGroup):
            blocks += [getattr(unit, f"layer_{i}") for i in range(unit.size)]
        else:
            blocks.append(unit)
    return blocks


def attention_maps(graphdef: nnx.GraphDef, params: Any, tokens_BxL: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
    """([layers, B, H, L, L] probabilities, [B, L, V] logits of the same walk)."""
    model = nnx.merge(graphdef, params)
    b, t = tokens_BxL.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    x = model.embed_tokens(tokens_BxL, positions)
    maps = []
    for block in blocks_in_order(model):
        maps.append(block.attn.weights(block.attn_norm(x), positions))
        x = block(x, positions)[0]
    return jnp.stack(maps), model.head(x)


def head_statistics(probs_NxHxLxL: np.ndarray) -> dict[str, np.ndarray]:
    """STATS [layers, H] of one prompt's maps (module docstring)."""
    p = np.asarray(probs_NxHxLxL, np.float64)
    t = p.shape[-1]
    rows = slice(1, None) if t > 1 else slice(None)
    logs = np.log(np.where(p > 0, p, 1.0))
    distance = np.arange(t)[:, None] - np.arange(t)[None, :]  # q - s
    return {"entropy": (-(p * logs).sum(-1))[..., rows].mean(-1),
            "mean_distance": (p * distance).sum(-1)[..., rows].mean(-1),
            "first_token": p[..., 0][..., rows].mean(-1)}


def write_heads_csv(path: Path, stats: dict[str, np.ndarray]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "head", *STATS])
        for layer, head in np.ndindex(stats["entropy"].shape):
            w.writerow([layer, head, *(f"{stats[s][layer, head]:.6g}" for s in STATS)])


def heads_table(stats: dict[str, np.ndarray]) -> str:
    """The statistics as an aligned text table, one row per head."""
    lines = [f"{'layer':>5} {'head':>4} {'entropy':>8} {'mean_distance':>13} {'first_token':>11}"]
    for layer, head in np.ndindex(stats["entropy"].shape):
        e, d, f = (stats[s][layer, head] for s in STATS)
        lines.append(f"{layer:>5} {head:>4} {e:>8.3f} {d:>13.2f} {f:>11.3f}")
    return "\n".join(lines)


def plot_layer(path: Path, probs_HxLxL: np.ndarray, labels: list[str], layer: int) -> None:
    """One PNG: a grid of the layer's heads, rows = queries, columns = keys."""
    # Deferred: matplotlib is heavy and only the attention maps draw.
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    h, t = probs_HxLxL.shape[:2]
    cols = min(h, 4)
    rows = math.ceil(h / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= h:
            ax.axis("off")
            continue
        ax.imshow(probs_HxLxL[i], vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(f"head {i}", fontsize=9)
        if t <= 32:
            ax.set_xticks(range(t), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(t), labels, fontsize=6)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"layer {layer}: attention (rows: queries, columns: keys)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_attention_maps(out_dir: Path, probs_NxHxLxL: np.ndarray, labels: list[str]
                         ) -> dict[str, np.ndarray]:
    """layer_<i>.png for every layer, heads.csv and maps.npz (the probabilities and the
    token labels) under `out_dir`; returns the head statistics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = head_statistics(probs_NxHxLxL)
    for layer, probs in enumerate(probs_NxHxLxL):
        plot_layer(out_dir / f"layer_{layer:02d}.png", probs, labels, layer)
    write_heads_csv(out_dir / "heads.csv", stats)
    np.savez(out_dir / "maps.npz", probs=probs_NxHxLxL, tokens=np.asarray(labels))
    return stats


def prompt_attention(exp: Any, params: Any, prompt: str, out_dir: Path
                     ) -> dict[str, np.ndarray]:
    """The attention maps of `prompt` (in the run's tokenizer, as sampling encodes it)
    written under `out_dir` (`write_attention_maps`); returns the head statistics."""
    ids = encode_prompts(exp, [prompt])
    Sampling().check_prompts(ids, exp.config.train.seq_len)
    probs, _ = jax.jit(attention_maps, static_argnums=0)(
        exp.graphdef, split_objective_params(params)[0], jnp.asarray(ids, jnp.int32))
    tok = exp.data.tokenizer
    labels = [tok.decode([i]) for i in ids[0]]
    return write_attention_maps(out_dir, np.asarray(jax.device_get(probs))[:, 0], labels)
