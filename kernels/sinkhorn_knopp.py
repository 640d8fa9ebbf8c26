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

The fused kernels keep no (R, K) intermediate but q. In base 2, with x_rk = (t_rk - M_k) log2(e)/tau_t,
the state is one log-normalizer per column and one per row (fp32 vectors):

    prototype step   colsum_k = sum_r 2^(x_rk - c_k - l_r)  (all-reduced "sum"),  c_k += log2 colsum_k
    sample step      l_r = log2 sum_k 2^(x_rk - c_k)        (online max over k: local)
    targets          q_rk = 2^(x_rk - c_k - l_r)

starting from c = 0, l = 0: the same P at every step as the official in-place updates, up to
rounding. The sample normalizer l_r is a log-sum-exp, so a row lying far below every column's max
(2^x underflows: more than ~100 tau_t in fp32) is still normalized, where the official in-place fp32
steps divide 0 by 0. After a sample step the rows sum to 1, so the next prototype sums lie in
[1/K, B_global]: c stays finite for any number of iterations. The total, 1/K, 1/B and global_rows
drop out (global_rows is accepted for the reference, which follows the official steps literally).

Passes (no atomics: deterministic), over T in its own dtype, rows contiguous in K:
  _sk_colmax_kernel, grid (K blocks, row splits), only with row_valid: column maxima of the valid
      rows (splits, K), reduced by torch.
  _sk_colsum_kernel, grid (K blocks, row splits): prototype partial sums (splits, K), summed by torch.
  _sk_row_lse_kernel, grid (row blocks, K splits): per (row, split) max and sum of 2^(x - c - max),
      merged by torch into l (R,).
  _sk_targets_kernel, grid (row blocks, K splits): writes q, per (row, split) entropy partials.
Per iteration: 2 kernels, one all-reduce of K floats (the caller's, between launches: the ops are
collective-free); once: torch.amax (colmax with row_valid) for M and its all-reduce. Host side: no
synchronization, CUDA-graph capturable; each launch is a torch.library custom op
(fastdino::sinkhorn_knopp_colsum, fastdino::sinkhorn_knopp_row_lse, fastdino::sinkhorn_knopp_targets,
fastdino::sinkhorn_knopp_colmax) with a fake implementation, so torch.compile traces the whole
function, the all-reduces included (they are the caller's Python).

Padded rows (row_valid, the iBOT patch targets). The masked-token logits are a static-shaped
(U, K) buffer whose first n_masked rows are real and the rest padding (finite values, e.g. copies of
a token). row_valid (R,) bool device tensor (None: every row valid). Rows with False take no part in
any sum or max (the column max, the total, the prototype sums of every rank) and get q = 0 and
entropy = 0 exactly; the valid rows get the targets of the unpadded computation over the valid rows
of all ranks, up to rounding (B_global = valid rows over all ranks; it cancels). A rank may have no
valid row; with none on any rank, q and entropy are all zeros. No host synchronization, no
data-dependent shape. Fused: M_k is the max over the valid rows (_sk_colmax_kernel instead of
torch.amax: the padding could otherwise hold a column's max far above its valid rows and underflow
their first prototype sum; 0 where no row of any rank is valid); l_r = +inf for the invalid rows from
the start and after every sample step, so 2^(x - c - l) = 0 for them in the colsum and targets
kernels (x is finite on the padding, so x - c - l = -inf, never inf - inf); a prototype sum is
clamped to the smallest normal fp32 before its log2 (>= 1/K unless no row of any rank is valid; then
0, and c stays finite). The reference masks with torch.where after every division (no 0/0 or inf
of the padding reaches a valid row) and takes M_k over the valid rows too.

Traffic: T read 2 n_iterations + 2 times (amax or colmax, 2 per iteration, targets; T is 16 MB at
R = 128, K = 65536 in bf16, which may stay in an H100's 50 MB L2 between passes), q written once in
fp32; the floor is T once + q once. Not measured on a GPU yet.
Design limits: launch table untuned (no GPU measurement yet); the all-rows-underflow case of a
column cannot happen (its max entry, of a valid row, is 2^0); a non-finite logit makes q non-finite
(as the official; with row_valid, a non-finite padded logit too).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .soft_cross_entropy import LN2, LOG2E, check_runnable, rows_contiguous, sm_count

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


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _x_tile(T_ptr, ColMax_ptr, ColLse_ptr, rows, cols, rmask, cmask, stride_t, x_scale):
    """x - c of a [rows, cols] tile, log2 units: (t - M_k) * log2(e)/tau_t - c_k; -inf past K."""
    t = tl.load(T_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :],
                mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    col_max = tl.load(ColMax_ptr + cols, mask=cmask, other=0.0)
    col_lse = tl.load(ColLse_ptr + cols, mask=cmask, other=0.0)
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
    T_ptr, Temp_ptr, ColMax_ptr, ColLse_ptr, RowLse_ptr, Part_ptr,
    R, K, rows_per_split, stride_t,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Part[pid_r, k] = sum over rows [pid_r*rows_per_split, +rows_per_split) of 2^(x_rk - c_k - l_r),
    for the columns of block pid_k. The [BLOCK_R, BLOCK_K] accumulator is reduced once, at the end."""
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    x_scale = LOG2E / tl.load(Temp_ptr).to(tl.float32)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    r_begin = pid_r * rows_per_split
    r_end = tl.minimum(r_begin + rows_per_split, R)
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for r0 in range(r_begin, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < r_end
        x = _x_tile(T_ptr, ColMax_ptr, ColLse_ptr, rows, cols, rmask, cmask, stride_t, x_scale)
        row_lse = tl.load(RowLse_ptr + rows, mask=rmask, other=float("inf"))  # masked rows: 2^-inf = 0
        acc += tl.exp2(x - row_lse[:, None])
    tl.store(Part_ptr + pid_r.to(tl.int64) * K + cols, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _sk_row_lse_kernel(
    T_ptr, Temp_ptr, ColMax_ptr, ColLse_ptr, PartMax_ptr, PartSum_ptr,
    R, K, cols_per_split, n_splits, stride_t,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Rows of block pid_r over columns [pid_k*cols_per_split, +cols_per_split): running max m_r of
    x - c and z_r = sum 2^(x - c - m_r), stored at [r, pid_k] of PartMax / PartSum (R, n_splits)."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    x_scale = LOG2E / tl.load(Temp_ptr).to(tl.float32)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    c_begin = pid_k * cols_per_split
    c_end = tl.minimum(c_begin + cols_per_split, K)
    m_run = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    z_run = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(c_begin, c_end, BLOCK_K):
        cols = c0 + tl.arange(0, BLOCK_K)
        x = _x_tile(T_ptr, ColMax_ptr, ColLse_ptr, rows, cols, rmask, cols < c_end, stride_t, x_scale)
        m_new = tl.maximum(m_run, tl.max(x, axis=1))  # finite: every tile has a column < c_end
        z_run = z_run * tl.exp2(m_run - m_new) + tl.sum(tl.exp2(x - m_new[:, None]), axis=1)
        m_run = m_new
    out = rows.to(tl.int64) * n_splits + pid_k
    tl.store(PartMax_ptr + out, m_run, mask=rmask)
    tl.store(PartSum_ptr + out, z_run, mask=rmask)


@triton.jit
def _sk_targets_kernel(
    T_ptr, Temp_ptr, ColMax_ptr, ColLse_ptr, RowLse_ptr, Q_ptr, PartEnt_ptr,
    R, K, cols_per_split, n_splits, stride_t, stride_q,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """q = 2^(x - c - l) for the rows of block pid_r over columns [pid_k*cols_per_split, ...), and
    PartEnt[r, pid_k] = -ln2 sum q log2 q over them (0 log 0 = 0; a NaN q stays NaN)."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    x_scale = LOG2E / tl.load(Temp_ptr).to(tl.float32)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    row_lse = tl.load(RowLse_ptr + rows, mask=rmask, other=float("inf"))  # masked rows: q = 0
    c_begin = pid_k * cols_per_split
    c_end = tl.minimum(c_begin + cols_per_split, K)
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for c0 in range(c_begin, c_end, BLOCK_K):
        cols = c0 + tl.arange(0, BLOCK_K)
        cmask = cols < c_end
        log2_q = _x_tile(T_ptr, ColMax_ptr, ColLse_ptr, rows, cols, rmask, cmask, stride_t, x_scale) \
            - row_lse[:, None]
        q = tl.exp2(log2_q)
        tl.store(Q_ptr + rows[:, None].to(tl.int64) * stride_q + cols[None, :], q,
                 mask=rmask[:, None] & cmask[None, :])
        acc += q * tl.where(q == 0.0, 0.0, log2_q)  # 0 log 0 = 0, not 0 * -inf
    tl.store(PartEnt_ptr + rows.to(tl.int64) * n_splits + pid_k, tl.sum(acc, axis=1) * -LN2, mask=rmask)


# ----------------------------------------------------------------------------------------------
# Launchers, custom ops, public function
# ----------------------------------------------------------------------------------------------
# (BLOCK_R, BLOCK_K, num_warps). Untuned: chosen for 16-byte loads and ~32 fp32 values per thread
# per tile; PROGRAMS_PER_SM sets the splits (programs ~ PROGRAMS_PER_SM * SMs). Tune on a GPU.
COL_CONFIG = (16, 256, 4)  # prototype sums: a column block down a share of the rows
ROW_CONFIG = (4, 1024, 4)  # row log-sum-exp and targets: a row block along a share of K
PROGRAMS_PER_SM = 4


def launch_config(R: int, K: int, kind: str, device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_R, BLOCK_K, num_warps, per_split, n_splits) of the "col" or "row" kernels: per_split
    rows (col) or columns (row) per program, a multiple of the block; n_splits programs along it."""
    block_r, block_k, nw = COL_CONFIG if kind == "col" else ROW_CONFIG
    block_k = min(block_k, max(16, triton.next_power_of_2(K)))
    target = PROGRAMS_PER_SM * sm_count(device)
    if kind == "col":
        length, block, n_other = R, block_r, triton.cdiv(K, block_k)
    else:
        length, block, n_other = K, block_k, triton.cdiv(R, block_r)
    n_splits = max(1, min(triton.cdiv(length, block), triton.cdiv(target, n_other)))
    per_split = triton.cdiv(triton.cdiv(length, n_splits), block) * block
    return block_r, block_k, max(1, min(nw, block_r * block_k // 256)), per_split, triton.cdiv(length, per_split)


@torch.library.custom_op("fastdino::sinkhorn_knopp_colmax", mutates_args=())
def sinkhorn_knopp_colmax_op(teacher_logits: torch.Tensor, row_valid: torch.Tensor) -> torch.Tensor:
    """Column maxima (K,) fp32 over the rows with row_valid (R,) bool True; -inf where there is none."""
    T = rows_contiguous(teacher_logits)
    R, K = T.shape
    BR, BK, nw, per_split, n_splits = launch_config(R, K, "col", T.device)
    part = torch.empty((n_splits, K), dtype=torch.float32, device=T.device)
    _sk_colmax_kernel[(triton.cdiv(K, BK), n_splits)](T, row_valid.contiguous().view(torch.uint8), part,
                                                      R, K, per_split, T.stride(0),
                                                      BLOCK_R=BR, BLOCK_K=BK, num_warps=nw)
    return part[0] if n_splits == 1 else part.amax(dim=0)


@sinkhorn_knopp_colmax_op.register_fake
def _(teacher_logits, row_valid):
    return teacher_logits.new_empty(teacher_logits.shape[1], dtype=torch.float32)


@torch.library.custom_op("fastdino::sinkhorn_knopp_colsum", mutates_args=())
def sinkhorn_knopp_colsum_op(teacher_logits: torch.Tensor, teacher_temp: torch.Tensor, col_max: torch.Tensor,
                             col_lse: torch.Tensor, row_lse: torch.Tensor) -> torch.Tensor:
    """Prototype sums (K,) fp32 of this rank's rows: sum_r 2^(x_rk - c_k - l_r)."""
    T = rows_contiguous(teacher_logits)
    R, K = T.shape
    BR, BK, nw, per_split, n_splits = launch_config(R, K, "col", T.device)
    part = torch.empty((n_splits, K), dtype=torch.float32, device=T.device)
    _sk_colsum_kernel[(triton.cdiv(K, BK), n_splits)](T, teacher_temp, col_max, col_lse, row_lse, part,
                                                      R, K, per_split, T.stride(0),
                                                      BLOCK_R=BR, BLOCK_K=BK, num_warps=nw)
    return part[0] if n_splits == 1 else part.sum(dim=0)


@sinkhorn_knopp_colsum_op.register_fake
def _(teacher_logits, teacher_temp, col_max, col_lse, row_lse):
    return teacher_logits.new_empty(teacher_logits.shape[1], dtype=torch.float32)


@torch.library.custom_op("fastdino::sinkhorn_knopp_row_lse", mutates_args=())
def sinkhorn_knopp_row_lse_op(teacher_logits: torch.Tensor, teacher_temp: torch.Tensor, col_max: torch.Tensor,
                              col_lse: torch.Tensor) -> torch.Tensor:
    """Sample normalizers (R,) fp32: l_r = log2 sum_k 2^(x_rk - c_k)."""
    T = rows_contiguous(teacher_logits)
    R, K = T.shape
    BR, BK, nw, per_split, n_splits = launch_config(R, K, "row", T.device)
    part_max = torch.empty((R, n_splits), dtype=torch.float32, device=T.device)
    part_sum = torch.empty_like(part_max)
    _sk_row_lse_kernel[(triton.cdiv(R, BR), n_splits)](T, teacher_temp, col_max, col_lse, part_max, part_sum,
                                                       R, K, per_split, n_splits, T.stride(0),
                                                       BLOCK_R=BR, BLOCK_K=BK, num_warps=nw)
    if n_splits == 1:
        return part_max[:, 0] + torch.log2(part_sum[:, 0])
    m = part_max.amax(dim=1, keepdim=True)  # merge the splits: rescale each to the row's max
    return m[:, 0] + torch.log2(torch.sum(part_sum * torch.exp2(part_max - m), dim=1))


@sinkhorn_knopp_row_lse_op.register_fake
def _(teacher_logits, teacher_temp, col_max, col_lse):
    return teacher_logits.new_empty(teacher_logits.shape[0], dtype=torch.float32)


@torch.library.custom_op("fastdino::sinkhorn_knopp_targets", mutates_args=())
def sinkhorn_knopp_targets_op(teacher_logits: torch.Tensor, teacher_temp: torch.Tensor, col_max: torch.Tensor,
                              col_lse: torch.Tensor, row_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q (R, K) fp32, entropy (R,) fp32): q_rk = 2^(x_rk - c_k - l_r)."""
    T = rows_contiguous(teacher_logits)
    R, K = T.shape
    BR, BK, nw, per_split, n_splits = launch_config(R, K, "row", T.device)
    q = torch.empty((R, K), dtype=torch.float32, device=T.device)
    part = torch.empty((R, n_splits), dtype=torch.float32, device=T.device)
    _sk_targets_kernel[(triton.cdiv(R, BR), n_splits)](T, teacher_temp, col_max, col_lse, row_lse, q, part,
                                                       R, K, per_split, n_splits, T.stride(0), q.stride(0),
                                                       BLOCK_R=BR, BLOCK_K=BK, num_warps=nw)
    return q, part[:, 0] if n_splits == 1 else part.sum(dim=1)


@sinkhorn_knopp_targets_op.register_fake
def _(teacher_logits, teacher_temp, col_max, col_lse, row_lse):
    R, K = teacher_logits.shape
    return (teacher_logits.new_empty((R, K), dtype=torch.float32),
            teacher_logits.new_empty(R, dtype=torch.float32))


IMPLS = ("triton", "torch")
_FP32_TINY = torch.finfo(torch.float32).tiny  # 2^-126, the smallest normal fp32


def sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=3, all_reduce=None, global_rows=None,
                   impl="triton", *, row_valid=None):
    """Teacher targets by Sinkhorn-Knopp: (q (R, K), entropy (R,)), fp32, no gradient; rows of q sum to 1.

    teacher_logits (R, K) any float dtype, this rank's rows; teacher_temp a 0-dim fp32 device tensor
    (what the engine passes) or a float; all_reduce(x, op) reduces x in place over ranks, op "sum" or
    "max" (None: one process), called 1 + n_iterations times on (K,) fp32 vectors; global_rows
    B_global (default R: it cancels, see the header). row_valid (R,) bool device tensor or None (all
    valid): the rows with False (padding, finite) take no part in any sum or max and get q = 0,
    entropy 0; the valid rows get the targets of the valid rows alone (see the header).
    impl="triton": the custom ops (CUDA, or CPU under TRITON_INTERPRET=1); "torch": the reference.
    """
    if impl not in IMPLS:
        raise ValueError(f"sinkhorn_knopp: impl={impl!r} is not one of {list(IMPLS)}")
    if impl == "torch":
        return sinkhorn_knopp_ref(teacher_logits, teacher_temp, n_iterations, all_reduce, global_rows,
                                  row_valid=row_valid)
    R, K = _check_inputs(teacher_logits, teacher_temp, n_iterations, global_rows, row_valid)
    check_runnable(teacher_logits, "sinkhorn_knopp")
    T = rows_contiguous(teacher_logits.detach())  # once, not in each of the 2 n_iterations + 1 ops
    if isinstance(teacher_temp, torch.Tensor):
        temp = teacher_temp.detach().reshape(()).to(torch.float32)
    else:
        temp = torch.full((), float(teacher_temp), dtype=torch.float32, device=T.device)
    if row_valid is None:
        col_max = torch.amax(T, dim=0).to(torch.float32)  # exact in T's dtype
    else:
        valid = row_valid.detach()
        col_max = sinkhorn_knopp_colmax_op(T, valid)  # over the valid rows: -inf where none
    if all_reduce is not None:
        all_reduce(col_max, "max")
    col_lse = torch.zeros(K, dtype=torch.float32, device=T.device)
    row_lse = torch.zeros(R, dtype=torch.float32, device=T.device)
    if row_valid is not None:
        col_max = torch.where(col_max == float("-inf"), 0.0, col_max)  # no valid row on any rank: x finite
        row_lse = torch.where(valid, row_lse, float("inf"))  # invalid rows: 2^(x - c - inf) = 0 in every sum
    for _ in range(n_iterations):
        colsum = sinkhorn_knopp_colsum_op(T, temp, col_max, col_lse, row_lse)
        if all_reduce is not None:
            all_reduce(colsum, "sum")
        if row_valid is None:
            col_lse = col_lse + torch.log2(colsum)
        else:  # 0 when no row of any rank is valid: keep c finite (x - c - l stays -inf there, not NaN)
            col_lse = col_lse + torch.log2(colsum.clamp_min(_FP32_TINY))
        row_lse = sinkhorn_knopp_row_lse_op(T, temp, col_max, col_lse)
        if row_valid is not None:
            row_lse = torch.where(valid, row_lse, float("inf"))
    return sinkhorn_knopp_targets_op(T, temp, col_max, col_lse, row_lse)


__all__ = ["sinkhorn_knopp", "sinkhorn_knopp_ref", "sinkhorn_knopp_colmax_op", "sinkhorn_knopp_colsum_op",
           "sinkhorn_knopp_row_lse_op", "sinkhorn_knopp_targets_op", "launch_config"]
