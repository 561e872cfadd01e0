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

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Quant
from jaxlm.losses.objectives import split_objective_params
from jaxlm.models.model import abstract_model, split_params
from jaxlm.models.ptq import quantize_params
from jaxlm.models.quant import tree_bytes
from jaxlm.training.evaluate import evaluate
from jaxlm.training.experiment import Experiment
from jaxlm.training.lora import base_quant
from jaxlm.training.steps import make_eval_step

BITS = {"int8": 8, "int4": 4}


def quant_config_for(exp: Experiment, bits: int, granularity: str | None = None,
                     symmetric: bool | None = None) -> Quant:
    """The run's `quant` settings with `bits` weight bits (overrides optional), checked
    against the model's matrices."""
    values = exp.config.quant.to_dict()
    values["weight_bits"] = bits
    if granularity:
        values["granularity"] = granularity
    if symmetric is not None:
        values["symmetric"] = symmetric
    quant = Quant.parse(values)
    quant.check_divides(exp.config.model)
    return quant


def quantize_run_params(exp: Experiment, params: Any, quant: Quant) -> tuple[Any, Any]:
    """(graphdef of the model with `quant`, params with integer weights), on the run's mesh."""
    model = abstract_model(dataclasses.replace(exp.model_cfg, quant=quant))
    graphdef, _ = split_params(model)
    model_params, _ = split_objective_params(params)
    qparams = jax.jit(lambda p: quantize_params(model, p, quant))(model_params)
    return graphdef, qparams


def evaluate_quantized(exp: Experiment, params: Any, quantize: str,
                       granularity: str | None = None, symmetric: bool | None = None
                       ) -> dict[str, Any]:
    """Eval loss with real `int8`/`int4` weights, and the bytes of the weights."""
    if base_quant(exp.config) is not None:
        raise ConfigError("quantize", f"the run's frozen base is already int"
                                      f"{exp.config.quant.weight_bits} (QLoRA); evaluate it "
                                      "without --quantize")
    quant = quant_config_for(exp, BITS[quantize], granularity, symmetric)
    graphdef, qparams = quantize_run_params(exp, params, quant)
    eval_step = jax.jit(make_eval_step(graphdef, exp.model_cfg, exp.mesh, exp.rules))
    result = evaluate(exp, qparams, eval_step=eval_step)
    return {**result, "quantize": quantize, "granularity": quant.granularity,
            "symmetric": quant.symmetric, "activation_bits": quant.activation_bits,
            "weight_bytes": tree_bytes(qparams),
            "float_weight_bytes": tree_bytes(split_objective_params(params)[0])}
