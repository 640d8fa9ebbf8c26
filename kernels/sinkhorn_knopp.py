"""Teacher targets by Sinkhorn-Knopp (DINOv2): a few alternating normalizations of exp(t / tau_t)
so that every prototype gets the same share of the batch, instead of a center.

Inputs: teacher logits T (R, K) in any float dtype, R = this rank's teacher rows (B_global rows over
all ranks); teacher_temp tau_t, a 0-dim fp32 device tensor (or a float); all_reduce, a callable
all_reduce(tensor, op) reducing a tensor in place over ranks, op "sum" or "max" (None: one process).

The official steps (dinov2/loss/dino_clstoken_loss.py, sinkhorn_knopp_teacher), written with
P = Q^T in our (rows, prototypes) orientation:

    P = exp(T / tau_t);  P /= sum(P)                      the total over all ranks
    n_iterations times (3):
        P[:, k] /= sum_r P[r, k];  P /= K                 prototype sums over all ranks: 1/K each
        P[r, :] /= sum_k P[r, k];  P /= B_global          sample sums (local): 1/B each
    q = B_global * P                                      (R, K) fp32, every row sums to 1
    entropy_r = -sum_k q_rk ln q_rk                       (R,) fp32 (a collapse monitor)

Numerics. The scalars (the total, 1/K, 1/B, * B) cancel against the normalization that follows
them, and so does any per-prototype factor applied before the first prototype normalization. Both
implementations subtract from each column its max over all rows of all ranks (the valid rows with
row_valid), M_k (all_reduce op "max"): nothing overflows and every prototype sum of the first step
is >= 1. The official code exponentiates t / tau_t directly, which is inf for t > 88.7 tau_t (3.5 at
tau_t = 0.04) in fp32.

The fused kernels keep no (R, K) intermediate but q. In base 2, with x_rk = (t_rk - M_k) * scale,
scale = log2(e)/tau_t, the state is one log-normalizer per column and one per row (fp32 vectors):

    prototype step   colsum_k = sum_r 2^(x_rk - c_k - l_r)  (all-reduced "sum"),  c_k += log2 colsum_k
    sample step      l_r = log2 sum_k 2^(x_rk - c_k)        (online max over k: local)
    targets          q_rk = 2^(x_rk - c_k - l_r)

starting from c = 0, l = 0: the same P at every step as the official in-place updates, up to
rounding. The sample normalizer l_r is a log-sum-exp, so a row lying far below every column's max
(2^x underflows: more than ~100 tau_t in fp32) is still normalized, where the official in-place fp32
steps divide 0 by 0. After a sample step the rows sum to 1, so the next prototype sums lie in
[1/K, B_global]: c stays finite for any number of iterations. The total, 1/K, 1/B and global_rows
drop out (global_rows is accepted for the reference, which follows the official steps literally).

Rounding shared with the loss. scale = teacher_scale(tau_t) (kernels/soft_cross_entropy.py): a 0-dim
fp32 tensor computed once per call by torch and read from memory by every kernel (Triton's fp32 `/`
is approximate on NVIDIA GPUs: a quotient in each kernel could differ from the loss kernels'). Every
launch is compiled without FMA contraction (enable_fp_fusion=False), so the exponent is rounded one
operation at a time, ((float32(t) - M) * scale - c) - l, exactly as soft_cross_entropy's
_target_block (LogitTargets) and softmax_center.teacher_probs compute it from (center = M as the
kernels read it, col_offset = c, row_offset = l): sinkhorn_knopp_stats hands the loss that state and
the loss kernels make the same q bit for bit (the same tl.exp2; the tests check the exponent's bits
under the interpreter), torch (teacher_probs) to exp2's rounding (an ulp or two). The entropy is the
same with or without q written.

Passes (no atomics: deterministic), over T in its own dtype, rows contiguous in K:
  _sk_colmax_kernel, grid (K blocks, row splits), only with row_valid: column maxima of the valid
      rows (splits, K), reduced by torch (without row_valid: torch.amax).
  _sk_colsum_kernel, grid (K blocks, row splits): prototype partial sums (splits, K). Per row block
      it first merges l_r from the last sample step's (R, K splits) partials.
  _sk_row_lse_kernel, grid (row blocks, K splits): the prototype step, c += log2 colsum, colsum summed
      over its row splits per column tile (one after an all-reduce; the programs of row block 0 store
      the new c, all compute the same), then the sample step in parts: the log-sum-exp of x - c over each
      (row, K split), (R, K splits), merged by the next colsum or targets launch.
  _sk_targets_kernel, grid (row blocks, K splits): merges l_r, writes q (WRITE_Q) and per (row, split)
      entropy partials, summed by torch; with WRITE_Q=False (sinkhorn_knopp_stats) no q: the programs
      of K split 0 store l_r (R,), those of row block 0 M_k as read (K,) fp32.
Per iteration: 2 kernels, one all-reduce of K floats (the caller's, between launches: the ops are
collective-free). Host side: no synchronization, CUDA-graph capturable, every launch in a
torch.library custom op with a fake implementation, so torch.compile traces the whole function, the
all-reduces included (they are the caller's Python). Each call first computes teacher_scale (2 torch
launches: reciprocal, mul). With all_reduce None: one op, fastdino::sinkhorn_knopp, of 2 n_iterations
+ 3 launches (torch.amax, the kernels, the entropy sum; +1 with row_valid: the colmax kernel and its
split max). With an all_reduce: one op per step, the caller's all-reduces between them:
fastdino::sinkhorn_knopp_colmax (with row_valid; else torch.amax and a cast to fp32), then per
iteration fastdino::sinkhorn_knopp_colsum (the kernel and a torch sum of its splits: the vector
all-reduced) and fastdino::sinkhorn_knopp_row_lse, then fastdino::sinkhorn_knopp_targets: 3
n_iterations + 4 launches (+3 in fp32 without row_valid: no cast). sinkhorn_knopp_stats launches the
same, its last op fastdino::sinkhorn_knopp_stats (one process) or fastdino::sinkhorn_knopp_target_stats
(after the per-step ops). A torch split sum is left out where its pass has one split. The launch plan
of a shape is derived once (_plan).

sinkhorn_knopp_stats (q never stored): (center (K,) = M_k as the kernels read it, col_offset (K,) =
c_k, row_offset (R,) = l_r, +inf on padded rows, entropy (R,)), fp32, so that
    q_rk = 2^(((float32(t_rk) - center_k) * teacher_scale(tau_t) - col_offset_k) - row_offset_r),
the form of LogitTargets(teacher_logits, center, teacher_temp, row_offset, col_offset): the soft-CE
kernels read t (its own dtype) instead of an fp32 q. impl="torch": sinkhorn_knopp_stats_ref, the same
log-domain algorithm in plain PyTorch (its sums in torch's order), tied to the official steps in the
tests through teacher_probs.

Padded rows (row_valid, the iBOT patch targets). The masked-token logits are a static-shaped
(U, K) buffer whose first n_masked rows are real and the rest padding (finite values, e.g. copies of
a token). row_valid (R,) bool device tensor (None: every row valid). Rows with False take no part in
any sum or max (the column max, the total, the prototype sums of every rank) and get q = 0 and
entropy = 0 exactly; the valid rows get the targets of the unpadded computation over the valid rows
of all ranks, up to rounding (B_global = valid rows over all ranks; it cancels). A rank may have no
valid row; with none on any rank, q and entropy are all zeros. No host synchronization, no
data-dependent shape. Fused: M_k is the max over the valid rows (_sk_colmax_kernel instead of
torch.amax: the padding could otherwise hold a column's max far above its valid rows and underflow
their first prototype sum; -inf where no row of any rank is valid, read as 0 by the kernels); the
kernels that merge l_r set it to +inf on the invalid rows (row_valid passed to the colsum and targets
launches), so 2^(x - c - l) = 0 for them (x is finite on the padding, so x - c - l = -inf, never
inf - inf); a prototype sum is clamped to the smallest normal fp32 before its log2 (>= 1/K unless no
row of any rank is valid; then 0, and c stays finite). Without padding the -inf read and the clamp
change nothing (M_k is finite for finite logits, the sums are >= 1/K). The reference masks with
torch.where after every division (no 0/0 or inf of the padding reaches a valid row) and takes M_k
over the valid rows too.

Traffic: T read 2 n_iterations + 2 times (amax or colmax, 2 per iteration, targets; T is 16 MB at
R = 128, K = 65536 in bf16, which may stay in an H100's 50 MB L2 between passes), q written once in
fp32; the floor is T once + q once. sinkhorn_knopp_stats writes no q (32 MB at R = 128, K = 65536),
only l (R,), M (K,) and the entropy partials; its consumers read T again instead of q (half the bytes
in bf16). Besides T, the kernels read per tile the small state: M, c, the colsum splits (row splits x
K floats) and the row partials (R x K splits). Measured on an H200 before the state updates moved
into the kernels (B = 32, 64, K = 65536): 0.11-0.16 ms of device time, but 0.8-1.3 ms of host time
per call from ~42 launches in 7 custom ops; not measured since.
Design limits: launch table untuned; the all-rows-underflow case of a column cannot happen (its max
entry, of a valid row, is 2^0); a NaN or +inf logit makes q non-finite (as the official; with
row_valid, on a padded row too); a -inf logit gets q = 0 (a column of them, a column of zeros).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .soft_cross_entropy import LN2, check_runnable, rows_contiguous, scaled_logits_dtype, sm_count, teacher_scale

OPS = ("sum", "max")


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
def _check_inputs(teacher_logits, teacher_temp, n_iterations, global_rows, row_valid=None):
    if teacher_logits.dim() != 2 or teacher_logits.shape[0] < 1 or teacher_logits.shape[1] < 1:
        raise ValueError(f"sinkhorn_knopp: teacher_logits must be 2-D (R, K) with R, K >= 1, "
                         f"got {tuple(teacher_logits.shape)}")
    if not teacher_logits.is_floating_point():
        raise ValueError(f"sinkhorn_knopp: teacher_logits must be floating point, got {teacher_logits.dtype}")
    if isinstance(teacher_temp, torch.Tensor):
        if teacher_temp.numel() != 1:
            raise ValueError(f"sinkhorn_knopp: teacher_temp must be a 0-dim tensor, got {tuple(teacher_temp.shape)}")
    elif not teacher_temp > 0:
        raise ValueError(f"sinkhorn_knopp: teacher_temp must be > 0, got {teacher_temp}")
    if isinstance(n_iterations, bool) or not isinstance(n_iterations, int) or n_iterations < 1:
        raise ValueError(f"sinkhorn_knopp: n_iterations must be an int >= 1, got {n_iterations!r}")
    if global_rows is not None and not isinstance(global_rows, torch.Tensor) and global_rows < 1:
        raise ValueError(f"sinkhorn_knopp: global_rows must be >= 1, got {global_rows}")
    if row_valid is not None and (not isinstance(row_valid, torch.Tensor) or row_valid.dtype != torch.bool
                                  or tuple(row_valid.shape) != (teacher_logits.shape[0],)
                                  or row_valid.device != teacher_logits.device):
        what = (f"{row_valid.dtype} {tuple(row_valid.shape)} on {row_valid.device}"
                if isinstance(row_valid, torch.Tensor) else type(row_valid).__name__)
        raise ValueError(f"sinkhorn_knopp: row_valid must be a bool tensor ({teacher_logits.shape[0]},) on "
                         f"{teacher_logits.device} or None, got {what}")
    return teacher_logits.shape


def sinkhorn_knopp_ref(teacher_logits, teacher_temp, n_iterations=3, all_reduce=None, global_rows=None, *,
                       row_valid=None):
    """Plain PyTorch: the official steps of the header, with each column's max over all ranks
    subtracted before exp (the first prototype normalization cancels it).

    teacher_logits (R, K) any float dtype; teacher_temp a float or a 0-dim tensor; all_reduce(x, op)
    in place over ranks, op "sum" | "max" (None: one process); global_rows B_global, an int or a 0-dim
    tensor, the same on every rank (default 1: it cancels; a rank-local count would not, with ranks of
    different sizes); row_valid (R,) bool on
    the device or None: the rows with False are left out of every sum (the column max too) and get
    q = 0, entropy 0 (see the header). Math in fp32, fp64 when teacher_logits is fp64. Returns
    (q (R, K), entropy (R,)), detached. In fp32 a row lying more than ~100 tau_t below every column's
    max underflows to zeros and its sample sum is 0: q is NaN there, as in the official code.
    """
    R, K = _check_inputs(teacher_logits, teacher_temp, n_iterations, global_rows, row_valid)
    dt = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    t = teacher_logits.detach().to(dt)
    temp = teacher_temp.detach().to(dt) if isinstance(teacher_temp, torch.Tensor) else teacher_temp
    # the official B_global cancels only if it is the same number on every rank: a rank-local count (R,
    # or this rank's valid rows) would weigh the samples of ranks with fewer rows up. Without
    # global_rows each sample's mass is 1 (B = 1 on every rank: the same targets, no collective)
    if row_valid is None:
        n_samples = 1 if global_rows is None else global_rows

        def keep(Q):
            return Q

        col_max = t.amax(dim=0)
    else:
        valid = row_valid.detach()
        n_samples = 1 if global_rows is None else global_rows

        def keep(Q):  # (K, R): zeros in the invalid samples' columns, whatever 0/0 or inf produced there
            return torch.where(valid, Q, 0.0)

        col_max = torch.where(valid[:, None], t, float("-inf")).amax(dim=0)  # -inf: no valid row here
    if all_reduce is not None:
        all_reduce(col_max, "max")
    Q = keep(torch.exp((t - col_max) / temp).T)  # (K, R): prototypes by samples, the official layout
    total = Q.sum()
    if all_reduce is not None:
        all_reduce(total, "sum")
    Q = keep(Q / total)
    for _ in range(n_iterations):
        per_prototype = Q.sum(dim=1, keepdim=True)  # over this rank's samples, then over ranks
        if all_reduce is not None:
            all_reduce(per_prototype, "sum")
        Q = keep(Q / per_prototype / K)  # each prototype: mass 1/K
        Q = keep(Q / Q.sum(dim=0, keepdim=True) / n_samples)  # each sample: mass 1/B
    q = keep(Q * n_samples).T.contiguous()
    return q, -torch.special.xlogy(q, q).sum(dim=-1)


def sinkhorn_knopp_stats_ref(teacher_logits, teacher_temp, n_iterations=3, all_reduce=None, *, row_valid=None):
    """Plain PyTorch: the log-domain algorithm of the header (the fused kernels' state, not the official
    steps; sinkhorn_knopp_ref is those), returning that state instead of q:
    (center (K,), col_offset (K,), row_offset (R,), entropy (R,)) with
    q_rk = 2^(((t_rk - center_k) * scale - col_offset_k) - row_offset_r), scale =
    teacher_scale(teacher_temp) (teacher_probs makes q from them).

        center   M_k, the column max over the valid rows of all ranks (all_reduce "max"); 0 where none
        c = 0, l = 0 (+inf on invalid rows), n_iterations times:
            c_k += log2 max(sum_r 2^(x_rk - c_k - l_r), tiny)     (all_reduce "sum" of the sums)
            l_r  = log2 sum_k 2^(x_rk - c_k)                      (+inf on invalid rows)
        entropy  -ln2 sum_k q_rk log2 q_rk                        (0 on invalid rows)

    x = (t - M) * scale - c rounded as the kernels round it; the sums in torch's order (not the
    kernels'). Arguments as sinkhorn_knopp_ref's (no global_rows: it cancels); the same collectives
    as sinkhorn_knopp (1 + n_iterations). Math in fp32, fp64 when teacher_logits is fp64 (scale =
    log2(e) / teacher_temp in fp64). Detached.
    """
    R, K = _check_inputs(teacher_logits, teacher_temp, n_iterations, None, row_valid)
    t, scale = scaled_logits_dtype(teacher_logits, teacher_temp)
    valid = None if row_valid is None else row_valid.detach()
    inf = float("inf")

    def invalid_to_inf(x):  # +inf on the rows with row_valid False: 2^(x - c - l) = 0 there
        return x if valid is None else torch.where(valid, x, inf)

    col_max = t.amax(dim=0) if valid is None else torch.where(valid[:, None], t, -inf).amax(dim=0)
    if all_reduce is not None:
        all_reduce(col_max, "max")
    center = torch.where(col_max == -inf, 0.0, col_max)  # no valid row on any rank: x stays finite
    y = (t - center) * scale  # x + c: log2 units
    col_lse = torch.zeros(K, dtype=t.dtype, device=t.device)
    row_lse = invalid_to_inf(torch.zeros(R, dtype=t.dtype, device=t.device))
    for _ in range(n_iterations):
        colsum = torch.exp2(y - col_lse - row_lse[:, None]).sum(dim=0)  # invalid rows: 2^-inf = 0
        if all_reduce is not None:
            all_reduce(colsum, "sum")
        col_lse = col_lse + torch.log2(colsum.clamp_min(torch.finfo(t.dtype).tiny))
        x = y - col_lse
        m = x.amax(dim=1, keepdim=True)
        row_lse = invalid_to_inf(m[:, 0] + torch.log2(torch.exp2(x - m).sum(dim=1)))
    log2_q = y - col_lse - row_lse[:, None]
    q = torch.exp2(log2_q)
    entropy = -LN2.value * (q * torch.where(q == 0, 0.0, log2_q)).sum(dim=1)  # 0 log 0 = 0
    return center, col_lse, row_lse, entropy


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
FP32_TINY = tl.constexpr(1.1754943508222875e-38)  # 2^-126, the smallest normal fp32


@triton.jit
def _col_max(ColMax_ptr, cols, cmask):
    """M_k at cols in fp32 (stored in fp32 or in T's dtype); -inf (no valid row on any rank) read as
    0, so that x stays finite."""
    col_max = tl.load(ColMax_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    return tl.where(col_max == float("-inf"), 0.0, col_max)


@triton.jit
def _col_lse_next(ColLse_ptr, ColSum_ptr, cols, cmask, K, n_sum_splits):
    """The prototype step at cols: c_k + log2 colsum_k, colsum summed over its (n_sum_splits, K) split
    partials in order and clamped to the smallest normal fp32 (0 when no row of any rank is valid: c
    stays finite; a NaN stays NaN); c = 0 before the first step (ColLse_ptr None)."""
    colsum = tl.load(ColSum_ptr + cols, mask=cmask, other=1.0)
    for _ in range(1, n_sum_splits):
        ColSum_ptr += K
        colsum += tl.load(ColSum_ptr + cols, mask=cmask, other=1.0)
    col_lse = tl.log2(tl.where(colsum < FP32_TINY, FP32_TINY, colsum))
    if ColLse_ptr is not None:
        col_lse += tl.load(ColLse_ptr + cols, mask=cmask, other=0.0)
    return col_lse


@triton.jit
def _row_lse(RowPart_ptr, Valid_ptr, rows, rmask, n_row_splits, BLOCK_S: tl.constexpr):
    """l_r of rows: the sample step's log-sum-exps p_s per (row, K split), (R, n_row_splits), merged:
    l = m + log2 sum_s 2^(p_s - m), m = max_s p_s; 0 before the first sample step (RowPart_ptr None);
    +inf past R and on the rows with Valid 0 (no term in any sum, q = 0)."""
    if RowPart_ptr is None:
        row_lse = tl.zeros(rows.shape, dtype=tl.float32)
    else:
        splits = tl.arange(0, BLOCK_S)
        split_mask = (splits < n_row_splits)[None, :]
        # past the splits: no term (2^-inf); past R: 0 (replaced below), no inf - inf
        part = tl.load(RowPart_ptr + rows[:, None].to(tl.int64) * n_row_splits + splits[None, :],
                       mask=rmask[:, None] & split_mask, other=0.0)
        part = tl.where(split_mask, part, float("-inf"))
        row_max = tl.max(part, axis=1)  # finite: every split saw a column
        row_lse = row_max + tl.log2(tl.sum(tl.exp2(part - row_max[:, None]), axis=1))
    keep = rmask
    if Valid_ptr is not None:
        keep = keep & (tl.load(Valid_ptr + rows, mask=rmask, other=0) != 0)
    return tl.where(keep, row_lse, float("inf"))


@triton.jit
def _x_tile(T_ptr, col_max, col_lse, rows, cols, rmask, cmask, stride_t, x_scale):
    """x - c of a [rows, cols] tile, log2 units: (t - M_k) * x_scale - c_k, x_scale =
    teacher_scale(tau_t), from the column vectors col_max and col_lse of cols; -inf past K. Each
    operation rounded on its own (the kernels are compiled without FMA contraction): the bits of
    soft_cross_entropy's _target_block and of teacher_probs' exponent."""
    t = tl.load(T_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :],
                mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    x = (t - col_max[None, :]) * x_scale - col_lse[None, :]
    return tl.where(cmask[None, :], x, float("-inf"))


@triton.jit
def _sk_colmax_kernel(
    T_ptr, Valid_ptr, Part_ptr,
    R, K, rows_per_split, stride_t,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Part[pid_r, k] = max of t_rk (fp32, exact) over the valid rows r of [pid_r*rows_per_split,
    +rows_per_split), -inf where none, for the columns of block pid_k; invalid rows are not read. A NaN
    logit may be dropped here (it reaches q through the other passes)."""
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    r_begin = pid_r * rows_per_split
    r_end = tl.minimum(r_begin + rows_per_split, R)
    acc = tl.full([BLOCK_R, BLOCK_K], float("-inf"), dtype=tl.float32)
    for r0 in range(r_begin, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        valid = tl.load(Valid_ptr + rows, mask=rows < r_end, other=0) != 0
        t = tl.load(T_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :],
                    mask=valid[:, None] & cmask[None, :], other=float("-inf")).to(tl.float32)
        acc = tl.maximum(acc, t)
    tl.store(Part_ptr + pid_r.to(tl.int64) * K + cols, tl.max(acc, axis=0), mask=cmask)


@triton.jit
def _sk_colsum_kernel(
    T_ptr, Scale_ptr, ColMax_ptr, ColLse_ptr, RowPart_ptr, Valid_ptr, Part_ptr,
    R, K, rows_per_split, n_row_splits, stride_t,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Part[pid_r, k] = sum over rows [pid_r*rows_per_split, +rows_per_split) of 2^(x_rk - c_k - l_r),
    for the columns of block pid_k; c = 0 with ColLse_ptr None, l_r merged from the last sample step's
    partials (_row_lse). The [BLOCK_R, BLOCK_K] accumulator is reduced once, at the end."""
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    x_scale = tl.load(Scale_ptr)  # teacher_scale(tau_t), computed by torch
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    col_max = _col_max(ColMax_ptr, cols, cmask)
    if ColLse_ptr is None:
        col_lse = tl.zeros([BLOCK_K], dtype=tl.float32)
    else:
        col_lse = tl.load(ColLse_ptr + cols, mask=cmask, other=0.0)
    r_begin = pid_r * rows_per_split
    r_end = tl.minimum(r_begin + rows_per_split, R)
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for r0 in range(r_begin, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < r_end
        # l before the T tile: the merge's registers are free again when T's are taken (sm_90a at
        # BLOCK_S 16: 96 registers, 115 the other way round)
        row_lse = _row_lse(RowPart_ptr, Valid_ptr, rows, rmask, n_row_splits, BLOCK_S)
        x = _x_tile(T_ptr, col_max, col_lse, rows, cols, rmask, cmask, stride_t, x_scale)
        acc += tl.exp2(x - row_lse[:, None])  # rows masked or invalid: 2^-inf = 0
    tl.store(Part_ptr + pid_r.to(tl.int64) * K + cols, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _sk_row_lse_kernel(
    T_ptr, Scale_ptr, ColMax_ptr, ColLse_ptr, ColSum_ptr, NewColLse_ptr, RowPart_ptr,
    R, K, cols_per_split, n_sum_splits, n_splits, stride_t,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The prototype step then the sample step's partials. Over columns [pid_k*cols_per_split,
    +cols_per_split): c' = c + log2 colsum (_col_lse_next), stored to NewColLse by the programs of row
    block 0 (every program computes the same c'); for the rows of block pid_r the running max m_r of
    x - c' and z_r = sum 2^(x - c' - m_r); their log-sum-exp m_r + log2 z_r to RowPart[r, pid_k]
    (R, n_splits)."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    x_scale = tl.load(Scale_ptr)  # teacher_scale(tau_t), computed by torch
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    c_begin = pid_k * cols_per_split
    c_end = tl.minimum(c_begin + cols_per_split, K)
    m_run = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    z_run = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(c_begin, c_end, BLOCK_K):
        cols = c0 + tl.arange(0, BLOCK_K)
        cmask = cols < c_end
        col_lse = _col_lse_next(ColLse_ptr, ColSum_ptr, cols, cmask, K, n_sum_splits)
        if pid_r == 0:
            tl.store(NewColLse_ptr + cols, col_lse, mask=cmask)
        x = _x_tile(T_ptr, _col_max(ColMax_ptr, cols, cmask), col_lse, rows, cols, rmask, cmask, stride_t,
                    x_scale)
        m_new = tl.maximum(m_run, tl.max(x, axis=1))  # finite: every tile has a column < c_end
        z_run = z_run * tl.exp2(m_run - m_new) + tl.sum(tl.exp2(x - m_new[:, None]), axis=1)
        m_run = m_new
    tl.store(RowPart_ptr + rows.to(tl.int64) * n_splits + pid_k, m_run + tl.log2(z_run), mask=rmask)


@triton.jit
def _sk_targets_kernel(
    T_ptr, Scale_ptr, ColMax_ptr, ColLse_ptr, RowPart_ptr, Valid_ptr, Q_ptr, RowOff_ptr, Center_ptr, PartEnt_ptr,
    R, K, cols_per_split, n_splits, stride_t, stride_q,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, WRITE_Q: tl.constexpr,
):
    """q = 2^(x - c - l) for the rows of block pid_r over columns [pid_k*cols_per_split, ...), l
    merged from the (R, n_splits) sample step partials (_row_lse), and PartEnt[r, pid_k] =
    -ln2 sum q log2 q over them (0 log 0 = 0; a NaN q stays NaN). WRITE_Q: q stored to Q (R, K);
    else q is not stored (the consumers make it from the logits: LogitTargets) and the state it is made
    from is: l to RowOff (R,) by the programs of K split 0, M as read (_col_max: fp32, 0 for -inf) to
    Center (K,) by the programs of row block 0."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    x_scale = tl.load(Scale_ptr)  # teacher_scale(tau_t), computed by torch
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    row_lse = _row_lse(RowPart_ptr, Valid_ptr, rows, rmask, n_splits, BLOCK_S)  # masked rows: q = 0
    if not WRITE_Q:
        if pid_k == 0:
            tl.store(RowOff_ptr + rows, row_lse, mask=rmask)
    c_begin = pid_k * cols_per_split
    c_end = tl.minimum(c_begin + cols_per_split, K)
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for c0 in range(c_begin, c_end, BLOCK_K):
        cols = c0 + tl.arange(0, BLOCK_K)
        cmask = cols < c_end
        col_max = _col_max(ColMax_ptr, cols, cmask)
        x = _x_tile(T_ptr, col_max, tl.load(ColLse_ptr + cols, mask=cmask, other=0.0),
                    rows, cols, rmask, cmask, stride_t, x_scale)
        log2_q = x - row_lse[:, None]
        q = tl.exp2(log2_q)
        if WRITE_Q:
            tl.store(Q_ptr + rows[:, None].to(tl.int64) * stride_q + cols[None, :], q,
                     mask=rmask[:, None] & cmask[None, :])
        else:
            if pid_r == 0:
                tl.store(Center_ptr + cols, col_max, mask=cmask)
        acc += q * tl.where(q == 0.0, 0.0, log2_q)  # 0 log 0 = 0, not 0 * -inf
    tl.store(PartEnt_ptr + rows.to(tl.int64) * n_splits + pid_k, tl.sum(acc, axis=1) * -LN2, mask=rmask)


# ----------------------------------------------------------------------------------------------
# Launchers, custom ops, public function
# ----------------------------------------------------------------------------------------------
# (BLOCK_R, BLOCK_K, num_warps). Untuned: chosen for 16-byte loads and ~32 fp32 values per thread
# per tile; PROGRAMS_PER_SM sets the splits (programs ~ PROGRAMS_PER_SM * SMs). Tune on a GPU
# (launch_config and _plan are cached per shape: cache_clear() them after changing these).
COL_CONFIG = (16, 256, 4)  # prototype sums: a column block down a share of the rows
ROW_CONFIG = (4, 1024, 4)  # row log-sum-exp and targets: a row block along a share of K
PROGRAMS_PER_SM = 4


def _split(R, K, kind: str, device: torch.device, block_k: int):
    """(per_split, n_splits) of launch_config at BLOCK_K block_k, in SymInt-safe arithmetic: the fake
    row_lse sizes its row partials with the nominal BLOCK_K (the same n_splits as the clipped one:
    with K below a block, 1)."""
    block_r = COL_CONFIG[0] if kind == "col" else ROW_CONFIG[0]
    target = PROGRAMS_PER_SM * sm_count(device)
    if kind == "col":
        length, block, n_other = R, block_r, triton.cdiv(K, block_k)
    else:
        length, block, n_other = K, block_k, triton.cdiv(R, block_r)
    n_splits = torch.sym_max(1, torch.sym_min(triton.cdiv(length, block), triton.cdiv(target, n_other)))
    per_split = triton.cdiv(triton.cdiv(length, n_splits), block) * block
    return per_split, triton.cdiv(length, per_split)


@functools.lru_cache(maxsize=256)
def launch_config(R: int, K: int, kind: str, device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_R, BLOCK_K, num_warps, per_split, n_splits) of the "col" or "row" kernels: per_split
    rows (col) or columns (row) per program, a multiple of the block; n_splits programs along it."""
    block_r, block_k, nw = COL_CONFIG if kind == "col" else ROW_CONFIG
    block_k = min(block_k, max(16, triton.next_power_of_2(K)))
    return block_r, block_k, max(1, min(nw, block_r * block_k // 256)), *_split(R, K, kind, device, block_k)


class _Plan(NamedTuple):
    """The launches of one (R, K, device), derived once: the "col" and "row" launch_config, their
    grids, and BLOCK_S, the row partials' splits rounded up to a power of 2."""
    R: int
    K: int
    col: tuple[int, int, int, int, int]
    col_grid: tuple[int, int]
    row: tuple[int, int, int, int, int]
    row_grid: tuple[int, int]
    block_s: int


@functools.lru_cache(maxsize=256)
def _plan(R: int, K: int, device: torch.device) -> _Plan:
    col, row = launch_config(R, K, "col", device), launch_config(R, K, "row", device)
    return _Plan(R, K, col, (triton.cdiv(K, col[1]), col[4]), row, (triton.cdiv(R, row[0]), row[4]),
                 triton.next_power_of_2(row[4]))


def _valid_bytes(row_valid):
    return None if row_valid is None else row_valid.contiguous().view(torch.uint8)


# every launch: x = (t - M) * scale - c rounded one operation at a time, as _target_block and
# teacher_probs round it (a contracted FMA would not)
NO_FMA = {"enable_fp_fusion": False}


def _launch_colmax(T, valid, p):
    """Column maxima (K,) fp32 over the rows with valid (uint8) != 0: the kernel's row splits reduced."""
    BR, BK, nw, per_split, n_splits = p.col
    part = torch.empty((n_splits, p.K), dtype=torch.float32, device=T.device)
    _sk_colmax_kernel[p.col_grid](T, valid, part, p.R, p.K, per_split, T.stride(0),
                                  BLOCK_R=BR, BLOCK_K=BK, num_warps=nw, **NO_FMA)
    return part[0] if n_splits == 1 else part.amax(dim=0)


def _launch_colsum(T, scale, col_max, col_lse, row_part, valid, p):
    """Prototype sums, per row split: (splits, K) fp32."""
    BR, BK, nw, per_split, n_splits = p.col
    part = torch.empty((n_splits, p.K), dtype=torch.float32, device=T.device)
    _sk_colsum_kernel[p.col_grid](T, scale, col_max, col_lse, row_part, valid, part,
                                  p.R, p.K, per_split, p.row[4], T.stride(0),
                                  BLOCK_R=BR, BLOCK_K=BK, BLOCK_S=p.block_s, num_warps=nw, **NO_FMA)
    return part


def _launch_row_lse(T, scale, col_max, col_lse, colsum, p):
    """(c' (K,), the row log-sum-exps per K split (R, splits)) from the prototype sums colsum (splits, K)."""
    BR, BK, nw, per_split, n_splits = p.row
    new_col_lse = torch.empty(p.K, dtype=torch.float32, device=T.device)
    row_part = torch.empty((p.R, n_splits), dtype=torch.float32, device=T.device)
    _sk_row_lse_kernel[p.row_grid](T, scale, col_max, col_lse, colsum, new_col_lse, row_part,
                                   p.R, p.K, per_split, colsum.shape[0], n_splits, T.stride(0),
                                   BLOCK_R=BR, BLOCK_K=BK, num_warps=nw, **NO_FMA)
    return new_col_lse, row_part


def _launch_targets(T, scale, col_max, col_lse, row_part, valid, p, write_q):
    """write_q: (q (R, K), entropy (R,)); else (center (K,), row_offset (R,), entropy (R,)), no q."""
    BR, BK, nw, per_split, n_splits = p.row
    f32 = dict(dtype=torch.float32, device=T.device)
    q = torch.empty((p.R, p.K), **f32) if write_q else None
    row_offset, center = (None, None) if write_q else (torch.empty(p.R, **f32), torch.empty(p.K, **f32))
    part = torch.empty((p.R, n_splits), **f32)
    _sk_targets_kernel[p.row_grid](T, scale, col_max, col_lse, row_part, valid, q, row_offset, center, part,
                                   p.R, p.K, per_split, n_splits, T.stride(0), p.K,
                                   BLOCK_R=BR, BLOCK_K=BK, BLOCK_S=p.block_s, WRITE_Q=write_q, num_warps=nw,
                                   **NO_FMA)
    entropy = part[:, 0] if n_splits == 1 else part.sum(dim=1)
    return (q, entropy) if write_q else (center, row_offset, entropy)


def _iterate(T, scale, valid, n_iterations, p):
    """One process: (M (K,) in T's dtype, or fp32 over the valid rows; c (K,); the last sample step's
    row partials (R, splits)), every launch but the targets pass."""
    col_max = torch.amax(T, dim=0) if valid is None else _launch_colmax(T, valid, p)  # T's dtype: exact
    col_lse = row_part = None  # c = 0, l = 0
    for _ in range(n_iterations):
        colsum = _launch_colsum(T, scale, col_max, col_lse, row_part, valid, p)  # (splits, K)
        col_lse, row_part = _launch_row_lse(T, scale, col_max, col_lse, colsum, p)
    return col_max, col_lse, row_part


@torch.library.custom_op("fastdino::sinkhorn_knopp", mutates_args=())
def sinkhorn_knopp_op(teacher_logits: torch.Tensor, teacher_scale: torch.Tensor, row_valid: Optional[torch.Tensor],
                      n_iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q (R, K) fp32, entropy (R,) fp32) on one process (no all-reduce): every launch in one op.
    teacher_scale: teacher_scale(tau_t), 0-dim fp32; row_valid (R,) bool or None (all valid)."""
    T = rows_contiguous(teacher_logits)
    p = _plan(T.shape[0], T.shape[1], T.device)
    valid = _valid_bytes(row_valid)
    col_max, col_lse, row_part = _iterate(T, teacher_scale, valid, n_iterations, p)
    return _launch_targets(T, teacher_scale, col_max, col_lse, row_part, valid, p, write_q=True)


@sinkhorn_knopp_op.register_fake
def _(teacher_logits, teacher_scale, row_valid, n_iterations):
    R, K = teacher_logits.shape
    return (teacher_logits.new_empty((R, K), dtype=torch.float32),
            teacher_logits.new_empty(R, dtype=torch.float32))


@torch.library.custom_op("fastdino::sinkhorn_knopp_stats", mutates_args=())
def sinkhorn_knopp_stats_op(teacher_logits: torch.Tensor, teacher_scale: torch.Tensor,
                            row_valid: Optional[torch.Tensor], n_iterations: int
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(center (K,), col_offset (K,), row_offset (R,), entropy (R,)), fp32, on one process: the launches
    of sinkhorn_knopp_op with the targets pass storing M, l and the entropy instead of q."""
    T = rows_contiguous(teacher_logits)
    p = _plan(T.shape[0], T.shape[1], T.device)
    valid = _valid_bytes(row_valid)
    col_max, col_lse, row_part = _iterate(T, teacher_scale, valid, n_iterations, p)
    center, row_offset, entropy = _launch_targets(T, teacher_scale, col_max, col_lse, row_part, valid, p,
                                                  write_q=False)
    return center, col_lse, row_offset, entropy


@sinkhorn_knopp_stats_op.register_fake
def _(teacher_logits, teacher_scale, row_valid, n_iterations):
    R, K = teacher_logits.shape
    return tuple(teacher_logits.new_empty(n, dtype=torch.float32) for n in (K, K, R, R))


@torch.library.custom_op("fastdino::sinkhorn_knopp_colmax", mutates_args=())
def sinkhorn_knopp_colmax_op(teacher_logits: torch.Tensor, row_valid: torch.Tensor) -> torch.Tensor:
    """Column maxima (K,) fp32 over the rows with row_valid (R,) bool True; -inf where there is none."""
    T = rows_contiguous(teacher_logits)
    return _launch_colmax(T, _valid_bytes(row_valid), _plan(T.shape[0], T.shape[1], T.device))


@sinkhorn_knopp_colmax_op.register_fake
def _(teacher_logits, row_valid):
    return teacher_logits.new_empty(teacher_logits.shape[1], dtype=torch.float32)


@torch.library.custom_op("fastdino::sinkhorn_knopp_colsum", mutates_args=())
def sinkhorn_knopp_colsum_op(teacher_logits: torch.Tensor, teacher_scale: torch.Tensor, col_max: torch.Tensor,
                             col_lse: Optional[torch.Tensor], row_part: Optional[torch.Tensor],
                             row_valid: Optional[torch.Tensor]) -> torch.Tensor:
    """Prototype sums (K,) fp32 of this rank's rows: sum_r 2^(x_rk - c_k - l_r), the kernel's row splits
    summed. teacher_scale: teacher_scale(tau_t), 0-dim fp32; col_lse c (K,) (None: 0); row_part the
    (R, splits) row log-sum-exps of the last sinkhorn_knopp_row_lse, merged into l (None: l = 0);
    row_valid (R,) bool or None: l = +inf on the rows with False."""
    T = rows_contiguous(teacher_logits)
    part = _launch_colsum(T, teacher_scale, col_max, col_lse, row_part, _valid_bytes(row_valid),
                          _plan(T.shape[0], T.shape[1], T.device))
    return part[0] if part.shape[0] == 1 else part.sum(dim=0)


@sinkhorn_knopp_colsum_op.register_fake
def _(teacher_logits, teacher_scale, col_max, col_lse, row_part, row_valid):
    return teacher_logits.new_empty(teacher_logits.shape[1], dtype=torch.float32)


@torch.library.custom_op("fastdino::sinkhorn_knopp_row_lse", mutates_args=())
def sinkhorn_knopp_row_lse_op(teacher_logits: torch.Tensor, teacher_scale: torch.Tensor, col_max: torch.Tensor,
                              col_lse: Optional[torch.Tensor], colsum: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The prototype step c' = c + log2 colsum ((K,) fp32; col_lse None: c = 0), then the sample step in
    parts: (c', row_part), row_part (R, splits) fp32 the log-sum-exps of x_rk - c'_k over each K split,
    merged into l_r by the next sinkhorn_knopp_colsum, sinkhorn_knopp_targets or
    sinkhorn_knopp_target_stats."""
    T = rows_contiguous(teacher_logits)
    return _launch_row_lse(T, teacher_scale, col_max, col_lse, colsum.view(1, -1),
                           _plan(T.shape[0], T.shape[1], T.device))


@sinkhorn_knopp_row_lse_op.register_fake
def _(teacher_logits, teacher_scale, col_max, col_lse, colsum):
    R, K = teacher_logits.shape
    n_splits = _split(R, K, "row", teacher_logits.device, ROW_CONFIG[1])[1]
    return (teacher_logits.new_empty(K, dtype=torch.float32),
            teacher_logits.new_empty((R, n_splits), dtype=torch.float32))


@torch.library.custom_op("fastdino::sinkhorn_knopp_targets", mutates_args=())
def sinkhorn_knopp_targets_op(teacher_logits: torch.Tensor, teacher_scale: torch.Tensor, col_max: torch.Tensor,
                              col_lse: torch.Tensor, row_part: torch.Tensor, row_valid: Optional[torch.Tensor]
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q (R, K) fp32, entropy (R,) fp32): q_rk = 2^(x_rk - c_k - l_r), l_r merged from the row_part of
    sinkhorn_knopp_row_lse (+inf, q = 0, on the rows with row_valid False)."""
    T = rows_contiguous(teacher_logits)
    return _launch_targets(T, teacher_scale, col_max, col_lse, row_part, _valid_bytes(row_valid),
                           _plan(T.shape[0], T.shape[1], T.device), write_q=True)


@sinkhorn_knopp_targets_op.register_fake
def _(teacher_logits, teacher_scale, col_max, col_lse, row_part, row_valid):
    R, K = teacher_logits.shape
    return (teacher_logits.new_empty((R, K), dtype=torch.float32),
            teacher_logits.new_empty(R, dtype=torch.float32))


@torch.library.custom_op("fastdino::sinkhorn_knopp_target_stats", mutates_args=())
def sinkhorn_knopp_target_stats_op(teacher_logits: torch.Tensor, teacher_scale: torch.Tensor,
                                   col_max: torch.Tensor, col_lse: torch.Tensor, row_part: torch.Tensor,
                                   row_valid: Optional[torch.Tensor]
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sinkhorn_knopp_targets without q: (center (K,) M as the kernels read it (fp32, 0 for -inf),
    row_offset (R,) l_r (+inf on the rows with row_valid False), entropy (R,)), fp32."""
    T = rows_contiguous(teacher_logits)
    return _launch_targets(T, teacher_scale, col_max, col_lse, row_part, _valid_bytes(row_valid),
                           _plan(T.shape[0], T.shape[1], T.device), write_q=False)


@sinkhorn_knopp_target_stats_op.register_fake
def _(teacher_logits, teacher_scale, col_max, col_lse, row_part, row_valid):
    R, K = teacher_logits.shape
    return tuple(teacher_logits.new_empty(n, dtype=torch.float32) for n in (K, R, R))


IMPLS = ("triton", "torch")


def _prepare(teacher_logits, teacher_temp, row_valid):
    """(T, scale, valid) for the custom ops: T detached, rows contiguous (once, not in each op);
    scale = teacher_scale(tau_t), 0-dim fp32 on T's device (a float temperature made there with
    torch.full: no host copy); row_valid detached or None."""
    T = rows_contiguous(teacher_logits.detach())
    if not isinstance(teacher_temp, torch.Tensor):
        teacher_temp = torch.full((), float(teacher_temp), dtype=torch.float32, device=T.device)
    return T, teacher_scale(teacher_temp), None if row_valid is None else row_valid.detach()


def _per_step(T, scale, valid, n_iterations, all_reduce):
    """One op per step, the caller's all-reduces between them (no collective inside an op): (M (K,)
    fp32, c (K,), the last sample step's row partials (R, splits))."""
    if valid is None:
        col_max = torch.amax(T, dim=0).to(torch.float32)  # exact in T's dtype
    else:
        col_max = sinkhorn_knopp_colmax_op(T, valid)  # over the valid rows: -inf where none (read as 0)
    all_reduce(col_max, "max")
    col_lse = row_part = None  # c = 0, l = 0
    for _ in range(n_iterations):
        colsum = sinkhorn_knopp_colsum_op(T, scale, col_max, col_lse, row_part, valid)
        all_reduce(colsum, "sum")
        col_lse, row_part = sinkhorn_knopp_row_lse_op(T, scale, col_max, col_lse, colsum)
    return col_max, col_lse, row_part


def sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=3, all_reduce=None, global_rows=None,
                   impl="triton", *, row_valid=None):
    """Teacher targets by Sinkhorn-Knopp: (q (R, K), entropy (R,)), fp32, no gradient; rows of q sum to 1.

    teacher_logits (R, K) any float dtype, this rank's rows; teacher_temp a 0-dim fp32 device tensor
    (what the engine passes) or a float; all_reduce(x, op) reduces x in place over ranks, op "sum" or
    "max" (None: one process), called 1 + n_iterations times on (K,) fp32 vectors; global_rows
    B_global (default R: it cancels, see the header). row_valid (R,) bool device tensor or None (all
    valid): the rows with False (padding, finite) take no part in any sum or max and get q = 0,
    entropy 0; the valid rows get the targets of the valid rows alone (see the header).
    impl="triton": the custom ops (CUDA, or CPU under TRITON_INTERPRET=1): one op without all_reduce,
    one per step with it; "torch": the reference.
    """
    if impl not in IMPLS:
        raise ValueError(f"sinkhorn_knopp: impl={impl!r} is not one of {list(IMPLS)}")
    if impl == "torch":
        return sinkhorn_knopp_ref(teacher_logits, teacher_temp, n_iterations, all_reduce, global_rows,
                                  row_valid=row_valid)
    _check_inputs(teacher_logits, teacher_temp, n_iterations, global_rows, row_valid)
    check_runnable(teacher_logits, "sinkhorn_knopp")
    T, scale, valid = _prepare(teacher_logits, teacher_temp, row_valid)
    if all_reduce is None:
        return sinkhorn_knopp_op(T, scale, valid, n_iterations)
    col_max, col_lse, row_part = _per_step(T, scale, valid, n_iterations, all_reduce)
    return sinkhorn_knopp_targets_op(T, scale, col_max, col_lse, row_part, valid)


def sinkhorn_knopp_stats(teacher_logits, teacher_temp, n_iterations=3, all_reduce=None, *, row_valid=None,
                         impl="triton"):
    """The Sinkhorn-Knopp targets as the state they are made from, q never stored: (center (K,),
    col_offset (K,), row_offset (R,), entropy (R,)), fp32, no gradient, with

        q_rk = 2^(((float32(t_rk) - center_k) * teacher_scale(tau_t) - col_offset_k) - row_offset_r)

    (LogitTargets(teacher_logits, center, teacher_temp, row_offset, col_offset) for the soft-CE
    kernels; teacher_probs materializes it). center = M_k as the kernels read it (0 where no valid row
    of any rank), col_offset = c_k, row_offset = l_r (+inf on the rows with row_valid False: q = 0),
    entropy as sinkhorn_knopp's. Arguments and collectives as sinkhorn_knopp's (global_rows cancels:
    not taken). impl="triton": sinkhorn_knopp's launches with the targets pass storing l_r, M_k and the
    entropy instead of q (the same bits of x and l: its q is this formula's, up to exp2's rounding);
    "torch": sinkhorn_knopp_stats_ref (the same log-domain algorithm in plain PyTorch).
    """
    if impl not in IMPLS:
        raise ValueError(f"sinkhorn_knopp_stats: impl={impl!r} is not one of {list(IMPLS)}")
    if impl == "torch":
        return sinkhorn_knopp_stats_ref(teacher_logits, teacher_temp, n_iterations, all_reduce, row_valid=row_valid)
    _check_inputs(teacher_logits, teacher_temp, n_iterations, None, row_valid)
    check_runnable(teacher_logits, "sinkhorn_knopp_stats")
    T, scale, valid = _prepare(teacher_logits, teacher_temp, row_valid)
    if all_reduce is None:
        return sinkhorn_knopp_stats_op(T, scale, valid, n_iterations)
    col_max, col_lse, row_part = _per_step(T, scale, valid, n_iterations, all_reduce)
    center, row_offset, entropy = sinkhorn_knopp_target_stats_op(T, scale, col_max, col_lse, row_part, valid)
    return center, col_lse, row_offset, entropy


__all__ = ["sinkhorn_knopp", "sinkhorn_knopp_ref", "sinkhorn_knopp_stats", "sinkhorn_knopp_stats_ref",
           "sinkhorn_knopp_op", "sinkhorn_knopp_stats_op", "sinkhorn_knopp_colmax_op", "sinkhorn_knopp_colsum_op",
           "sinkhorn_knopp_row_lse_op", "sinkhorn_knopp_targets_op", "sinkhorn_knopp_target_stats_op",
           "launch_config"]
