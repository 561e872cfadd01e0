"""Models for `benchmarks/device_check.sh`: train-step throughput and MFU on one accelerator.

  python benchmarks/train_throughput.py --config=configs/device_check.py:125m --synthetic
  python benchmarks/train_throughput.py --config=configs/device_check.py:smoke_dense \
      --synthetic --steps=2 --warmup=1 --repeats=1

Presets (bfloat16 compute, float32 parameters, full rematerialisation, a GPT-2 sized
vocabulary of 50,304; the data is synthetic: the embedded corpus only passes the
vocabulary check):
  125m         12 layers, d_model 768, 12 heads, GELU d_ff 3072, tied embeddings (GPT-2
               small's shape, 124M parameters), seq 1024, batch 16.
  1b           `configs/gpt_1b.py`'s model (24 layers, d_model 2048, SwiGLU d_ff 5504,
               untied; 1.42B parameters with this vocabulary), seq 2048, batch 8.
  moe          the `moe` preset of configs/shakespeare_char.py scaled to `125m`: 8 experts
               of d_ff 1536, top-2 (the dense model's active MLP), dropless.
  smoke_dense  2 layers, d_model 64, seq 64, batch 4, vocabulary 512: the same code on CPU.
  smoke_moe    smoke_dense with 4 experts, top-2.
"""

from ml_collections import ConfigDict

from jaxlm.configs.base import get_base_config

PRESETS = ("125m", "1b", "moe", "smoke_dense", "smoke_moe")


def get_config(arg: str | None = None) -> ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"configs/device_check.py: unknown preset {arg!r}; choose one of "
                         f"{list(PRESETS)}")
    c = get_base_config()
    c.name = f"device_check_{arg}"
    c.steps, c.warmup_steps, c.log_every = 100, 10, 10
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.model.vocab_size = 50_304
    m = c.model
    if arg in ("125m", "moe"):
        c.batch_size, c.seq_len = 16, 1024
        m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.d_ff = 12, 768, 12, 12, 3072
    elif arg == "1b":
        c.batch_size, c.seq_len = 8, 2048
        m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.d_ff = 24, 2048, 16, 16, 5504
        m.mlp, m.tie_embeddings = "swiglu", False
    else:
        c.batch_size, c.seq_len = 4, 64
        m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.d_ff = 2, 64, 4, 4, 256
        m.vocab_size = 512
    if arg in ("moe", "smoke_moe"):
        m.moe.num_experts = 8 if arg == "moe" else 4
        m.moe.top_k = 2
        m.moe.d_ff = m.d_ff // 2
    return c
