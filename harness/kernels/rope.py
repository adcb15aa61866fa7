"""Rotary position embedding applied to q and k in one launch (Hugging Face `rotate_half` layout).

q: (B, Hq, T, D), k: (B, Hk, T, D), any strides (the attention's transposed projections need no copy).
cos / sin come in one of two forms:
- per token, (B or 1, T, D): what a Hugging Face rotary module returns, already gathered from the
  position ids (so packed rows, whose positions restart at every sample, are handled);
- a table (P, D) plus `position_ids` (B, T): the kernel gathers row position_ids[b, t] itself.
Only the first D/2 columns of cos / sin are read (HF duplicates the halves).
"""

from __future__ import annotations

import torch

from harness.kernels import _runtime


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _per_token(cos, sin, position_ids):
    if position_ids is None:
        return cos, sin
    return cos[position_ids], sin[position_ids]  # (P, D) table -> (B, T, D)


def rope_reference(q, k, cos, sin, position_ids=None):
    """The Hugging Face formula, computed in fp32 (fp64 for fp64 inputs), outputs in q / k's dtype."""
    cos, sin = _per_token(cos, sin, position_ids)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    c, s = cos.to(compute).unsqueeze(1), sin.to(compute).unsqueeze(1)  # (B, 1, T, D): broadcast over heads
    qc, kc = q.to(compute), k.to(compute)
    return (qc * c + _rotate_half(qc) * s).to(q.dtype), (kc * c + _rotate_half(kc) * s).to(k.dtype)


def _launch(q, k, cos, sin, position_ids, sign: float):
    tk = _runtime.triton_kernels()
    b, n_q, t, d = q.shape
    n_k = k.shape[1]
    qo, ko = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    cos, sin = cos.contiguous(), sin.contiguous()
    if position_ids is not None:
        pos = position_ids.expand(b, t).contiguous()
        cs_sb, cs_st = 0, cos.stride(0)
    else:
        pos = cos  # unused placeholder pointer
        cs_sb = 0 if cos.shape[0] == 1 else cos.stride(0)  # (1, T, D) is shared by the whole batch
        cs_st = cos.stride(1)
    compute = tk.tl.float64 if q.dtype == torch.float64 else tk.tl.float32
    tk.rope_qk[(b * t,)](
        q, k, qo, ko, cos, sin, pos, t, n_q, n_k, d // 2,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2), cs_sb, cs_st,
        SIGN=sign, HAS_POS=position_ids is not None, BLOCK_QH=_runtime.next_pow2(n_q), BLOCK_KH=_runtime.next_pow2(n_k),
        BLOCK_HALF=_runtime.next_pow2(d // 2), COMPUTE=compute,
    )
    _runtime.count_launch("rope")
    return qo, ko


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids):
        ctx.save_for_backward(cos, sin, position_ids)
        return _launch(q, k, cos, sin, position_ids, 1.0)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        # The rotation is orthogonal: its transpose is the rotation by -angle, i.e. the same kernel with -sin.
        cos, sin, position_ids = ctx.saved_tensors
        dq, dk = _launch(dq_out, dk_out, cos, sin, position_ids, -1.0)
        return dq, dk, None, None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None = None):
    if q.dim() != 4 or k.dim() != 4 or q.shape[-1] % 2 or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be (B, H, T, D) with the same even D")
    if position_ids is None and (cos.dim() != 3 or cos.shape[1] != q.shape[2]):
        raise ValueError(f"rope: per-token cos must be (B or 1, T, D), got {tuple(cos.shape)} for T={q.shape[2]}")
    if _runtime.use_triton(q):
        return RoPEFunction.apply(q, k, cos, sin, position_ids)
    return rope_reference(q, k, cos, sin, position_ids)
