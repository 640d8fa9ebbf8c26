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
Host side: per-shape launch plans are cached, the partials share one allocation, temperatures
and scales are kernel scalars (no device tensors made per call), the upstream gradient is read
in the kernel: 4 launches, no synchronization, CUDA-graph capturable.

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
    BLOCK_K: tl.constexpr, ROWS: tl.constexpr,
):
    """One K tile of the rows of images [pid_g*group_b, +group_b). Partials per (row, tile), in
    log2 units: student (m, z) with m = max s*s_scale, z = sum 2^(s*s_scale - m); teacher
    (m, z, d, w) with y = (t - c)*t_scale, e = 2^(y - m), z = sum e, d = sum e * (sum_{v != i} s_v),
    w = sum e * (y - m) (entropy term, relative to the tile max so that peaked q does not cancel).
    SStat is (2, n_views*B, n_tiles), TStat (4, 2B, n_tiles); TSumPart (n_groups, K) gets the
    group's teacher column sums.
    Rows are loaded as 2-D blocks (the two global views and the teacher pair as [2, BLOCK_K], the
    local views ROWS at a time) so that many 16-byte loads are in flight per program: the loop body
    ends in reductions, which the compiler does not pipeline across iterations."""
    pid_k = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    c = tl.load(C_ptr + offs, mask=mask, other=0.0)
    tsum = tl.zeros([BLOCK_K], dtype=tl.float32)
    s_plane = n_views * B * n_tiles
    t_plane = 2 * B * n_tiles
    offs_2 = tl.arange(0, 2)
    offs_r = tl.arange(0, ROWS)
    for j in range(0, group_b):
        b = pid_g * group_b + j
        if b < B:
            rows2 = b + offs_2 * B  # global views / teacher views of image b: rows b and B + b
            t = tl.load(T_ptr + rows2[:, None].to(tl.int64) * stride_t + offs[None, :], mask=mask[None, :],
                        other=0.0).to(tl.float32)
            sg = tl.load(S_ptr + rows2[:, None].to(tl.int64) * stride_s + offs[None, :], mask=mask[None, :],
                         other=0.0).to(tl.float32)
            tsum += tl.sum(t, axis=0)
            x = tl.where(mask[None, :], sg * s_scale, float("-inf"))
            m = tl.max(x, axis=1)
            tl.store(SStat_ptr + rows2 * n_tiles + pid_k, m)
            tl.store(SStat_ptr + s_plane + rows2 * n_tiles + pid_k, tl.sum(tl.exp2(x - m[:, None]), axis=1))
            acc = tl.zeros([BLOCK_K], dtype=tl.float32)  # sum of the local views
            for v0 in range(2, n_views, ROWS):
                vr = v0 + offs_r
                rmask = vr < n_views
                rows = vr * B + b
                sl = tl.load(S_ptr + rows[:, None].to(tl.int64) * stride_s + offs[None, :],
                             mask=rmask[:, None] & mask[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(sl, axis=0)
                xl = tl.where(mask[None, :], sl * s_scale, float("-inf"))
                ml = tl.max(xl, axis=1)
                tl.store(SStat_ptr + rows * n_tiles + pid_k, ml, mask=rmask)
                tl.store(SStat_ptr + s_plane + rows * n_tiles + pid_k, tl.sum(tl.exp2(xl - ml[:, None]), axis=1),
                         mask=rmask)
            # teacher view i pairs with every student view but i: sum_{v != i} s_v = s_{1-i} + locals
            other = (acc + tl.sum(sg, axis=0))[None, :] - sg
            y = tl.where(mask[None, :], (t - c[None, :]) * t_scale, float("-inf"))
            m = tl.max(y, axis=1)
            e = tl.exp2(y - m[:, None])
            tl.store(TStat_ptr + rows2 * n_tiles + pid_k, m)
            tl.store(TStat_ptr + t_plane + rows2 * n_tiles + pid_k, tl.sum(e, axis=1))
            tl.store(TStat_ptr + 2 * t_plane + rows2 * n_tiles + pid_k, tl.sum(e * other, axis=1))
            tl.store(TStat_ptr + 3 * t_plane + rows2 * n_tiles + pid_k,
                     tl.sum(e * tl.where(mask[None, :], y - m[:, None], 0.0), axis=1))
    tl.store(TSumPart_ptr + pid_g.to(tl.int64) * K + offs, tsum, mask=mask)


@triton.jit
def _dino_loss_combine_kernel(
    SStat_ptr, TStat_ptr, Lse_ptr, RowStat_ptr,
    B, n_views, n_tiles, inv_student_temp,
    BLOCK_T: tl.constexpr, V_BLOCK: tl.constexpr,
):
    """Image b: merge the tile partials (rescale each by 2^(m_tile - M)) into lse per row (log2
    units, kept for the backward: Lse = [student rows (n_views*B) | teacher rows (2B)]), the
    image's summed pair losses RowStat[b] and its two teacher entropies RowStat[B + b]. All views
    of the image are one [V_BLOCK, BLOCK_T] load: one memory round trip, not one per view."""
    b = tl.program_id(0)
    offs_t = tl.arange(0, BLOCK_T)
    tmask = offs_t < n_tiles
    s_plane = n_views * B * n_tiles
    t_plane = 2 * B * n_tiles
    # teacher views
    rows2 = b + tl.arange(0, 2) * B
    idx = rows2[:, None] * n_tiles + offs_t[None, :]
    m = tl.load(TStat_ptr + idx, mask=tmask[None, :], other=float("-inf"))
    z = tl.load(TStat_ptr + t_plane + idx, mask=tmask[None, :], other=0.0)
    d = tl.load(TStat_ptr + 2 * t_plane + idx, mask=tmask[None, :], other=0.0)
    w = tl.load(TStat_ptr + 3 * t_plane + idx, mask=tmask[None, :], other=0.0)
    mx = tl.max(m, axis=1)
    r = tl.exp2(m - mx[:, None])
    zt = tl.sum(z * r, axis=1)
    tl.store(Lse_ptr + n_views * B + rows2, mx + tl.log2(zt))
    dots = tl.sum(tl.sum(d * r, axis=1) / zt, axis=0)  # sum_i <q_i, sum_{v != i} s_v>
    # entropy = lse(y) - <q, y> = ln2 * (log2 Z - <q, y - M>), <q, y - M> from the tile terms
    # w + (m - M) z; both small for a peaked q, so nothing cancels
    wq = tl.sum((w + tl.where(tmask[None, :], m - mx[:, None], 0.0) * z) * r, axis=1) / zt
    ent = tl.sum(tl.log2(zt) - wq, axis=0) * LN2
    # student views
    offs_v = tl.arange(0, V_BLOCK)
    vmask = offs_v < n_views
    rows = offs_v * B + b
    idx = rows[:, None] * n_tiles + offs_t[None, :]
    smask = vmask[:, None] & tmask[None, :]
    m = tl.load(SStat_ptr + idx, mask=smask, other=float("-inf"))
    z = tl.load(SStat_ptr + s_plane + idx, mask=smask, other=0.0)
    mx = tl.where(vmask, tl.max(m, axis=1), 0.0)  # padded rows: no -inf - -inf
    lse = mx + tl.log2(tl.where(vmask, tl.sum(z * tl.exp2(m - mx[:, None]), axis=1), 1.0))
    tl.store(Lse_ptr + rows, lse, mask=vmask)
    n_v = tl.where(offs_v >= 2, 2.0, 1.0)  # pairs that use student view v
    lse_sum = tl.sum(tl.where(vmask, n_v * lse, 0.0), axis=0)
    tl.store(RowStat_ptr + b, lse_sum * LN2 - dots * inv_student_temp)
    tl.store(RowStat_ptr + B + b, ent)


@triton.jit
def _dino_center_kernel(
    RowStat_ptr, TSumPart_ptr, C_ptr, Res_ptr,
    B, K, n_groups, loss_scale, ent_scale, center_momentum, count,
    UPDATE_CENTER: tl.constexpr, BLOCK_B: tl.constexpr, G_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
):
    """Every program sums the B image losses (tiny) so it knows on device whether the loss is
    finite; program 0 writes Res[0:2] = (loss, entropy). Columns [pid*BLOCK, +BLOCK): teacher
    column sums Res[2:2+K] (G_BLOCK group partials per load), a copy of the old center
    Res[2+K:2+2K] (for the backward), and the gated center update."""
    pid = tl.program_id(0)
    offs_b = tl.arange(0, BLOCK_B)
    acc_l = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_e = tl.zeros([BLOCK_B], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        mb = b0 + offs_b < B
        acc_l += tl.load(RowStat_ptr + b0 + offs_b, mask=mb, other=0.0)
        acc_e += tl.load(RowStat_ptr + B + b0 + offs_b, mask=mb, other=0.0)
    loss = tl.sum(acc_l, axis=0) * loss_scale
    if pid == 0:
        tl.store(Res_ptr, loss)
        tl.store(Res_ptr + 1, tl.sum(acc_e, axis=0) * ent_scale)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    offs_g = tl.arange(0, G_BLOCK)
    ts = tl.zeros([BLOCK], dtype=tl.float32)
    for g0 in range(0, n_groups, G_BLOCK):
        gmask = g0 + offs_g < n_groups
        part = tl.load(TSumPart_ptr + (g0 + offs_g)[:, None].to(tl.int64) * K + offs[None, :],
                       mask=gmask[:, None] & mask[None, :], other=0.0)
        ts += tl.sum(part, axis=0)
    tl.store(Res_ptr + 2 + offs, ts, mask=mask)
    c = tl.load(C_ptr + offs, mask=mask, other=0.0)
    tl.store(Res_ptr + 2 + K + offs, c, mask=mask)
    if UPDATE_CENTER:
        ok = tl.abs(loss) < float("inf")  # False for inf and nan
        new = c * center_momentum + (ts / count) * (1.0 - center_momentum)
        tl.store(C_ptr + offs, tl.where(ok, new, c), mask=mask)


@triton.jit
def _dino_loss_bwd_kernel(
    S_ptr, T_ptr, C_ptr, Lse_ptr, GradOut_ptr, DS_ptr,
    B, K, n_views, group_b, stride_s, stride_t, stride_ds,
    s_scale, t_scale, grad_scale,  # grad_scale = 1 / (P * B * tau_s)
    BLOCK_K: tl.constexpr, ROWS: tl.constexpr,
):
    """dS_v = g * grad_scale * (n_v * 2^(s_v*s_scale - lse_v) - Q_v), Q_0 = q_1, Q_1 = q_0,
    Q_local = q_0 + q_1, q_i = 2^((t_i - c)*t_scale - lse_i). Same grid shape as the forward (its
    own group size); the same 2-D row blocks."""
    pid_k = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    c = tl.load(C_ptr + offs, mask=mask, other=0.0)
    coef = tl.load(GradOut_ptr).to(tl.float32) * grad_scale  # upstream grad read on device: no sync
    out_ty = DS_ptr.dtype.element_ty
    offs_2 = tl.arange(0, 2)
    offs_r = tl.arange(0, ROWS)
    for j in range(0, group_b):
        b = pid_g * group_b + j
        if b < B:
            rows2 = b + offs_2 * B
            t = tl.load(T_ptr + rows2[:, None].to(tl.int64) * stride_t + offs[None, :], mask=mask[None, :],
                        other=0.0).to(tl.float32)
            sg = tl.load(S_ptr + rows2[:, None].to(tl.int64) * stride_s + offs[None, :], mask=mask[None, :],
                         other=0.0).to(tl.float32)
            q = tl.exp2((t - c[None, :]) * t_scale - tl.load(Lse_ptr + n_views * B + rows2)[:, None])
            q01 = tl.sum(q, axis=0)  # q_0 + q_1
            p = tl.exp2(sg * s_scale - tl.load(Lse_ptr + rows2)[:, None])
            # global view i pairs with teacher view 1 - i only: Q = (q_0 + q_1) - q_i
            tl.store(DS_ptr + rows2[:, None].to(tl.int64) * stride_ds + offs[None, :],
                     (coef * (p - (q01[None, :] - q))).to(out_ty), mask=mask[None, :])
            for v0 in range(2, n_views, ROWS):
                vr = v0 + offs_r
                rmask = vr < n_views
                rows = vr * B + b
                m2 = rmask[:, None] & mask[None, :]
                sl = tl.load(S_ptr + rows[:, None].to(tl.int64) * stride_s + offs[None, :], mask=m2,
                             other=0.0).to(tl.float32)
                lse = tl.load(Lse_ptr + rows, mask=rmask, other=0.0)
                pl = tl.exp2(sl * s_scale - lse[:, None])
                tl.store(DS_ptr + rows[:, None].to(tl.int64) * stride_ds + offs[None, :],
                         (coef * (2.0 * pl - q01[None, :])).to(out_ty), mask=m2)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
# Launch table, (BLOCK_K, ROWS, num_warps) per element size, from the H100 sweep of
# `python benchmarks/loss.py --sweep` (device time, B=64, K=65536, 2+10 crops; torch 2.11, triton 3.6).
# bf16: fwd 0.0829 ms (0.42 of peak; was 0.2755 ms with (1024, 4, 8)), bwd 0.0820 ms (0.79 of peak;
# was 0.0864 ms). fp32 keeps its earlier entries (fwd 0.135 ms, bwd 0.161 ms).
# PROGRAMS_PER_SM[kind][element size] sets the number of batch groups:
# n_groups ~ PROGRAMS_PER_SM * SMs / n_tiles.
FWD_CONFIG = {2: (1024, 2, 4), 4: (1024, 4, 8)}
BWD_CONFIG = {2: (2048, 4, 8), 4: (1024, 4, 8)}
PROGRAMS_PER_SM = {"fwd": {2: 4, 4: 4}, "bwd": {2: 2, 4: 4}}
MAX_GROUPS = 16  # the forward's (n_groups, K) teacher column-sum partials stay <= 16 rows
MAX_TILES = 512  # the combine kernel holds (views, tiles) partials of one image in registers

_SM_COUNT: dict = {}
_CONFIG_CACHE: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few programs are enough to exercise the K split and the groups
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def launch_config(B: int, K: int, ncrops: int, itemsize: int, device: torch.device, kind: str = "fwd",
                  block_k: int | None = None, group_b: int | None = None, num_warps: int | None = None,
                  rows: int | None = None, programs_per_sm: int | None = None) -> tuple[int, int, int, int]:
    """(BLOCK_K, ROWS, num_warps, group_b) of the forward ("fwd") or backward ("bwd") streaming
    kernel: K split into tiles of BLOCK_K columns, each program takes one tile of group_b images
    (local views ROWS at a time), about programs_per_sm programs per SM. Overrides win."""
    table = FWD_CONFIG if kind == "fwd" else BWD_CONFIG
    bk, rw, nw = table.get(itemsize, table[4])
    if block_k is None:
        block_k = min(bk, max(16, triton.next_power_of_2(K)))
        block_k = max(block_k, triton.next_power_of_2(triton.cdiv(K, MAX_TILES)))
    if rows is None:
        rows = max(1, min(rw, triton.next_power_of_2(max(ncrops - 2, 1))))
    if num_warps is None:
        num_warps = max(1, min(nw, block_k * rows // 256))
    n_tiles = triton.cdiv(K, block_k)
    if group_b is None:
        pps = programs_per_sm or PROGRAMS_PER_SM[kind].get(itemsize, PROGRAMS_PER_SM[kind][4])
        n_groups = max(1, min(B, MAX_GROUPS, triton.cdiv(pps * _sm_count(device), n_tiles)))
        group_b = triton.cdiv(B, n_groups)
    return block_k, rows, num_warps, group_b


def _check_runnable(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"dino_loss: the Triton kernels need CUDA tensors (got {t.device}); set "
                           "TRITON_INTERPRET=1 to interpret them on CPU, or use impl='reference'")


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _plan(B, K, ncrops, itemsize, device, launch):
    """Per-shape launch plan, cached: (fwd config, bwd config, n_tiles, n_groups, combine and
    center constexprs, workspace sizes). `launch` = (block_k, group_b, num_warps, rows) overrides."""
    key = (B, K, ncrops, itemsize, device, launch)
    plan = _CONFIG_CACHE.get(key)
    if plan is None:
        block_k, group_b, num_warps, rows = launch
        fwd = launch_config(B, K, ncrops, itemsize, device, "fwd", block_k, group_b, num_warps, rows)
        bwd = launch_config(B, K, ncrops, itemsize, device, "bwd", block_k, group_b, num_warps, rows)
        n_tiles, n_groups = triton.cdiv(K, fwd[0]), triton.cdiv(B, fwd[3])
        plan = _CONFIG_CACHE[key] = (fwd, bwd, n_tiles, n_groups, _combine_meta(ncrops, n_tiles),
                                     _center_meta(B, K, n_groups))
    return plan


def _combine_meta(ncrops: int, n_tiles: int) -> dict:
    BLOCK_T = max(16, triton.next_power_of_2(n_tiles))
    V_BLOCK = max(2, triton.next_power_of_2(ncrops))
    return dict(BLOCK_T=BLOCK_T, V_BLOCK=V_BLOCK, num_warps=max(1, min(8, V_BLOCK * BLOCK_T // 512)))


def _center_meta(B: int, K: int, n_groups: int) -> tuple[int, dict]:
    G_BLOCK = min(16, triton.next_power_of_2(n_groups))
    BLOCK = min(max(64, 4096 // G_BLOCK), max(16, triton.next_power_of_2(K)))
    meta = dict(BLOCK_B=min(256, max(16, triton.next_power_of_2(B))), G_BLOCK=G_BLOCK, BLOCK=BLOCK, num_warps=4)
    return triton.cdiv(K, BLOCK), meta


def loss_workspace(B, K, ncrops, n_tiles, n_groups, device):
    """One fp32 allocation for the forward's partials, split into views: SStat (2, ncrops*B,
    n_tiles), TStat (4, 2B, n_tiles), TSumPart (n_groups, K), RowStat (2, B)."""
    s_n, t_n, p_n = 2 * ncrops * B * n_tiles, 8 * B * n_tiles, n_groups * K
    ws = torch.empty(s_n + t_n + p_n + 2 * B, dtype=torch.float32, device=device)
    return ws[:s_n], ws[s_n:s_n + t_n], ws[s_n + t_n:s_n + t_n + p_n], ws[s_n + t_n + p_n:]


def combine_and_center(sstat, tstat, tsum_part, row_stat, center, B, K, ncrops, n_tiles, n_groups,
                       student_temp, center_momentum, combine_meta, center_meta):
    """Passes 2 and 3 (shared with kernels/dino_head_loss.py). Returns (lse (ncrops*B + 2B,) log2
    units, res (2 + 2K,) = [loss, entropy, teacher_sum (K), center before the update (K)])."""
    f32 = dict(dtype=torch.float32, device=center.device)
    lse = torch.empty(ncrops * B + 2 * B, **f32)
    _dino_loss_combine_kernel[(B,)](
        sstat, tstat, lse, row_stat, B, ncrops, n_tiles, 1.0 / student_temp, **combine_meta)
    res = torch.empty(2 + 2 * K, **f32)
    update = center_momentum is not None
    grid, meta = center_meta
    _dino_center_kernel[(grid,)](
        row_stat, tsum_part, center, res,
        B, K, n_groups, 1.0 / ((2 * ncrops - 2) * B), 1.0 / (2 * B),
        float(center_momentum) if update else 0.0, float(2 * B), UPDATE_CENTER=update, **meta)
    return lse, res


def dino_loss_fwd(student_output, teacher_output, center, ncrops, student_temp, teacher_temp,
                  center_momentum=None, launch=(None, None, None, None)):
    """Launch passes 1-3: 3 kernels, 3 allocations. Returns (res, lse, plan) with res (2 + 2K,) =
    [loss, entropy, teacher_sum (K), center_saved (K)]; center is updated in place when
    center_momentum is not None."""
    B, K = _check_inputs(student_output, teacher_output, center, ncrops)
    _check_runnable(student_output)
    if center.dtype != torch.float32 or not center.is_contiguous():
        raise ValueError(f"dino_loss: center must be a contiguous fp32 tensor, got {center.dtype}")
    S, T = _rows_contiguous(student_output), _rows_contiguous(teacher_output)
    plan = _plan(B, K, ncrops, S.element_size(), S.device, launch)
    (BLOCK_K, ROWS, nw, gb), _, n_tiles, n_groups, combine_meta, center_meta = plan
    sstat, tstat, tsum_part, row_stat = loss_workspace(B, K, ncrops, n_tiles, n_groups, S.device)
    _dino_loss_fwd_kernel[(n_tiles, n_groups)](
        S, T, center, sstat, tstat, tsum_part,
        B, K, ncrops, gb, n_tiles, S.stride(0), T.stride(0),
        LOG2E / student_temp, LOG2E / teacher_temp,
        BLOCK_K=BLOCK_K, ROWS=ROWS, num_warps=nw,
    )
    lse, res = combine_and_center(sstat, tstat, tsum_part, row_stat, center, B, K, ncrops, n_tiles, n_groups,
                                  student_temp, center_momentum, combine_meta, center_meta)
    return res, lse, plan


def dino_loss_bwd(grad_out, student_output, teacher_output, center_saved, lse, ncrops,
                  student_temp, teacher_temp, plan):
    """Launch pass 4: the gradient w.r.t. student_output, same dtype and shape. grad_out: the
    upstream gradient of the loss as a 1-element device tensor (read in the kernel)."""
    S, T = _rows_contiguous(student_output), _rows_contiguous(teacher_output)
    n_rows, K = S.shape
    B = n_rows // ncrops
    BLOCK_K, ROWS, nw, gb = plan[1]
    dS = torch.empty_like(S, memory_format=torch.contiguous_format)
    _dino_loss_bwd_kernel[(triton.cdiv(K, BLOCK_K), triton.cdiv(B, gb))](
        S, T, center_saved, lse, grad_out, dS,
        B, K, ncrops, gb, S.stride(0), T.stride(0), dS.stride(0),
        LOG2E / student_temp, LOG2E / teacher_temp, 1.0 / ((2 * ncrops - 2) * B * student_temp),
        BLOCK_K=BLOCK_K, ROWS=ROWS, num_warps=nw,
    )
    return dS


# ----------------------------------------------------------------------------------------------
# autograd.Function and the public function
# ----------------------------------------------------------------------------------------------
class DINOLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_output, teacher_output, center, ncrops, student_temp, teacher_temp,
                center_momentum, launch):
        teacher_output = teacher_output.detach()
        res, lse, plan = dino_loss_fwd(student_output, teacher_output, center, ncrops, student_temp,
                                       teacher_temp, center_momentum, launch)
        K = center.numel()
        ctx.save_for_backward(student_output, teacher_output, res, lse)
        ctx.args = (ncrops, student_temp, teacher_temp, plan)
        loss, entropy, teacher_sum = res[0], res[1], res[2:2 + K]
        ctx.mark_non_differentiable(entropy, teacher_sum)
        return loss, entropy, teacher_sum

    @staticmethod
    def backward(ctx, grad_loss, grad_entropy, grad_teacher_sum):
        student_output, teacher_output, res, lse = ctx.saved_tensors
        dS = None
        if ctx.needs_input_grad[0]:
            K = student_output.shape[1]
            dS = dino_loss_bwd(grad_loss, student_output, teacher_output, res[2 + K:], lse, *ctx.args)
        return dS, None, None, None, None, None, None, None


def dino_loss(student_output, teacher_output, center, ncrops, student_temp, teacher_temp,
              center_momentum=None, block_k=None, group_b=None, num_warps=None, rows=None):
    """Fused multi-crop DINO loss (Triton; CUDA, or CPU under TRITON_INTERPRET=1).

    student_output (ncrops*B, K) crop-major, teacher_output (2*B, K), any float dtype; center
    (1, K) or (K,) fp32. Returns (loss, teacher_entropy, teacher_sum): loss scalar fp32
    (differentiable w.r.t. student_output), mean entropy of the teacher distributions, fp32
    column sums (K,) of the raw teacher logits. center_momentum not None: the center is updated
    in place, c <- m c + (1 - m) teacher_sum / (2B), only where the loss is finite (on device).
    block_k / group_b / num_warps / rows override the launch table for both passes (tests, tuning).
    Host cost per step: 4 kernel launches, 4 allocations, no synchronization; CUDA-graph capturable.
    """
    return DINOLossFn.apply(student_output, teacher_output, center, ncrops, float(student_temp),
                            float(teacher_temp), center_momentum, (block_k, group_b, num_warps, rows))


def memory_floor_bytes(n_rows: int, n_teacher_rows: int, K: int, itemsize: int) -> int:
    """Bytes one forward+backward must move: student read twice (statistics, then gradient),
    teacher read once, gradient written once."""
    return (3 * n_rows + n_teacher_rows) * K * itemsize


__all__ = ["dino_loss", "dino_loss_ref", "dino_loss_torch", "DINOLossFn", "memory_floor_bytes",
           "launch_config"]
