"""Decoder-only Transformer: pre-norm blocks stacked on a `layers` axis and run by scan."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import Attention
from models.config import ModelConfig
from models.layers import MLP, Embed, Linear, RMSNorm, residual_std
from parallel.sharding import constrain

ACT_BxLxD = ("act_batch", "act_len", "act_embed")

_REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "full": None,  # save nothing: recompute the whole block
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Output(NamedTuple):
    logits: jax.Array  # [B, L, padded_vocab], float32
    cache: dict[str, jax.Array] | None = None  # stacked over layers
    hidden: jax.Array | None = None  # [layers, B, L, D] block outputs, if asked for


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Block(nnx.Module):
    """x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dtype = cfg.compute_dtype
        out_std = residual_std(cfg.init_std, cfg.num_layers)
        self.dropout = cfg.dropout
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                              rope_theta=cfg.rope_theta, impl=cfg.attention_impl,
                              std=cfg.init_std, out_std=out_std, dtype=dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.mlp, std=cfg.init_std, out_std=out_std,
                       dtype=dtype, rngs=rngs)

    def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array, *,
                 segment_ids_BxL: jax.Array | None = None,
                 cache: dict[str, jax.Array] | None = None,
                 cache_index: jax.Array | None = None,
                 kv_valid_BxS: jax.Array | None = None,
                 dropout_key: jax.Array | None = None):
        keys = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        h, new_cache = self.attn(self.attn_norm(x_BxLxD), positions_BxL,
                                 segment_ids_BxT=segment_ids_BxL, cache=cache,
                                 cache_index=cache_index, kv_valid_BxS=kv_valid_BxS)
        x_BxLxD = x_BxLxD + dropout(h, self.dropout, keys[0])
        h = self.mlp(self.mlp_norm(x_BxLxD))
        x_BxLxD = x_BxLxD + dropout(h, self.dropout, keys[1])
        return constrain(x_BxLxD, ACT_BxLxD), new_cache


class Transformer(nnx.Module):
    """Token embedding -> `num_layers` blocks -> RMSNorm -> logits."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = cfg.compute_dtype
        self.embed = Embed(cfg.padded_vocab, cfg.d_model, std=cfg.init_std, dtype=dtype,
                           rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = Linear((cfg.d_model,), (cfg.padded_vocab,), ("embed", "vocab"),
                                  std=cfg.init_std, dtype=dtype, rngs=rngs)

    def __call__(self, tokens_BxL: jax.Array, *, positions_BxL: jax.Array | None = None,
                 segment_ids_BxL: jax.Array | None = None,
                 cache: dict[str, jax.Array] | None = None,
                 cache_index: jax.Array | None = None,
                 kv_valid_BxS: jax.Array | None = None,
                 dropout_key: jax.Array | None = None,
                 return_hidden: bool = False) -> Output:
        b, length = tokens_BxL.shape
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(length)[None], (b, length))
        x = constrain(self.embed(tokens_BxL), ACT_BxLxD)
        if dropout_key is not None:
            emb_key, dropout_key = jax.random.split(dropout_key)
            x = dropout(x, self.cfg.dropout, emb_key)

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
        x, new_cache, hidden = run_layers(self.blocks, layer, x, rows, dropout_key, cache,
                                          self.cfg, return_hidden=return_hidden)
        x = self.final_norm(x)
        if self.cfg.tie_embeddings:
            logits = self.embed.attend(x)
        else:
            logits = self.lm_head(x)
        logits = constrain(logits.astype(jnp.float32), ("act_batch", "act_len", "act_vocab"))
        return Output(logits=logits, cache=new_cache, hidden=hidden)

    @property
    def blocks_graphdef(self) -> nnx.GraphDef:
        return nnx.graphdef(self.blocks)


def run_layers(blocks: nnx.Module, layer: Callable[..., Any], x: jax.Array,
               rows: dict[str, jax.Array], key: jax.Array | None,
               cache: dict[str, jax.Array] | None, cfg: ModelConfig, *,
               return_hidden: bool = False):
    """Apply the stacked blocks in order: `lax.scan` over the layers axis, unrolled, or
    pipelined over stages when `cfg.pipeline_stages > 1`.

    All read the same stacked parameters, so checkpoints do not depend on the choice.
    """
    state = nnx.state(blocks)
    if cfg.remat != "none":
        layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[cfg.remat],
                               prevent_cse=not cfg.scan_layers)
    if cfg.pipeline_stages > 1:
        if cache is not None or return_hidden:
            raise ValueError("pipelined layers support training and evaluation only "
                             "(no KV cache, no hidden states); restore on a mesh without "
                             "pipeline parallelism to decode")
        from parallel.pipeline import pipeline_layers
        return pipeline_layers(layer, state, x, rows, key, cfg), None, None

    if cfg.scan_layers:
        def body(x, xs):
            block_state, layer_cache, index = xs
            x, new_cache = layer(x, block_state, layer_cache, index, rows, key)
            return x, (new_cache, x if return_hidden else None)

        x, (new_cache, hidden) = jax.lax.scan(
            body, x, (state, cache, jnp.arange(cfg.num_layers)))
        return x, new_cache, hidden

    caches, hiddens = [], []
    for i in range(cfg.num_layers):
        pick = lambda a, i=i: a[i]  # noqa: E731
        x, new_cache = layer(x, jax.tree.map(pick, state),
                             None if cache is None else jax.tree.map(pick, cache), i, rows, key)
        caches.append(new_cache)
        hiddens.append(x)
    stack = lambda *xs: jnp.stack(xs)  # noqa: E731
    new_cache = None if cache is None else jax.tree.map(stack, *caches)
    hidden = jnp.stack(hiddens) if return_hidden else None
    return x, new_cache, hidden
