"""The Triton kernels themselves, run by the Triton interpreter on CPU, against their PyTorch references.

TRITON_INTERPRET must be set before triton is first imported, so this module only runs in a process
started with it (tests/test_kernels.py starts one per kernel); collected in a normal pytest process it
is skipped and leaves the environment alone:

    TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_kernels_interp.py -q

Launches are kept small: the interpreter runs ~7 ms per program instance.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 from process start (tests/test_kernels.py runs it)", allow_module_level=True)

from harness.kernels import _runtime
from harness.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from harness.kernels.rmsnorm import RMSNormFunction, rmsnorm, rmsnorm_reference
from harness.kernels.rope import RoPEFunction, rope, rope_reference
from harness.kernels.swiglu import SwiGLUFunction, swiglu, swiglu_reference


def launches(name: str) -> int:
    return _runtime.LAUNCHES.get(name, 0)


def grads_of(fn, *inputs):
    """Outputs and input gradients of sum(out * fixed random weights) (a generic upstream gradient)."""
    inputs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(1)
    total = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    total.backward()
    return [o.detach() for o in outs], [x.grad for x in inputs if x.requires_grad]


def assert_close_all(a, b, tol):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


# ---- RMSNorm --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 5, 37), (2, 64), (130, 33)])  # odd widths; 130 rows: several programs
@pytest.mark.parametrize("weight_trainable", [True, False])
def test_rmsnorm_matches_reference_fp32(shape, weight_trainable):
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    w = (1 + 0.1 * torch.randn(shape[-1])).requires_grad_(weight_trainable)
    before = launches("rmsnorm")
    out_k, g_k = grads_of(lambda a, b: rmsnorm(a, b, 1e-6), x, w)
    assert launches("rmsnorm") == before + 2, "the Triton forward and backward did not both run"
    out_r, g_r = grads_of(lambda a, b: rmsnorm_reference(a, b, 1e-6), x, w)
    assert len(g_k) == (2 if weight_trainable else 1)
    assert_close_all(out_k + g_k, out_r + g_r, 1e-5)


def test_rmsnorm_frozen_weight_gets_no_gradient():
    x = torch.randn(4, 19, requires_grad=True)
    w = torch.ones(19)
    rmsnorm(x, w, 1e-5).sum().backward()
    assert w.grad is None and x.grad is not None


def test_rmsnorm_gradcheck_fp64_on_the_kernel():
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFunction.apply(a, b, 1e-6), (x, w))


# ---- RoPE -----------------------------------------------------------------------------------------


def _rope_inputs(b, hq, hk, t, d, dtype=torch.float32):
    torch.manual_seed(0)
    # (B, T, H, D) projections viewed as (B, H, T, D): the strided layout the attention passes in.
    q = torch.randn(b, t, hq, d, dtype=dtype).transpose(1, 2)
    k = torch.randn(b, t, hk, d, dtype=dtype).transpose(1, 2)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    return q, k, inv_freq


def _cos_sin(pos, inv_freq, dtype):
    freqs = pos[..., None].double() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("b,hq,hk,t,d", [(2, 4, 2, 5, 6), (1, 3, 1, 9, 10)])
def test_rope_per_token_cos_sin_with_packed_positions(b, hq, hk, t, d):
    q, k, inv_freq = _rope_inputs(b, hq, hk, t, d)
    # Packed rows: positions restart at every sample boundary.
    pos = torch.stack([torch.cat([torch.arange(3), torch.arange(t - 3)]) for _ in range(b)])
    cos, sin = _cos_sin(pos, inv_freq, torch.float32)
    q.requires_grad_(True), k.requires_grad_(True)
    before = launches("rope")
    out_k, g_k = grads_of(lambda a, c: rope(a, c, cos, sin), q, k)
    assert launches("rope") == before + 2
    out_r, g_r = grads_of(lambda a, c: rope_reference(a, c, cos, sin), q, k)
    assert_close_all(out_k + g_k, out_r + g_r, 1e-5)


def test_rope_position_id_table_equals_per_token_gather():
    q, k, inv_freq = _rope_inputs(2, 2, 1, 7, 8)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3], [4, 5, 0, 1, 2, 3, 4]])
    table_cos, table_sin = _cos_sin(torch.arange(16), inv_freq, torch.float32)  # (P, D)
    q.requires_grad_(True), k.requires_grad_(True)
    out_k, g_k = grads_of(lambda a, c: rope(a, c, table_cos, table_sin, position_ids=pos), q, k)
    cos, sin = _cos_sin(pos, inv_freq, torch.float32)
    out_r, g_r = grads_of(lambda a, c: rope_reference(a, c, cos, sin), q, k)
    assert_close_all(out_k + g_k, out_r + g_r, 1e-5)


def test_rope_batch_shared_cos_sin_and_gradcheck_fp64():
    q, k, inv_freq = _rope_inputs(2, 2, 1, 3, 4, dtype=torch.float64)
    cos, sin = _cos_sin(torch.arange(3)[None], inv_freq, torch.float64)  # (1, T, D): shared over the batch
    q.requires_grad_(True), k.requires_grad_(True)
    # fast_mode: one random projection instead of the full Jacobian (each launch is 6 interpreted programs).
    assert torch.autograd.gradcheck(lambda a, c: RoPEFunction.apply(a, c, cos, sin, None), (q, k), fast_mode=True)


# ---- SwiGLU ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 5, 37), (1000,)])
def test_swiglu_matches_reference_fp32(shape):
    torch.manual_seed(0)
    g, u = torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True)
    before = launches("swiglu")
    out_k, g_k = grads_of(swiglu, g, u)
    assert launches("swiglu") == before + 2
    out_r, g_r = grads_of(swiglu_reference, g, u)
    assert_close_all(out_k + g_k, out_r + g_r, 1e-5)


def test_swiglu_gradcheck_fp64_on_the_kernel():
    g = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLUFunction.apply, (g, u))


# ---- linear + cross-entropy -----------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("head_trainable", [False, True])
def test_linear_cross_entropy_matches_reference_fp32(reduction, head_trainable):
    torch.manual_seed(0)
    n, h, v = 37, 24, 123  # odd token count and vocab; chunk 8 -> 5 chunks, the last one partial
    x = torch.randn(n, h, requires_grad=True)
    w = (0.3 * torch.randn(v, h)).requires_grad_(head_trainable)
    t = torch.randint(0, v, (n,))
    t[::4] = -100  # ignored (prompt / padding) tokens
    before = launches("linear_cross_entropy")
    loss_k, g_k = grads_of(lambda a, b: linear_cross_entropy(a, b, t, reduction=reduction, chunk_tokens=8), x, w)
    assert launches("linear_cross_entropy") == before + 5
    loss_r, g_r = grads_of(lambda a, b: linear_cross_entropy_reference(a, b, t, reduction=reduction), x, w)
    assert len(g_k) == (2 if head_trainable else 1)
    assert_close_all(loss_k + g_k, loss_r + g_r, 1e-5)


def test_linear_cross_entropy_block_loop_over_a_vocab_wider_than_one_block():
    """V > BLOCK_V would need the kernel's online log-sum-exp loop: force it with a wide vocab."""
    torch.manual_seed(0)
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(70000, 8) * 0.1  # BLOCK_V caps at 65536 in the interpreter: two slices
    t = torch.tensor([5, 69999, -100])
    loss_k, g_k = grads_of(lambda a: linear_cross_entropy(a, w, t), x)
    loss_r, g_r = grads_of(lambda a: linear_cross_entropy_reference(a, w, t), x)
    assert_close_all(loss_k + g_k, loss_r + g_r, 1e-5)


def test_linear_cross_entropy_gradcheck_fp64_on_the_kernel():
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, -100, 8, 0, 3])
    assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, t, reduction="mean", chunk_tokens=2), (x, w))


# ---- a patched model, every kernel on its Triton path ---------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_patched_model_matches_unpatched(arch):
    from tests.test_kernels import loss_and_grads, packed_batch, tiny_causal_lm

    from harness.kernels import apply_kernels

    model = tiny_causal_lm(arch)
    batch = packed_batch(model.config.vocab_size)
    loss_ref, grads_ref = loss_and_grads(model, batch, fused=False)
    apply_kernels(model, "all")
    before = dict(_runtime.LAUNCHES)
    loss_k, grads_k = loss_and_grads(model, batch, fused=True)
    assert all(_runtime.LAUNCHES.get(k, 0) > before.get(k, 0) for k in ("rmsnorm", "rope", "swiglu", "linear_cross_entropy"))
    torch.testing.assert_close(loss_k, loss_ref, rtol=1e-5, atol=1e-5)
    for name in grads_ref:
        torch.testing.assert_close(grads_k[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)


# ---- NF4 dequantisation and the frozen 4-bit linear -----------------------------------------------


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nested", [True, False])
def test_nf4_dequantize_is_bit_exact_with_bitsandbytes(storage, nested):
    import bitsandbytes.functional as bnbf

    from harness.kernels.nf4 import nf4_dequantize
    from tests.test_kernels import quantised

    p = quantised(torch.randn(96, 72), storage, nested)
    before = launches("nf4")
    out = nf4_dequantize(p, p.quant_state)
    assert launches("nf4") == before + 1
    assert torch.equal(out, bnbf.dequantize_4bit(p.data, p.quant_state))


def test_nf4_linear_matches_bitsandbytes_linear4bit():
    import bitsandbytes as bnb

    from harness.kernels.nf4 import nf4_linear

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(72, 40, bias=True, compute_dtype=torch.float32, quant_type="nf4", quant_storage=torch.bfloat16)
    layer.load_state_dict({"weight": torch.randn(40, 72), "bias": torch.randn(40)}, strict=False)
    layer = layer.to("cpu")
    x = torch.randn(3, 5, 72, requires_grad=True)
    out_k, g_k = grads_of(lambda a: nf4_linear(a, layer.weight, layer.weight.quant_state, layer.bias), x)
    out_r, g_r = grads_of(layer, x)
    assert_close_all(out_k + g_k, out_r + g_r, 1e-5)


def test_patched_qlora_model_matches_unpatched(tiny_llama):
    from tests.test_kernels import loss_and_grads, packed_batch, qlora_model

    from harness.kernels import apply_kernels

    model = qlora_model(tiny_llama)
    batch = packed_batch(model.config.vocab_size, seed=2)
    loss_ref, grads_ref = loss_and_grads(model, batch, fused=False)
    apply_kernels(model, "all")
    before = dict(_runtime.LAUNCHES)
    loss_k, grads_k = loss_and_grads(model, batch, fused=True)
    assert all(_runtime.LAUNCHES.get(k, 0) > before.get(k, 0) for k in ("rmsnorm", "rope", "swiglu", "linear_cross_entropy", "nf4"))
    torch.testing.assert_close(loss_k, loss_ref, rtol=1e-5, atol=1e-5)
    for name in grads_ref:
        torch.testing.assert_close(grads_k[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
