"""The model's resolved hyper-parameters: the typed `model` section as it is, plus what the
data (vocabulary), the training sequence length (MoE capacity groups), the layout
(pipeline schedule), the `quant` and the `lora` sections decide. Every key and default
lives in `configs/sections.py`; this holds only what is derived from them."""

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxlm.configs import keys
from jaxlm.configs.sections import Lora, Model, Quant, RopeScaling

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model: Model
    vocab_size: int  # model.vocab_size or the data's; logits beyond it are masked
    # The training sequence length (train.seq_len): capacity groups keep their sequences
    # when the layer sees fewer tokens per sequence (decoding); 0 = the tokens it sees.
    seq_len: int = 0
    # Set from the mesh and the pipeline section by the experiment.
    pipeline_stages: int = 1
    pipeline_microbatches: int = 1
    pipeline_repeats: int = 1
    quant: Quant | None = None  # fake-quantized weights/activations (QAT); None = float
    lora: Lora | None = None  # low-rank adapters; None = none

    @classmethod
    def from_section(cls, model: Model, data_vocab_size: int, quant: Quant | None = None,
                     lora: Lora | None = None, seq_len: int = 0, pipeline_stages: int = 1,
                     pipeline_microbatches: int = 1, pipeline_repeats: int = 1
                     ) -> "ModelConfig":
        """The model of a run: the data's vocabulary unless `model.vocab_size` is set;
        `quant` and `lora` apply when they are enabled."""
        return cls(model=model, vocab_size=model.vocab_size or data_vocab_size,
                   seq_len=seq_len, pipeline_stages=pipeline_stages,
                   pipeline_microbatches=pipeline_microbatches,
                   pipeline_repeats=pipeline_repeats,
                   quant=quant if quant is not None and quant.enabled else None,
                   lora=lora if lora is not None and lora.rank else None)

    @property
    def padded_vocab(self) -> int:
        """Embedding/logit rows: the vocabulary rounded up to a multiple of vocab_multiple."""
        multiple = self.model.vocab_multiple
        return -(-self.vocab_size // multiple) * multiple

    @property
    def head_dim(self) -> int:
        return self.model.resolved_head_dim

    @property
    def expert_d_ff(self) -> int:
        """The hidden width of one expert."""
        return self.model.moe.d_ff or self.model.d_ff

    @property
    def compute_dtype(self) -> jnp.dtype:
        return DTYPES[self.model.dtype]

    @property
    def rope_scaling(self) -> RopeScaling | None:
        """Llama 3 RoPE scaling parameters, or None for plain RoPE."""
        scaling = self.model.rope_scaling
        return None if scaling.type == "none" else scaling

    def adapter(self, projection: str) -> Lora | None:
        """The adapter of a projection (q, k, v, o, gate, up, down), or None."""
        if self.lora is None or projection not in self.lora.targets:
            return None
        return self.lora

    @property
    def stochastic(self) -> bool:
        """Whether training draws random numbers: dropout, router jitter, adapter dropout."""
        m, adapters = self.model, self.lora
        return m.dropout > 0 or m.moe.jitter > 0 or bool(adapters and adapters.dropout > 0)

    @property
    def window(self) -> int | None:
        """The sliding attention window, or None."""
        return self.model.sliding_window or None

    @property
    def layers_per_unit(self) -> int:
        """Layers in one scanned unit: k when every k-th layer is MoE, else 1."""
        every = self.model.moe.every
        return every if self.model.moe.num_experts and every > 1 else 1

    @property
    def num_units(self) -> int:
        return self.model.num_layers // self.layers_per_unit

    def moe_group_rows(self, length: int) -> int:
        """Sequences of `length` tokens per capacity group: > 1 only for capacity dispatch
        with groups of several whole sequences. Batch splits (gradient accumulation and
        pipeline micro-batches) move blocks of this many rows, so groups stay whole."""
        moe = self.model.moe
        if not moe.num_experts or moe.capacity_factor <= 0:
            return 1
        return max(1, moe.group_size // (self.seq_len or length))

    def is_moe_layer(self, index_in_unit: int) -> bool:
        """Within a unit of k layers, the last one is the MoE layer."""
        return bool(self.model.moe.num_experts) and index_in_unit == self.layers_per_unit - 1

    def replace_model(self, **values: object) -> "ModelConfig":
        """A copy with keys of the `model` section replaced (nested sections as dicts,
        e.g. `moe={"top_k": 1}`), validated again."""
        merged = self.model.model_dump()
        for key, value in values.items():
            merged[key] = {**merged[key], **value} if isinstance(value, dict) else value
        return dataclasses.replace(self, model=Model.parse(merged))


def first_model_difference(a: Model, b: Model) -> tuple[str, Any, Any] | None:
    """(dotted key, a's value, b's value) of the first architecture key that differs."""
    for key in keys.flat_keys(a):
        if key in Model.EXECUTION_KEYS:
            continue
        va, vb = keys.get(a, key), keys.get(b, key)
        if not hasattr(va, "model_fields") and va != vb:
            return key, va, vb
    return None
