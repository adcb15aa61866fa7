"""Fused kernels (Triton) with plain PyTorch references, and the patcher that switches them into
Hugging Face Llama / Mistral / Qwen2 models (recipe key `kernels`).

Each kernel is callable on its own and picks its implementation per call (see `_runtime`): Triton on
CUDA, the Triton interpreter on CPU under TRITON_INTERPRET=1, otherwise its PyTorch reference
(linear_cross_entropy keeps its chunked path there, which saves the same memory on CPU).
"""

from harness.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from harness.kernels.nf4 import nf4_dequantize, nf4_dequantize_reference, nf4_linear
from harness.kernels.patch import apply_kernels, fused_loss_enabled, remove_kernels, resolve_kernel_names
from harness.kernels.rmsnorm import rmsnorm, rmsnorm_reference
from harness.kernels.rope import rope, rope_reference
from harness.kernels.swiglu import swiglu, swiglu_reference

__all__ = [
    "apply_kernels",
    "fused_loss_enabled",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "nf4_dequantize",
    "nf4_dequantize_reference",
    "nf4_linear",
    "remove_kernels",
    "resolve_kernel_names",
    "rmsnorm",
    "rmsnorm_reference",
    "rope",
    "rope_reference",
    "swiglu",
    "swiglu_reference",
]
