"""Fused multi-crop DINO loss: forward and backward in streaming passes, no [B, K] intermediates.

Inputs: student logits S (n_views*B, K), crop-major (view v of image b is row v*B + b); teacher
logits T (2*B, K) (the two global views); center c (1, K) fp32. Any float dtype, fp32 math.

    q_i      = softmax((t_i - c) / tau_t)                 teacher view i in {0, 1}
    lse_v    = logsumexp(s_v / tau_s)                      student view v in {0 .. n_views-1}
    loss     = 1/(P*B) * sum_b sum_{i, v != i} ( lse_v - <q_i, s_v> / tau_s ),   P = 2*n_views - 2 pairs

because sum_k q_i,k = 1 turns each pair's cross-entropy -<q_i, log_softmax(s_v/tau_s)> into
lse_v - <q_i, s_v>/tau_s. Grouping by student view: L_v = n_v*lse_v - <Q_v, s_v>/tau_s with
Q_0 = q_1, Q_1 = q_0, Q_v = q_0 + q_1 for the local views (n_0 = n_1 = 1, n_v = 2). Grouping by
teacher view instead, the dot terms are <q_i, sum_{v != i} s_v>: one dot per teacher row.

    dL/ds_v  = g / (P*B*tau_s) * (n_v * softmax(s_v / tau_s) - Q_v)          (g = upstream grad)

The teacher gets no gradient (as in the official code, q is detached), nor does the center.

Passes (all fp32 accumulation; exponentials in base 2 with log2(e) folded into the scales):
  1. _dino_loss_fwd_kernel, grid (K tiles, batch groups): one K tile of every row of a group of
     images, read once. Per tile and row: max and sum of exponentials (student and teacher), the
     teacher's dot with the sum of the other student views and with (t - c) (for the entropy), and
     the teacher column sums of the group. Splitting K across programs fills the GPU at B = 16..128.
  2. _dino_loss_combine_kernel, grid (B,): merges the per-tile partials of each image (online
     softmax rescaling) into lse per row and the image's loss and teacher entropy.
  3. _dino_center_kernel, grid (K blocks,): total loss and entropy, the teacher column sums and,
     when asked, the center update c <- m c + (1 - m) colsum / (2B), skipped on device when the
     loss is not finite (no host sync). Keeps a copy of the old center for the backward.
  4. _dino_loss_bwd_kernel, grid (K tiles, batch groups): reads S and T once more, writes dS.

Traffic: S twice, T twice, dS once, plus ~1% partials; the floor is S twice + T once + dS once.
Design limits: n_views >= 2 (two globals, any number of locals); rows of S and T contiguous in K.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)  # usable inside the kernels


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------
def _check_inputs(student_output, teacher_output, center, ncrops):
    if student_output.dim() != 2 or teacher_output.dim() != 2:
        raise ValueError(f"dino_loss: student_output and teacher_output must be 2-D, got "
                         f"{tuple(student_output.shape)} and {tuple(teacher_output.shape)}")
    if ncrops < 2:
        raise ValueError(f"dino_loss: ncrops must be >= 2 (two global crops), got {ncrops}")
    n_rows, K = student_output.shape
    if n_rows % ncrops != 0:
        raise ValueError(f"dino_loss: student_output has {n_rows} rows, not a multiple of ncrops={ncrops}")
    B = n_rows // ncrops
    if tuple(teacher_output.shape) != (2 * B, K):
        raise ValueError(f"dino_loss: teacher_output must be (2*B, K) = {(2 * B, K)} for student_output "
                         f"{tuple(student_output.shape)} and ncrops={ncrops}, got {tuple(teacher_output.shape)}")
    if center.numel() != K:
        raise ValueError(f"dino_loss: center has {center.numel()} elements, expected K={K}")
    return B, K


def _finish_center(center, teacher_sum, loss, B, center_momentum):
    """c <- m c + (1 - m) * teacher_sum / (2B) where the loss is finite (device-side gate)."""
    new = center * center_momentum + (teacher_sum.view_as(center) / (2 * B)) * (1 - center_momentum)
    center.copy_(torch.where(torch.isfinite(loss.detach()), new, center))


def dino_loss_ref(student_output, teacher_output, center, ncrops, student_temp, teacher_temp,
                  center_momentum=None):
    """Plain PyTorch, written from the paper: the double loop over (teacher view, student view) pairs.

    Math in fp32 (fp64 when the student is fp64). Returns (loss, teacher_entropy, teacher_sum):
    loss scalar (differentiable w.r.t. student_output), mean entropy of the 2B teacher
    distributions, column sums (K,) of the raw teacher logits. center_momentum not None: the center
    is updated in place afterwards (gated on the finiteness of the loss).
    """
    B, K = _check_inputs(student_output, teacher_output, center, ncrops)
    dt = torch.float64 if student_output.dtype == torch.float64 else torch.float32
    student = (student_output.to(dt) / student_temp).chunk(ncrops)
    teacher = teacher_output.detach().to(dt)
    logq = torch.log_softmax((teacher - center.to(dt).view(1, K)) / teacher_temp, dim=-1)
    q = logq.exp().chunk(2)
    total, n_terms = 0.0, 0
    for i, q_i in enumerate(q):
        for v, s_v in enumerate(student):
            if v == i:
                continue
            total = total + torch.sum(-q_i * torch.log_softmax(s_v, dim=-1), dim=-1).mean()
            n_terms += 1
    loss = total / n_terms
    entropy = -(logq.exp() * logq).sum(-1).mean()
    teacher_sum = teacher.sum(0)
    if center_momentum is not None:
        with torch.no_grad():
            _finish_center(center, teacher_sum.to(center.dtype), loss, B, center_momentum)
    return loss, entropy.detach(), teacher_sum


def dino_loss_torch(student_output, teacher_output, center, ncrops, student_temp, teacher_temp,
                    center_momentum=None):
    """Vectorized PyTorch formulation of the one-pass algebra (the CPU fast path and the CPU
    benchmark's second variant): loss = (sum_v n_v lse_v - sum_i <q_i, sum_{v!=i} s_v>/tau_s)/(P*B).
    Same arguments and outputs as dino_loss_ref."""
    B, K = _check_inputs(student_output, teacher_output, center, ncrops)
    dt = torch.float64 if student_output.dtype == torch.float64 else torch.float32
    s = student_output.to(dt).view(ncrops, B, K)
    teacher = teacher_output.detach().to(dt)
    logq = torch.log_softmax((teacher - center.to(dt).view(1, K)) / teacher_temp, dim=-1)
    q = logq.exp().view(2, B, K)
    lse = torch.logsumexp(s / student_temp, dim=-1)  # (ncrops, B)
    n_v = torch.full((ncrops, 1), 2.0, dtype=dt, device=s.device)
    n_v[:2] = 1.0
    s_all = s.sum(0)  # sum over the views, then the teacher view's own crop is taken out
    dots = (q * (s_all.unsqueeze(0) - s[:2])).sum(-1)  # (2, B): <q_i, sum_{v != i} s_v>
    loss = ((n_v * lse).sum() - dots.sum() / student_temp) / ((2 * ncrops - 2) * B)
    entropy = -(q.view(2 * B, K) * logq).sum(-1).mean()
    teacher_sum = teacher.sum(0)
    if center_momentum is not None:
        with torch.no_grad():
            _finish_center(center, teacher_sum.to(center.dtype), loss, B, center_momentum)
    return loss, entropy.detach(), teacher_sum


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dino_loss_fwd_kernel(
    S_ptr, T_ptr, C_ptr, SStat_ptr, TStat_ptr, TSumPart_ptr,
    B, K, n_views, group_b, n_tiles, stride_s, stride_t,
    s_scale, t_scale,  # log2(e)/tau_s, log2(e)/tau_t
    BLOCK_K: tl.constexpr,
):
    """One K tile of the rows of images [pid_g*group_b, +group_b). Partials per (row, tile), in
    log2 units: student (m, z) with m = max s*s_scale, z = sum 2^(s*s_scale - m); teacher
    (m, z, d, w) with y = (t - c)*t_scale, e = 2^(y - m), z = sum e, d = sum e * (sum_{v != i} s_v),
    w = sum e * (y - m) (entropy term, relative to the tile max so that peaked q does not cancel). SStat is (2, n_views*B, n_tiles), TStat (4, 2B, n_tiles);
    TSumPart (n_groups, K) gets the group's teacher column sums."""
    pid_k = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    c = tl.load(C_ptr + offs, mask=mask, other=0.0)
    tsum = tl.zeros([BLOCK_K], dtype=tl.float32)
    s_plane = n_views * B * n_tiles
    t_plane = 2 * B * n_tiles
    for j in range(0, group_b):
        b = pid_g * group_b + j
        if b < B:
            t0 = tl.load(T_ptr + b.to(tl.int64) * stride_t + offs, mask=mask, other=0.0).to(tl.float32)
            t1 = tl.load(T_ptr + (b + B).to(tl.int64) * stride_t + offs, mask=mask, other=0.0).to(tl.float32)
            s0 = tl.load(S_ptr + b.to(tl.int64) * stride_s + offs, mask=mask, other=0.0).to(tl.float32)
            s1 = tl.load(S_ptr + (b + B).to(tl.int64) * stride_s + offs, mask=mask, other=0.0).to(tl.float32)
            tsum += t0 + t1
            # student global views 0 and 1
            x = tl.where(mask, s0 * s_scale, float("-inf"))
            m = tl.max(x, axis=0)
            tl.store(SStat_ptr + b * n_tiles + pid_k, m)
            tl.store(SStat_ptr + s_plane + b * n_tiles + pid_k, tl.sum(tl.exp2(x - m), axis=0))
            x = tl.where(mask, s1 * s_scale, float("-inf"))
            m = tl.max(x, axis=0)
            tl.store(SStat_ptr + (b + B) * n_tiles + pid_k, m)
            tl.store(SStat_ptr + s_plane + (b + B) * n_tiles + pid_k, tl.sum(tl.exp2(x - m), axis=0))
            # local views, two rows per iteration so that two loads are in flight
            acc = tl.zeros([BLOCK_K], dtype=tl.float32)
            for v in range(2, n_views, 2):
                row_u = v * B + b
                row_w = row_u + B
                has_w = row_w < n_views * B  # the second row exists (odd number of locals)
                mask_w = offs < tl.where(has_w, K, 0)
                su = tl.load(S_ptr + row_u.to(tl.int64) * stride_s + offs, mask=mask, other=0.0).to(tl.float32)
                sw = tl.load(S_ptr + row_w.to(tl.int64) * stride_s + offs, mask=mask_w,
                             other=0.0).to(tl.float32)
                acc += su + sw
                x = tl.where(mask, su * s_scale, float("-inf"))
                m = tl.max(x, axis=0)
                tl.store(SStat_ptr + row_u * n_tiles + pid_k, m)
                tl.store(SStat_ptr + s_plane + row_u * n_tiles + pid_k, tl.sum(tl.exp2(x - m), axis=0))
                x = tl.where(mask, sw * s_scale, float("-inf"))
                m = tl.max(x, axis=0)
                tl.store(SStat_ptr + row_w * n_tiles + pid_k, m, mask=has_w)
                tl.store(SStat_ptr + s_plane + row_w * n_tiles + pid_k, tl.sum(tl.exp2(x - m), axis=0),
                         mask=has_w)
            # teacher views: softmax statistics, dot with the other student views, entropy term
            tc0 = t0 - c
            y = tl.where(mask, tc0 * t_scale, float("-inf"))
            m = tl.max(y, axis=0)
            e = tl.exp2(y - m)
            tl.store(TStat_ptr + b * n_tiles + pid_k, m)
            tl.store(TStat_ptr + t_plane + b * n_tiles + pid_k, tl.sum(e, axis=0))
            tl.store(TStat_ptr + 2 * t_plane + b * n_tiles + pid_k, tl.sum(e * (s1 + acc), axis=0))
            tl.store(TStat_ptr + 3 * t_plane + b * n_tiles + pid_k, tl.sum(e * tl.where(mask, y - m, 0.0), axis=0))
            tc1 = t1 - c
            y = tl.where(mask, tc1 * t_scale, float("-inf"))
            m = tl.max(y, axis=0)
            e = tl.exp2(y - m)
            tl.store(TStat_ptr + (b + B) * n_tiles + pid_k, m)
            tl.store(TStat_ptr + t_plane + (b + B) * n_tiles + pid_k, tl.sum(e, axis=0))
            tl.store(TStat_ptr + 2 * t_plane + (b + B) * n_tiles + pid_k, tl.sum(e * (s0 + acc), axis=0))
            tl.store(TStat_ptr + 3 * t_plane + (b + B) * n_tiles + pid_k,
                     tl.sum(e * tl.where(mask, y - m, 0.0), axis=0))
    tl.store(TSumPart_ptr + pid_g.to(tl.int64) * K + offs, tsum, mask=mask)


@triton.jit
def _dino_loss_combine_kernel(
    SStat_ptr, TStat_ptr, LseS_ptr, LseT_ptr, RowLoss_ptr, RowEnt_ptr,
    B, n_views, n_tiles, inv_student_temp,
    BLOCK_T: tl.constexpr,
):
    """Image b: merge the tile partials (rescale each by 2^(m_tile - M)) into lse per row (log2
    units, kept for the backward), the image's summed pair losses and its two teacher entropies."""
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_T)
    mask = offs < n_tiles
    s_plane = n_views * B * n_tiles
    t_plane = 2 * B * n_tiles
    dots = 0.0
    ent = 0.0
    for i in tl.static_range(2):
        row = i * B + b
        m = tl.load(TStat_ptr + row * n_tiles + offs, mask=mask, other=float("-inf"))
        z = tl.load(TStat_ptr + t_plane + row * n_tiles + offs, mask=mask, other=0.0)
        d = tl.load(TStat_ptr + 2 * t_plane + row * n_tiles + offs, mask=mask, other=0.0)
        w = tl.load(TStat_ptr + 3 * t_plane + row * n_tiles + offs, mask=mask, other=0.0)
        mx = tl.max(m, axis=0)
        r = tl.exp2(m - mx)
        zt = tl.sum(z * r, axis=0)
        lse = mx + tl.log2(zt)
        tl.store(LseT_ptr + row, lse)
        dots += tl.sum(d * r, axis=0) / zt  # <q_i, sum_{v != i} s_v>
        # entropy = lse(y) - <q, y> = ln2 * (log2 Z - <q, y - M>), <q, y - M> from the tile terms
        # w + (m - M) z; both small for a peaked q, so nothing cancels
        wq = tl.sum((w + tl.where(mask, m - mx, 0.0) * z) * r, axis=0) / zt
        ent += (tl.log2(zt) - wq) * LN2
    lse_sum = 0.0
    for v in range(0, n_views):
        row = v * B + b
        m = tl.load(SStat_ptr + row * n_tiles + offs, mask=mask, other=float("-inf"))
        z = tl.load(SStat_ptr + s_plane + row * n_tiles + offs, mask=mask, other=0.0)
        mx = tl.max(m, axis=0)
        lse = mx + tl.log2(tl.sum(z * tl.exp2(m - mx), axis=0))
        tl.store(LseS_ptr + row, lse)
        lse_sum += tl.where(v >= 2, 2.0, 1.0) * lse  # n_v pairs use student view v
    tl.store(RowLoss_ptr + b, lse_sum * LN2 - dots * inv_student_temp)
    tl.store(RowEnt_ptr + b, ent)


@triton.jit
def _dino_center_kernel(
    RowLoss_ptr, RowEnt_ptr, TSumPart_ptr, C_ptr, CSaved_ptr, TSum_ptr, Out_ptr,
    B, K, n_groups, loss_scale, ent_scale, center_momentum, count,
    UPDATE_CENTER: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK: tl.constexpr,
):
    """Every program sums the B image losses (tiny) so it knows on device whether the loss is
    finite; program 0 writes (loss, entropy). Columns [pid*BLOCK, +BLOCK): teacher column sums,
    a copy of the old center (for the backward), and the gated center update."""
    pid = tl.program_id(0)
    offs_b = tl.arange(0, BLOCK_B)
    acc_l = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_e = tl.zeros([BLOCK_B], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        mb = b0 + offs_b < B
        acc_l += tl.load(RowLoss_ptr + b0 + offs_b, mask=mb, other=0.0)
        acc_e += tl.load(RowEnt_ptr + b0 + offs_b, mask=mb, other=0.0)
    loss = tl.sum(acc_l, axis=0) * loss_scale
    if pid == 0:
        tl.store(Out_ptr, loss)
        tl.store(Out_ptr + 1, tl.sum(acc_e, axis=0) * ent_scale)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    ts = tl.zeros([BLOCK], dtype=tl.float32)
    for g in range(0, n_groups):
        ts += tl.load(TSumPart_ptr + g * K + offs, mask=mask, other=0.0)
    tl.store(TSum_ptr + offs, ts, mask=mask)
    c = tl.load(C_ptr + offs, mask=mask, other=0.0)
    tl.store(CSaved_ptr + offs, c, mask=mask)
    if UPDATE_CENTER:
        ok = tl.abs(loss) < float("inf")  # False for inf and nan
        new = c * center_momentum + (ts / count) * (1.0 - center_momentum)
        tl.store(C_ptr + offs, tl.where(ok, new, c), mask=mask)


@triton.jit
def _dino_loss_bwd_kernel(
    S_ptr, T_ptr, C_ptr, LseS_ptr, LseT_ptr, GradOut_ptr, DS_ptr,
    B, K, n_views, group_b, stride_s, stride_t, stride_ds,
    s_scale, t_scale, grad_scale,  # grad_scale = 1 / (P * B * tau_s)
    BLOCK_K: tl.constexpr,
):
    """dS_v = g * grad_scale * (n_v * 2^(s_v*s_scale - lse_v) - Q_v), Q_0 = q_1, Q_1 = q_0,
    Q_local = q_0 + q_1, q_i = 2^((t_i - c)*t_scale - lse_i). Same grid as the forward."""
    pid_k = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    c = tl.load(C_ptr + offs, mask=mask, other=0.0)
    coef = tl.load(GradOut_ptr).to(tl.float32) * grad_scale  # upstream grad read on device: no sync
    out_ty = DS_ptr.dtype.element_ty
    for j in range(0, group_b):
        b = pid_g * group_b + j
        if b < B:
            t0 = tl.load(T_ptr + b.to(tl.int64) * stride_t + offs, mask=mask, other=0.0).to(tl.float32)
            t1 = tl.load(T_ptr + (b + B).to(tl.int64) * stride_t + offs, mask=mask, other=0.0).to(tl.float32)
            s0 = tl.load(S_ptr + b.to(tl.int64) * stride_s + offs, mask=mask, other=0.0).to(tl.float32)
            s1 = tl.load(S_ptr + (b + B).to(tl.int64) * stride_s + offs, mask=mask, other=0.0).to(tl.float32)
            q0 = tl.exp2((t0 - c) * t_scale - tl.load(LseT_ptr + b))
            q1 = tl.exp2((t1 - c) * t_scale - tl.load(LseT_ptr + b + B))
            p = tl.exp2(s0 * s_scale - tl.load(LseS_ptr + b))
            tl.store(DS_ptr + b.to(tl.int64) * stride_ds + offs, (coef * (p - q1)).to(out_ty), mask=mask)
            p = tl.exp2(s1 * s_scale - tl.load(LseS_ptr + b + B))
            tl.store(DS_ptr + (b + B).to(tl.int64) * stride_ds + offs, (coef * (p - q0)).to(out_ty), mask=mask)
            q01 = q0 + q1
            for v in range(2, n_views, 2):
                row_u = v * B + b
                row_w = row_u + B
                has_w = row_w < n_views * B  # the second row exists (odd number of locals)
                mask_w = offs < tl.where(has_w, K, 0)
                su = tl.load(S_ptr + row_u.to(tl.int64) * stride_s + offs, mask=mask, other=0.0).to(tl.float32)
                sw = tl.load(S_ptr + row_w.to(tl.int64) * stride_s + offs, mask=mask_w,
                             other=0.0).to(tl.float32)
                lse_u = tl.load(LseS_ptr + row_u)
                lse_w = tl.load(LseS_ptr + row_w, mask=has_w, other=0.0)
                p = tl.exp2(su * s_scale - lse_u)
                tl.store(DS_ptr + row_u.to(tl.int64) * stride_ds + offs, (coef * (2.0 * p - q01)).to(out_ty),
                         mask=mask)
                p = tl.exp2(sw * s_scale - lse_w)
                tl.store(DS_ptr + row_w.to(tl.int64) * stride_ds + offs, (coef * (2.0 * p - q01)).to(out_ty),
                         mask=mask_w)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few programs are enough to exercise the K split and the groups
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def launch_config(B: int, K: int, device: torch.device, block_k: int | None = None,
                  group_b: int | None = None, num_warps: int | None = None,
                  programs_per_sm: int = 4) -> tuple[int, int, int]:
    """(BLOCK_K, group_b, num_warps): K split into tiles of BLOCK_K columns; each program takes a
    tile of group_b images, enough programs to fill the GPU (about programs_per_sm per SM) while
    keeping the (n_groups, K) column-sum partials small (n_groups <= 16)."""
    if block_k is None:
        block_k = min(1024, max(16, triton.next_power_of_2(K)))
        block_k = max(block_k, triton.next_power_of_2(triton.cdiv(K, 4096)))  # <= 4096 tiles
    n_tiles = triton.cdiv(K, block_k)
    if group_b is None:
        n_groups = max(1, min(B, 16, triton.cdiv(programs_per_sm * _sm_count(device), n_tiles)))
        group_b = triton.cdiv(B, n_groups)
    if num_warps is None:
        num_warps = max(1, min(8, block_k // 256))
    return block_k, group_b, num_warps


def _check_runnable(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"dino_loss: the Triton kernels need CUDA tensors (got {t.device}); set "
                           "TRITON_INTERPRET=1 to interpret them on CPU, or use impl='reference'")


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def dino_loss_fwd(student_output, teacher_output, center, ncrops, student_temp, teacher_temp,
                  center_momentum=None, block_k=None, group_b=None, num_warps=None):
    """Launch passes 1-3. Returns (out (2,) = [loss, entropy], teacher_sum (K,), lse_s, lse_t,
    center_saved, config). center is updated in place when center_momentum is not None."""
    B, K = _check_inputs(student_output, teacher_output, center, ncrops)
    _check_runnable(student_output)
    if center.dtype != torch.float32 or not center.is_contiguous():
        raise ValueError(f"dino_loss: center must be a contiguous fp32 tensor, got {center.dtype}")
    S, T = _rows_contiguous(student_output), _rows_contiguous(teacher_output)
    dev = S.device
    BLOCK_K, gb, nw = launch_config(B, K, dev, block_k, group_b, num_warps)
    n_tiles, n_groups = triton.cdiv(K, BLOCK_K), triton.cdiv(B, gb)
    f32 = dict(dtype=torch.float32, device=dev)
    sstat = torch.empty((2, ncrops * B, n_tiles), **f32)
    tstat = torch.empty((4, 2 * B, n_tiles), **f32)
    tsum_part = torch.empty((n_groups, K), **f32)
    _dino_loss_fwd_kernel[(n_tiles, n_groups)](
        S, T, center, sstat, tstat, tsum_part,
        B, K, ncrops, gb, n_tiles, S.stride(0), T.stride(0),
        LOG2E / student_temp, LOG2E / teacher_temp,
        BLOCK_K=BLOCK_K, num_warps=nw,
    )
    lse_s = torch.empty(ncrops * B, **f32)
    lse_t = torch.empty(2 * B, **f32)
    row_loss = torch.empty(B, **f32)
    row_ent = torch.empty(B, **f32)
    _dino_loss_combine_kernel[(B,)](
        sstat, tstat, lse_s, lse_t, row_loss, row_ent,
        B, ncrops, n_tiles, 1.0 / student_temp,
        BLOCK_T=max(16, triton.next_power_of_2(n_tiles)), num_warps=1 if n_tiles <= 256 else 4,
    )
    out = torch.empty(2, **f32)
    teacher_sum = torch.empty(K, **f32)
    center_saved = torch.empty(K, **f32)
    BLOCK = min(1024, max(16, triton.next_power_of_2(K)))
    update = center_momentum is not None
    _dino_center_kernel[(triton.cdiv(K, BLOCK),)](
        row_loss, row_ent, tsum_part, center, center_saved, teacher_sum, out,
        B, K, n_groups, 1.0 / ((2 * ncrops - 2) * B), 1.0 / (2 * B),
        float(center_momentum) if update else 0.0, float(2 * B),
        UPDATE_CENTER=update, BLOCK_B=min(256, max(16, triton.next_power_of_2(B))), BLOCK=BLOCK,
        num_warps=4,
    )
    return out, teacher_sum, lse_s, lse_t, center_saved, (BLOCK_K, gb, nw)


def dino_loss_bwd(grad_out, student_output, teacher_output, center_saved, lse_s, lse_t, ncrops,
                  student_temp, teacher_temp, config):
    """Launch pass 4: the gradient w.r.t. student_output, same dtype and shape."""
    S, T = _rows_contiguous(student_output), _rows_contiguous(teacher_output)
    n_rows, K = S.shape
    B = n_rows // ncrops
    BLOCK_K, gb, nw = config
    dS = torch.empty_like(S, memory_format=torch.contiguous_format)
    grad_out = grad_out.reshape(1).to(torch.float32)
    _dino_loss_bwd_kernel[(triton.cdiv(K, BLOCK_K), triton.cdiv(B, gb))](
        S, T, center_saved, lse_s, lse_t, grad_out, dS,
        B, K, ncrops, gb, S.stride(0), T.stride(0), dS.stride(0),
        LOG2E / student_temp, LOG2E / teacher_temp, 1.0 / ((2 * ncrops - 2) * B * student_temp),
        BLOCK_K=BLOCK_K, num_warps=nw,
    )
    return dS


# ----------------------------------------------------------------------------------------------
# autograd.Function and the public function
# ----------------------------------------------------------------------------------------------
class DINOLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_output, teacher_output, center, ncrops, student_temp, teacher_temp,
                center_momentum, block_k, group_b, num_warps):
        out, teacher_sum, lse_s, lse_t, center_saved, config = dino_loss_fwd(
            student_output, teacher_output.detach(), center, ncrops, student_temp, teacher_temp,
            center_momentum, block_k, group_b, num_warps)
        ctx.save_for_backward(student_output, teacher_output.detach(), center_saved, lse_s, lse_t)
        ctx.args = (ncrops, student_temp, teacher_temp, config)
        ctx.mark_non_differentiable(teacher_sum)
        loss, entropy = out[0], out[1]
        ctx.mark_non_differentiable(entropy)
        return loss, entropy, teacher_sum

    @staticmethod
    def backward(ctx, grad_loss, grad_entropy, grad_teacher_sum):
        student_output, teacher_output, center_saved, lse_s, lse_t = ctx.saved_tensors
        dS = None
        if ctx.needs_input_grad[0]:
            dS = dino_loss_bwd(grad_loss, student_output, teacher_output, center_saved, lse_s, lse_t, *ctx.args)
        return dS, None, None, None, None, None, None, None, None, None


def dino_loss(student_output, teacher_output, center, ncrops, student_temp, teacher_temp,
              center_momentum=None, block_k=None, group_b=None, num_warps=None):
    """Fused multi-crop DINO loss (Triton; CUDA, or CPU under TRITON_INTERPRET=1).

    student_output (ncrops*B, K) crop-major, teacher_output (2*B, K), any float dtype; center
    (1, K) or (K,) fp32. Returns (loss, teacher_entropy, teacher_sum): loss scalar fp32
    (differentiable w.r.t. student_output), mean entropy of the teacher distributions, fp32
    column sums (K,) of the raw teacher logits. center_momentum not None: the center is updated
    in place, c <- m c + (1 - m) teacher_sum / (2B), only where the loss is finite (on device).
    block_k / group_b / num_warps override the launch heuristics (tests, tuning).
    """
    return DINOLossFn.apply(student_output, teacher_output, center, ncrops, float(student_temp),
                            float(teacher_temp), center_momentum, block_k, group_b, num_warps)


def memory_floor_bytes(n_rows: int, n_teacher_rows: int, K: int, itemsize: int) -> int:
    """Bytes one forward+backward must move: student read twice (statistics, then gradient),
    teacher read once, gradient written once."""
    return (3 * n_rows + n_teacher_rows) * K * itemsize


__all__ = ["dino_loss", "dino_loss_ref", "dino_loss_torch", "DINOLossFn", "memory_floor_bytes",
           "launch_config"]
