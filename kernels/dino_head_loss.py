"""Fused head last layer + DINO loss: the student logits S = X W^T (X (n_views*B, D) bottleneck
features, W (K, D) effective weight-normalized last layer) are computed tile by tile and never stored,
nor is their gradient. Loss, lse, teacher statistics and center update follow kernels/dino_loss.py
(same partials, same combine and center kernels); see its header for the algebra.

    dS_v   = g / (P*B*tau_s) * (n_v softmax(S_v / tau_s) - Q_v)           (recomputed per tile)
    dX     = dS W          dW = dS^T X

Kernels (fp32 accumulation; tl.dot on the tensor cores in the dtype of X and W):
  1. _dino_head_loss_fwd_kernel, grid (K tiles, image blocks): W tile once, S tile of every view
     by tl.dot, teacher tile read from T; writes the per-tile partials of kernels/dino_loss.py.
  2. _dino_head_loss_bwd_dw_kernel, grid (K tiles,): recomputes S, forms dS, accumulates the
     (BLOCK_K, D) tile of dW over all rows in registers: deterministic, no atomics.
  3. _dino_head_loss_bwd_dx_kernel, grid (views x image blocks, K chunks): recomputes S, forms dS,
     accumulates dX rows over the chunk's tiles; fp32 partials (n_chunks, n_views*B, D) summed after.

Memory: no (n_views*B, K) tensor. The teacher logits T (2B, K) are an input (the teacher's
F.linear, as the unfused teacher does; no gradient); partials are O(n_views*B*K/BLOCK_K) floats for
the forward statistics and O(n_chunks*n_views*B*D) for dX.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import dino_loss as _dl
from .dino_loss import LOG2E, _check_runnable, _sm_count


def dino_head_loss_ref(student_feats, student_weight, teacher_output, center, ncrops, student_temp,
                       teacher_temp, center_momentum=None):
    """Unfused: student logits F.linear(student_feats, student_weight), then dino_loss_ref.
    Returns (loss, teacher_entropy, teacher_sum)."""
    return _dl.dino_loss_ref(F.linear(student_feats, student_weight), teacher_output, center, ncrops,
                             student_temp, teacher_temp, center_momentum)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_w_tile(W_ptr, offs_k, offs_d, mask_k, mask_d, stride_w):
    """(BLOCK_K, BLOCK_D) tile of the effective last-layer weight, zero outside K x D."""
    return tl.load(W_ptr + offs_k[:, None].to(tl.int64) * stride_w + offs_d[None, :],
                   mask=mask_k[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def _load_teacher_pair(T_ptr, offs_b, offs_k, mask, B, stride_t):
    """fp32 (BLOCK_B, BLOCK_K) tiles of teacher views 0 and 1 (rows b and B + b)."""
    t_rows = offs_b[:, None].to(tl.int64) * stride_t + offs_k[None, :]
    t0 = tl.load(T_ptr + t_rows, mask=mask, other=0.0).to(tl.float32)
    t1 = tl.load(T_ptr + B * stride_t + t_rows, mask=mask, other=0.0).to(tl.float32)
    return t0, t1


@triton.jit
def _dino_head_loss_fwd_kernel(
    X_ptr, W_ptr, T_ptr, C_ptr, SStat_ptr, TStat_ptr, TSumPart_ptr,
    B, K, D, n_views, n_tiles, stride_x, stride_w, stride_t,
    s_scale, t_scale,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Partials of images [pid_b*BLOCK_B, +BLOCK_B) on K tile pid_k; layouts of kernels/dino_loss.py
    (SStat (2, n_views*B, n_tiles), TStat (4, 2B, n_tiles), TSumPart (n_blocks, K))."""
    pid_k = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    mask_k = offs_k < K
    mask_b = offs_b < B
    mask_d = offs_d < D
    mask = mask_b[:, None] & mask_k[None, :]
    w = _load_w_tile(W_ptr, offs_k, offs_d, mask_k, mask_d, stride_w)
    c = tl.load(C_ptr + offs_k, mask=mask_k, other=0.0)
    t0, t1 = _load_teacher_pair(T_ptr, offs_b, offs_k, mask, B, stride_t)
    tl.store(TSumPart_ptr + pid_b.to(tl.int64) * K + offs_k, tl.sum(t0 + t1, axis=0), mask=mask_k)
    s_plane = n_views * B * n_tiles
    t_plane = 2 * B * n_tiles
    x_mask = mask_b[:, None] & mask_d[None, :]
    s0 = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    s1 = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)  # sum of the local views' logits
    for v in range(0, n_views):
        rows = v * B + offs_b
        x = tl.load(X_ptr + rows[:, None].to(tl.int64) * stride_x + offs_d[None, :], mask=x_mask, other=0.0)
        s = tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)  # (BLOCK_B, BLOCK_K) fp32
        xs = tl.where(mask, s * s_scale, float("-inf"))
        m = tl.where(mask_b, tl.max(xs, axis=1), 0.0)
        z = tl.sum(tl.exp2(xs - m[:, None]), axis=1)
        tl.store(SStat_ptr + rows * n_tiles + pid_k, m, mask=mask_b)
        tl.store(SStat_ptr + s_plane + rows * n_tiles + pid_k, z, mask=mask_b)
        if v == 0:
            s0 = s
        elif v == 1:
            s1 = s
        else:
            acc += s
    for i in tl.static_range(2):
        if i == 0:
            tc = t0 - c[None, :]
            other = s1 + acc
        else:
            tc = t1 - c[None, :]
            other = s0 + acc
        y = tl.where(mask, tc * t_scale, float("-inf"))
        m = tl.where(mask_b, tl.max(y, axis=1), 0.0)
        e = tl.exp2(y - m[:, None])
        rows = i * B + offs_b
        tl.store(TStat_ptr + rows * n_tiles + pid_k, m, mask=mask_b)
        tl.store(TStat_ptr + t_plane + rows * n_tiles + pid_k, tl.sum(e, axis=1), mask=mask_b)
        tl.store(TStat_ptr + 2 * t_plane + rows * n_tiles + pid_k, tl.sum(e * other, axis=1), mask=mask_b)
        tl.store(TStat_ptr + 3 * t_plane + rows * n_tiles + pid_k,
                 tl.sum(e * tl.where(mask, y - m[:, None], 0.0), axis=1), mask=mask_b)


@triton.jit
def _head_dlogits(x, w, t0, t1, c, lse_s, lse_t0, lse_t1, v, coef, mask, s_scale, t_scale,
                  DOT_PRECISION: tl.constexpr):
    """dS tile of student view v: coef * (n_v p - Q_v), zero outside the valid rows/columns."""
    s = tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
    p = tl.exp2(s * s_scale - lse_s[:, None])
    q0 = tl.exp2((t0 - c[None, :]) * t_scale - lse_t0[:, None])
    q1 = tl.exp2((t1 - c[None, :]) * t_scale - lse_t1[:, None])
    n_v = tl.where(v >= 2, 2.0, 1.0)
    q = tl.where(v != 0, q0, 0.0) + tl.where(v != 1, q1, 0.0)
    return tl.where(mask, coef * (n_v * p - q), 0.0)


@triton.jit
def _dino_head_loss_bwd_dw_kernel(
    X_ptr, W_ptr, T_ptr, C_ptr, LseS_ptr, LseT_ptr, GradOut_ptr, DW_ptr,
    B, K, D, n_views, stride_x, stride_w, stride_t, stride_dw,
    s_scale, t_scale, grad_scale,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dW[tile] = sum over all rows of dS[:, tile]^T X, accumulated in registers."""
    pid_k = tl.program_id(0)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask_k = offs_k < K
    mask_d = offs_d < D
    w = _load_w_tile(W_ptr, offs_k, offs_d, mask_k, mask_d, stride_w)
    c = tl.load(C_ptr + offs_k, mask=mask_k, other=0.0)
    coef = tl.load(GradOut_ptr).to(tl.float32) * grad_scale
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        mask = mask_b[:, None] & mask_k[None, :]
        t0, t1 = _load_teacher_pair(T_ptr, offs_b, offs_k, mask, B, stride_t)
        lse_t0 = tl.load(LseT_ptr + offs_b, mask=mask_b, other=0.0)
        lse_t1 = tl.load(LseT_ptr + B + offs_b, mask=mask_b, other=0.0)
        for v in range(0, n_views):
            rows = v * B + offs_b
            x = tl.load(X_ptr + rows[:, None].to(tl.int64) * stride_x + offs_d[None, :],
                        mask=mask_b[:, None] & mask_d[None, :], other=0.0)
            lse_s = tl.load(LseS_ptr + rows, mask=mask_b, other=0.0)
            ds = _head_dlogits(x, w, t0, t1, c, lse_s, lse_t0, lse_t1, v, coef, mask, s_scale, t_scale,
                               DOT_PRECISION)
            acc += tl.dot(tl.trans(ds.to(x.dtype)), x, input_precision=DOT_PRECISION)
    tl.store(DW_ptr + offs_k[:, None].to(tl.int64) * stride_dw + offs_d[None, :],
             acc.to(DW_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_d[None, :])


@triton.jit
def _dino_head_loss_bwd_dx_kernel(
    X_ptr, W_ptr, T_ptr, C_ptr, LseS_ptr, LseT_ptr, GradOut_ptr, DXPart_ptr,
    B, K, D, n_views, n_bblocks, tiles_per_chunk, stride_x, stride_w, stride_t,
    s_scale, t_scale, grad_scale,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dX rows of (view v, image block) over the K tiles of chunk pid_c: sum_tiles dS W, fp32 partial."""
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    v = pid // n_bblocks
    offs_b = (pid % n_bblocks) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    mask_b = offs_b < B
    mask_d = offs_d < D
    rows = v * B + offs_b
    x = tl.load(X_ptr + rows[:, None].to(tl.int64) * stride_x + offs_d[None, :],
                mask=mask_b[:, None] & mask_d[None, :], other=0.0)
    lse_s = tl.load(LseS_ptr + rows, mask=mask_b, other=0.0)
    lse_t0 = tl.load(LseT_ptr + offs_b, mask=mask_b, other=0.0)
    lse_t1 = tl.load(LseT_ptr + B + offs_b, mask=mask_b, other=0.0)
    coef = tl.load(GradOut_ptr).to(tl.float32) * grad_scale
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    for j in range(0, tiles_per_chunk):
        offs_k = (pid_c * tiles_per_chunk + j) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        mask = mask_b[:, None] & mask_k[None, :]
        w = _load_w_tile(W_ptr, offs_k, offs_d, mask_k, mask_d, stride_w)
        c = tl.load(C_ptr + offs_k, mask=mask_k, other=0.0)
        t0, t1 = _load_teacher_pair(T_ptr, offs_b, offs_k, mask, B, stride_t)
        ds = _head_dlogits(x, w, t0, t1, c, lse_s, lse_t0, lse_t1, v, coef, mask, s_scale, t_scale,
                           DOT_PRECISION)
        acc += tl.dot(ds.to(w.dtype), w, input_precision=DOT_PRECISION)
    out = DXPart_ptr + pid_c.to(tl.int64) * (n_views * B * D) + rows[:, None] * D + offs_d[None, :]
    tl.store(out, acc, mask=mask_b[:, None] & mask_d[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers, autograd.Function, public function
# ----------------------------------------------------------------------------------------------
def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: TF32 only where PyTorch's own matmuls would use it (same numbers as F.linear)."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


# Launch table per element size of X and W: kind -> (BLOCK_K, num_warps, num_stages, max BLOCK_B), for
# BLOCK_D <= 256. Shared memory holds the W tile (BLOCK_K, BLOCK_D), the X tile (BLOCK_B, BLOCK_D)
# times the pipeline stages of the loop that loads it, and the tl.dot operand/layout buffers; fp32
# doubles every tile (and TF32 wgmma on sm_90 stages both operands), so 4-byte inputs take smaller K
# tiles and fewer stages. Every entry stays under sm_80's 166912 B (A100 opt-in maximum) and sm_90's
# 232448 B with triton 3.6 and 3.9 (tests/kernels/test_dino_head_loss.py compiles each one,
# fp32 (ieee and tf32), bf16 and fp16, at the largest BLOCK_B; smaller BLOCK_B only shrink tiles).
HEAD_CONFIG = {
    2: {"fwd": (128, 8, 3, 64), "dw": (64, 8, 2, 64), "dx": (64, 4, 2, 64)},
    4: {"fwd": (64, 4, 1, 64), "dw": (32, 8, 2, 32), "dx": (32, 4, 2, 64)},
}
HEAD_MAX_BLOCK_D = 256  # larger D: K tiles shrink in proportion


def head_launch_config(B: int, D: int, itemsize: int, block_b: int | None = None,
                       block_k: int | None = None) -> dict:
    """kind ("fwd", "dw", "dx") -> (BLOCK_B, BLOCK_K, BLOCK_D, num_warps, num_stages): what the
    launchers use for B images of D features with inputs of `itemsize` bytes. block_b overrides
    BLOCK_B of every kernel; block_k sets the forward's BLOCK_K and caps the backward's (tests)."""
    BLOCK_D = max(16, triton.next_power_of_2(D))
    shrink = max(1, BLOCK_D // HEAD_MAX_BLOCK_D)
    out = {}
    for kind, (bk, nw, ns, max_b) in HEAD_CONFIG[4 if itemsize >= 4 else 2].items():
        BLOCK_B = block_b or min(max_b, max(16, triton.next_power_of_2(B)))
        BLOCK_K = max(16, bk // shrink)
        if block_k is not None:
            BLOCK_K = block_k if kind == "fwd" else min(block_k, BLOCK_K)
        out[kind] = (BLOCK_B, BLOCK_K, BLOCK_D, nw, ns)
    return out


def dino_head_loss_fwd(X, W, T, center, ncrops, student_temp, teacher_temp, center_momentum, blocks):
    """Pass 1 (tl.dot tiles), then the combine and center passes of kernels/dino_loss.py.
    Returns (res, lse): res (2 + 2K,) = [loss, entropy, teacher_sum, center_saved], lse in log2 units."""
    n_rows, D = X.shape
    K = W.shape[0]
    B = n_rows // ncrops
    BLOCK_B, BLOCK_K, BLOCK_D, nw, ns = blocks["fwd"]
    n_tiles, n_bblocks = triton.cdiv(K, BLOCK_K), triton.cdiv(B, BLOCK_B)
    sstat, tstat, tsum_part, row_stat = _dl.loss_workspace(B, K, ncrops, n_tiles, n_bblocks, X.device)
    _dino_head_loss_fwd_kernel[(n_tiles, n_bblocks)](
        X, W, T, center, sstat, tstat, tsum_part,
        B, K, D, ncrops, n_tiles, X.stride(0), W.stride(0), T.stride(0),
        LOG2E / student_temp, LOG2E / teacher_temp,
        BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, DOT_PRECISION=_dot_precision(X.dtype),
        num_warps=nw, num_stages=ns,
    )
    lse, res = _dl.combine_and_center(sstat, tstat, tsum_part, row_stat, center, B, K, ncrops, n_tiles, n_bblocks,
                                      student_temp, center_momentum, _dl._combine_meta(ncrops, n_tiles),
                                      _dl._center_meta(B, K, n_bblocks))
    return res, lse


def dino_head_loss_bwd(grad_out, X, W, T, center_saved, lse_s, lse_t, ncrops, student_temp, teacher_temp,
                       blocks, need_dx, need_dw):
    n_rows, D = X.shape
    K = W.shape[0]
    B = n_rows // ncrops
    # grad_out (0-d, any float dtype) is read in the kernels: no host-side conversion
    args = (LOG2E / student_temp, LOG2E / teacher_temp, 1.0 / ((2 * ncrops - 2) * B * student_temp))
    prec = _dot_precision(X.dtype)
    dX = dW = None
    if need_dw:
        dW = torch.empty_like(W)
        BLOCK_B, BK, BLOCK_D, nw, ns = blocks["dw"]  # the (BK, D) fp32 accumulator lives in registers
        _dino_head_loss_bwd_dw_kernel[(triton.cdiv(K, BK),)](
            X, W, T, center_saved, lse_s, lse_t, grad_out, dW,
            B, K, D, ncrops, X.stride(0), W.stride(0), T.stride(0), dW.stride(0), *args,
            BLOCK_B=BLOCK_B, BLOCK_K=BK, BLOCK_D=BLOCK_D, DOT_PRECISION=prec, num_warps=nw, num_stages=ns,
        )
    if need_dx:
        BLOCK_B, BK, BLOCK_D, nw, ns = blocks["dx"]  # W tile + dS tile staged in shared memory
        n_bblocks = triton.cdiv(B, BLOCK_B)
        n_tiles = triton.cdiv(K, BK)
        n_chunks = max(1, min(n_tiles, triton.cdiv(2 * _sm_count(X.device), ncrops * n_bblocks)))
        tiles_per_chunk = triton.cdiv(n_tiles, n_chunks)
        n_chunks = triton.cdiv(n_tiles, tiles_per_chunk)
        part = torch.empty((n_chunks, n_rows, D), dtype=torch.float32, device=X.device)
        _dino_head_loss_bwd_dx_kernel[(ncrops * n_bblocks, n_chunks)](
            X, W, T, center_saved, lse_s, lse_t, grad_out, part,
            B, K, D, ncrops, n_bblocks, tiles_per_chunk, X.stride(0), W.stride(0), T.stride(0), *args,
            BLOCK_B=BLOCK_B, BLOCK_K=BK, BLOCK_D=BLOCK_D, DOT_PRECISION=prec, num_warps=nw, num_stages=ns,
        )
        dX = part.sum(0).to(X.dtype)
    return dX, dW


class DINOHeadLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, W, T, center, ncrops, student_temp, teacher_temp, center_momentum, blocks):
        res, lse = dino_head_loss_fwd(X, W, T, center, ncrops, student_temp, teacher_temp, center_momentum, blocks)
        K = W.shape[0]
        ctx.save_for_backward(X, W, T, res, lse)
        ctx.args = (ncrops, student_temp, teacher_temp, blocks)
        loss, entropy, teacher_sum = res[0], res[1], res[2:2 + K]
        ctx.mark_non_differentiable(entropy, teacher_sum)
        return loss, entropy, teacher_sum

    @staticmethod
    def backward(ctx, grad_loss, grad_entropy, grad_teacher_sum):
        X, W, T, res, lse = ctx.saved_tensors
        K, n_rows = W.shape[0], X.shape[0]
        dX, dW = dino_head_loss_bwd(grad_loss, X, W, T, res[2 + K:], lse[:n_rows], lse[n_rows:], *ctx.args,
                                    need_dx=ctx.needs_input_grad[0], need_dw=ctx.needs_input_grad[1])
        return dX, dW, None, None, None, None, None, None, None


def dino_head_loss(student_feats, student_weight, teacher_output, center, ncrops, student_temp, teacher_temp,
                   center_momentum=None, block_b=None, block_k=None):
    """Fused last layer + DINO loss (Triton; CUDA, or CPU under TRITON_INTERPRET=1).

    student_feats (ncrops*B, D) and student_weight (K, D) in one dtype (the matmul dtype; fp32
    accumulation); teacher_output (2*B, K) logits; center (1, K) fp32. Returns (loss,
    teacher_entropy, teacher_sum) as kernels.dino_loss.dino_loss; gradients flow to student_feats
    and student_weight (the dW kernel is skipped when student_weight needs no gradient).
    """
    if student_feats.dim() != 2 or student_weight.dim() != 2 or student_feats.shape[1] != student_weight.shape[1]:
        raise ValueError(f"dino_head_loss: student_feats (N, D) and student_weight (K, D) disagree: "
                         f"{tuple(student_feats.shape)} vs {tuple(student_weight.shape)}")
    logits_shape = torch.empty(0, device="meta").expand(0, 0).new_empty(student_feats.shape[0], student_weight.shape[0])
    B, K = _dl._check_inputs(logits_shape, teacher_output.to("meta"), center.to("meta"), ncrops)
    _check_runnable(student_feats)
    if student_feats.dtype != student_weight.dtype:
        raise ValueError(f"dino_head_loss: student_feats ({student_feats.dtype}) and student_weight "
                         f"({student_weight.dtype}) must have one dtype")
    if center.dtype != torch.float32 or not center.is_contiguous():
        raise ValueError(f"dino_head_loss: center must be a contiguous fp32 tensor, got {center.dtype}")
    X, W = student_feats.contiguous(), student_weight.contiguous()
    T = teacher_output.detach().contiguous()
    # T's tiles are pipelined through shared memory too: the wider of the two dtypes picks the table
    blocks = head_launch_config(B, X.shape[1], max(X.element_size(), T.element_size()), block_b, block_k)
    return DINOHeadLossFn.apply(X, W, T, center, ncrops, float(student_temp), float(teacher_temp),
                                center_momentum, blocks)


__all__ = ["dino_head_loss", "dino_head_loss_ref", "DINOHeadLossFn", "head_launch_config", "HEAD_CONFIG"]
