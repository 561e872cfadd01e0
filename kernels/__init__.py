"""Pallas kernels: FlashAttention-2 forward and backward for GPU (Triton) and TPU (Mosaic).

Importing this package needs no accelerator; the Pallas backends load on first use.
"""

from kernels._common import BlockSizes
from kernels.flash_attention import (DEFAULT_BLOCK_SIZES, default_backend, flash_attention,
                                     flash_attention_backward, padded_head_dim)
from kernels.reference import reference_attention, reference_mask

__all__ = ["BlockSizes", "DEFAULT_BLOCK_SIZES", "default_backend", "flash_attention",
           "flash_attention_backward", "padded_head_dim", "reference_attention", "reference_mask"]
