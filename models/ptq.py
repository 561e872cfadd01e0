"""Post-training quantization of a model's parameters: every weight matrix becomes integers
plus scales (`models.quant.QTensor`), module by module."""

from typing import Any

import jax
from flax import nnx

from configs.sections import Quant
from models.layers import Embed, Linear
from models.quant import quantize_matrix


def quantize_params(model: nnx.Module, params: dict[str, Any], cfg: Quant
                    ) -> dict[str, Any]:
    """Post-training quantization: every quantizable weight of `params` becomes a QTensor.

    `model` (abstract is fine) tells which parameters are weights and their layout;
    stacked layers are quantized layer by layer. Other parameters (norms) stay float32.
    """
    out = jax.tree.map(lambda x: x, params)  # a copy of the nested dicts

    def put(path, value):
        node = out
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value

    def get(path):
        node = params
        for p in path:
            node = node[p]
        return node

    for path, module in model.iter_modules():
        if isinstance(module, Linear):
            var, name, in_ndim = module.kernel, "kernel", module.in_ndim
        elif isinstance(module, Embed):
            var, name, in_ndim = module.embedding, "embedding", None
        else:
            continue
        stacked = var.get_metadata().get("out_sharding", (None,))[0] == "layers"
        w = get((*path, name))

        def one(w, in_ndim=in_ndim):
            if in_ndim is None:  # embedding [V, D]: scales over D
                return quantize_matrix(w.T, cfg, shape=w.shape)
            i = 1
            for d in w.shape[:in_ndim]:
                i *= d
            return quantize_matrix(w.reshape(i, -1), cfg, shape=w.shape)

        put((*path, name), jax.vmap(one)(w) if stacked else one(w))
    return out
