"""LoRA adapters in a parameter tree: telling them from the base weights, and merging them
into the base (`kernel + scale * A B`) for a plain model.

A Linear with an adapter holds `lora_a` [in..., r] and `lora_b` [r, out...] beside its
`kernel` (`models.layers.Linear`); every other parameter is the base. Parameter trees are
nested dicts; a stacked (`layers`) parameter has one more leading axis.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.models.layers import LORA_A, LORA_B, Linear, subtree, weight_matrices
from jaxlm.models.quant import QTensor

ADAPTER_KEYS = (LORA_A, LORA_B)


def split_adapters(tree: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the adapter leaves, every other leaf): two nested dicts without empty branches.

    Works for any tree shaped like the parameters (values, shapes, logical axes)."""
    adapters: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            a, r = split_adapters(value)
            if a:
                adapters[key] = a
            if r:
                rest[key] = r
        elif key in ADAPTER_KEYS:
            adapters[key] = value
        else:
            rest[key] = value
    return adapters, rest


def join_trees(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The union of two nested dicts with disjoint leaves (inverse of `split_adapters`)."""
    out = dict(a)
    for key, value in b.items():
        if key in out and isinstance(value, dict):
            out[key] = join_trees(out[key], value)
        else:
            out[key] = value
    return out


def _float(w: Any, stacked: bool) -> jax.Array:
    """A kernel as float32 in its own shape ([layers] + kernel shape if stacked)."""
    if not isinstance(w, QTensor):
        return w
    mat = w.dequantize(jnp.float32)
    return mat.reshape((mat.shape[0],) * stacked + tuple(w.shape))


def merge_adapters(model: nnx.Module, params: dict[str, Any]) -> dict[str, Any]:
    """The parameters of the same model without adapters, computing the same function:
    each adapted kernel becomes `kernel + scale * A B`, integer (QLoRA) weights become
    float32. `model` (abstract is fine) is the model with adapters."""
    out = jax.tree.map(lambda x: x, params, is_leaf=lambda x: isinstance(x, QTensor))
    for path, module, name, stacked in weight_matrices(model):
        here = subtree(out, path)
        w = here[name]
        if isinstance(w, QTensor) and name == "embedding":
            w = w.dequantize(jnp.float32)
            w = jnp.swapaxes(w, -1, -2)  # stored as [D, V] (scales over D)
        else:
            w = _float(w, stacked)
        if isinstance(module, Linear) and module.lora is not None:
            a, b = here.pop(LORA_A), here.pop(LORA_B)
            r, lead = module.lora.rank, w.shape[:1] if stacked else ()
            a_IxR = a.reshape(*lead, -1, r).astype(jnp.float32)
            b_RxO = b.reshape(*lead, r, -1).astype(jnp.float32)
            delta = jnp.einsum("...ir,...ro->...io", a_IxR, b_RxO) * module.lora.scale
            w = w + delta.reshape(w.shape)
        here[name] = w
    return out
