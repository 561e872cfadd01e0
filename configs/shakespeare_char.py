"""Character-level Transformer on tiny Shakespeare (the embedded default).

Train (the default preset is nanoGPT's CPU recipe; minutes on 2 CPU cores):
  python train.py --config=configs/shakespeare_char.py --workdir=runs/shakespeare_char

Presets after the colon:
  (none)  4 layers, 4 heads, d_model 128, seq 64, batch 12, 2000 steps.
  large   6 layers, 6 heads, d_model 384, seq 256, batch 64, dropout 0.2,
          5000 steps (nanoGPT's GPU recipe; val loss ~1.47).
  tiny    2 layers, d_model 32, a few steps: smoke tests and CI.
  moe     the default with every MLP replaced by 8 experts (d_ff 256 each), top-2:
          the same active parameters per token as the default.

  python train.py --config=configs/shakespeare_char.py:tiny --workdir=/tmp/tiny
  python eval.py --workdir=runs/shakespeare_char --sample --prompt="ROMEO:"
"""

from ml_collections import ConfigDict

from jaxlm.configs.base import get_base_config


def get_config(arg: str | None = None) -> ConfigDict:
    c = get_base_config()
    c.name = "shakespeare_char"
    preset = arg or "default"
    if preset == "default":
        pass  # The base config is nanoGPT's CPU recipe.
    elif preset == "large":
        c.name = "shakespeare_char_large"
        c.steps = 5000
        c.batch_size = 64
        c.seq_len = 256
        c.warmup_steps = 100
        c.eval_batch_size = 64
        c.model.num_layers = 6
        c.model.num_heads = 6
        c.model.num_kv_heads = 6
        c.model.d_model = 384
        c.model.d_ff = 1536
        c.model.dropout = 0.2
    elif preset == "moe":
        c.name = "shakespeare_char_moe"
        c.model.moe.num_experts = 8
        c.model.moe.top_k = 2
        c.model.moe.d_ff = 256  # 2 active experts x 256 = the dense d_ff of 512
    elif preset == "tiny":
        c.name = "shakespeare_char_tiny"
        c.steps = 20
        c.batch_size = 8
        c.seq_len = 32
        c.warmup_steps = 2
        c.log_every = 5
        c.eval_every = 10
        c.checkpoint_every = 10
        c.eval_batch_size = 64
        c.eval_max_batches = 2
        c.model.num_layers = 2
        c.model.d_model = 32
        c.model.num_heads = 4
        c.model.num_kv_heads = 2
        c.model.d_ff = 64
    else:
        raise ValueError(f"configs/shakespeare_char.py: unknown preset {arg!r}; "
                         "choose one of: default, large, moe, tiny")
    return c
