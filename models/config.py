"""Model hyper-parameters, resolved from `config.model` and the data's vocabulary."""

import dataclasses
from typing import Any

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
MLP_KINDS = ("gelu", "swiglu")


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
    scan_layers: bool = True
    remat: str = "none"
    # Mixture of experts (model.moe.*); moe_num_experts = 0 is a dense model.
    moe_num_experts: int = 0
    moe_top_k: int = 2
    moe_every: int = 1  # every k-th layer is MoE (the others dense)
    moe_num_shared_experts: int = 0
    moe_d_ff: int = 0  # per expert; 0 = d_ff
    moe_capacity_factor: float = 0.0  # > 0: capacity dispatch; <= 0: dropless
    moe_router_order: str = "softmax_topk"
    moe_renormalize: bool = True
    moe_jitter: float = 0.0
    moe_grouped_matmul: str = "auto"  # auto | ragged_dot | blocks (dropless dispatch)
    # Set from the mesh and config.pipeline_* by the experiment, not by model config.
    pipeline_stages: int = 1
    pipeline_microbatches: int = 1
    pipeline_repeats: int = 1
    quant: Any = None  # models.quant.QuantConfig: fake-quantized weights/activations (QAT)

    @property
    def compute_dtype(self) -> jnp.dtype:
        return DTYPES[self.dtype]

    @property
    def layers_per_unit(self) -> int:
        """Layers in one scanned unit: k when every k-th layer is MoE, else 1."""
        return self.moe_every if self.moe_num_experts and self.moe_every > 1 else 1

    @property
    def num_units(self) -> int:
        return self.num_layers // self.layers_per_unit

    def is_moe_layer(self, index_in_unit: int) -> bool:
        """Within a unit of k layers, the last one is the MoE layer."""
        return bool(self.moe_num_experts) and index_in_unit == self.layers_per_unit - 1

    @classmethod
    def from_config(cls, model_cfg: Any, data_vocab_size: int, **overrides: Any
                    ) -> "ModelConfig":
        """Resolve derived fields: the vocabulary (padded) and head_dim."""
        vocab = int(model_cfg.vocab_size) or data_vocab_size
        multiple = max(1, int(model_cfg.vocab_multiple))
        padded = -(-vocab // multiple) * multiple
        head_dim = int(model_cfg.head_dim) or int(model_cfg.d_model) // max(
            1, int(model_cfg.num_heads))
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in model_cfg.items() if k in names}
        moe = model_cfg.get("moe")
        if moe is not None:
            kwargs.update({f"moe_{k}": v for k, v in moe.items() if f"moe_{k}" in names})
            if not kwargs.get("moe_d_ff"):
                kwargs["moe_d_ff"] = int(model_cfg.d_ff)
        kwargs.update(vocab_size=vocab, padded_vocab=padded, head_dim=head_dim, **overrides)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
