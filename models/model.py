"""Building the model (a decoder-only Transformer, dense or Mixture-of-Experts, in Flax NNX)
and handling its parameters.

Training code handles parameters as a pure pytree (nested dicts of arrays) and rebuilds
the module with `nnx.merge(graphdef, params)` inside jitted functions.

Shape suffixes. Array names end in their shape, one letter per axis (`x_BxLxD` is
[batch, length, d_model]); each letter means one thing everywhere in the code:

  B  batch (sequences)                  H  query heads
  L  length: query or token positions   G  KV heads (groups of query heads)
  S  key/value length (cache slots)     R  query heads per KV head (H / G)
  D  d_model (residual width)           K  head dimension (per-head key/value size)
  F  MLP hidden width (d_ff)            V  vocabulary (padded)
  E  experts                            A  experts per token (top-k assignments)
  C  expert capacity (slots)            T  tokens of a flattened batch (B * L)
  N  rows of a flattened matrix (tokens, or token-expert pairs after dispatch)
  P  capacity groups (MoE)              Q  token places in a capacity group
  I  input features of a weight matrix  O  output features of a weight matrix
  U  stacked layer units (the scanned axis)
"""

import math
from typing import Any

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxlm.models.config import ModelConfig
from jaxlm.models.quant import QTensor, set_quant
from jaxlm.models.transformer import Transformer


def create_model(cfg: ModelConfig, seed: int) -> Transformer:
    model = Transformer(cfg, rngs=nnx.Rngs(params=seed))
    if cfg.quant is not None:
        set_quant(model, cfg.quant)
    return model


def abstract_model(cfg: ModelConfig) -> Transformer:
    """The model with ShapeDtypeStructs for parameters: nothing is allocated."""
    return nnx.eval_shape(lambda: create_model(cfg, 0))


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, dict[str, Any]]:
    """(graphdef, params as a pure nested dict)."""
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def abstract_params(cfg: ModelConfig) -> tuple[nnx.GraphDef, dict[str, Any], dict[str, Any]]:
    """(graphdef, parameter ShapeDtypeStructs, their logical PartitionSpecs): no allocation."""
    model = abstract_model(cfg)
    graphdef, params = split_params(model)
    return graphdef, params, param_logical_axes(model)


def param_logical_axes(model: nnx.Module) -> dict[str, Any]:
    """A pytree like `split_params(model)[1]` of PartitionSpecs of logical axis names."""
    state = nnx.state(model)
    specs = jax.tree.map(lambda v: P(*v.get_metadata()["out_sharding"]), state,
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(specs)


def count_params(params: Any) -> int:
    """Parameters of a tree; an integer (QTensor) matrix counts as the float one it
    stands for."""
    def count(x: Any) -> int:
        if isinstance(x, QTensor):
            return math.prod(x.qvalue.shape[:-2]) * math.prod(x.shape)
        return math.prod(x.shape)
    return sum(count(x) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QTensor)))


def active_params(cfg: ModelConfig, total: int) -> int:
    """Parameters used per token: all, minus the routed experts a token does not visit."""
    if not cfg.model.moe.num_experts:
        return total
    per_expert = cfg.model.d_model * cfg.expert_d_ff * (3 if cfg.model.mlp == "swiglu" else 2)
    moe_layers = cfg.model.num_layers // cfg.layers_per_unit
    return total - moe_layers * (cfg.model.moe.num_experts - cfg.model.moe.top_k) * per_expert
