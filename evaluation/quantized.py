"""Post-training quantization of a run's checkpoint, and evaluation with real integer weights.

`quantize_run_params` turns every weight matrix of a float (or QAT) checkpoint into
integers plus scales (`models.quant.QTensor`: int8, or int4 packed two per byte) with
the run's `quant` settings (granularity, symmetric, activation bits) and the requested
bit width. `evaluate_quantized` runs the validation split with those weights: they stay
integers in device memory and are dequantized inside the jitted step, matrix by matrix
(weight-only storage; activations are fake-quantized when `quant.activation_bits` is
set, as in training). Norm scales stay float32. `nf4` stores each weight as the index
of one of the 16 NormalFloat-4 levels, in blocks of 64 inputs (or --quant_granularity)
with double-quantized absmax scales (`models.quant.NF4Tensor`, QLoRA's format).

`method="gptq"` quantizes the blocks' matrices with GPTQ (`models/gptq.py`) instead of
rounding to nearest, calibrated on `calibration_batches` batches of `train.batch_size`
windows of `train.seq_len` tokens, spread evenly over the run's training split (over each
mixture source by its weight) or over `calibration_data` (a text's tokens, or a prepared
set's split). The windows do not overlap: a set too short for them is refused.
"""

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Quant
from jaxlm.losses.objectives import split_objective_params
from jaxlm.data.pipeline import TokenData
from jaxlm.models.gptq import GptqSettings, gptq_params
from jaxlm.models.model import abstract_model, count_params, split_params
from jaxlm.models.ptq import quantize_params
from jaxlm.models.quant import QTensor, tree_bytes
from jaxlm.training.evaluate import evaluate
from jaxlm.training.experiment import Experiment
from jaxlm.training.lora import base_quant
from jaxlm.training.steps import make_eval_step

BITS = {"int8": 8, "int4": 4, "int3": 3, "nf4": 4}
NF4_BLOCK = "64"  # --quantize=nf4's default inputs per absmax scale (bitsandbytes' default)


def quant_config_for(exp: Experiment, bits: int, granularity: str | None = None,
                     symmetric: bool | None = None, weight_format: str = "int") -> Quant:
    """The run's `quant` settings with `bits` weight bits in `weight_format` (overrides
    optional), checked against the model's matrices."""
    values = exp.config.quant.to_dict()
    values["weight_bits"] = bits
    values["weight_format"] = weight_format
    if granularity:
        values["granularity"] = granularity
    if symmetric is not None:
        values["symmetric"] = symmetric
    quant = Quant.parse(values)
    quant.check_divides(exp.config.model)
    return quant


def quantize_run_params(exp: Experiment, params: Any, quant: Quant,
                        gptq: GptqSettings | None = None, calibration: Any = None
                        ) -> tuple[Any, Any]:
    """(graphdef of the model with `quant`, params with integer weights), on the run's mesh:
    rounded to nearest, or with `gptq` on the `calibration` batches."""
    model = abstract_model(dataclasses.replace(exp.model_cfg, quant=quant))
    graphdef, _ = split_params(model)
    model_params, _ = split_objective_params(params)
    if gptq is None:
        qparams = jax.jit(lambda p: quantize_params(model, p, quant))(model_params)
    else:
        float_quant = Quant.parse({**quant.to_dict(), "weight_bits": 0})
        float_model = abstract_model(dataclasses.replace(exp.model_cfg, quant=(
            float_quant if float_quant.enabled else None)))
        qparams = gptq_params(float_model, model, model_params, calibration, quant, gptq)
    return graphdef, qparams


def calibration_batches(exp: Experiment, count: int, data: TokenData | np.ndarray | None = None,
                        key: str = "calibration_batches") -> list[dict[str, jax.Array]]:
    """`count` batches of `train.batch_size` non-overlapping windows of `train.seq_len`
    tokens, spread evenly over the training split(s) (or `data`), as global arrays."""
    rows, length = exp.config.train.batch_size, exp.config.train.seq_len
    if data is None:
        named = [(n, d.train, w) for n, d, w in exp.data.named() if w > 0]
    else:
        named = [("--data", data if isinstance(data, np.ndarray) else data.val, 1.0)]
    windows = _split_count(count * rows, [w for _, _, w in named])
    starts = []
    for (name, tokens, _), n in zip(named, windows):
        if n and n * length > len(tokens):
            raise ConfigError(key, f"{count} batches of {rows} x {length} tokens need {n} "
                                   f"windows ({n * length:,} tokens) of {name}, which has "
                                   f"{len(tokens):,}; calibrate on fewer batches")
        stride = len(tokens) // n if n else 0
        starts += [(tokens, k * stride) for k in range(n)]
    per = rows // jax.process_count()
    mine = jax.process_index() * per
    batches = []
    for b in range(count):
        chunk = starts[b * rows:(b + 1) * rows][mine:mine + per]
        inputs = np.stack([np.asarray(t[s:s + length]) for t, s in chunk]).astype(np.int32)
        batches.append(exp.to_global({"inputs": inputs}))
    return batches


def _split_count(total: int, weights: list[float]) -> list[int]:
    """`total` split by `weights` (largest remainders get the rest)."""
    w = np.asarray(weights, np.float64) / np.sum(weights)
    counts = np.floor(w * total).astype(int)
    for i in np.argsort(-(w * total - counts), kind="stable")[:total - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def evaluate_quantized(exp: Experiment, params: Any, quantize: str,
                       granularity: str | None = None, symmetric: bool | None = None,
                       gptq: GptqSettings | None = None, calibration_count: int = 0,
                       calibration_data: TokenData | np.ndarray | None = None,
                       save: Callable[[Any, Quant], None] | None = None) -> dict[str, Any]:
    """Eval loss with real `int8`/`int4`/`int3` or `nf4` weights, the bytes of the
    weights and their bits per parameter; with `gptq`, quantized by GPTQ on
    `calibration_count` batches. `save(qparams, quant)` then gets the quantized weights
    and their format (`eval.py --save`)."""
    base = base_quant(exp.config)
    if base is not None:
        held = "nf4" if base.weight_format == "nf4" else f"int{base.weight_bits}"
        what = "frozen base is" if exp.config.lora.rank else "weights are"
        kind = "QLoRA" if exp.config.lora.rank else "a quantized run"
        raise ConfigError("quantize", f"the run's {what} already {held} ({kind}); "
                                      "evaluate it without --quantize")
    if quantize == "nf4":  # blocks of 64 and symmetric, whatever the run's `quant`
        granularity = granularity or NF4_BLOCK
        symmetric = True if symmetric is None else symmetric
    quant = quant_config_for(exp, BITS[quantize], granularity, symmetric,
                             "nf4" if quantize == "nf4" else "int")
    extra: dict[str, Any] = {"quant_method": "rtn" if gptq is None else "gptq"}
    calibration = None
    if gptq is not None:
        calibration = calibration_batches(exp, calibration_count, calibration_data)
        extra.update(calibration_batches=calibration_count, damp=gptq.damp,
                     act_order=gptq.act_order)
    start = time.perf_counter()
    graphdef, qparams = quantize_run_params(exp, params, quant, gptq, calibration)
    jax.block_until_ready(qparams)
    extra["quantize_seconds"] = round(time.perf_counter() - start, 3)
    eval_step = jax.jit(make_eval_step(graphdef, exp.model_cfg, exp.mesh, exp.rules))
    result = evaluate(exp, qparams, eval_step=eval_step)
    if save is not None:
        save(qparams, quant)
    return {**result, "quantize": quantize, **extra, "granularity": quant.granularity,
            "symmetric": quant.symmetric, "activation_bits": quant.activation_bits,
            "bits_per_parameter": round(bits_per_parameter(qparams), 4),
            "weight_bytes": tree_bytes(qparams),
            "float_weight_bytes": tree_bytes(split_objective_params(params)[0])}


def bits_per_parameter(params: Any) -> float:
    """Storage bits per weight of the quantized matrices of `params` (integers or level
    indices, their scales and zero points; the float norms are not counted)."""
    matrices = [x for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QTensor))
                if isinstance(x, QTensor)]
    return 8 * tree_bytes(matrices) / count_params(matrices)
