"""Post-training quantization of a run's checkpoint, and evaluation with real integer weights.

`quantize_run_params` turns every weight matrix of a float (or QAT) checkpoint into
integers plus scales (`models.quant.QTensor`: int8, or int4 packed two per byte) with
the run's `quant` settings (granularity, symmetric, activation bits) and the requested
bit width. `evaluate_quantized` runs the validation split with those weights: they stay
integers in device memory and are dequantized inside the jitted step, matrix by matrix
(weight-only storage; activations are fake-quantized when `quant.activation_bits` is
set, as in training). Norm scales stay float32.
"""

import dataclasses
from typing import Any

import jax
from ml_collections import ConfigDict

from configs.errors import ConfigError
from losses.objectives import split_objective_params
from models import abstract_model, split_params
from models.quant import QuantConfig, check_quant_config, quantize_params, tree_bytes
from training.experiment import Experiment
from training.steps import make_eval_step

BITS = {"int8": 8, "int4": 4}


def quant_config_for(exp: Experiment, bits: int, granularity: str | None = None,
                     symmetric: bool | None = None) -> QuantConfig:
    """The run's `quant` settings with `bits` weight bits (overrides optional)."""
    q = ConfigDict(exp.config.quant.to_dict())
    q.weight_bits = bits
    if granularity:
        q.granularity = granularity
    if symmetric is not None:
        q.symmetric = symmetric
    m = exp.model_cfg
    check_quant_config(q, {"embed": m.d_model, "attn.o": m.num_heads * m.head_dim,
                           "mlp.down": m.d_ff})
    return QuantConfig.from_config(q)


def quantize_run_params(exp: Experiment, params: Any, qcfg: QuantConfig
                        ) -> tuple[Any, Any]:
    """(graphdef of the model with `qcfg`, params with integer weights), on the run's mesh."""
    model = abstract_model(dataclasses.replace(exp.model_cfg, quant=qcfg))
    graphdef, _ = split_params(model)
    model_params, _ = split_objective_params(params)
    qparams = jax.jit(lambda p: quantize_params(model, p, qcfg))(model_params)
    return graphdef, qparams


def evaluate_quantized(exp: Experiment, params: Any, quantize: str,
                       granularity: str | None = None, symmetric: bool | None = None
                       ) -> dict[str, Any]:
    """Eval loss with real `int8`/`int4` weights, and the bytes of the weights."""
    from training.evaluate import evaluate  # noqa: PLC0415 (import cycle)
    if quantize not in BITS:
        raise ConfigError("quantize", f"unknown value {quantize!r}; choose one of "
                                      f"{sorted(BITS)}")
    qcfg = quant_config_for(exp, BITS[quantize], granularity, symmetric)
    graphdef, qparams = quantize_run_params(exp, params, qcfg)
    eval_step = jax.jit(make_eval_step(graphdef, exp.model_cfg, exp.mesh, exp.rules))
    result = evaluate(exp, qparams, eval_step=eval_step)
    return {**result, "quantize": quantize, "granularity": qcfg.granularity,
            "symmetric": qcfg.symmetric, "activation_bits": qcfg.activation_bits,
            "weight_bytes": tree_bytes(qparams),
            "float_weight_bytes": tree_bytes(split_objective_params(params)[0])}
