"""GPU tier for the fused kernels: the compiled Triton kernels in bf16 (and fp32) against their PyTorch
references on CUDA, a patched model against the unpatched one, and the fused loss's memory.
Skipped cleanly without CUDA (tests/conftest.py). bf16 tolerances: 1-2 bf16 ulps (2^-7 relative)."""

from __future__ import annotations

import pytest
import torch

from harness.kernels import (
    _runtime,
    apply_kernels,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    rmsnorm,
    rmsnorm_reference,
    rope,
    rope_reference,
    swiglu,
    swiglu_reference,
)

pytestmark = pytest.mark.gpu
DEV = "cuda"
TOL = {torch.bfloat16: dict(rtol=1.6e-2, atol=2e-2), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def grads_of(fn, *inputs):
    inputs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator(device=DEV).manual_seed(1)
    sum((o.float() * torch.randn(o.shape, generator=gen, device=DEV)).sum() for o in outs).backward()
    return [o.detach().float() for o in outs], [x.grad.float() for x in inputs if x.requires_grad]


def check(kernel_fn, ref_fn, inputs, dtype, name):
    before = _runtime.LAUNCHES.get(name, 0)
    out_k, g_k = grads_of(kernel_fn, *inputs)
    assert _runtime.LAUNCHES.get(name, 0) > before, f"{name}: the Triton kernel did not run"
    # The reference runs on fp32 copies: the fused kernels compute in fp32 too.
    out_r, g_r = grads_of(ref_fn, *[x.detach().float().requires_grad_(x.requires_grad) for x in inputs])
    for a, b in zip(out_k + g_k, out_r + g_r, strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rmsnorm_gpu(dtype):
    x = torch.randn(4, 333, 4096, device=DEV, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(4096, device=DEV)).to(dtype).requires_grad_(True)
    check(lambda a, b: rmsnorm(a, b, 1e-5), lambda a, b: rmsnorm_reference(a, b, 1e-5), [x, w], dtype, "rmsnorm")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_gpu_packed_positions(dtype):
    b, t, d = 2, 300, 128
    q = torch.randn(b, t, 32, d, device=DEV, dtype=dtype).transpose(1, 2).requires_grad_(True)
    k = torch.randn(b, t, 8, d, device=DEV, dtype=dtype).transpose(1, 2).requires_grad_(True)
    pos = torch.cat([torch.arange(100), torch.arange(200)]).to(DEV).expand(b, t)
    inv = 1.0 / (500000 ** (torch.arange(0, d, 2, device=DEV).float() / d))
    emb = torch.cat([pos[..., None] * inv] * 2, -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    check(lambda a, c: rope(a, c, cos, sin), lambda a, c: rope_reference(a, c, cos.float(), sin.float()), [q, k], dtype, "rope")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_swiglu_gpu(dtype):
    g = torch.randn(3, 1000, 1433, device=DEV, dtype=dtype, requires_grad=True)
    u = torch.randn(3, 1000, 1433, device=DEV, dtype=dtype, requires_grad=True)
    check(swiglu, swiglu_reference, [g, u], dtype, "swiglu")


@pytest.mark.parametrize("head_trainable", [False, True])
def test_linear_cross_entropy_gpu_bf16(head_trainable):
    n, h, v = 2049, 1024, 32003
    x = torch.randn(n, h, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(v, h, device=DEV) * h**-0.5).to(torch.bfloat16).requires_grad_(head_trainable)
    t = torch.randint(0, v, (n,), device=DEV)
    t[::5] = -100
    out_k, g_k = grads_of(lambda a, b: linear_cross_entropy(a, b, t, reduction="mean"), x, w)
    out_r, g_r = grads_of(lambda a, b: linear_cross_entropy_reference(a, b, t, reduction="mean"), x, w)
    torch.testing.assert_close(out_k[0], out_r[0], rtol=1e-3, atol=1e-3)
    for a, b in zip(g_k, g_r, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_linear_cross_entropy_gpu_memory():
    """Peak allocation of loss + backward (frozen head): chunked <= 10% of unfused."""
    n, h, v = 4096, 1024, 128256
    w = (torch.randn(v, h, device=DEV) * h**-0.5).to(torch.bfloat16)
    t = torch.randint(0, v, (n,), device=DEV)
    peaks = {}
    for name, fn in (("unfused", linear_cross_entropy_reference), ("chunked", linear_cross_entropy)):
        x = torch.randn(n, h, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(x, w, t).backward()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
    print({k: f"{v / 2**20:.0f} MiB" for k, v in peaks.items()})
    assert peaks["chunked"] <= 0.10 * peaks["unfused"]


def test_patched_model_bf16_matches_unpatched():
    from tests.test_kernels import loss_and_grads, packed_batch, tiny_causal_lm

    model = tiny_causal_lm("llama").to(DEV, torch.bfloat16)
    batch = {k: v.to(DEV) for k, v in packed_batch(model.config.vocab_size).items()}
    loss_ref, _ = loss_and_grads(model, batch, fused=False)
    apply_kernels(model, "all")
    loss_k, _ = loss_and_grads(model, batch, fused=True)
    assert abs(loss_k.item() - loss_ref.item()) <= 1e-2 * abs(loss_ref.item())
