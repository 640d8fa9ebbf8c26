"""Multi-view soft-target cross-entropy: forward and backward in streaming passes, no [rows, K]
intermediates. The student side of DINO ([CLS] rows) and of iBOT (masked patch rows).

Inputs: student logits S (V*G, K), view-major (row v*G + g is view v of group g; for DINO a group
is an image and V = 2 + n_local crops); target probabilities Q (T*G, K), row i*G + g, T in {1, 2}
(rows summing to 1 are the teacher's business: kernels/softmax_center.py, Sinkhorn-Knopp; the loss
does not rely on it, the backward does); optional per-group weights w (G,) and per-view weights
c (V,) (DINOv3's local-crop reweighting; c = 1 without them). View v is paired with target i unless
skip_same_view and v == i.

    n_v    = number of targets paired with view v,   P = sum_v n_v  (pairs per group)
    Q_vg   = sum_{i ~ v} q_ig,   B_vg = sum_k Q_vgk  (= n_v for normalized targets)
    loss   = sum_g w_g sum_v c_v sum_{i ~ v} -<q_ig, log_softmax(s_vg / tau)>,   w_g = 1/(P*G) by default
           = sum_g w_g sum_v c_v ( B_vg log Z_vg + <Q_vg, M_vg - s_vg / tau> )
    M_vg   = max_k s_vgk / tau,   Z_vg = sum_k exp(s_vgk / tau - M_vg) >= 1,   lse_vg = M_vg + log Z_vg

Every term is >= 0 (weights >= 0), so nothing cancels: the loss is exactly 0 where it is 0 (K = 1)
and tiny losses keep relative accuracy, log Z = log1p(Z - 1) with Z - 1 summed without the 1 of the maximal element
(a difference n_v lse - <Q, s> / tau of two large numbers would leave ~1e-7 absolute). K is split
into tiles across programs and M is known only after all of them: per tile t the forward keeps the
tile max m_t, Z_t - 1 and a_t = <Q, m_t - s / tau> on t, then <Q, M - s / tau> = sum_t a_t + (M - m_t) B_t
with B_t the paired mass on t (per target row and tile: the views' masses are sums of the targets').

    dL/ds_vg = g * w_g * c_v * (B_vg softmax(s_vg / tau) - Q_vg) / tau         (g = upstream gradient)

computed with n_v for B_vg (targets summing to 1 up to rounding: ~1e-7 relative). No gradient flows
to Q, w or c. DINO: V = ncrops, T = 2, skip_same_view, uniform weights (the official loss exactly: mean
over the 2V - 2 pairs, mean over the batch); DINOv3's reweight_dino_local_loss: c = 1 on the 2 global
views, its local weight on the others (P stays 2V - 2: global_scale * global mean + local_scale *
weight * local mean). iBOT: V = 1, T = 1, no skip, w = 1 / (masked tokens of the row's image) / n_images.

Passes (fp32 accumulation; exponentials in base 2, x = s * log2(e)/tau):
  1. _soft_ce_fwd_kernel, grid (K tiles, group blocks): one K tile of every row of a block of
     groups, read once. Per (student row, tile): the max logit, Z_t - 1 and a_t (_row_partials);
     per (target row, tile): the target mass. Rows are loaded as 2-D blocks (the T target-aligned
     views and their paired targets as [T, BLOCK_K], the other views ROWS at a time) to keep many
     16-byte loads in flight per program. Splitting K across programs fills the GPU at G = 16..128.
  2. _soft_ce_combine_kernel, grid (G,): merges the tile partials of a group into lse per row (kept
     for the backward) and the group's loss (views weighted by c, the group not yet by w_g).
  3. _soft_ce_reduce_kernel, grid (1,): loss = sum_g w_g * group loss, weights read on device.
  4. _soft_ce_bwd_kernel, grid (K tiles, group blocks): reads S and Q once more, writes dS.
kernels/linear_soft_cross_entropy.py (the fused last layer) writes the same partials from its tl.dot
tiles (_row_partials, partials) and finishes with passes 2 and 3 (combine_and_reduce).
The backward is compiled without FMA contraction: a contracted s * (1/tau) - lse would round s / tau
differently from the forward's M / tau; as compiled, the exponent is exactly 0 where lse = M / tau
(K = 1; one dominant logit), and the gradient exactly 0 at K = 1.
Host side: per-shape launch plans are cached, partials share one allocation, the upstream gradient
and both weights are read in the kernels (a new view weight each step, a schedule's, recompiles and
re-captures nothing), student_temp is a kernel scalar (constant for a run):
3 + 1 launches, no synchronization, CUDA-graph capturable. Both passes are torch.library custom ops
(fastdino::soft_cross_entropy, fastdino::soft_cross_entropy_backward) with fake implementations,
so torch.compile traces a step through them without a graph break.

Targets from the teacher logits (LogitTargets: DINO's centering, fused, fastdino/targets.py): Q is
not stored. Passes 1 and 4 load the teacher logits t (their own dtype) instead of q and make
q = 2^((t - c) * scale - row_offset) in registers (_target_block, FROM_LOGITS), with the center c
(one tile per program), scale = teacher_scale(tau_t) and the rows' log2 normalizers row_offset
(+inf: a padded row, q = 0) from kernels/softmax_center.py's softmax_center_stats, which reads t once
and is compiled, like both passes here in this mode, without FMA contraction: y2 has the same bits.
For DINO at B = 64, K = 65536, 2 + 10 crops in bf16 the teacher side of a step goes from t read 3x +
q written and read 2x in fp32 (144 MB) to t read 3x in bf16 (48 MB), against the student's 300 MB.

Traffic: S twice, Q twice (or t twice), dS once, plus the partials: 3 V + T floats per group and K
tile, written once and read once (~1% of S's traffic at BLOCK_K = 1024 in bf16); the floor is S twice
+ Q once + dS once (memory_floor_bytes). S in fp32/bf16/fp16 (dS in S's dtype), Q read as fp32.
Design limits: T in {1, 2}; rows of S and Q contiguous in K (other layouts are copied); with logit
targets the sweep's largest tiles (BLOCK_K 2048, ROWS 8, 8 warps) spill 8 B in the fp32 backward on
sm_80 (the launch table's do not); any K (past
MAX_TILES = 512 tiles of the table's BLOCK_K, BLOCK_K grows); the combine kernel holds one group's
(views, tiles) partials in registers (compiled without spills up to 16 views x 1024 tiles: this op
stays within MAX_TILES, the fused head reaches 1024 in fp32 at K = 65536). Shapes with many
single-row groups (iBOT: V = T = 1) run one group per loop iteration of a program: correct, not
yet tuned (a group-blocked variant is the next step).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
def pair_counts(n_views: int, n_targets: int, skip_same_view: bool) -> list[int]:
    """n_v for v in range(n_views): the targets paired with student view v."""
    return [n_targets - int(skip_same_view and v < n_targets) for v in range(n_views)]


def check_shapes(n_rows: int, K: int, target_shape, n_views: int, n_targets: int, skip_same_view: bool,
                 weight_shape=None, what: str = "soft_cross_entropy") -> int:
    """One-line ValueErrors for inconsistent shapes; returns G (groups)."""
    if n_targets not in (1, 2):
        raise ValueError(f"{what}: n_targets must be 1 or 2, got {n_targets}")
    if n_views < 1 or n_rows % n_views != 0:
        raise ValueError(f"{what}: student rows ({n_rows}) are not a multiple of n_views={n_views}")
    G = n_rows // n_views
    if tuple(target_shape) != (n_targets * G, K):
        raise ValueError(f"{what}: targets must be (n_targets*G, K) = {(n_targets * G, K)}, "
                         f"got {tuple(target_shape)}")
    if weight_shape is not None and tuple(weight_shape) != (G,):
        raise ValueError(f"{what}: weights must be (G,) = ({G},), got {tuple(weight_shape)}")
    if sum(pair_counts(n_views, n_targets, skip_same_view)) == 0:
        raise ValueError(f"{what}: no (target, view) pair with n_views={n_views}, n_targets={n_targets}, "
                         f"skip_same_view={skip_same_view}")
    return G


def _check_tensors(student_logits, targets, n_views, n_targets, skip_same_view, weights, view_weights=None):
    if student_logits.dim() != 2 or targets.dim() != 2:
        raise ValueError(f"soft_cross_entropy: student_logits and targets must be 2-D, got "
                         f"{tuple(student_logits.shape)} and {tuple(targets.shape)}")
    if view_weights is not None and tuple(view_weights.shape) != (n_views,):
        raise ValueError(f"soft_cross_entropy: view_weights must be (n_views,) = ({n_views},), got "
                         f"{tuple(view_weights.shape)}")
    return check_shapes(student_logits.shape[0], student_logits.shape[1], targets.shape, n_views, n_targets,
                        skip_same_view, None if weights is None else weights.shape)


def soft_cross_entropy_ref(student_logits, targets, n_views, student_temp, n_targets=2, skip_same_view=True,
                           weights=None, *, view_weights=None):
    """Plain PyTorch, from the paper: the double loop over (target i, student view v) pairs.

    student_logits (n_views*G, K) view-major, targets (n_targets*G, K) probabilities (detached),
    weights (G,) or None (= 1/(pairs*G): the mean over pairs and groups), view_weights (n_views,) or
    None (= 1): each pair of view v counts view_weights[v] times (the pair count is unchanged). Math in
    fp32, fp64 when student_logits is fp64. Returns the scalar loss, differentiable w.r.t. student_logits.
    """
    _check_tensors(student_logits, targets, n_views, n_targets, skip_same_view, weights, view_weights)
    dt = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    student = (student_logits.to(dt) / student_temp).chunk(n_views)
    target = targets.detach().to(dt).chunk(n_targets)
    c = None if view_weights is None else view_weights.detach().to(dt)
    per_group, n_pairs = 0.0, 0  # summed cross-entropy of each group, over its pairs
    for i, q_i in enumerate(target):
        for v, s_v in enumerate(student):
            if skip_same_view and v == i:
                continue  # the same view for target and student is not a pair (DINO)
            pair = torch.sum(-q_i * F.log_softmax(s_v, dim=-1), dim=-1)
            per_group = per_group + (pair if c is None else c[v] * pair)
            n_pairs += 1
    if weights is None:
        return per_group.mean() / n_pairs
    return torch.sum(weights.detach().to(dt) * per_group)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _target_block(Q_ptr, rows, offs, mask, stride_q, c, co, scale, RowOff_ptr, FROM_LOGITS: tl.constexpr,
                  HAS_COL_OFFSET: tl.constexpr):
    """fp32 [len(rows), BLOCK_K] block of target probabilities, 0 outside K: loaded from Q, or with
    FROM_LOGITS made from the teacher logits in Q_ptr as q = 2^((t - c) * scale [- co] - row_offset)
    (LogitTargets; scale = teacher_scale(teacher_temp), read from memory; co: the tile of the column
    offsets with HAS_COL_OFFSET, Sinkhorn-Knopp's). The kernel is compiled without FMA contraction: the
    exponent rounds as in the statistics kernels where the offsets came from."""
    if FROM_LOGITS:
        t = tl.load(Q_ptr + rows[:, None].to(tl.int64) * stride_q + offs[None, :], mask=mask[None, :],
                    other=0.0).to(tl.float32)
        y2 = (t - c[None, :]) * scale
        if HAS_COL_OFFSET:
            y2 = y2 - co[None, :]
        off = tl.load(RowOff_ptr + rows)
        return tl.where(mask[None, :], tl.exp2(y2 - off[:, None]), 0.0)
    return tl.load(Q_ptr + rows[:, None].to(tl.int64) * stride_q + offs[None, :], mask=mask[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _row_partials(SStat_ptr, s, paired_q, rows, rmask, mask, pid_k, n_tiles, s_plane, s_scale):
    """Tile partials of a [R, BLOCK_K] block of student rows, stored at SStat[:, rows, pid_k]; with
    d_k = (s_k - m) * s_scale <= 0 (log2 units, exactly 0 at the maximal elements):
      m = max_k s_k (the raw logit);
      r = sum_k 2^d_k - 1, the exponentials of all but one maximal element (ties counted exactly:
          no rounding of 1 + r);
      a = -sum_k Q_k d_k, paired_q = the rows' paired target mass Q ([R, BLOCK_K], or [1, BLOCK_K]
          shared by the rows).
    r and a are sums of terms >= 0. d scales a difference: s * s_scale - m * s_scale could be
    contracted to one FMA, nonzero at the maximal element."""
    s = tl.where(mask[None, :], s, float("-inf"))
    m = tl.max(s, axis=1)
    d = (s - m[:, None]) * s_scale  # -inf outside K
    below = d < 0.0
    ties = tl.sum(tl.where(below, 0.0, 1.0), axis=1)
    r = tl.sum(tl.where(below, tl.exp2(d), 0.0), axis=1) + (ties - 1.0)
    a = -tl.sum(paired_q * tl.where(mask[None, :], d, 0.0), axis=1)
    tl.store(SStat_ptr + rows * n_tiles + pid_k, m, mask=rmask)
    tl.store(SStat_ptr + s_plane + rows * n_tiles + pid_k, r, mask=rmask)
    tl.store(SStat_ptr + 2 * s_plane + rows * n_tiles + pid_k, a, mask=rmask)


@triton.jit
def _soft_ce_fwd_kernel(
    S_ptr, Q_ptr, SStat_ptr, QStat_ptr, Center_ptr, Scale_ptr, RowOff_ptr, ColOff_ptr,
    G, K, n_views, group_size, n_tiles, stride_s, stride_q,
    s_scale,  # log2(e) / tau
    N_TARGETS: tl.constexpr, SKIP_SAME_VIEW: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr,
    FROM_LOGITS: tl.constexpr, HAS_COL_OFFSET: tl.constexpr,
):
    """One K tile of the rows of groups [pid_g*group_size, +group_size). Partials: SStat
    (3, n_views*G, n_tiles) = (m, r, a) per student row (_row_partials); QStat (n_targets*G,
    n_tiles) = sum_k q_k per target row. The loop body ends in reductions, which the compiler does
    not pipeline across iterations: the 2-D row blocks are what keeps loads in flight."""
    pid_k = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    s_plane = n_views * G * n_tiles
    offs_t = tl.arange(0, N_TARGETS)
    offs_r = tl.arange(0, ROWS)
    hmask = offs_t < n_views  # target-aligned views that exist (n_views may be < n_targets)
    c, co, scale = 0.0, 0.0, 0.0
    if FROM_LOGITS:  # the center's (and column offsets') tile and the teacher temperature, once per program
        c = tl.load(Center_ptr + offs, mask=mask, other=0.0)
        scale = tl.load(Scale_ptr)
        if HAS_COL_OFFSET:
            co = tl.load(ColOff_ptr + offs, mask=mask, other=0.0)
    for j in range(0, group_size):
        g = pid_g * group_size + j
        if g < G:
            rows_t = offs_t * G + g  # student view i of group g
            if SKIP_SAME_VIEW:
                rows_q = (N_TARGETS - 1 - offs_t) * G + g  # target 1 - i: the one view i pairs with (T = 2)
            else:
                rows_q = rows_t
            q = _target_block(Q_ptr, rows_q, offs, mask, stride_q, c, co, scale, RowOff_ptr, FROM_LOGITS,
                              HAS_COL_OFFSET)
            tl.store(QStat_ptr + rows_q.to(tl.int64) * n_tiles + pid_k, tl.sum(q, axis=1))
            q_all = tl.sum(q, axis=0)[None, :]  # all targets: the mass paired with views >= n_targets
            if not SKIP_SAME_VIEW:
                q_h = q_all
            elif N_TARGETS == 2:
                q_h = q
            else:
                q_h = tl.zeros_like(q)  # one target, skipped by view 0: no pair
            # a view missing (n_views < n_targets) reloads the last one, not stored: loads under the
            # column mask only, fewer live predicates (no spill at BLOCK_K = 2048, ROWS = 8)
            rows_in = tl.minimum(offs_t, n_views - 1) * G + g
            sh = tl.load(S_ptr + rows_in[:, None].to(tl.int64) * stride_s + offs[None, :], mask=mask[None, :],
                         other=0.0).to(tl.float32)
            _row_partials(SStat_ptr, sh, q_h, rows_t, hmask, mask, pid_k, n_tiles, s_plane, s_scale)
            for v0 in range(N_TARGETS, n_views, ROWS):
                vr = v0 + offs_r
                rmask = vr < n_views
                rows = vr * G + g
                sl = tl.load(S_ptr + rows[:, None].to(tl.int64) * stride_s + offs[None, :],
                             mask=rmask[:, None] & mask[None, :], other=0.0).to(tl.float32)
                _row_partials(SStat_ptr, sl, q_all, rows, rmask, mask, pid_k, n_tiles, s_plane, s_scale)


@triton.jit
def _soft_ce_combine_kernel(
    SStat_ptr, QStat_ptr, ViewWeight_ptr, Lse_ptr, GroupLoss_ptr,
    G, n_views, n_tiles, s_scale, inv_student_temp,
    N_TARGETS: tl.constexpr, SKIP_SAME_VIEW: tl.constexpr, HAS_VIEW_WEIGHTS: tl.constexpr,
    BLOCK_T: tl.constexpr, V_BLOCK: tl.constexpr,
):
    """Group g from _soft_ce_fwd_kernel's partials. Per view, with M = max_t m_t (raw logit), gap_t =
    (M - m_t) * s_scale >= 0 and B_t the view's paired target mass on tile t:
        Z - 1  = sum_t (1 + r_t) 2^-gap_t - 1, a sum of terms >= 0 (tiles at the max: r_t)
        Lse    = M / tau + log1p(Z - 1)            (natural log, per row: the backward's input)
        GroupLoss[g] = sum_v c_v [ (sum_t B_t) log1p(Z - 1) + ln 2 sum_t (a_t + gap_t B_t) ]
    with c_v = ViewWeight[v] (read on device), or 1. Every term >= 0: no cancellation, no assumption
    that a target row sums to 1, exactly 0 at K = 1 and relative accuracy for tiny losses. All views
    of the group are one [V_BLOCK, BLOCK_T] load per partial: one memory round trip, not one per view."""
    g = tl.program_id(0)
    offs_t = tl.arange(0, BLOCK_T)
    tmask = offs_t < n_tiles
    offs_v = tl.arange(0, V_BLOCK)
    vmask = offs_v < n_views
    rows = offs_v * G + g
    idx = rows[:, None].to(tl.int64) * n_tiles + offs_t[None, :]
    smask = vmask[:, None] & tmask[None, :]
    s_plane = n_views * G * n_tiles
    m = tl.load(SStat_ptr + idx, mask=smask, other=float("-inf"))
    r = tl.load(SStat_ptr + s_plane + idx, mask=smask, other=0.0)
    a = tl.load(SStat_ptr + 2 * s_plane + idx, mask=smask, other=0.0)
    mx = tl.where(vmask, tl.max(m, axis=1), 0.0)  # padded rows: no -inf - -inf
    top = m == mx[:, None]  # the tiles holding the row max
    gap = (mx[:, None] - m) * s_scale  # +inf on padded tiles
    w = tl.exp2(-gap)
    n_top = tl.sum(tl.where(top, 1.0, 0.0), axis=1)
    z1 = tl.sum(r * w + tl.where(top, 0.0, w), axis=1) + (n_top - 1.0)  # Z - 1
    z1 = tl.where(vmask, z1, 0.0)
    u = 1.0 + z1  # log1p(z1) = log(u) * z1 / (u - 1), z1 where u rounds to 1: relative accuracy (Goldberg)
    log_z = tl.where(u == 1.0, z1, tl.log(u) * (z1 / tl.where(u == 1.0, 1.0, u - 1.0)))
    tl.store(Lse_ptr + rows, mx * inv_student_temp + log_z, mask=vmask)
    mass = tl.zeros([V_BLOCK, BLOCK_T], dtype=tl.float32)  # B_t of each view
    for i in tl.static_range(N_TARGETS):
        b_i = tl.load(QStat_ptr + (i * G + g).to(tl.int64) * n_tiles + offs_t, mask=tmask, other=0.0)
        if SKIP_SAME_VIEW:
            mass += tl.where((offs_v != i)[:, None], b_i[None, :], 0.0)
        else:
            mass += b_i[None, :]
    excess = tl.sum(a + tl.where(smask, gap, 0.0) * mass, axis=1)  # a, mass: 0 off the tiles
    loss = tl.sum(mass, axis=1) * log_z + excess * LN2
    if HAS_VIEW_WEIGHTS:
        loss *= tl.load(ViewWeight_ptr + offs_v, mask=vmask, other=0.0).to(tl.float32)
    tl.store(GroupLoss_ptr + g, tl.sum(tl.where(vmask, loss, 0.0), axis=0))


@triton.jit
def _soft_ce_reduce_kernel(
    GroupLoss_ptr, Weight_ptr, Loss_ptr, G, uniform_weight,
    HAS_WEIGHTS: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Loss = sum_g w_g * GroupLoss[g]; w_g = Weight[g] (read on device) or uniform_weight."""
    offs = tl.arange(0, BLOCK_G)
    acc = tl.zeros([BLOCK_G], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        gmask = g0 + offs < G
        part = tl.load(GroupLoss_ptr + g0 + offs, mask=gmask, other=0.0)
        if HAS_WEIGHTS:
            part *= tl.load(Weight_ptr + g0 + offs, mask=gmask, other=0.0).to(tl.float32)
        acc += part
    loss = tl.sum(acc, axis=0)
    if not HAS_WEIGHTS:
        loss *= uniform_weight
    tl.store(Loss_ptr, loss)


@triton.jit
def _soft_ce_bwd_kernel(
    S_ptr, Q_ptr, Lse_ptr, Weight_ptr, ViewWeight_ptr, GradOut_ptr, DS_ptr, Center_ptr, Scale_ptr, RowOff_ptr,
    ColOff_ptr, G, K, n_views, group_size, stride_s, stride_q, stride_ds,
    inv_student_temp, grad_scale,  # 1/tau;  1/tau, times 1/(P*G) without weights
    N_TARGETS: tl.constexpr, SKIP_SAME_VIEW: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    HAS_VIEW_WEIGHTS: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr, FROM_LOGITS: tl.constexpr,
    HAS_COL_OFFSET: tl.constexpr,
):
    """dS_vg = g * w_g * c_v / tau * (n_v e^(s_vg / tau - lse_vg) - Q_vg) with Q_vg = sum_i q_ig, minus
    q_vg for the target-aligned views under skip_same_view. s / tau is rounded as in the forward
    (no FMA contraction), so where lse = max (one dominant logit; K = 1) the exponent is exactly 0.
    Same grid shape and 2-D row blocks as the forward (its own group size)."""
    pid_k = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    coef = tl.load(GradOut_ptr).to(tl.float32) * grad_scale  # upstream grad read on device: no sync
    out_ty = DS_ptr.dtype.element_ty
    offs_t = tl.arange(0, N_TARGETS)
    offs_r = tl.arange(0, ROWS)
    hmask = offs_t < n_views
    if HAS_VIEW_WEIGHTS:
        c_h = tl.load(ViewWeight_ptr + offs_t, mask=hmask, other=0.0).to(tl.float32)
    center, co, scale = 0.0, 0.0, 0.0
    if FROM_LOGITS:
        center = tl.load(Center_ptr + offs, mask=mask, other=0.0)
        scale = tl.load(Scale_ptr)
        if HAS_COL_OFFSET:
            co = tl.load(ColOff_ptr + offs, mask=mask, other=0.0)
    for j in range(0, group_size):
        g = pid_g * group_size + j
        if g < G:
            coef_g = coef
            if HAS_WEIGHTS:
                coef_g = coef * tl.load(Weight_ptr + g).to(tl.float32)
            rows_t = offs_t * G + g
            q = _target_block(Q_ptr, rows_t, offs, mask, stride_q, center, co, scale, RowOff_ptr, FROM_LOGITS,
                              HAS_COL_OFFSET)
            q_all = tl.sum(q, axis=0)  # sum over the targets of the group
            hm = hmask[:, None] & mask[None, :]
            sh = tl.load(S_ptr + rows_t[:, None].to(tl.int64) * stride_s + offs[None, :], mask=hm,
                         other=0.0).to(tl.float32)
            lse_h = tl.load(Lse_ptr + rows_t, mask=hmask, other=0.0)
            p = tl.exp2((sh * inv_student_temp - lse_h[:, None]) * LOG2E)
            if SKIP_SAME_VIEW:  # view i pairs with every target but i
                dsh = (N_TARGETS - 1.0) * p - (q_all[None, :] - q)
            else:
                dsh = N_TARGETS * p - q_all[None, :]
            if HAS_VIEW_WEIGHTS:
                dsh = (coef_g * c_h)[:, None] * dsh
            else:
                dsh = coef_g * dsh
            tl.store(DS_ptr + rows_t[:, None].to(tl.int64) * stride_ds + offs[None, :], dsh.to(out_ty), mask=hm)
            for v0 in range(N_TARGETS, n_views, ROWS):
                vr = v0 + offs_r
                rmask = vr < n_views
                rows = vr * G + g
                m2 = rmask[:, None] & mask[None, :]
                sl = tl.load(S_ptr + rows[:, None].to(tl.int64) * stride_s + offs[None, :], mask=m2,
                             other=0.0).to(tl.float32)
                lse_l = tl.load(Lse_ptr + rows, mask=rmask, other=0.0)
                pl = tl.exp2((sl * inv_student_temp - lse_l[:, None]) * LOG2E)
                coef_l = coef_g
                if HAS_VIEW_WEIGHTS:
                    coef_l = (coef_g * tl.load(ViewWeight_ptr + vr, mask=rmask, other=0.0).to(tl.float32))[:, None]
                tl.store(DS_ptr + rows[:, None].to(tl.int64) * stride_ds + offs[None, :],
                         (coef_l * (N_TARGETS * pl - q_all[None, :])).to(out_ty), mask=m2)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
# Launch table, (BLOCK_K, ROWS, num_warps) per element size of S, from the H100 sweep of the former
# fused DINO loss (`python benchmarks/loss.py --sweep`, device time, B=64, K=65536, 2+10 crops; torch
# 2.11, triton 3.6): bf16 fwd 0.0829 ms, bwd 0.0820 ms; fp32 fwd 0.135 ms, bwd 0.161 ms. That kernel
# read the teacher logits in S's dtype; the targets are fp32 now, so re-run the sweep on a GPU before
# trusting these for new numbers. PROGRAMS_PER_SM[kind][element size] sets the number of group
# blocks: n_groups ~ PROGRAMS_PER_SM * SMs / n_tiles.
FWD_CONFIG = {2: (1024, 2, 4), 4: (1024, 4, 8)}
BWD_CONFIG = {2: (2048, 4, 8), 4: (1024, 4, 8)}
PROGRAMS_PER_SM = {"fwd": {2: 4, 4: 4}, "bwd": {2: 2, 4: 4}}
MAX_TILES = 512  # the combine kernel holds (views, tiles) partials of one group in registers

_SM_COUNT: dict = {}
_PLAN_CACHE: dict = {}


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few programs are enough to exercise the K split and the groups
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def launch_config(G: int, K: int, n_views: int, n_targets: int, itemsize: int, device: torch.device,
                  kind: str = "fwd", block_k: int = 0, group_size: int = 0, num_warps: int = 0, rows: int = 0,
                  programs_per_sm: int = 0) -> tuple[int, int, int, int]:
    """(BLOCK_K, ROWS, num_warps, group_size) of the forward ("fwd") or backward ("bwd") streaming
    kernel: K split into tiles of BLOCK_K columns, each program takes one tile of group_size groups
    (the views past the target-aligned ones ROWS at a time), about programs_per_sm programs per SM.
    Nonzero overrides win."""
    table = FWD_CONFIG if kind == "fwd" else BWD_CONFIG
    bk, rw, nw = table.get(itemsize, table[4])
    if not block_k:
        block_k = min(bk, max(16, triton.next_power_of_2(K)))
        block_k = max(block_k, triton.next_power_of_2(triton.cdiv(K, MAX_TILES)))
    if not rows:
        rows = max(1, min(rw, triton.next_power_of_2(max(n_views - n_targets, 1))))
    if not num_warps:
        num_warps = max(1, min(nw, block_k * rows // 256))
    n_tiles = triton.cdiv(K, block_k)
    if not group_size:
        pps = programs_per_sm or PROGRAMS_PER_SM[kind].get(itemsize, PROGRAMS_PER_SM[kind][4])
        n_groups = max(1, min(G, triton.cdiv(pps * sm_count(device), n_tiles)))
        group_size = triton.cdiv(G, n_groups)
    return block_k, rows, num_warps, group_size


def check_runnable(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{what}: the Triton kernels need CUDA tensors (got {t.device}); set "
                           "TRITON_INTERPRET=1 to interpret them on CPU, or use impl='torch'")


def check_float_tensors(op: str, tensors: dict, optional=()) -> None:
    """One-line ValueError naming the first of `op`'s arguments {name: value} that is not a floating-point tensor
    (None is allowed for the names in `optional`), or that is on another device than the first one."""
    first = None
    for name, t in tensors.items():
        if t is None and name in optional:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{op}: {name} must be a floating-point tensor, got {what}")
        if first is None:
            first = (name, t.device)
        elif t.device != first[1]:
            raise ValueError(f"{op}: {name} on {t.device} but {first[0]} on {first[1]}")


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def combine_meta(n_views: int, n_tiles: int) -> dict:
    BLOCK_T = max(16, triton.next_power_of_2(n_tiles))
    V_BLOCK = max(2, triton.next_power_of_2(n_views))
    return dict(BLOCK_T=BLOCK_T, V_BLOCK=V_BLOCK, num_warps=max(1, min(8, V_BLOCK * BLOCK_T // 512)))


def reduce_meta(G: int) -> dict:
    return dict(BLOCK_G=min(1024, max(16, triton.next_power_of_2(G))), num_warps=4)


def _plan(G, K, n_views, n_targets, itemsize, device, launch):
    """Per-shape launch plan, cached: (fwd config, bwd config, n_tiles, n_groups, combine meta,
    reduce meta). `launch` = (block_k, group_size, num_warps, rows), 0 = from the table."""
    key = (G, K, n_views, n_targets, itemsize, device, launch)
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        block_k, group_size, num_warps, rows = launch
        fwd = launch_config(G, K, n_views, n_targets, itemsize, device, "fwd", block_k, group_size, num_warps, rows)
        bwd = launch_config(G, K, n_views, n_targets, itemsize, device, "bwd", block_k, group_size, num_warps, rows)
        n_tiles = triton.cdiv(K, fwd[0])
        plan = _PLAN_CACHE[key] = (fwd, bwd, n_tiles, triton.cdiv(G, fwd[3]), combine_meta(n_views, n_tiles),
                                   reduce_meta(G))
    return plan


def partials(G: int, n_views: int, n_targets: int, n_tiles: int, device
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One fp32 allocation for the forward's partials: SStat (3, n_views*G, n_tiles), QStat
    (n_targets*G, n_tiles), GroupLoss (G,)."""
    s_n, q_n = 3 * n_views * G * n_tiles, n_targets * G * n_tiles
    ws = torch.empty(s_n + q_n + G, dtype=torch.float32, device=device)
    return ws[:s_n], ws[s_n:s_n + q_n], ws[s_n + q_n:]


def combine_and_reduce(sstat, qstat, group_loss, weights, view_weights, G, n_views, n_tiles, student_temp,
                       n_targets, skip_same_view, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Passes 2 and 3 on the forward's partials (partials()), shared with
    kernels/linear_soft_cross_entropy.py. weights (G,) / view_weights (n_views,): contiguous device
    tensors or None. Returns (loss 0-dim fp32, lse (n_views*G,) fp32, natural log)."""
    lse = torch.empty(n_views * G, dtype=torch.float32, device=device)
    _soft_ce_combine_kernel[(G,)](
        sstat, qstat, qstat if view_weights is None else view_weights, lse, group_loss, G, n_views, n_tiles,
        LOG2E.value / student_temp, 1.0 / student_temp, N_TARGETS=n_targets, SKIP_SAME_VIEW=skip_same_view,
        HAS_VIEW_WEIGHTS=view_weights is not None, **combine_meta(n_views, n_tiles))
    loss = torch.empty((), dtype=torch.float32, device=device)
    n_pairs = sum(pair_counts(n_views, n_targets, skip_same_view))
    _soft_ce_reduce_kernel[(1,)](
        group_loss, group_loss if weights is None else weights, loss, G, 1.0 / (n_pairs * G),
        HAS_WEIGHTS=weights is not None, **reduce_meta(G))
    return loss, lse


# ----------------------------------------------------------------------------------------------
# Custom ops (torch.compile traces through them; CUDA-graph capturable)
# ----------------------------------------------------------------------------------------------
def teacher_scale(teacher_temp, device=None) -> torch.Tensor:
    """log2(e) / teacher_temp, 0-dim fp32, computed once by torch on the temperature's device (a float:
    on `device`) and read from memory by every kernel that makes q from the teacher logits, so all of
    them round y2 = (t - c) * scale to the same bits (an in-kernel division would not: Triton's fp32 `/`
    is approximate on NVIDIA GPUs)."""
    t = teacher_temp if isinstance(teacher_temp, torch.Tensor) else torch.tensor(float(teacher_temp), device=device)
    return LOG2E.value / t.detach().float().reshape(())


def scaled_logits_dtype(teacher_logits, teacher_temp) -> tuple[torch.Tensor, torch.Tensor | float]:
    """(t, scale) for the torch references of the exponent y2 = (t - c) * scale: t detached in fp32 and
    scale = teacher_scale(teacher_temp) (the kernels' bits), or with fp64 logits both in fp64
    (scale = log2(e) / teacher_temp computed in fp64)."""
    t = teacher_logits.detach()
    if t.dtype == torch.float64:
        temp = teacher_temp.detach().double() if isinstance(teacher_temp, torch.Tensor) else float(teacher_temp)
        return t, LOG2E.value / temp
    return t.float(), teacher_scale(teacher_temp, device=t.device)


def _logit_args(targets, center, scale, row_offset, col_offset) -> tuple:
    """The kernels' (Center, Scale, RowOff, ColOff) pointers, FROM_LOGITS and HAS_COL_OFFSET: with
    LogitTargets' tensors, else `targets` (never read)."""
    if center is None:
        return targets, targets, targets, targets, False, False
    co = targets if col_offset is None else col_offset.contiguous().view(-1)
    return (center.contiguous().view(-1), scale.float().reshape(()), row_offset.contiguous(), co, True,
            col_offset is not None)


@torch.library.custom_op("fastdino::soft_cross_entropy", mutates_args=())
def soft_cross_entropy_op(student_logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None,
                          n_views: int, student_temp: float, n_targets: int, skip_same_view: bool,
                          block_k: int, group_size: int, num_warps: int, rows: int,
                          view_weights: torch.Tensor | None = None, center: torch.Tensor | None = None,
                          teacher_scale: torch.Tensor | None = None,
                          row_offset: torch.Tensor | None = None,
                          col_offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Passes 1-3: 3 kernels, 3 allocations. Returns (loss 0-dim fp32, lse (n_views*G,) fp32).
    block_k / group_size / num_warps / rows: launch overrides, 0 = the launch table. view_weights
    (n_views,) or None: last, so that callers without them keep their positional arguments. With
    center / teacher_scale / row_offset (LogitTargets, teacher_scale = teacher_scale(teacher_temp)),
    `targets` holds the teacher logits."""
    S, Q = rows_contiguous(student_logits), rows_contiguous(targets)
    W = None if weights is None else weights.contiguous()
    VW = None if view_weights is None else view_weights.contiguous()
    C, TT, RO, CO, from_logits, has_co = _logit_args(Q, center, teacher_scale, row_offset, col_offset)
    n_rows, K = S.shape
    G = n_rows // n_views
    plan = _plan(G, K, n_views, n_targets, S.element_size(), S.device, (block_k, group_size, num_warps, rows))
    (BLOCK_K, ROWS, nw, gs), _, n_tiles, n_groups, _, _ = plan
    sstat, qstat, group_loss = partials(G, n_views, n_targets, n_tiles, S.device)
    _soft_ce_fwd_kernel[(n_tiles, n_groups)](
        S, Q, sstat, qstat, C, TT, RO, CO, G, K, n_views, gs, n_tiles, S.stride(0), Q.stride(0),
        LOG2E.value / student_temp, N_TARGETS=n_targets, SKIP_SAME_VIEW=skip_same_view, BLOCK_K=BLOCK_K,
        ROWS=ROWS, FROM_LOGITS=from_logits, HAS_COL_OFFSET=has_co, num_warps=nw,
        **({"enable_fp_fusion": False} if from_logits else {}))
    return combine_and_reduce(sstat, qstat, group_loss, W, VW, G, n_views, n_tiles, student_temp, n_targets,
                              skip_same_view, S.device)


@soft_cross_entropy_op.register_fake
def _(student_logits, targets, weights, n_views, student_temp, n_targets, skip_same_view, block_k, group_size,
      num_warps, rows, view_weights=None, center=None, teacher_scale=None, row_offset=None, col_offset=None):
    f32 = dict(dtype=torch.float32, device=student_logits.device)
    return torch.empty((), **f32), torch.empty(student_logits.shape[0], **f32)


@torch.library.custom_op("fastdino::soft_cross_entropy_backward", mutates_args=())
def soft_cross_entropy_backward_op(grad_loss: torch.Tensor, student_logits: torch.Tensor, targets: torch.Tensor,
                                   lse: torch.Tensor, weights: torch.Tensor | None, n_views: int,
                                   student_temp: float, n_targets: int, skip_same_view: bool, block_k: int,
                                   group_size: int, num_warps: int, rows: int,
                                   view_weights: torch.Tensor | None = None, center: torch.Tensor | None = None,
                                   teacher_scale: torch.Tensor | None = None,
                                   row_offset: torch.Tensor | None = None,
                                   col_offset: torch.Tensor | None = None) -> torch.Tensor:
    """Pass 4: dS (same shape and dtype as student_logits, contiguous). grad_loss: the upstream
    gradient of the loss, a 0-dim device tensor read in the kernel (as the weights)."""
    S, Q = rows_contiguous(student_logits), rows_contiguous(targets)
    W = None if weights is None else weights.contiguous()
    VW = None if view_weights is None else view_weights.contiguous()
    C, TT, RO, CO, from_logits, has_co = _logit_args(Q, center, teacher_scale, row_offset, col_offset)
    n_rows, K = S.shape
    G = n_rows // n_views
    plan = _plan(G, K, n_views, n_targets, S.element_size(), S.device, (block_k, group_size, num_warps, rows))
    BLOCK_K, ROWS, nw, gs = plan[1]
    grad_scale = 1.0 / student_temp
    if W is None:
        grad_scale /= sum(pair_counts(n_views, n_targets, skip_same_view)) * G
    dS = torch.empty_like(S, memory_format=torch.contiguous_format)
    _soft_ce_bwd_kernel[(triton.cdiv(K, BLOCK_K), triton.cdiv(G, gs))](
        S, Q, lse, lse if W is None else W, lse if VW is None else VW, grad_loss, dS, C, TT, RO, CO,
        G, K, n_views, gs, S.stride(0), Q.stride(0), dS.stride(0), 1.0 / student_temp, grad_scale,
        N_TARGETS=n_targets, SKIP_SAME_VIEW=skip_same_view, HAS_WEIGHTS=W is not None,
        HAS_VIEW_WEIGHTS=VW is not None, BLOCK_K=BLOCK_K, ROWS=ROWS, FROM_LOGITS=from_logits,
        HAS_COL_OFFSET=has_co, num_warps=nw,
        enable_fp_fusion=False)
    return dS


@soft_cross_entropy_backward_op.register_fake
def _(grad_loss, student_logits, targets, lse, weights, n_views, student_temp, n_targets, skip_same_view,
      block_k, group_size, num_warps, rows, view_weights=None, center=None, teacher_scale=None, row_offset=None,
      col_offset=None):
    return torch.empty_like(student_logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    student_logits, targets, weights, *args, view_weights, center, teacher_scale, row_offset, col_offset = inputs
    ctx.save_for_backward(student_logits, targets, output[1], weights, view_weights, center, teacher_scale,
                          row_offset, col_offset)
    ctx.args = args
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_lse):
    (student_logits, targets, lse, weights, view_weights, center, teacher_scale, row_offset,
     col_offset) = ctx.saved_tensors
    dS = None
    if grad_loss is not None and ctx.needs_input_grad[0]:
        dS = soft_cross_entropy_backward_op(grad_loss, student_logits, targets, lse, weights, *ctx.args,
                                            view_weights, center, teacher_scale, row_offset, col_offset)
    return (dS,) + (None,) * 15


soft_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------
IMPLS = ("triton", "torch")


class LogitTargets(NamedTuple):
    """Target probabilities given by the teacher logits they come from (fused teacher targets:
    fastdino/targets.py), never stored: q = 2^((t - c) * log2(e) / teacher_temp - col_offset -
    row_offset), with DINO's centering c = the center, no col_offset and row_offset = log2 of the row's
    normalizer (kernels/softmax_center.py's softmax_center_stats); with Sinkhorn-Knopp c = the column
    maxima, col_offset = the prototypes' log-normalizers, row_offset = the samples'
    (kernels/sinkhorn_knopp.py); +inf row offsets for padded rows: q = 0. The soft-CE kernels read t (its own dtype:
    bf16 under autocast, half of fp32 q) instead of q; probs() is the materialized q for everything else."""
    logits: torch.Tensor  # (R, K) any float dtype
    center: torch.Tensor  # (K,) or (1, K) fp32
    teacher_temp: torch.Tensor  # 0-dim fp32 device tensor
    row_offset: torch.Tensor  # (R,) fp32, log2 units
    col_offset: torch.Tensor | None = None  # (K,) fp32, log2 units, subtracted too (Sinkhorn-Knopp's prototypes)

    @property
    def shape(self) -> torch.Size:
        return self.logits.shape

    def dim(self) -> int:
        return self.logits.dim()

    def probs(self) -> torch.Tensor:
        """q (R, K) fp32."""
        from .softmax_center import teacher_probs

        return teacher_probs(self.logits, self.center, self.teacher_temp, self.row_offset, self.col_offset)


def soft_cross_entropy(student_logits, targets, n_views, student_temp, n_targets=2, skip_same_view=True,
                       weights=None, impl="triton", *, view_weights=None, block_k=0, group_size=0, num_warps=0,
                       rows=0):
    """Multi-view soft-target cross-entropy (see the header), scalar fp32 loss.

    student_logits (n_views*G, K) view-major, fp32/bf16/fp16; targets (n_targets*G, K) fp32
    probabilities (no gradient), or LogitTargets (the Triton kernels read the teacher logits and make
    q on the fly; the torch impl materializes it); weights (G,) fp32 per-group weights or None (mean over pairs and
    groups); view_weights (n_views,) fp32 per-view weights c_v or None (= 1), a device tensor read in
    the kernels (no gradient). impl="triton": the custom op (CUDA tensors, or CPU under
    TRITON_INTERPRET=1); impl="torch": soft_cross_entropy_ref. block_k / group_size / num_warps / rows override the
    launch table of both streaming passes (tests, tuning).
    Host cost per step: 4 kernel launches, 4 allocations, no synchronization.
    """
    if impl not in IMPLS:
        raise ValueError(f"soft_cross_entropy: impl={impl!r} is not one of {list(IMPLS)}")
    if impl == "torch":
        q = targets.probs() if isinstance(targets, LogitTargets) else targets
        return soft_cross_entropy_ref(student_logits, q, n_views, student_temp, n_targets, skip_same_view,
                                      weights, view_weights=view_weights)
    _check_tensors(student_logits, targets, n_views, n_targets, skip_same_view, weights, view_weights)
    check_runnable(student_logits, "soft_cross_entropy")
    logit_args = (None, None, None, None)
    if isinstance(targets, LogitTargets):
        scale = teacher_scale(targets.teacher_temp, targets.logits.device)
        targets, logit_args = targets.logits, (targets.center, scale, targets.row_offset, targets.col_offset)
    loss, _ = soft_cross_entropy_op(student_logits, targets.detach(), None if weights is None else weights.detach(),
                                    n_views, float(student_temp), n_targets, bool(skip_same_view),
                                    block_k, group_size, num_warps, rows,
                                    None if view_weights is None else view_weights.detach(), *logit_args)
    return loss


def memory_floor_bytes(n_rows: int, n_target_rows: int, K: int, itemsize: int, target_itemsize: int = 4) -> int:
    """Bytes one forward+backward must move: student logits read twice (statistics, then gradient),
    targets read once, gradient written once."""
    return (3 * n_rows * itemsize + n_target_rows * target_itemsize) * K


__all__ = ["soft_cross_entropy", "soft_cross_entropy_ref", "LogitTargets", "teacher_scale", "soft_cross_entropy_op", "soft_cross_entropy_backward_op",
           "memory_floor_bytes", "launch_config", "pair_counts"]
