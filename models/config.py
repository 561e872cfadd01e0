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
    # Set from the mesh and config.pipeline_* by the experiment, not by model config.
    pipeline_stages: int = 1
    pipeline_microbatches: int = 1
    pipeline_repeats: int = 1

    @property
    def compute_dtype(self) -> jnp.dtype:
        return DTYPES[self.dtype]

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
        kwargs.update(vocab_size=vocab, padded_vocab=padded, head_dim=head_dim, **overrides)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
