"""A ~1.1B-parameter byte-level GPT, for planning layouts (and for real accelerators).

Plan it on 64 fake CPU devices without training (seconds to a minute per layout):
  python train.py --config=configs/gpt_1b.py --cpu_devices=64 --dry_run \
      --config.mesh.fsdp=8 --config.mesh.tensor=8
  python benchmarks/plan_layouts.py --config=configs/gpt_1b.py --cpu_devices=64

Presets: (none) 24 layers, d_model 2048, 16 heads, seq 2048, global batch 256.
"""

from ml_collections import ConfigDict

from jaxlm.configs.base import get_base_config


def get_config(arg: str | None = None) -> ConfigDict:
    c = get_base_config()
    c.name = "gpt_1b"
    if arg:
        raise ValueError(f"configs/gpt_1b.py: unknown preset {arg!r}")
    c.steps = 100_000
    c.batch_size = 256
    c.seq_len = 2048
    c.learning_rate = 3e-4
    c.min_learning_rate = 3e-5
    c.warmup_steps = 2000
    c.beta2 = 0.95
    c.eval_batch_size = 256
    c.eval_max_batches = 4
    c.log_every = 100
    c.eval_every = 5000
    c.checkpoint_every = 5000
    c.data.tokenizer = "byte"
    c.model.num_layers = 24
    c.model.d_model = 2048
    c.model.num_heads = 16
    c.model.num_kv_heads = 16
    c.model.d_ff = 5504
    c.model.mlp = "swiglu"
    c.model.tie_embeddings = False
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    return c
