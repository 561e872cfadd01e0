"""The model's resolved hyper-parameters: the `model` config section plus what the data
(vocabulary), the training sequence length (MoE capacity groups) and the layout (pipeline
schedule) decide."""

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxlm.configs.sections import Lora, Model, Quant
from jaxlm.models.layers import LoraSpec, RopeScaling

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int  # real vocabulary; logits beyond it are masked
    padded_vocab: int  # embedding/logit rows, a multiple of vocab_multiple
    num_layers: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_ff: int
    mlp: str = "gelu"
    dropout: float = 0.0
    tie_embeddings: bool = True
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    dtype: str = "float32"
    attention_impl: str = "xla"
    context_attention: str = "ring"  # ring | allgather, when the sequence is split
    scan_layers: bool = True
    remat: str = "none"
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    position: str = "rope"  # rope | learned
    max_positions: int = 0  # rows of the learned position table
    rope_scaling_type: str = "none"  # none | llama3 (model.rope_scaling.*)
    rope_scaling_factor: float = 8.0
    rope_scaling_low_freq_factor: float = 1.0
    rope_scaling_high_freq_factor: float = 4.0
    rope_scaling_original_max_positions: int = 8192
    attention_bias: str = "none"  # none | qkv | all
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int = 0  # 0 = every earlier position is visible
    # Mixture of experts (model.moe.*); moe_num_experts = 0 is a dense model.
    moe_num_experts: int = 0
    moe_top_k: int = 2
    moe_every: int = 1  # every k-th layer is MoE (the others dense)
    moe_num_shared_experts: int = 0
    moe_d_ff: int = 0  # per expert; 0 = d_ff
    moe_capacity_factor: float = 0.0  # > 0: capacity dispatch; <= 0: dropless
    moe_group_size: int = 0  # tokens per capacity group; 0 = one sequence
    moe_router_order: str = "softmax_topk"
    moe_renormalize: bool = True
    moe_jitter: float = 0.0
    moe_grouped_matmul: str = "auto"  # auto | ragged_dot | blocks (dropless dispatch)
    # The training sequence length (train.seq_len): capacity groups keep their sequences
    # when the layer sees fewer tokens per sequence (decoding); 0 = the tokens it sees.
    seq_len: int = 0
    # Set from the mesh and the pipeline section by the experiment, not by model config.
    pipeline_stages: int = 1
    pipeline_microbatches: int = 1
    pipeline_repeats: int = 1
    quant: Quant | None = None  # fake-quantized weights/activations (QAT); None = float
    # LoRA adapters (the `lora` section): rank 0 = none.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ()

    @property
    def compute_dtype(self) -> jnp.dtype:
        return DTYPES[self.dtype]

    @property
    def rope_scaling(self) -> RopeScaling | None:
        """Llama 3 RoPE scaling parameters, or None for plain RoPE."""
        if self.rope_scaling_type == "none":
            return None
        return RopeScaling(self.rope_scaling_factor, self.rope_scaling_low_freq_factor,
                           self.rope_scaling_high_freq_factor,
                           self.rope_scaling_original_max_positions)

    def lora(self, projection: str) -> LoraSpec | None:
        """The adapter spec of a projection (q, k, v, o, gate, up, down), or None."""
        if not self.lora_rank or projection not in self.lora_targets:
            return None
        return LoraSpec(self.lora_rank, self.lora_alpha, self.lora_dropout)

    @property
    def window(self) -> int | None:
        """The sliding attention window, or None."""
        return self.sliding_window or None

    @property
    def layers_per_unit(self) -> int:
        """Layers in one scanned unit: k when every k-th layer is MoE, else 1."""
        return self.moe_every if self.moe_num_experts and self.moe_every > 1 else 1

    @property
    def num_units(self) -> int:
        return self.num_layers // self.layers_per_unit

    def moe_group_rows(self, length: int) -> int:
        """Sequences of `length` tokens per capacity group: > 1 only for capacity dispatch
        with groups of several whole sequences. Batch splits (gradient accumulation and
        pipeline micro-batches) move blocks of this many rows, so groups stay whole."""
        if not self.moe_num_experts or self.moe_capacity_factor <= 0:
            return 1
        return max(1, self.moe_group_size // (self.seq_len or length))

    def is_moe_layer(self, index_in_unit: int) -> bool:
        """Within a unit of k layers, the last one is the MoE layer."""
        return bool(self.moe_num_experts) and index_in_unit == self.layers_per_unit - 1

    @classmethod
    def from_section(cls, model: Model, data_vocab_size: int, quant: Quant | None = None,
                     lora: Lora | None = None, **overrides: Any) -> "ModelConfig":
        """Resolve derived fields: the vocabulary (padded), head_dim, per-expert d_ff.
        `lora` adds adapters; `overrides` set the others, e.g. `seq_len`."""
        vocab = model.vocab_size or data_vocab_size
        padded = -(-vocab // model.vocab_multiple) * model.vocab_multiple
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: getattr(model, k) for k in type(model).model_fields if k in names}
        for sub in ("moe", "rope_scaling"):
            section = getattr(model, sub)
            kwargs.update({f"{sub}_{k}": getattr(section, k) for k in type(section).model_fields
                           if f"{sub}_{k}" in names})
        kwargs["moe_d_ff"] = model.moe.d_ff or model.d_ff
        kwargs.update(vocab_size=vocab, padded_vocab=padded, head_dim=model.resolved_head_dim,
                      quant=quant if quant is not None and quant.enabled else None)
        if lora is not None and lora.rank:
            kwargs.update(lora_rank=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          lora_targets=lora.target_names)
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
