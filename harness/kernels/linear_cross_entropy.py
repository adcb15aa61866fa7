"""Fused linear + cross-entropy: loss(hidden @ W^T, targets) without ever holding the (N x V) logits.

Tokens are processed in chunks of C rows: logits_c = hidden_c @ W^T (C x V, upcast to fp32), the
chunk's loss, and its gradient softmax - onehot written over the chunk in place, then
dX_c = grad_c @ W (and dW += grad_c^T @ hidden_c only when the head is trainable). The gradients are
therefore computed in the forward (as Liger does) and only scaled by the incoming gradient in the
backward: the backward needs neither the logits nor the head weight, so under ZeRO-3 nothing has to be
gathered again for it. Peak extra memory is one chunk (C x V fp32) plus dX (N x H), against
(N x V) logits + their fp32 copy + their gradient for the unfused path.

Chunk size (harness/loss_chunks.py; Liger's rule, at least 64 rows): C ~ N / ceil(V / H), so a chunk of logits is about as big as the hidden
states (Llama-3: V=128256, H=4096 -> 32 chunks; 4096 tokens -> 128-row chunks of 64 MiB fp32).

The cross-entropy step runs as a Triton kernel on GPU (and under TRITON_INTERPRET=1 on CPU), as plain
in-place PyTorch otherwise; the GEMMs are always torch (cuBLAS / the CPU BLAS).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from harness.kernels import _runtime
from harness.loss_chunks import MIN_CHUNK_TOKENS, default_chunk_tokens  # noqa: F401 (the rule, torch-free)

REDUCTIONS = ("sum", "mean")


def linear_cross_entropy_reference(hidden, weight, targets, ignore_index: int = -100, reduction: str = "sum", bias=None):
    """The unfused computation the fused one must equal: full logits, upcast to fp32, F.cross_entropy."""
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias)
    return F.cross_entropy(logits.float(), targets.reshape(-1), ignore_index=ignore_index, reduction=reduction)




def _ce_chunk_torch(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, write_grad: bool) -> torch.Tensor:
    """Per-row loss of an fp32 (C x V) chunk; with write_grad the chunk becomes softmax - onehot (0 on
    ignored rows), in place, so no second (C x V) buffer is allocated."""
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    lse = torch.logsumexp(logits, dim=-1)
    loss = (lse - logits.gather(1, safe[:, None]).squeeze(1)) * valid
    if write_grad:
        logits.sub_(lse[:, None]).exp_()
        rows = torch.arange(logits.shape[0], device=logits.device)
        logits[rows, safe] -= valid.to(logits.dtype)
        logits.mul_(valid[:, None].to(logits.dtype))
    return loss


def _ce_chunk_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, write_grad: bool) -> torch.Tensor:
    tk = _runtime.triton_kernels()
    loss = torch.empty(logits.shape[0], device=logits.device, dtype=logits.dtype)
    block_v = min(_runtime.next_pow2(logits.shape[1]), 4096 if logits.is_cuda else 1 << 16)
    compute = tk.tl.float64 if logits.dtype == torch.float64 else tk.tl.float32
    tk.cross_entropy_rows[(logits.shape[0],)](logits, targets.contiguous(), loss, logits.shape[1], logits.stride(0), ignore_index,
                                              WRITE_GRAD=write_grad, BLOCK_V=block_v, COMPUTE=compute)
    _runtime.count_launch("linear_cross_entropy")
    return loss


def _chunked(hidden, weight, bias, targets, ignore_index, chunk_tokens, want_dx, want_dw):
    """Returns (loss sum, dX or None, dW or None, db or None), gradients of the loss *sum*."""
    n = hidden.shape[0]
    # fp64 inputs (gradcheck) stay fp64; everything else computes the softmax in fp32.
    ce_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    ce = _ce_chunk_triton if _runtime.use_triton(hidden) else _ce_chunk_torch
    loss_sum = torch.zeros((), device=hidden.device, dtype=ce_dtype)
    dx = torch.empty_like(hidden) if want_dx else None
    dw = torch.zeros(weight.shape, device=weight.device, dtype=ce_dtype) if want_dw else None
    db = torch.zeros(weight.shape[0], device=weight.device, dtype=ce_dtype) if (want_dw and bias is not None) else None
    write_grad = want_dx or want_dw
    for start in range(0, n, chunk_tokens):
        h_c = hidden[start:start + chunk_tokens]
        logits = F.linear(h_c, weight, bias).to(ce_dtype)  # (C, V); .to makes no copy when already fp32
        loss_sum += ce(logits, targets[start:start + chunk_tokens], ignore_index, write_grad).sum()
        if not write_grad:
            continue
        grad = logits.to(hidden.dtype)  # (C, V) d loss_sum / d logits, in the GEMM dtype
        if want_dx:
            torch.matmul(grad, weight.to(hidden.dtype), out=dx[start:start + chunk_tokens])
        if want_dw:
            dw.addmm_(grad.t().to(ce_dtype), h_c.to(ce_dtype))
            if db is not None:
                db += grad.sum(0).to(ce_dtype)
        del logits, grad
    return loss_sum, dx, dw, db


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, reduction, chunk_tokens):
        want_dx, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, dx, dw, db = _chunked(hidden, weight, bias, targets, ignore_index, chunk_tokens, want_dx, want_dw)
        if reduction == "mean":
            # Divide by the target-token count as a tensor: no host sync on GPU.
            n_valid = (targets != ignore_index).sum().clamp(min=1).to(loss.dtype)
            loss = loss / n_valid
            for g in (dx, dw, db):  # in place: no second (N x H) / (V x H) buffer
                if g is not None:
                    g.div_(n_valid.to(g.dtype))
        ctx.grads = (dx, dw.to(weight.dtype) if dw is not None else None, db.to(bias.dtype) if db is not None else None)
        return loss.float() if loss.dtype != torch.float64 else loss

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw, db = ctx.grads  # kept (not cleared): a retained graph may run backward again
        scale = lambda g: None if g is None else g * grad_loss.to(g.dtype)  # noqa: E731
        return scale(dx), scale(dw), scale(db), None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                         reduction: str = "sum", bias: torch.Tensor | None = None, chunk_tokens: int | None = None) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight^T (+ bias)` against `targets`, never materialising all logits.

    hidden (..., H), weight (V, H), targets (...) aligned with hidden's leading dims (already shifted for
    next-token prediction); rows whose target is `ignore_index` contribute nothing. reduction="sum"
    gives the token-loss sum the harness normalises across ranks; "mean" divides by the number of
    target tokens. A frozen weight (requires_grad=False) gets no gradient and costs no dW GEMM.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"linear_cross_entropy: weight {tuple(weight.shape)} does not match hidden size {hidden.shape[-1]} "
                         "(an empty weight means a ZeRO-3 parameter used outside its module's forward)")
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    targets1d = targets.reshape(-1)
    if targets1d.shape[0] != hidden2d.shape[0]:
        raise ValueError(f"linear_cross_entropy: {targets1d.shape[0]} targets for {hidden2d.shape[0]} hidden rows")
    if not targets1d.is_cuda:  # a range check costs a device sync on GPU; F.cross_entropy checks the same on CPU
        bad = (targets1d != ignore_index) & ((targets1d < 0) | (targets1d >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(f"linear_cross_entropy: target ids outside [0, {weight.shape[0]}) (ignore_index={ignore_index})")
    chunk = chunk_tokens or default_chunk_tokens(hidden2d.shape[0], weight.shape[1], weight.shape[0])
    if torch.is_grad_enabled() and (hidden2d.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return LinearCrossEntropyFunction.apply(hidden2d, weight, bias, targets1d, ignore_index, reduction, chunk)
    with torch.no_grad():
        loss, *_ = _chunked(hidden2d, weight, bias, targets1d, ignore_index, chunk, False, False)
        if reduction == "mean":
            loss = loss / (targets1d != ignore_index).sum().clamp(min=1).to(loss.dtype)
    return loss.float() if loss.dtype != torch.float64 else loss
