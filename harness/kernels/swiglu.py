"""SwiGLU elementwise step of a Llama MLP: h = silu(gate) * up, with a backward that recomputes
sigmoid(gate) from the saved inputs instead of keeping silu(gate) (one (tokens x I) tensor less)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.kernels import _runtime


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _grid(n: int, x: torch.Tensor):
    # GPU: 1024 elements a program; interpreter: ~7 ms a program whatever its size, so big blocks.
    block = 1024 if x.is_cuda else min(1 << 16, _runtime.next_pow2(n))
    return block, (-(-n // block),)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        tk = _runtime.triton_kernels()
        gate, up = gate.contiguous(), up.contiguous()
        h = torch.empty_like(gate)
        block, grid = _grid(gate.numel(), gate)
        compute = tk.tl.float64 if gate.dtype == torch.float64 else tk.tl.float32
        tk.swiglu_fwd[grid](gate, up, h, gate.numel(), BLOCK=block, COMPUTE=compute)
        _runtime.count_launch("swiglu")
        ctx.save_for_backward(gate, up)
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        tk = _runtime.triton_kernels()
        gate, up = ctx.saved_tensors
        dh = dh.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        block, grid = _grid(gate.numel(), gate)
        compute = tk.tl.float64 if gate.dtype == torch.float64 else tk.tl.float32
        tk.swiglu_bwd[grid](dh, gate, up, dg, du, gate.numel(), BLOCK=block, COMPUTE=compute)
        _runtime.count_launch("swiglu")
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    if _runtime.use_triton(gate):
        return SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)
