"""Fused head last layer + multi-view soft-target cross-entropy: the student logits S = X W^T
(X (V*B, D) bottleneck features, view-major; W (K, D) effective weight-normalized last layer) are
computed tile by tile and never stored, nor is their gradient. The loss is kernels/soft_cross_entropy.py's
with DINO's pairing (T = 2 targets, view i not paired with target i, uniform weights 1/(P*B)) against
fp32 target probabilities Q (2B, K), finished by its combine and reduce; see its header for the algebra.

    loss   = 1/(P*B) sum_b sum_v ( B_vb log Z_vb + <Q_vb, M_vb - s_vb / tau> ),   P = sum_v n_v
             (M = max s / tau, Z = sum e^(s / tau - M), B_vb = sum_k Q_vbk: every term >= 0, no cancellation)
    dS_vb  = g / (P*B*tau) * (n_v softmax(s_vb / tau) - Q_vb)                  (recomputed per tile)
    dX     = dS W          dW = dS^T X

with n_0 = n_1 = 1, n_v = 2 for the local views; Q_0 = q_1, Q_1 = q_0, Q_v = q_0 + q_1.

Kernels (fp32 accumulation; tl.dot on the tensor cores in the dtype of X and W):
  1. _linear_soft_ce_fwd_kernel, grid (K tiles, image blocks): W tile once, target tiles once, the S
     tile of every view by tl.dot; writes the partials of kernels/soft_cross_entropy.py's forward
     (per student row and tile the max logit, Z_t - 1 and <Q, m_t - s / tau>, by its _row_partials;
     per target row and tile the mass), which its combine_and_reduce (_soft_ce_combine_kernel,
     _soft_ce_reduce_kernel) turns into the loss and lse per row: 3 launches.
  2. _linear_soft_ce_bwd_dw_kernel, grid (K tiles,): recomputes S, forms dS, accumulates the
     (BLOCK_K, D) tile of dW over all rows in registers: deterministic, no atomics. Skipped when W
     needs no gradient (frozen last layer).
  3. _linear_soft_ce_bwd_dx_kernel, grid (views x image blocks, K chunks): recomputes S, forms dS,
     accumulates dX rows over the chunk's tiles; fp32 partials (n_chunks, V*B, D) summed after.
Both backward kernels are compiled without FMA contraction (_head_dlogits): s / tau is rounded as the
combine's M / tau, so at K = 1 (loss exactly 0) both gradients are exactly 0 too, given a backward
tl.dot that rounds S as the forward's did (the same sum over D; checked under the interpreter).
Forward and backward are torch.library custom ops (fastdino::linear_soft_cross_entropy and
fastdino::linear_soft_cross_entropy_backward) with fake implementations; the upstream gradient is
read in the kernels: no host synchronization, CUDA-graph capturable.

Memory: no (V*B, K) tensor. Partials are O(V*B*K/BLOCK_K) floats for the forward statistics and
O(n_chunks*V*B*D) for dX. Traffic: W read three times (fwd, dW, dX), Q three times, X a few times.
Design limits: D <= 256 at full K tiles (larger D shrinks the tiles); X and W in one dtype; the
combine holds one image's (views, K tiles) partials in registers: compiled without spills up to 16
views x 1024 tiles (K = 65536 in fp32, 131072 in bf16, at D <= 256), spilling past that.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .soft_cross_entropy import (LOG2E, LogitTargets, _row_partials, check_runnable, check_shapes, combine_and_reduce,
                                 pair_counts, partials, rows_contiguous, sm_count, soft_cross_entropy_ref)


def linear_soft_cross_entropy_ref(feats, weight, targets, n_views, student_temp):
    """Unfused: student logits F.linear(feats, weight), then soft_cross_entropy_ref (DINO pairing)."""
    return soft_cross_entropy_ref(F.linear(feats, weight), targets, n_views, student_temp)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_w_tile(W_ptr, offs_k, offs_d, mask_k, mask_d, stride_w):
    """(BLOCK_K, BLOCK_D) tile of the effective last-layer weight, zero outside K x D."""
    return tl.load(W_ptr + offs_k[:, None].to(tl.int64) * stride_w + offs_d[None, :],
                   mask=mask_k[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def _load_target_pair(Q_ptr, offs_b, offs_k, mask, B, stride_q):
    """fp32 (BLOCK_B, BLOCK_K) tiles of targets 0 and 1 (rows b and B + b), zero outside."""
    q0 = tl.load(Q_ptr + offs_b[:, None].to(tl.int64) * stride_q + offs_k[None, :], mask=mask, other=0.0)
    q1 = tl.load(Q_ptr + (offs_b + B)[:, None].to(tl.int64) * stride_q + offs_k[None, :], mask=mask, other=0.0)
    return q0.to(tl.float32), q1.to(tl.float32)


@triton.jit
def _paired_targets(q0, q1, v):
    """Q_v: target i pairs with every view but view i."""
    return tl.where(v != 0, q0, 0.0) + tl.where(v != 1, q1, 0.0)


@triton.jit
def _linear_soft_ce_fwd_kernel(
    X_ptr, W_ptr, Q_ptr, SStat_ptr, QStat_ptr,
    B, K, D, n_views, n_tiles, stride_x, stride_w, stride_q,
    s_scale,  # log2(e) / tau
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Partials of images [pid_b*BLOCK_B, +BLOCK_B) on K tile pid_k, those of
    kernels/soft_cross_entropy.py's forward: SStat (3, n_views*B, n_tiles) = (tile max, Z_t - 1,
    a_t) per student row (_row_partials on the tl.dot tile of each view); QStat (2B, n_tiles) =
    sum_k q_k per target row."""
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
    q0, q1 = _load_target_pair(Q_ptr, offs_b, offs_k, mask, B, stride_q)
    tl.store(QStat_ptr + offs_b * n_tiles + pid_k, tl.sum(q0, axis=1), mask=mask_b)
    tl.store(QStat_ptr + (B + offs_b) * n_tiles + pid_k, tl.sum(q1, axis=1), mask=mask_b)
    s_plane = n_views * B * n_tiles
    x_mask = mask_b[:, None] & mask_d[None, :]
    for v in range(0, n_views):
        rows = v * B + offs_b
        x = tl.load(X_ptr + rows[:, None].to(tl.int64) * stride_x + offs_d[None, :], mask=x_mask, other=0.0)
        s = tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)  # (BLOCK_B, BLOCK_K) fp32; 0 on padded rows
        _row_partials(SStat_ptr, s, _paired_targets(q0, q1, v), rows, mask_b, mask_k, pid_k, n_tiles, s_plane,
                      s_scale)


@triton.jit
def _head_dlogits(x, w, q0, q1, lse, v, coef, mask, inv_student_temp, DOT_PRECISION: tl.constexpr):
    """dS tile of student view v: coef * (n_v p - Q_v), p = e^(s / tau - lse), zero outside the valid
    rows/columns. The kernels calling it are compiled without FMA contraction: s / tau is rounded as
    the combine's M / tau, so the exponent is exactly 0 where lse = M / tau (K = 1)."""
    s = tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
    p = tl.exp2((s * inv_student_temp - lse[:, None]) * LOG2E)
    n_v = tl.where(v >= 2, 2.0, 1.0)
    return tl.where(mask, coef * (n_v * p - _paired_targets(q0, q1, v)), 0.0)


@triton.jit
def _linear_soft_ce_bwd_dw_kernel(
    X_ptr, W_ptr, Q_ptr, Lse_ptr, GradOut_ptr, DW_ptr,
    B, K, D, n_views, stride_x, stride_w, stride_q, stride_dw,
    inv_student_temp, grad_scale,  # 1 / tau;  1 / (P * B * tau)
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dW[tile] = sum over all rows of dS[:, tile]^T X, accumulated in registers."""
    pid_k = tl.program_id(0)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask_k = offs_k < K
    mask_d = offs_d < D
    w = _load_w_tile(W_ptr, offs_k, offs_d, mask_k, mask_d, stride_w)
    coef = tl.load(GradOut_ptr).to(tl.float32) * grad_scale  # upstream grad read on device: no sync
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        mask = mask_b[:, None] & mask_k[None, :]
        q0, q1 = _load_target_pair(Q_ptr, offs_b, offs_k, mask, B, stride_q)
        for v in range(0, n_views):
            rows = v * B + offs_b
            x = tl.load(X_ptr + rows[:, None].to(tl.int64) * stride_x + offs_d[None, :],
                        mask=mask_b[:, None] & mask_d[None, :], other=0.0)
            lse = tl.load(Lse_ptr + rows, mask=mask_b, other=0.0)
            ds = _head_dlogits(x, w, q0, q1, lse, v, coef, mask, inv_student_temp, DOT_PRECISION)
            acc += tl.dot(tl.trans(ds.to(x.dtype)), x, input_precision=DOT_PRECISION)
    tl.store(DW_ptr + offs_k[:, None].to(tl.int64) * stride_dw + offs_d[None, :],
             acc.to(DW_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_d[None, :])


@triton.jit
def _linear_soft_ce_bwd_dx_kernel(
    X_ptr, W_ptr, Q_ptr, Lse_ptr, GradOut_ptr, DXPart_ptr,
    B, K, D, n_views, n_bblocks, tiles_per_chunk, stride_x, stride_w, stride_q,
    inv_student_temp, grad_scale,
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
    lse = tl.load(Lse_ptr + rows, mask=mask_b, other=0.0)
    coef = tl.load(GradOut_ptr).to(tl.float32) * grad_scale
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    for j in range(0, tiles_per_chunk):
        offs_k = (pid_c * tiles_per_chunk + j) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        mask = mask_b[:, None] & mask_k[None, :]
        w = _load_w_tile(W_ptr, offs_k, offs_d, mask_k, mask_d, stride_w)
        q0, q1 = _load_target_pair(Q_ptr, offs_b, offs_k, mask, B, stride_q)
        ds = _head_dlogits(x, w, q0, q1, lse, v, coef, mask, inv_student_temp, DOT_PRECISION)
        acc += tl.dot(ds.to(w.dtype), w, input_precision=DOT_PRECISION)
    out = DXPart_ptr + pid_c.to(tl.int64) * (n_views * B * D) + rows[:, None].to(tl.int64) * D + offs_d[None, :]
    tl.store(out, acc, mask=mask_b[:, None] & mask_d[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: TF32 only where PyTorch's own matmuls would use it (same numbers as F.linear)."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


# fp32 features with IEEE fp32 dots (TF32 off, PyTorch's default for matmuls) are refused on a GPU: the
# forward and dX kernels compile with 10-19 KB of ptxas spill stack per thread at 32 registers on
# sm_80 and sm_90a (tests/kernels/test_linear_soft_cross_entropy.py reports it), which is where the
# 116 ms the H100 measured (vs 0.3 ms in bf16) goes. bf16 (the training precision) and fp32 with TF32
# compile with at most a few hundred bytes of spills.
FP32_IEEE_REFUSED = ("linear_soft_cross_entropy: fp32 features with IEEE fp32 dots (torch.backends.cuda.matmul."
                     "allow_tf32 is False) compile to kernels that spill 10-19 KB of registers per thread "
                     "(~400x slower than bf16): use bf16, allow TF32, or the unfused head")


# Launch table per element size of X and W: kind -> (BLOCK_K, num_warps, num_stages, max BLOCK_B), for
# BLOCK_D <= 256, from the H100 runs of the former fused head (which read bf16 teacher logits where
# the fp32 targets are now read). Shared memory holds the W tile (BLOCK_K, BLOCK_D), the X tile
# (BLOCK_B, BLOCK_D) and the fp32 target tiles times the pipeline stages of the loop that loads
# them, and the tl.dot operand/layout buffers; fp32 doubles every tile (and TF32 wgmma on sm_90
# stages both operands), so 4-byte inputs take smaller K tiles and fewer stages. Every entry stays
# under sm_80's 166912 B (A100 opt-in maximum) and sm_90's 232448 B with triton 3.9
# (tests/kernels/test_linear_soft_cross_entropy.py compiles each one, fp32 (ieee and tf32), bf16
# and fp16, at the largest BLOCK_B; smaller BLOCK_B only shrink tiles). The 4-byte forward runs 8
# warps since it writes the cancellation-free partials (_row_partials): at 4 it spilled 648 B on
# sm_90a, at 8 none on either target. Not re-timed since the targets became fp32: re-run
# `python benchmarks/loss.py --head` on a GPU.
HEAD_CONFIG = {
    2: {"fwd": (128, 8, 3, 64), "dw": (64, 8, 2, 64), "dx": (64, 4, 2, 64)},
    4: {"fwd": (64, 8, 1, 64), "dw": (32, 8, 2, 32), "dx": (32, 4, 2, 64)},
}
HEAD_MAX_BLOCK_D = 256  # larger D: K tiles shrink in proportion


def head_launch_config(B: int, D: int, itemsize: int, block_b: int = 0, block_k: int = 0) -> dict:
    """kind ("fwd", "dw", "dx") -> (BLOCK_B, BLOCK_K, BLOCK_D, num_warps, num_stages): what the
    launchers use for B images of D features with X and W of `itemsize` bytes. block_b overrides
    BLOCK_B of every kernel; block_k sets the forward's BLOCK_K and caps the backward's (tests);
    0 = from the table."""
    BLOCK_D = max(16, triton.next_power_of_2(D))
    shrink = max(1, BLOCK_D // HEAD_MAX_BLOCK_D)
    out = {}
    for kind, (bk, nw, ns, max_b) in HEAD_CONFIG[4 if itemsize >= 4 else 2].items():
        BLOCK_B = block_b or min(max_b, max(16, triton.next_power_of_2(B)))
        BLOCK_K = max(16, bk // shrink)
        if block_k:
            BLOCK_K = block_k if kind == "fwd" else min(block_k, BLOCK_K)
        out[kind] = (BLOCK_B, BLOCK_K, BLOCK_D, nw, ns)
    return out


def _check_inputs(feats, weight, targets, n_views):
    if feats.dim() != 2 or weight.dim() != 2 or feats.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_soft_cross_entropy: feats (V*B, D) and weight (K, D) disagree: "
                         f"{tuple(feats.shape)} vs {tuple(weight.shape)}")
    if targets.dim() != 2:
        raise ValueError(f"linear_soft_cross_entropy: targets must be 2-D (2B, K), got {tuple(targets.shape)}")
    return check_shapes(feats.shape[0], weight.shape[0], targets.shape, n_views, 2, True,
                        what="linear_soft_cross_entropy")


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastdino::linear_soft_cross_entropy", mutates_args=())
def linear_soft_cross_entropy_op(feats: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, n_views: int,
                                 student_temp: float, block_b: int, block_k: int
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1 (tl.dot tiles), then the combine and reduce passes of kernels/soft_cross_entropy.py.
    Returns (loss 0-dim fp32, lse (V*B,) fp32). block_b / block_k: launch overrides, 0 = the table."""
    X, W, Q = feats.contiguous(), weight.contiguous(), rows_contiguous(targets)
    n_rows, D = X.shape
    K = W.shape[0]
    B = n_rows // n_views
    BLOCK_B, BLOCK_K, BLOCK_D, nw, ns = head_launch_config(B, D, X.element_size(), block_b, block_k)["fwd"]
    n_tiles, n_bblocks = triton.cdiv(K, BLOCK_K), triton.cdiv(B, BLOCK_B)
    sstat, qstat, group_loss = partials(B, n_views, 2, n_tiles, X.device)
    _linear_soft_ce_fwd_kernel[(n_tiles, n_bblocks)](
        X, W, Q, sstat, qstat, B, K, D, n_views, n_tiles, X.stride(0), W.stride(0), Q.stride(0),
        LOG2E.value / student_temp,
        BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, DOT_PRECISION=_dot_precision(X.dtype),
        num_warps=nw, num_stages=ns)
    return combine_and_reduce(sstat, qstat, group_loss, None, None, B, n_views, n_tiles, student_temp, 2, True,
                              X.device)


@linear_soft_cross_entropy_op.register_fake
def _(feats, weight, targets, n_views, student_temp, block_b, block_k):
    f32 = dict(dtype=torch.float32, device=feats.device)
    return torch.empty((), **f32), torch.empty(feats.shape[0], **f32)


@torch.library.custom_op("fastdino::linear_soft_cross_entropy_backward", mutates_args=())
def linear_soft_cross_entropy_backward_op(grad_loss: torch.Tensor, feats: torch.Tensor, weight: torch.Tensor,
                                          targets: torch.Tensor, lse: torch.Tensor, n_views: int,
                                          student_temp: float, need_dfeats: bool, need_dweight: bool,
                                          block_b: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dfeats, dweight) in the dtypes of feats and weight; a gradient not needed is an empty (0,)
    tensor and its kernel is not launched (frozen last layer: no dW kernel)."""
    X, W, Q = feats.contiguous(), weight.contiguous(), rows_contiguous(targets)
    n_rows, D = X.shape
    K = W.shape[0]
    B = n_rows // n_views
    blocks = head_launch_config(B, D, X.element_size(), block_b, block_k)
    # grad_loss (0-d, any float dtype) is read in the kernels: no host-side conversion
    scales = (1.0 / student_temp, 1.0 / (sum(pair_counts(n_views, 2, True)) * B * student_temp))
    prec = _dot_precision(X.dtype)
    dX = dW = X.new_empty(0)
    if need_dweight:
        dW = torch.empty_like(W)
        BLOCK_B, BK, BLOCK_D, nw, ns = blocks["dw"]  # the (BK, D) fp32 accumulator lives in registers
        _linear_soft_ce_bwd_dw_kernel[(triton.cdiv(K, BK),)](
            X, W, Q, lse, grad_loss, dW, B, K, D, n_views, X.stride(0), W.stride(0), Q.stride(0), dW.stride(0),
            *scales, BLOCK_B=BLOCK_B, BLOCK_K=BK, BLOCK_D=BLOCK_D, DOT_PRECISION=prec, num_warps=nw, num_stages=ns,
            enable_fp_fusion=False)
    if need_dfeats:
        BLOCK_B, BK, BLOCK_D, nw, ns = blocks["dx"]  # W tile + dS tile staged in shared memory
        n_bblocks = triton.cdiv(B, BLOCK_B)
        n_tiles = triton.cdiv(K, BK)
        n_chunks = max(1, min(n_tiles, triton.cdiv(2 * sm_count(X.device), n_views * n_bblocks)))
        tiles_per_chunk = triton.cdiv(n_tiles, n_chunks)
        n_chunks = triton.cdiv(n_tiles, tiles_per_chunk)
        part = torch.empty((n_chunks, n_rows, D), dtype=torch.float32, device=X.device)
        _linear_soft_ce_bwd_dx_kernel[(n_views * n_bblocks, n_chunks)](
            X, W, Q, lse, grad_loss, part, B, K, D, n_views, n_bblocks, tiles_per_chunk,
            X.stride(0), W.stride(0), Q.stride(0), *scales,
            BLOCK_B=BLOCK_B, BLOCK_K=BK, BLOCK_D=BLOCK_D, DOT_PRECISION=prec, num_warps=nw, num_stages=ns,
            enable_fp_fusion=False)
        dX = part.sum(0).to(X.dtype)
    return dX, dW


@linear_soft_cross_entropy_backward_op.register_fake
def _(grad_loss, feats, weight, targets, lse, n_views, student_temp, need_dfeats, need_dweight, block_b, block_k):
    dX = torch.empty_like(feats, memory_format=torch.contiguous_format) if need_dfeats else feats.new_empty(0)
    dW = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dweight else feats.new_empty(0)
    return dX, dW


def _setup_context(ctx, inputs, output):
    feats, weight, targets, n_views, student_temp, block_b, block_k = inputs
    ctx.save_for_backward(feats, weight, targets, output[1])
    ctx.args = (n_views, student_temp)
    ctx.blocks = (block_b, block_k)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_lse):
    feats, weight, targets, lse = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_loss is None or not (need_dx or need_dw):
        return (None,) * 7
    dX, dW = linear_soft_cross_entropy_backward_op(grad_loss, feats, weight, targets, lse, *ctx.args,
                                                   need_dx, need_dw, *ctx.blocks)
    return (dX if need_dx else None, dW if need_dw else None) + (None,) * 5


linear_soft_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------
IMPLS = ("triton", "torch")


def linear_soft_cross_entropy(feats, weight, targets, n_views, student_temp, impl="triton", *, block_b=0,
                              block_k=0):
    """Fused last layer + DINO soft-target cross-entropy, scalar fp32 loss.

    feats (n_views*B, D) view-major and weight (K, D) in one dtype (the matmul dtype; fp32
    accumulation); targets (2B, K) fp32 probabilities (no gradient), or LogitTargets (materialized
    here: the fused head reads q). Gradients flow to feats and
    weight (the dW kernel is skipped when weight needs no gradient). impl="triton": the custom op
    (CUDA, or CPU under TRITON_INTERPRET=1); impl="torch": linear_soft_cross_entropy_ref.
    block_b / block_k override the launch table (tests, tuning).
    """
    if impl not in IMPLS:
        raise ValueError(f"linear_soft_cross_entropy: impl={impl!r} is not one of {list(IMPLS)}")
    if isinstance(targets, LogitTargets):
        targets = targets.probs()
    _check_inputs(feats, weight, targets, n_views)
    if feats.dtype != weight.dtype:
        raise ValueError(f"linear_soft_cross_entropy: feats ({feats.dtype}) and weight ({weight.dtype}) must "
                         "have one dtype")
    if impl == "torch":
        return linear_soft_cross_entropy_ref(feats, weight, targets, n_views, student_temp)
    check_runnable(feats, "linear_soft_cross_entropy")
    if feats.is_cuda and _dot_precision(feats.dtype) == "ieee" and feats.dtype == torch.float32:
        raise ValueError(FP32_IEEE_REFUSED)
    loss, _ = linear_soft_cross_entropy_op(feats, weight, targets.detach(), n_views, float(student_temp),
                                           block_b, block_k)
    return loss


__all__ = ["linear_soft_cross_entropy", "linear_soft_cross_entropy_ref", "linear_soft_cross_entropy_op",
           "linear_soft_cross_entropy_backward_op", "head_launch_config", "HEAD_CONFIG"]
