"""NF4 dequantisation of bitsandbytes 4-bit weights, and a frozen 4-bit linear built on it.

bitsandbytes packs two 4-bit codes per byte (high nibble = even element) into a tensor of its
`quant_storage` dtype (uint8, or bf16 / fp32 under ZeRO-3: 2 / 4 bytes hold 4 / 8 codes), read here
as raw bytes. Element e of the (out x in) weight is NF4[code_e] * absmax[e // blocksize]; with double
quantisation (QLoRA's default) absmax is itself 8-bit: absmax[j] = code2[absmax_u8[j]] *
absmax2[j // blocksize2] + offset. The Triton kernel does both levels in one pass.

`nf4_linear` is y = x @ W^T (+ b) for a frozen 4-bit W: the dequantised W is not saved for the backward
(it is dequantised again there, as bitsandbytes does), so only x's gradient is computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.kernels import _runtime


def _packed_bytes(packed: torch.Tensor) -> torch.Tensor:
    return packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)


def _real_absmax(qs) -> torch.Tensor:
    if not qs.nested:
        return qs.absmax.float()
    s2 = qs.state2
    blocks = torch.arange(qs.absmax.numel(), device=qs.absmax.device) // s2.blocksize
    return s2.code[qs.absmax.long()] * s2.absmax[blocks] + qs.offset


def nf4_dequantize_reference(packed: torch.Tensor, qs, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain PyTorch; equals bitsandbytes.functional.dequantize_4bit (checked in tests)."""
    b = _packed_bytes(packed)
    codes = torch.stack([b >> 4, b & 15], dim=1).reshape(-1).long()  # element 2i = high nibble of byte i
    n = qs.shape.numel()
    vals = qs.code.float()[codes[:n]]
    absmax = _real_absmax(qs).repeat_interleave(qs.blocksize)[:n]
    return (vals * absmax).view(qs.shape).to(dtype or qs.dtype)


def _check(packed, qs):
    if getattr(qs, "quant_type", "nf4") != "nf4":
        raise ValueError(f"nf4 kernel: quant_type {qs.quant_type} is not nf4")
    if getattr(qs, "packing_format_for_cpu", False):
        raise ValueError("nf4 kernel: the weight was repacked by bitsandbytes' CPU inference path")
    n_bytes = packed.numel() * packed.element_size()
    if 2 * n_bytes < qs.shape.numel():
        raise ValueError(f"nf4 kernel: {n_bytes} packed bytes cannot hold {qs.shape.numel()} weights "
                         "(an empty weight means a ZeRO-3 parameter used outside its module's forward)")


def nf4_dequantize(packed: torch.Tensor, qs, dtype: torch.dtype | None = None) -> torch.Tensor:
    _check(packed, qs)
    dtype = dtype or qs.dtype
    if not _runtime.use_triton(packed):
        return nf4_dequantize_reference(packed, qs, dtype)
    tk = _runtime.triton_kernels()
    n = qs.shape.numel()
    out = torch.empty(qs.shape, device=packed.device, dtype=dtype)
    block = 1024 if packed.is_cuda else min(1 << 16, _runtime.next_pow2(n))
    s2 = qs.state2 if qs.nested else qs  # unused pointers when not nested
    tk.nf4_dequant[(-(-n // block),)](
        _packed_bytes(packed), qs.code, qs.absmax, s2.code, s2.absmax, out, n,
        float(qs.offset) if qs.nested else 0.0, qs.blocksize, s2.blocksize if qs.nested else 1,
        NESTED=bool(qs.nested), BLOCK=block,
    )
    _runtime.count_launch("nf4")
    return out


class NF4LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, bias, qs):
        ctx.packed, ctx.qs = packed, qs  # the parameter itself: ZeRO-3 gathers it again for the backward
        return F.linear(x, nf4_dequantize(packed, qs, x.dtype), bias)

    @staticmethod
    def backward(ctx, dy):
        dx = dy @ nf4_dequantize(ctx.packed, ctx.qs, dy.dtype) if ctx.needs_input_grad[0] else None
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return dx, None, db, None


def nf4_linear(x: torch.Tensor, packed: torch.Tensor, qs, bias: torch.Tensor | None = None) -> torch.Tensor:
    if getattr(packed, "requires_grad", False):
        raise ValueError("nf4_linear: 4-bit weights are frozen; train LoRA adapters on them instead")
    return NF4LinearFunction.apply(x, packed, bias, qs)
