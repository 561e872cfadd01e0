"""Decoder-only Transformer: pre-norm blocks stacked on a `layers` axis and run by scan.

The scanned unit is one block, or, when every k-th layer is a Mixture-of-Experts layer,
a group of k blocks (k-1 dense, then one MoE), so the scan stays uniform.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.models.attention import Attention
from jaxlm.models.config import ModelConfig
from jaxlm.models.layers import MLP, Embed, Linear, PositionEmbed, dropout, make_norm, residual_std
from jaxlm.models.moe import MoE, load_balance_loss
from jaxlm.parallel.context import default_positions
from jaxlm.parallel.pipeline import pipeline_layers
from jaxlm.parallel.sharding import constrain

ACT_BxLxD = ("act_batch", "act_len", "act_embed")

_REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "full": None,  # save nothing: recompute the whole block
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Output(NamedTuple):
    logits: jax.Array  # [B, L, padded_vocab], float32
    cache: dict[str, jax.Array] | None = None  # stacked over layers
    hidden: jax.Array | None = None  # [units, B, L, D] unit outputs, if asked for
    # MoE routing statistics averaged over MoE layers (empty for dense models):
    # load_balance, z_loss, router_entropy, drop_fraction, load [E].
    aux: dict[str, jax.Array] | None = None


class Block(nnx.Module):
    """x + Attn(Norm(x)), then x + MLP(Norm(x)); Norm is RMSNorm or LayerNorm."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, moe: bool = False):
        dtype, m = cfg.compute_dtype, cfg.model
        out_std = residual_std(m.init_std, m.num_layers)
        self.dropout = m.dropout
        self.moe = moe
        self.attn_norm = make_norm(m.norm, m.d_model, eps=m.norm_eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(cfg, std=m.init_std, out_std=out_std, rngs=rngs)
        self.mlp_norm = make_norm(m.norm, m.d_model, eps=m.norm_eps, dtype=dtype, rngs=rngs)
        if moe:
            self.mlp = MoE(cfg, std=m.init_std, out_std=out_std, rngs=rngs)
        else:
            self.mlp = MLP(m.d_model, m.d_ff, m.mlp, std=m.init_std, out_std=out_std,
                           dtype=dtype, rngs=rngs, bias=m.mlp_bias, lora=cfg.adapter)

    def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array, *,
                 segment_ids_BxL: jax.Array | None = None,
                 cache: dict[str, jax.Array] | None = None,
                 cache_index: jax.Array | None = None,
                 kv_valid_BxS: jax.Array | None = None,
                 dropout_key: jax.Array | None = None):
        keys = (None,) * 3 if dropout_key is None else jax.random.split(dropout_key, 3)
        # The adapters' dropout keys are folded in, so the other keys stay as they were.
        lora_keys = (None, None) if dropout_key is None else (
            jax.random.fold_in(dropout_key, 3), jax.random.fold_in(dropout_key, 4))
        h, new_cache = self.attn(self.attn_norm(x_BxLxD), positions_BxL,
                                 segment_ids_BxL=segment_ids_BxL, cache=cache,
                                 cache_index=cache_index, kv_valid_BxS=kv_valid_BxS,
                                 lora_key=lora_keys[0])
        x_BxLxD = x_BxLxD + dropout(h, self.dropout, keys[0])
        aux = {}
        if self.moe:
            h, stats = self.mlp(self.mlp_norm(x_BxLxD), jitter_key=keys[2])
            aux = {"load_balance": load_balance_loss(stats["load"], stats["mean_prob"]),
                   "z_loss": stats["z_loss"], "router_entropy": stats["router_entropy"],
                   "drop_fraction": stats["drop_fraction"], "load": stats["load"]}
        else:
            h = self.mlp(self.mlp_norm(x_BxLxD), lora_keys[1])
        x_BxLxD = x_BxLxD + dropout(h, self.dropout, keys[1])
        return constrain(x_BxLxD, ACT_BxLxD), new_cache, aux


class BlockGroup(nnx.Module):
    """k consecutive blocks, the last one MoE: the scanned unit when `model.moe.every = k > 1`."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.size = cfg.layers_per_unit
        for i in range(self.size):
            setattr(self, f"layer_{i}", Block(cfg, rngs, moe=cfg.is_moe_layer(i)))

    def __call__(self, x_BxLxD, positions_BxL, *, segment_ids_BxL=None, cache=None,
                 cache_index=None, kv_valid_BxS=None, dropout_key=None):
        caches, aux = [], {}
        for i in range(self.size):
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
            layer_cache = None if cache is None else jax.tree.map(lambda a: a[i], cache)
            x_BxLxD, c, a = getattr(self, f"layer_{i}")(
                x_BxLxD, positions_BxL, segment_ids_BxL=segment_ids_BxL, cache=layer_cache,
                cache_index=cache_index, kv_valid_BxS=kv_valid_BxS, dropout_key=key)
            caches.append(c)
            aux.update(a)
        new_cache = None if cache is None else jax.tree.map(lambda *c: jnp.stack(c), *caches)
        return x_BxLxD, new_cache, aux


class Transformer(nnx.Module):
    """Token embedding (+ learned positions) -> `num_layers` blocks -> norm -> logits."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, m = cfg.compute_dtype, cfg.model
        self.embed = Embed(cfg.padded_vocab, m.d_model, std=m.init_std, dtype=dtype, rngs=rngs)
        if m.position == "learned":
            self.pos_embed = PositionEmbed(m.max_positions, m.d_model, std=m.init_std,
                                           dtype=dtype, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_units)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> nnx.Module:
            if cfg.layers_per_unit > 1:
                return BlockGroup(cfg, rngs)
            return Block(cfg, rngs, moe=cfg.is_moe_layer(0))

        self.blocks = make_blocks(rngs)
        self.final_norm = make_norm(m.norm, m.d_model, eps=m.norm_eps, dtype=dtype, rngs=rngs)
        if not m.tie_embeddings:
            self.lm_head = Linear((m.d_model,), (cfg.padded_vocab,), ("embed", "vocab"),
                                  std=m.init_std, dtype=dtype, rngs=rngs)

    def __call__(self, tokens_BxL: jax.Array, *, positions_BxL: jax.Array | None = None,
                 segment_ids_BxL: jax.Array | None = None,
                 cache: dict[str, jax.Array] | None = None,
                 cache_index: jax.Array | None = None,
                 kv_valid_BxS: jax.Array | None = None,
                 dropout_key: jax.Array | None = None,
                 return_hidden: bool = False) -> Output:
        b, length = tokens_BxL.shape
        if positions_BxL is None:  # 0..L-1, in the layout's order when the sequence is split
            positions_BxL = default_positions(b, length)
        x = self.embed_tokens(tokens_BxL, positions_BxL)
        if dropout_key is not None:
            emb_key, dropout_key = jax.random.split(dropout_key)
            x = dropout(x, self.cfg.model.dropout, emb_key)

        def layer(x, block_state, layer_cache, layer_index, rows, key):
            """One block; `rows` holds per-row inputs (split with x by the pipeline)."""
            block = nnx.merge(self.blocks_graphdef, block_state)
            key = None if key is None else jax.random.fold_in(key, layer_index)
            return block(x, rows["positions"], segment_ids_BxL=rows.get("segment_ids"),
                         cache=layer_cache, cache_index=cache_index,
                         kv_valid_BxS=kv_valid_BxS, dropout_key=key)

        rows = {"positions": positions_BxL}
        if segment_ids_BxL is not None:
            rows["segment_ids"] = segment_ids_BxL
        k = self.cfg.layers_per_unit
        if cache is not None and k > 1:  # [L, ...] -> [units, k, ...]
            cache = jax.tree.map(lambda a: a.reshape(-1, k, *a.shape[1:]), cache)
        x, new_cache, hidden, aux = run_layers(self.blocks, layer, x, rows, dropout_key, cache,
                                               self.cfg, return_hidden=return_hidden)
        if new_cache is not None and k > 1:
            new_cache = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), new_cache)
        return Output(logits=self.head(x), cache=new_cache, hidden=hidden, aux=aux)

    def embed_tokens(self, tokens_BxL: jax.Array, positions_BxL: jax.Array) -> jax.Array:
        """The first block's input: token embeddings (+ learned position embeddings)."""
        x = self.embed(tokens_BxL)
        if self.cfg.model.position == "learned":
            x = x + self.pos_embed(positions_BxL)
        return constrain(x, ACT_BxLxD)

    def head(self, x_BxLxD: jax.Array) -> jax.Array:
        """Float32 logits of the last block's output: final norm, then the LM head."""
        x = self.final_norm(x_BxLxD)
        if self.cfg.model.tie_embeddings:
            logits = self.embed.attend(x)
        else:
            logits = self.lm_head(x)
        return constrain(logits.astype(jnp.float32), ("act_batch", "act_len", "act_vocab"))

    @property
    def blocks_graphdef(self) -> nnx.GraphDef:
        return nnx.graphdef(self.blocks)


def run_layers(blocks: nnx.Module, layer: Callable[..., Any], x: jax.Array,
               rows: dict[str, jax.Array], key: jax.Array | None,
               cache: dict[str, jax.Array] | None, cfg: ModelConfig, *,
               return_hidden: bool = False):
    """Apply the stacked units in order: `lax.scan` over the layers axis, unrolled, or
    pipelined over stages when `cfg.pipeline_stages > 1`.

    All read the same stacked parameters, so checkpoints do not depend on the choice.
    Returns (x, new cache, hidden states, aux averaged over units).
    """
    state = nnx.state(blocks)
    if cfg.model.remat != "none":
        layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[cfg.model.remat],
                               prevent_cse=not cfg.model.scan_layers)
    mean = lambda a: jnp.mean(a, axis=0)  # noqa: E731
    if cfg.pipeline_stages > 1:
        if cache is not None or return_hidden:
            raise ValueError("pipelined layers support training and evaluation only "
                             "(no KV cache, no hidden states); restore on a mesh without "
                             "pipeline parallelism to decode")
        x, aux = pipeline_layers(layer, state, x, rows, key, cfg)
        return x, None, None, aux

    if cfg.model.scan_layers:
        def body(x, xs):
            block_state, layer_cache, index = xs
            x, new_cache, aux = layer(x, block_state, layer_cache, index, rows, key)
            return x, (new_cache, x if return_hidden else None, aux)

        x, (new_cache, hidden, aux) = jax.lax.scan(
            body, x, (state, cache, jnp.arange(cfg.num_units)))
        return x, new_cache, hidden, jax.tree.map(mean, aux)

    caches, hiddens, auxes = [], [], []
    for i in range(cfg.num_units):
        pick = lambda a, i=i: a[i]  # noqa: E731
        x, new_cache, aux = layer(x, jax.tree.map(pick, state),
                                  None if cache is None else jax.tree.map(pick, cache), i,
                                  rows, key)
        caches.append(new_cache)
        hiddens.append(x)
        auxes.append(aux)
    stack = lambda *xs: jnp.stack(xs)  # noqa: E731
    new_cache = None if cache is None else jax.tree.map(stack, *caches)
    hidden = jnp.stack(hiddens) if return_hidden else None
    return x, new_cache, hidden, jax.tree.map(lambda *a: mean(jnp.stack(a)), *auxes)
