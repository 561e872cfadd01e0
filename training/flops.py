"""Model FLOPs per token, the accelerators' peak FLOP/s, and model FLOPs utilisation (MFU).

One FLOP count serves the dry-run planner, `benchmarks/train_throughput.py` and the MFU in
the training records. MFU = model FLOPs per second per device / the device's peak
(PaLM's definition, Chowdhery et al. 2022, appendix B): rematerialised recomputation,
padding and the optimizer do not count, so a run that recomputes its forward pass reaches
at most ~75% even on a perfect machine.
"""

import jax

from jaxlm.models.config import ModelConfig

# Peak dense bfloat16 FLOP/s per chip, from the vendors' data sheets (the NVIDIA sheets
# print the sparse figure with an asterisk; dense is half of it). Matched in order against
# `jax.devices()[0].device_kind`, so more specific names come first.
PEAK_FLOPS_PER_DEVICE: tuple[tuple[str, float], ...] = (
    # NVIDIA H100 Tensor Core GPU data sheet: BF16 1,979 TFLOPS (SXM), 1,671 (NVL),
    # 1,513 (PCIe), "with sparsity".
    ("H100 NVL", 835.5e12),
    ("H100 PCIe", 756.5e12),
    ("H100", 989.5e12),
    # NVIDIA H200 Tensor Core GPU data sheet: BF16 1,979 TFLOPS (SXM), 1,671 (NVL), sparse.
    ("H200 NVL", 835.5e12),
    ("H200", 989.5e12),
    # NVIDIA A100 Tensor Core GPU data sheet: BFLOAT16 312 TFLOPS (624 with sparsity).
    ("A100", 312e12),
    # NVIDIA HGX B200 data sheet: FP16/BF16 Tensor Core 4.5 PFLOPS per GPU with sparsity.
    ("B200", 2250e12),
    # Google Cloud TPU system architecture pages, peak bf16 compute per chip:
    # v6e (Trillium) 918 TFLOPS, v5e 197, v5p 459, v4 275. JAX names v6e "TPU v6 lite",
    # v5e "TPU v5 lite" and v5p "TPU v5".
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
)


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: forward + backward = 3 x the forward's 2 FLOPs per
    multiply-add, for every matmul a token goes through.

    Matmul parameters: attention q, k, v, o; the dense MLP (2 matrices, 3 for SwiGLU) or,
    in MoE layers, the router, the top-k routed experts and the shared experts; the output
    projection to the padded vocabulary (tied or not; the embedding lookup is no matmul).
    Attention scores and values (QK^T and PV): 4 FLOPs per (query, key) pair per head per
    head dim, forward. Causal attention counts only the pairs the mask keeps, L(L+1)/2 per
    sequence (fewer with a sliding window): MaxText's convention
    (`calculate_tflops_training_per_device`, which rounds it to L^2/2), half of the
    12 * layers * heads * head_dim * L of PaLM's 6N + 12LHQT, which counts every pair.
    Norms, softmax, biases and the loss are left out, as in both.
    """
    m, moe = cfg.model, cfg.model.moe
    d, h, k = m.d_model, m.num_heads, cfg.head_dim
    attention_params = d * k * (2 * h + 2 * m.num_kv_heads)
    per_mlp = 3 if m.mlp == "swiglu" else 2
    dense_mlp = per_mlp * d * m.d_ff
    moe_layers = m.num_layers // cfg.layers_per_unit if moe.num_experts else 0
    moe_mlp = (per_mlp * d * cfg.expert_d_ff * (moe.top_k + moe.num_shared_experts)
               + d * moe.num_experts)
    matmul_params = (m.num_layers * attention_params + (m.num_layers - moe_layers)
                     * dense_mlp + moe_layers * moe_mlp + d * cfg.padded_vocab)
    attention = m.num_layers * 4 * h * k * mean_keys_per_query(seq_len, m.sliding_window)
    return 6.0 * matmul_params + 3.0 * attention


def mean_keys_per_query(seq_len: int, window: int = 0) -> float:
    """Keys a causal query sees, averaged over the positions of a sequence: (L + 1) / 2,
    or with a window w < L (each query sees the last w positions, itself included)
    (L w - w (w - 1) / 2) / L."""
    if not window or window >= seq_len:
        return (seq_len + 1) / 2
    return (seq_len * window - window * (window - 1) / 2) / seq_len


def peak_flops_per_device(configured: float = 0.0, device_kind: str | None = None
                          ) -> float | None:
    """The peak FLOP/s MFU divides by: `configured` if > 0, else the table's figure for
    `device_kind` (default: the first device's), else None (e.g. on CPU)."""
    if configured > 0:
        return configured
    kind = jax.devices()[0].device_kind if device_kind is None else device_kind
    for name, peak in PEAK_FLOPS_PER_DEVICE:
        if name.lower() in kind.lower():
            return peak
    return None


def throughput_fields(tokens_per_sec: float, flops_per_token: float, num_devices: int,
                      peak: float | None) -> dict[str, float]:
    """`flops_per_sec_per_device` (model FLOPs) and, given a peak, `mfu` (a fraction)."""
    per_device = tokens_per_sec * flops_per_token / num_devices
    out = {"flops_per_sec_per_device": per_device}
    if peak:
        out["mfu"] = per_device / peak
    return out
