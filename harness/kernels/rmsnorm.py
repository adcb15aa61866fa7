"""RMSNorm: y = w * x / sqrt(mean(x^2, -1) + eps), computed in fp32 (fp64 for fp64 inputs).

The backward skips the weight gradient when the weight is frozen (LoRA / QLoRA: every norm is), which
saves a (rows x H) product and a reduction over all rows.
"""

from __future__ import annotations

import torch

from harness.kernels import _runtime


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain PyTorch, the numerics of the fused path: fp32 compute, output in x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.to(compute)
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    return (xc * rstd * weight.to(compute)).to(x.dtype)


def _launch_shape(x2d: torch.Tensor):
    block_h = _runtime.next_pow2(x2d.shape[1])
    block_r = _runtime.rows_per_program(x2d.shape[0], block_h, x2d)
    return block_r, block_h, -(-x2d.shape[0] // block_r)


def _backward_programs(n_row_blocks: int, x: torch.Tensor) -> int:
    """Persistent backward grid: a few programs per SM on GPU, so the weight-gradient partials are
    (G x H) fp32 whatever the row count (8192 rows at H=4096 would otherwise be 128 MiB); half the row
    blocks in the interpreter, so the tests run the loop."""
    if x.is_cuda:
        return min(n_row_blocks, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count)
    return max(1, n_row_blocks // 2)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        tk = _runtime.triton_kernels()
        shape = x.shape
        x2d = x.reshape(-1, shape[-1]).contiguous()
        compute = tk.tl.float64 if x.dtype == torch.float64 else tk.tl.float32
        y = torch.empty_like(x2d)
        rstd = torch.empty(x2d.shape[0], device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        block_r, block_h, n_blocks = _launch_shape(x2d)
        tk.rmsnorm_fwd[(n_blocks,)](x2d, weight, y, rstd, x2d.shape[0], x2d.shape[1], x2d.stride(0), y.stride(0), eps,
                             BLOCK_R=block_r, BLOCK_H=block_h, COMPUTE=compute)
        _runtime.count_launch("rmsnorm")
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        tk = _runtime.triton_kernels()
        x2d, weight, rstd = ctx.saved_tensors
        dy2d = dy.reshape(-1, x2d.shape[1]).contiguous()
        compute = tk.tl.float64 if x2d.dtype == torch.float64 else tk.tl.float32
        block_r, block_h, n_blocks = _launch_shape(x2d)
        n_programs = _backward_programs(n_blocks, x2d)
        dx = torch.empty_like(x2d)
        want_dw = ctx.needs_input_grad[1]
        # One fp32 row of partial weight gradients per program; a 1-element dummy when frozen.
        partial = torch.empty((n_programs, x2d.shape[1]) if want_dw else (1,), device=x2d.device, dtype=rstd.dtype)
        tk.rmsnorm_bwd[(n_programs,)](dy2d, x2d, weight, rstd, dx, partial, x2d.shape[0], x2d.shape[1], dy2d.stride(0),
                                      x2d.stride(0), dx.stride(0), n_blocks, BLOCK_R=block_r, BLOCK_H=block_h, HAS_DW=want_dw,
                                      COMPUTE=compute)
        _runtime.count_launch("rmsnorm")
        dw = partial.sum(0).to(weight.dtype) if want_dw else None
        return dx.view(ctx.shape), dw, None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if weight.numel() != x.shape[-1]:
        raise ValueError(f"rmsnorm: weight has {weight.numel()} elements for hidden size {x.shape[-1]} "
                         "(an empty weight means a ZeRO-3 parameter used outside its module's forward)")
    if _runtime.use_triton(x):
        return RMSNormFunction.apply(x, weight, eps)
    return rmsnorm_reference(x, weight, eps)
