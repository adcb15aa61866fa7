"""Triton kernels. Imported only through `_runtime.triton_kernels()`.

Rules that keep every kernel runnable under the Triton interpreter (CPU CI) as well as on GPU:
- 16-bit loads are cast to `COMPUTE` (a constexpr: fp32, or fp64 when the inputs are fp64 so
  `torch.autograd.gradcheck` can run on the kernel itself) before any arithmetic: the interpreter keeps
  bf16 as raw uint16 bits and computes garbage on them.
- No libdevice / inline asm, no bf16 atomics, no autotune (one config), int64 row offsets.
"""

import triton
import triton.language as tl


# ------------------------------------------------------------------------------------------------
# RMSNorm: y = w * x / sqrt(mean(x^2) + eps), rows of width H; a (BLOCK_R x BLOCK_H) tile per program.
# ------------------------------------------------------------------------------------------------


@triton.jit
def rmsnorm_fwd(X, W, Y, RSTD, n_rows, n_cols, stride_x, stride_y, eps,
                BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, COMPUTE: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(COMPUTE)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)  # (BLOCK_R,)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd.to(RSTD.dtype.element_ty), mask=row_ok)


@triton.jit
def rmsnorm_bwd(DY, X, W, RSTD, DX, DW_PARTIAL, n_rows, n_cols, stride_dy, stride_x, stride_dx, n_row_blocks,
                BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, HAS_DW: tl.constexpr, COMPUTE: tl.constexpr):
    """dx = rstd * (w*dy - xhat * mean(w*dy*xhat)). A persistent grid: program p handles row blocks
    p, p + G, p + 2G, ... and, with HAS_DW, accumulates its rows' dy*xhat in registers and writes one
    row of DW_PARTIAL (G x H, reduced on the host): no atomics, deterministic, and G rows instead of
    one per row block."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(COMPUTE)
    dw = tl.zeros([BLOCK_H], dtype=COMPUTE)
    for rb in range(pid, n_row_blocks, n_programs):
        rows = (rb * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # int64 before the stride products
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0).to(COMPUTE)
        xhat = x * rstd[:, None]
        wdy = w[None, :] * dy
        c = tl.sum(wdy * xhat, axis=1) / n_cols
        dx = (wdy - xhat * c[:, None]) * rstd[:, None]
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DW:
            dw += tl.sum(dy * xhat, axis=0)
    if HAS_DW:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw, mask=col_ok)


# ------------------------------------------------------------------------------------------------
# RoPE on q and k in one launch. One program per (batch, token): it rotates all q heads and all k
# heads of that token. cos/sin are either per token (B_or_1, T, D) or a table (P, D) indexed by
# position_ids (B, T) (packed sequences restart positions per sample). Halves convention (HF
# rotate_half): out1 = x1*c - x2*s, out2 = x2*c + x1*s; the backward is the same with -s.
# ------------------------------------------------------------------------------------------------


@triton.jit
def _rope_one(SRC, DST, b, t, n_heads, s_b, s_h, s_t, d_b, d_h, d_t, c, s, half,
              BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, COMPUTE: tl.constexpr):
    heads = tl.arange(0, BLOCK_HEADS)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (heads < n_heads)[:, None] & (cols < half)[None, :]
    src = SRC + b * s_b + t * s_t + heads[:, None] * s_h + cols[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(COMPUTE)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(COMPUTE)
    dst = DST + b * d_b + t * d_t + heads[:, None] * d_h + cols[None, :]
    tl.store(dst, (x1 * c[None, :] - x2 * s[None, :]).to(DST.dtype.element_ty), mask=mask)
    tl.store(dst + half, (x2 * c[None, :] + x1 * s[None, :]).to(DST.dtype.element_ty), mask=mask)


@triton.jit
def rope_qk(Q, K, QO, KO, COS, SIN, POS, n_tokens, n_q_heads, n_k_heads, half,
            q_sb, q_sh, q_st, k_sb, k_sh, k_st, qo_sb, qo_sh, qo_st, ko_sb, ko_sh, ko_st, cs_sb, cs_st,
            SIGN: tl.constexpr, HAS_POS: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
            BLOCK_HALF: tl.constexpr, COMPUTE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_tokens
    t = pid % n_tokens
    if HAS_POS:  # table row = this token's position id
        row = tl.load(POS + pid).to(tl.int64) * cs_st
    else:
        row = b * cs_sb + t * cs_st
    cols = tl.arange(0, BLOCK_HALF)
    c = tl.load(COS + row + cols, mask=cols < half, other=0.0).to(COMPUTE)
    s = tl.load(SIN + row + cols, mask=cols < half, other=0.0).to(COMPUTE) * SIGN
    _rope_one(Q, QO, b, t, n_q_heads, q_sb, q_sh, q_st, qo_sb, qo_sh, qo_st, c, s, half, BLOCK_QH, BLOCK_HALF, COMPUTE)
    _rope_one(K, KO, b, t, n_k_heads, k_sb, k_sh, k_st, ko_sb, ko_sh, ko_st, c, s, half, BLOCK_KH, BLOCK_HALF, COMPUTE)


# ------------------------------------------------------------------------------------------------
# SwiGLU elementwise: h = silu(g) * u. The backward recomputes sigmoid(g) instead of saving it.
# ------------------------------------------------------------------------------------------------


@triton.jit
def swiglu_fwd(G, U, H, n, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(COMPUTE)
    u = tl.load(U + offs, mask=mask, other=0.0).to(COMPUTE)
    h = g * tl.sigmoid(g) * u
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_bwd(DH, G, U, DG, DU, n, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(COMPUTE)
    g = tl.load(G + offs, mask=mask, other=0.0).to(COMPUTE)
    u = tl.load(U + offs, mask=mask, other=0.0).to(COMPUTE)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DU + offs, (dh * silu).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + offs, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# Cross-entropy on one chunk of logits (rows x V), one program per row: an online log-sum-exp over V
# in BLOCK_V slices, the row's loss, and (WRITE_GRAD) softmax - onehot written over the logits in
# place, so the chunk never needs a second (rows x V) buffer. Ignored rows get loss 0 and grad 0.
# ------------------------------------------------------------------------------------------------


@triton.jit
def cross_entropy_rows(LOGITS, TARGETS, LOSS, n_cols, stride_row, ignore_index,
                       WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, COMPUTE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_row
    target = tl.load(TARGETS + row).to(tl.int64)
    ignored = target == ignore_index
    cols = tl.arange(0, BLOCK_V)
    # First slice peeled so the running max / sum start as properly typed scalars.
    x = tl.load(ptr + cols, mask=cols < n_cols, other=float("-inf")).to(COMPUTE)
    m = tl.max(x, axis=0)
    d = tl.sum(tl.exp(x - m), axis=0)
    for off in range(BLOCK_V, n_cols, BLOCK_V):
        x = tl.load(ptr + off + cols, mask=off + cols < n_cols, other=float("-inf")).to(COMPUTE)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    safe_target = tl.where(ignored, 0, target)
    x_target = tl.load(ptr + safe_target).to(COMPUTE)
    tl.store(LOSS + row, tl.where(ignored, 0.0, lse - x_target).to(LOSS.dtype.element_ty))
    if WRITE_GRAD:
        keep = tl.where(ignored, 0.0, 1.0)
        for off in range(0, n_cols, BLOCK_V):
            idx = off + cols
            x = tl.load(ptr + idx, mask=idx < n_cols, other=0.0).to(COMPUTE)
            g = tl.exp(x - lse) - tl.where(idx == target, 1.0, 0.0)
            tl.store(ptr + idx, (g * keep).to(LOGITS.dtype.element_ty), mask=idx < n_cols)


# ------------------------------------------------------------------------------------------------
# NF4 dequantisation (bitsandbytes layout), double quantisation in the same pass. BLOCK output
# elements per program; element e reads byte e // 2 (high nibble for even e).
# ------------------------------------------------------------------------------------------------


@triton.jit
def nf4_dequant(PACKED, CODE, ABSMAX, CODE2, ABSMAX2, OUT, n, offset, blocksize, blocksize2,
                NESTED: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < n
    byte = tl.load(PACKED + e // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(e % 2 == 0, byte >> 4, byte & 15)
    value = tl.load(CODE + nibble, mask=mask, other=0.0).to(tl.float32)
    block = e // blocksize
    if NESTED:
        q = tl.load(ABSMAX + block, mask=mask, other=0).to(tl.int32)
        absmax = tl.load(CODE2 + q, mask=mask, other=0.0) * tl.load(ABSMAX2 + block // blocksize2, mask=mask, other=0.0) + offset
    else:
        absmax = tl.load(ABSMAX + block, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + e, (value * absmax).to(OUT.dtype.element_ty), mask=mask)
