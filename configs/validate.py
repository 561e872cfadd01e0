"""Config checks that need no devices and no data: run first, before anything compiles."""

from typing import Any

from configs.errors import ConfigError

_POSITIVE_INTS = ("steps", "batch_size", "seq_len", "grad_accum_steps", "eval_batch_size",
                  "model.num_layers", "model.d_model", "model.num_heads", "model.num_kv_heads",
                  "model.d_ff", "model.vocab_multiple", "pipeline_repeats")
_NON_NEGATIVE = ("learning_rate", "min_learning_rate", "warmup_steps", "weight_decay",
                 "grad_clip", "log_every", "eval_every", "checkpoint_every", "eval_max_batches",
                 "keep_checkpoints", "model.head_dim", "model.vocab_size", "adam_eps",
                 "data.prefetch", "pipeline_microbatches")


def _get(config: Any, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _choice(config: Any, key: str, choices: Any) -> None:
    value = _get(config, key)
    if value not in choices:
        raise ConfigError(key, f"unknown value {value!r}; choose one of {sorted(choices)}")


def validate_config(config: Any) -> None:
    """Raise ConfigError naming the first bad key."""
    # Imported here so `configs` stays importable without the model code.
    from data.tokenizers import TOKENIZERS
    from losses.objectives import check_loss_config
    from models.quant import check_quant_config
    from models.attention import ATTENTION_IMPLS
    from models.config import DTYPES, MLP_KINDS, REMAT_POLICIES

    for key in _POSITIVE_INTS:
        value = _get(config, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(key, f"must be a positive integer, got {value!r}")
    for key in _NON_NEGATIVE:
        value = _get(config, key)
        if value < 0:
            raise ConfigError(key, f"must be >= 0, got {value!r}")
    if config.min_learning_rate > config.learning_rate:
        raise ConfigError("min_learning_rate", f"{config.min_learning_rate} is above "
                                               f"learning_rate {config.learning_rate}")
    for key in ("beta1", "beta2"):
        if not 0.0 <= _get(config, key) < 1.0:
            raise ConfigError(key, f"must be in [0, 1), got {_get(config, key)}")
    if not 0.0 <= config.model.dropout < 1.0:
        raise ConfigError("model.dropout", f"must be in [0, 1), got {config.model.dropout}")

    m = config.model
    if m.num_heads % m.num_kv_heads:
        raise ConfigError("model.num_kv_heads", f"num_heads {m.num_heads} is not divisible "
                                                f"by num_kv_heads {m.num_kv_heads}")
    head_dim = m.head_dim or m.d_model // m.num_heads
    if not m.head_dim and m.d_model % m.num_heads:
        raise ConfigError("model.num_heads", f"d_model {m.d_model} is not divisible by "
                                             f"num_heads {m.num_heads}; set model.head_dim")
    if head_dim % 2:
        raise ConfigError("model.head_dim", f"RoPE needs an even head_dim, got {head_dim}")
    _choice(config, "model.attention_impl", ATTENTION_IMPLS)
    if m.attention_impl == "cudnn":
        if m.dtype not in ("bfloat16", "float16"):
            raise ConfigError("model.attention_impl", f"'cudnn' runs in bfloat16 or float16 "
                                                      f"only; model.dtype is {m.dtype!r}")
        if head_dim % 8 or head_dim > 256:
            raise ConfigError("model.attention_impl", f"'cudnn' needs head_dim a multiple of "
                                                      f"8 and <= 256, got {head_dim}")
    _choice(config, "model.dtype", DTYPES)
    _choice(config, "model.remat", REMAT_POLICIES)
    _choice(config, "model.mlp", MLP_KINDS)
    _choice(config, "data.tokenizer", TOKENIZERS)
    moe = config.model.moe
    if moe.num_experts:
        from models.moe import ROUTER_ORDERS
        for key in ("top_k", "every"):
            if not isinstance(moe[key], int) or moe[key] <= 0:
                raise ConfigError(f"model.moe.{key}", f"must be a positive integer, "
                                                      f"got {moe[key]!r}")
        if moe.num_experts < 0:
            raise ConfigError("model.moe.num_experts", f"must be >= 0, got {moe.num_experts}")
        if moe.top_k > moe.num_experts:
            raise ConfigError("model.moe.top_k", f"top_k {moe.top_k} > num_experts "
                                                 f"{moe.num_experts}")
        if m.num_layers % moe.every:
            raise ConfigError("model.moe.every", f"num_layers {m.num_layers} is not divisible "
                                                 f"by every={moe.every}")
        _choice(config, "model.moe.router_order", ROUTER_ORDERS)
        from models.moe import GROUPED_MATMULS
        _choice(config, "model.moe.grouped_matmul", GROUPED_MATMULS)
        for key in ("num_shared_experts", "d_ff", "load_balance_weight", "z_loss_weight"):
            if moe[key] < 0:
                raise ConfigError(f"model.moe.{key}", f"must be >= 0, got {moe[key]}")
        if not 0.0 <= moe.jitter < 1.0:
            raise ConfigError("model.moe.jitter", f"must be in [0, 1), got {moe.jitter}")
    check_loss_config(config)
    check_quant_config(config.quant, {"embed": m.d_model, "attn.o": m.num_heads * head_dim,
                                      "mlp.down": m.d_ff})
    if config.batch_size % config.grad_accum_steps:
        raise ConfigError("grad_accum_steps", f"batch_size {config.batch_size} is not "
                                              f"divisible by grad_accum_steps "
                                              f"{config.grad_accum_steps}")
