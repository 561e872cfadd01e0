"""Post-training quantization of a model's parameters: every weight matrix becomes integers
plus scales (`models.quant.QTensor`), module by module."""

from typing import Any

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxlm.configs.sections import Quant
from jaxlm.models.layers import Linear, subtree, weight_matrices
from jaxlm.models.quant import NF4Tensor, QTensor, quantize_matrix


def quantize_params(model: nnx.Module, params: dict[str, Any], cfg: Quant
                    ) -> dict[str, Any]:
    """Post-training quantization: every quantizable weight of `params` becomes a QTensor.

    `model` (abstract is fine) tells which parameters are weights and their layout;
    stacked layers are quantized layer by layer. Other parameters (norms) stay float32.
    """
    out = jax.tree.map(lambda x: x, params)  # a copy of the nested dicts
    for path, module, name, stacked in weight_matrices(model):
        in_ndim = module.in_ndim if isinstance(module, Linear) else None
        node = subtree(out, path)
        w = node[name]

        def one(w, in_ndim=in_ndim):
            if in_ndim is None:  # embedding [V, D]: scales over D
                return quantize_matrix(w.T, cfg, shape=w.shape)
            i = 1
            for d in w.shape[:in_ndim]:
                i *= d
            return quantize_matrix(w.reshape(i, -1), cfg, shape=w.shape)

        node[name] = jax.vmap(one)(w) if stacked else one(w)
    return out


def quantized_axes(model: nnx.Module, axes: dict[str, Any], cfg: Quant) -> dict[str, Any]:
    """The logical axes of `quantize_params`'s output, from the float parameters' `axes`.

    A quantized matrix is [I, O] (int4: [I/2, O]): its integers take the first input and
    the first output axis name of the kernel, its scales (and zero points) [groups, O] the
    output axis name (none per tensor); NF4's second-level scales and offset are small and
    replicated; a stacked `layers` axis stays first."""
    out = jax.tree.map(lambda x: x, axes, is_leaf=lambda x: isinstance(x, P))
    for path, module, name, _ in weight_matrices(model):
        in_ndim = module.in_ndim if isinstance(module, Linear) else None
        node = subtree(out, path)
        spec = tuple(node[name])
        lead = spec[:1] if spec and spec[0] == "layers" else ()
        dims = spec[len(lead):]
        if in_ndim is None:  # [V, D] stored transposed: [D, V]
            i_axis, o_axis, shape = dims[1], dims[0], module.embedding.get_value().shape
        else:
            i_axis, o_axis = dims[0], dims[in_ndim]
            shape = module.kernel.get_value().shape[len(lead):]
        scale = P(*lead, None, None if cfg.group_size == -1 else o_axis)
        if cfg.weight_format == "nf4":
            node[name] = NF4Tensor(qvalue=P(*lead, i_axis, o_axis), scale=scale, zero=None,
                                   bits=4, shape=tuple(shape), scale_scale=P(*lead, None),
                                   scale_offset=P(*lead))
            continue
        node[name] = QTensor(qvalue=P(*lead, i_axis, o_axis), scale=scale,
                             zero=None if cfg.symmetric else scale, bits=cfg.weight_bits,
                             shape=tuple(shape))
    return out
