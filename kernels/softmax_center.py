"""Teacher targets by centering (DINO): the teacher's softmax, its entropy and the column sums the
center update needs. Two ops: softmax_center materializes q; softmax_center_stats gives only the
per-row statistics from which the loss kernels make q on the fly from the teacher logits (q never
stored).

Inputs: teacher logits T (R, K) in any float dtype (R = 2B for DINO's two global views; iBOT's
patch rows, padded); center c (1, K) or (K,) fp32; teacher_temp tau_t, a 0-dim fp32 device tensor
(it follows a per-epoch schedule: a device tensor changes without recompiling or re-capturing a
graph; a Python float is made into one).

    q_r       = softmax((t_r - c) / tau_t)                       (R, K) fp32
    entropy_r = -sum_k q_rk ln q_rk = lse(y_r) - <q_r, y_r>        (R,)  fp32,  y_r = (t_r - c) / tau_t
    colsum_k  = sum_r t_rk                                         (K,)  fp32, raw teacher logits

The entropy is taken relative to the row max M: ln2 * (log2 Z - <q, y2 - M>) with y2 = y*log2(e) and
Z = sum 2^(y2 - M); both terms are small and non-negative for a peaked q, so nothing cancels (the
naive lse - <q, y> loses everything at tau_t = 0.04 on logits of size ~10).
No gradient: the teacher is updated by EMA, the center by the engine (c <- m c + (1 - m) colsum / R,
all-reduced first where there are several ranks).

softmax_center (q materialized)
  Passes: _softmax_center_kernel, grid (R,): one program per row, two sweeps over K (online max and
  sum of exponentials in base 2, then q written and the entropy term accumulated); teacher_temp is
  read in the kernel. The column sums are torch.sum(T, 0, dtype=fp32) (deterministic, no atomics).
  Traffic: T read three times (twice by the kernel, the second sweep mostly from L2 at DINO sizes;
  once by the column sum), q written once in fp32; the floor is T once + q once.
  Design limits: one row per program (fine for R >= the SM count; small R leaves SMs idle).

softmax_center_stats (q made on the fly by its consumers), in log2 units:

    scale        = log2(e) / tau_t                 fp32: teacher_scale(tau_t) (kernels/soft_cross_entropy.py)
    y2_rk        = (float32(t_rk) - c_k) * scale     this expression exactly: the fp32 subtraction, then
                                                   the product (kernels compiled without FMA contraction)
    M_r          = max_k y2_rk,   Z_r = sum_k 2^(y2_rk - M_r) >= 1
    row_offset_r = M_r + log2 Z_r                  so that q_rk = 2^(y2_rk - row_offset_r)
    entropy_r    = ln2 * (log2 Z_r + E_r / Z_r),   E_r = sum_k 2^(y2_rk - M_r) (M_r - y2_rk) >= 0
    colsum_k     = sum_r t_rk over the valid rows (the caller divides by their count)

  row_valid (R,) bool (None: all valid): an invalid row (iBOT padding) gets row_offset = +inf (q = 0
  where its logits are finite), entropy 0, and is never read. Every term of Z and E is >= 0: no
  cancellation, no NaN (no inf - inf on masked columns, padded rows or tiles).
  teacher_probs(T, c, tau_t, row_offset) is the materialized q (torch) for consumers that cannot
  read logits.
  Passes:
    1. _softmax_center_stats_kernel, grid (K tiles,): one program per tile of BLOCK_K columns loops
       over all R rows, ROWS at a time ([ROWS, BLOCK_K] loads of T, valid rows only). Per (row, tile)
       it stores the partials m_t = max y2, z_t - 1 (z_t = sum 2^(y2 - m_t), summed without the 1 of
       one maximal element) and e_t = sum 2^(y2 - m_t) (m_t - y2) (3, R, n_tiles); the tile's column
       sums accumulate in registers and are stored once.
    2. _softmax_center_combine_kernel, grid (row blocks,): per row M = max_t m_t, with gap_t = M - m_t
       >= 0: Z - 1 = sum_t z_t 2^-gap_t - 1 (without the 1 of the maximal tile), E = sum_t 2^-gap_t
       (e_t + gap_t z_t), log2 Z as a log1p of Z - 1, then row_offset and entropy. Z - 1 kept apart
       gives a peaked row's entropy (1e-4 nats, say) to fp32 relative accuracy, where log2 of a
       rounded Z would leave ~1e-7 absolute.
  The scale is one 0-dim fp32 device tensor, teacher_scale(tau_t), computed by PyTorch from the
  device temperature (no sync) and read by the kernels, the one value every consumer multiplies by
  (the soft-CE kernels on LogitTargets, teacher_probs): y2 has the same bits everywhere (a scale
  computed in Triton would not: its `/` is the approximate div.full.f32 on NVIDIA GPUs).
  Traffic: T read exactly once (invalid rows not at all); written: 3 floats per row per tile (2.3% of
  a bf16 T's bytes at BLOCK_K = 256, 1.2% of an fp32 T's), read once by the combine; row_offset and
  entropy (R,), colsum (K,).
  The floor is T once. The tiling is fixed per element size (not per GPU): results do not depend on
  the SM count. BLOCK_K = 256 gives 256 programs at K = 65536 (about 2 per SM on an H100/H200); the
  table is not yet tuned on a GPU. Any K (past MAX_STATS_TILES tiles, BLOCK_K grows).

Host side (both ops): no synchronization, CUDA-graph capturable; torch.library custom ops
(fastdino::softmax_center, fastdino::softmax_center_stats) with fake implementations for
torch.compile. Rows of T contiguous in K (other layouts are copied).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .soft_cross_entropy import LN2, LOG2E, check_runnable, rows_contiguous, scaled_logits_dtype, teacher_scale


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
def _check_inputs(teacher_logits, center, teacher_temp):
    if teacher_logits.dim() != 2:
        raise ValueError(f"softmax_center: teacher_logits must be 2-D (R, K), got {tuple(teacher_logits.shape)}")
    K = teacher_logits.shape[1]
    if center.numel() != K or center.dim() not in (1, 2):
        raise ValueError(f"softmax_center: center must be (1, K) or (K,) with K={K}, got {tuple(center.shape)}")
    if isinstance(teacher_temp, torch.Tensor) and teacher_temp.numel() != 1:
        raise ValueError(f"softmax_center: teacher_temp must be a 0-dim tensor, got {tuple(teacher_temp.shape)}")
    return K


def softmax_center_ref(teacher_logits, center, teacher_temp):
    """Plain PyTorch: q = softmax((t - c) / teacher_temp), per-row entropy of q, column sums of t.

    teacher_logits (R, K) any float dtype, center (1, K) or (K,), teacher_temp a float or a 0-dim
    tensor. Math in fp32, fp64 when teacher_logits is fp64. Returns (q (R, K), entropy (R,),
    colsum (K,)), all detached.
    """
    K = _check_inputs(teacher_logits, center, teacher_temp)
    dt = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    t = teacher_logits.detach().to(dt)
    temp = teacher_temp.detach().to(dt) if isinstance(teacher_temp, torch.Tensor) else teacher_temp
    log_q = F.log_softmax((t - center.detach().to(dt).view(1, K)) / temp, dim=-1)
    q = log_q.exp()
    entropy = -torch.sum(q * log_q, dim=-1)
    return q, entropy, t.sum(0)


def _check_stats_inputs(teacher_logits, center, teacher_temp, row_valid):
    K = _check_inputs(teacher_logits, center, teacher_temp)
    R = teacher_logits.shape[0]
    if K == 0:
        raise ValueError("softmax_center_stats: K = 0 columns (a softmax over nothing)")
    if row_valid is not None and (row_valid.shape != (R,) or row_valid.dtype != torch.bool):
        raise ValueError(f"softmax_center_stats: row_valid must be a ({R},) bool tensor, got "
                         f"{tuple(row_valid.shape)} {row_valid.dtype}")
    return K


def _scaled_logits(teacher_logits, center, teacher_temp):
    """(t, y2): t = teacher_logits in fp32 and y2 = (t - c) * teacher_scale(teacher_temp), the
    kernels' y2 bit for bit (each operation rounded on its own: no contraction in eager PyTorch);
    fp64 when teacher_logits is fp64, with scale = log2(e) / teacher_temp in fp64."""
    K = teacher_logits.shape[1]
    t, scale = scaled_logits_dtype(teacher_logits, teacher_temp)
    return t, (t - center.detach().to(t.dtype).view(1, K)) * scale


def softmax_center_stats_ref(teacher_logits, center, teacher_temp, row_valid=None):
    """Plain PyTorch: the per-row statistics of q = softmax((t - c) / teacher_temp) in log2 units and
    the column sums of t, without q (see the header):
        row_offset_r = M_r + log2 Z_r  (q_rk = 2^(y2_rk - row_offset_r)),  entropy_r = -sum_k q ln q,
        colsum_k = sum of t_rk over the valid rows.
    teacher_logits (R, K) any float dtype, center (1, K) or (K,), teacher_temp a float or a 0-dim
    tensor, row_valid (R,) bool or None (all valid); invalid rows: row_offset +inf, entropy 0. Math in
    fp32, fp64 when teacher_logits is fp64. Returns (row_offset (R,), entropy (R,), colsum (K,))."""
    _check_stats_inputs(teacher_logits, center, teacher_temp, row_valid)
    t, y2 = _scaled_logits(teacher_logits, center, teacher_temp)
    M = y2.amax(dim=-1, keepdim=True)
    gap = M - y2  # >= 0, exactly 0 at the maximal elements
    p = torch.exp2(-gap)
    Z = p.sum(-1)
    log2_z = torch.log2(Z)
    row_offset = M.squeeze(-1) + log2_z
    entropy = LN2.value * (log2_z + (p * gap).sum(-1) / Z)  # both terms >= 0
    if row_valid is None:
        return row_offset, entropy, t.sum(0)
    row_valid = row_valid.to(t.device)
    return (torch.where(row_valid, row_offset, torch.inf), torch.where(row_valid, entropy, 0.0),
            torch.where(row_valid[:, None], t, 0.0).sum(0))


def teacher_probs(teacher_logits, center, teacher_temp, row_offset, col_offset=None):
    """q = 2^(y2 - col_offset[None, :] - row_offset[:, None]) (R, K), y2 = (t - c) *
    teacher_scale(teacher_temp), rounded as the kernels do (each subtraction in turn): the teacher's
    probabilities made from its logits and row statistics (softmax_center_stats' row_offset; with
    Sinkhorn-Knopp also its column log-normalizers col_offset, kernels/sinkhorn_knopp.py), for
    consumers that cannot read logits. fp32 (fp64 when teacher_logits is fp64); 0 on rows with
    row_offset = +inf (where the logits are finite). No gradient."""
    _check_inputs(teacher_logits, center, teacher_temp)
    if row_offset.shape != teacher_logits.shape[:1]:
        raise ValueError(f"teacher_probs: row_offset must be ({teacher_logits.shape[0]},), "
                         f"got {tuple(row_offset.shape)}")
    _, y2 = _scaled_logits(teacher_logits, center, teacher_temp)
    if col_offset is not None:
        y2 = y2 - col_offset.detach().reshape(-1).to(y2.dtype)[None, :]
    return torch.exp2(y2 - row_offset.detach().to(y2.dtype)[:, None])


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------
@triton.jit
def _softmax_center_kernel(
    T_ptr, C_ptr, Temp_ptr, Q_ptr, Ent_ptr,
    K, stride_t, stride_q,
    BLOCK_K: tl.constexpr,
):
    """Row r: sweep 1 keeps the running max M and Z = sum 2^(y - M) of y = (t - c) * log2(e)/tau_t;
    sweep 2 writes q = 2^(y - M - log2 Z) and accumulates <q, y - M> (each term <= 0: no -inf * 0
    on the masked columns, whose q is 0)."""
    r = tl.program_id(0).to(tl.int64)
    t_scale = LOG2E / tl.load(Temp_ptr).to(tl.float32)  # read on device: no host sync per step
    offs0 = tl.arange(0, BLOCK_K)
    row_t = T_ptr + r * stride_t
    m_run = float("-inf")
    z_run = 0.0
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + offs0
        mask = offs < K
        t = tl.load(row_t + offs, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(C_ptr + offs, mask=mask, other=0.0)
        y = tl.where(mask, (t - c) * t_scale, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(y, axis=0))
        z_run = z_run * tl.exp2(m_run - m_new) + tl.sum(tl.exp2(y - m_new), axis=0)
        m_run = m_new
    log2_z = tl.log2(z_run)
    lse = m_run + log2_z
    w = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + offs0
        mask = offs < K
        t = tl.load(row_t + offs, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(C_ptr + offs, mask=mask, other=0.0)
        y = (t - c) * t_scale
        q = tl.exp2(y - lse)
        tl.store(Q_ptr + r * stride_q + offs, q, mask=mask)
        w += tl.where(mask, q * (y - m_run), 0.0)
    tl.store(Ent_ptr + r, (log2_z - tl.sum(w, axis=0)) * LN2)


@triton.jit
def _softmax_center_stats_kernel(
    T_ptr, C_ptr, Scale_ptr, Valid_ptr, Stat_ptr, ColSum_ptr,
    R, K, n_tiles, plane, stride_t,  # plane = R * n_tiles; Scale = teacher_scale(teacher_temp), 0-dim
    HAS_VALID: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr,
):
    """K tile pid of every row, ROWS rows at a time; T read once (invalid rows not at all). Per (row,
    tile), with y2 = (t - c) * scale and gap = m - y2 >= 0 (exactly 0 at the maximal elements):
    Stat[0, r, pid] = m = max y2;  Stat[1] = z - 1 = sum 2^-gap - 1, the exponentials of all but one
    maximal element (ties counted exactly: z - 1 is not rounded through 1 + small, so a peaked row's
    log2 Z and entropy keep their relative accuracy);  Stat[2] = e = sum 2^-gap * gap >= 0.
    ColSum[tile] = sum of t over the valid rows, accumulated per row slot in registers (no cross-warp
    reduction in the loop) and reduced once. Compiled without FMA contraction: y2 rounds as the
    consumers' y2."""
    pid = tl.program_id(0)
    offs = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    c = tl.load(C_ptr + offs, mask=mask, other=0.0)
    scale = tl.load(Scale_ptr)  # read on device: no host sync, a new temperature recompiles nothing
    offs_r = tl.arange(0, ROWS)
    acc = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
    for r0 in range(0, R, ROWS):
        rows = r0 + offs_r
        rmask = rows < R
        lmask = rmask
        if HAS_VALID:
            lmask = rmask & (tl.load(Valid_ptr + rows, mask=rmask, other=0) != 0)
        t = tl.load(T_ptr + rows[:, None].to(tl.int64) * stride_t + offs[None, :],
                    mask=lmask[:, None] & mask[None, :], other=0.0).to(tl.float32)
        acc += t  # 0 on invalid rows and outside K
        y2 = (t - c[None, :]) * scale  # finite everywhere (t = c = 0 where not loaded)
        m = tl.max(tl.where(mask[None, :], y2, float("-inf")), axis=1)
        gap = m[:, None] - y2
        below = mask[None, :] & (gap > 0.0)
        ties = tl.sum(tl.where(mask[None, :] & (gap == 0.0), 1.0, 0.0), axis=1)  # >= 1
        p = tl.where(below, tl.exp2(-gap), 0.0)  # 0 at the ties (counted apart) and outside K
        idx = rows.to(tl.int64) * n_tiles + pid
        tl.store(Stat_ptr + idx, m, mask=rmask)
        tl.store(Stat_ptr + plane + idx, tl.sum(p, axis=1) + (ties - 1.0), mask=rmask)
        tl.store(Stat_ptr + 2 * plane + idx, tl.sum(p * gap, axis=1), mask=rmask)
    tl.store(ColSum_ptr + offs, tl.sum(acc, axis=0), mask=mask)


@triton.jit
def _softmax_center_combine_kernel(
    Stat_ptr, Valid_ptr, RowOff_ptr, Ent_ptr,
    R, n_tiles, plane,  # plane = R * n_tiles
    HAS_VALID: tl.constexpr, BLOCK_T: tl.constexpr, ROWS: tl.constexpr,
):
    """Rows [pid*ROWS, +ROWS) from the tile partials (m_t, r_t = z_t - 1, e_t): M = max_t m_t,
    gap_t = M - m_t >= 0 (0 on the tiles at the max, n_top of them), w_t = 2^-gap_t,
        Z - 1 = sum_t (r_t w_t + [t not at the max] w_t) + (n_top - 1) >= 0,
        E     = sum_t w_t (e_t + gap_t z_t) >= 0,
    log2 Z = log2(1 + (Z - 1)) with the rounding of 1 + (Z - 1) compensated (Goldberg's log1p),
    row_offset = M + log2 Z, entropy = ln2 (log2 Z + E / Z): sums of terms >= 0, relative accuracy for
    peaked rows. Padded rows and tiles read as 0 and weigh 0 (nothing infinite); invalid rows: +inf
    and 0."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < R
    offs_t = tl.arange(0, BLOCK_T)
    tmask = offs_t < n_tiles
    smask = rmask[:, None] & tmask[None, :]
    idx = rows[:, None].to(tl.int64) * n_tiles + offs_t[None, :]
    m = tl.load(Stat_ptr + idx, mask=smask, other=0.0)
    r = tl.load(Stat_ptr + plane + idx, mask=smask, other=0.0)
    e = tl.load(Stat_ptr + 2 * plane + idx, mask=smask, other=0.0)
    mx = tl.max(tl.where(tmask[None, :], m, float("-inf")), axis=1)  # finite: n_tiles >= 1
    top = tmask[None, :] & (m == mx[:, None])
    gap = tl.where(tmask[None, :], mx[:, None] - m, 0.0)
    w = tl.where(tmask[None, :], tl.exp2(-gap), 0.0)
    n_top = tl.sum(tl.where(top, 1.0, 0.0), axis=1)
    z1 = tl.sum(r * w + tl.where(top, 0.0, w), axis=1) + (n_top - 1.0)  # Z - 1 >= 0
    es = tl.sum(w * (e + gap * (1.0 + r)), axis=1)
    u = 1.0 + z1  # log2(1 + z1) = log2(u) * z1 / (u - 1); z1 / ln2 where u rounds to 1
    log2_z = tl.where(u == 1.0, z1 * LOG2E, tl.log2(u) * (z1 / tl.where(u == 1.0, 1.0, u - 1.0)))
    row_off = mx + log2_z
    ent = (log2_z + es / u) * LN2
    if HAS_VALID:
        valid = tl.load(Valid_ptr + rows, mask=rmask, other=0) != 0
        row_off = tl.where(valid, row_off, float("inf"))
        ent = tl.where(valid, ent, 0.0)
    tl.store(RowOff_ptr + rows, row_off, mask=rmask)
    tl.store(Ent_ptr + rows, ent, mask=rmask)


# ----------------------------------------------------------------------------------------------
# Launcher, custom op, public function
# ----------------------------------------------------------------------------------------------
MAX_BLOCK_K = 4096  # 8 warps: 16 fp32 per thread per sweep iteration, 16-byte loads


def launch_config(K: int) -> tuple[int, int]:
    """(BLOCK_K, num_warps) of the row kernel."""
    block_k = min(MAX_BLOCK_K, max(16, triton.next_power_of_2(K)))
    return block_k, max(1, min(8, block_k // 512))


@torch.library.custom_op("fastdino::softmax_center", mutates_args=())
def softmax_center_op(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """1 kernel + 1 column sum: (q (R, K) fp32, entropy (R,) fp32, colsum (K,) fp32)."""
    T = rows_contiguous(teacher_logits)
    R, K = T.shape
    c = center.reshape(K).to(torch.float32).contiguous()
    q = torch.empty((R, K), dtype=torch.float32, device=T.device)
    entropy = torch.empty(R, dtype=torch.float32, device=T.device)
    BLOCK_K, nw = launch_config(K)
    if R > 0:
        _softmax_center_kernel[(R,)](T, c, teacher_temp, q, entropy, K, T.stride(0), q.stride(0),
                                     BLOCK_K=BLOCK_K, num_warps=nw)
    return q, entropy, torch.sum(T, dim=0, dtype=torch.float32)


@softmax_center_op.register_fake
def _(teacher_logits, center, teacher_temp):
    R, K = teacher_logits.shape
    f32 = dict(dtype=torch.float32, device=teacher_logits.device)
    return torch.empty((R, K), **f32), torch.empty(R, **f32), torch.empty(K, **f32)


IMPLS = ("triton", "torch")


def softmax_center(teacher_logits, center, teacher_temp, impl="triton"):
    """Teacher targets by centering: (q (R, K), entropy (R,), colsum (K,)), fp32, no gradient.

    teacher_logits (R, K) any float dtype; center (1, K) or (K,) fp32; teacher_temp a 0-dim fp32
    device tensor (what the engine passes) or a float (made on the device with torch.full: no host
    copy). impl="triton": the custom op (CUDA, or CPU under TRITON_INTERPRET=1); "torch": the reference.
    """
    if impl not in IMPLS:
        raise ValueError(f"softmax_center: impl={impl!r} is not one of {list(IMPLS)}")
    if impl == "torch":
        return softmax_center_ref(teacher_logits, center, teacher_temp)
    _check_inputs(teacher_logits, center, teacher_temp)
    check_runnable(teacher_logits, "softmax_center")
    if not isinstance(teacher_temp, torch.Tensor):
        teacher_temp = torch.full((), float(teacher_temp), dtype=torch.float32, device=teacher_logits.device)
    return softmax_center_op(teacher_logits.detach(), center.detach(), teacher_temp.detach().reshape(()))



# (BLOCK_K, ROWS, num_warps) of the stats kernel per element size of T: [ROWS, BLOCK_K] loads of
# 8 KB, 16-byte per thread; BLOCK_K = 256 makes 256 programs at K = 65536. Not tuned on a GPU yet.
STATS_CONFIG = {2: (256, 16, 4), 4: (256, 8, 4)}
MAX_STATS_TILES = 1024  # the combine kernel holds [ROWS, tiles] partials of its rows in registers


def stats_launch_config(R: int, K: int, itemsize: int, block_k: int = 0, rows: int = 0, num_warps: int = 0
                        ) -> tuple[int, int, int]:
    """(BLOCK_K, ROWS, num_warps) of _softmax_center_stats_kernel; nonzero overrides win (tests, tuning)."""
    bk, rw, nw = STATS_CONFIG.get(itemsize, STATS_CONFIG[4])
    if not block_k:
        block_k = min(bk, max(16, triton.next_power_of_2(K)))
        block_k = max(block_k, triton.next_power_of_2(triton.cdiv(K, MAX_STATS_TILES)))
    if not rows:
        rows = min(rw, triton.next_power_of_2(max(R, 1)))
    if not num_warps:
        num_warps = max(1, min(nw, rows * block_k // 256))
    return block_k, rows, num_warps


def stats_combine_meta(R: int, n_tiles: int) -> dict:
    """BLOCK_T, ROWS, num_warps of _softmax_center_combine_kernel: all tiles of ROWS rows at once."""
    block_t = max(16, triton.next_power_of_2(n_tiles))
    rows = max(1, min(64, 2048 // block_t, triton.next_power_of_2(max(R, 1))))
    return dict(BLOCK_T=block_t, ROWS=rows, num_warps=max(1, min(4, rows * block_t // 256)))


@torch.library.custom_op("fastdino::softmax_center_stats", mutates_args=())
def softmax_center_stats_op(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: torch.Tensor,
                            row_valid: torch.Tensor | None = None, block_k: int = 0, rows: int = 0,
                            num_warps: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2 kernels (and teacher_scale's elementwise ops), 1 workspace: (row_offset (R,), entropy (R,),
    colsum (K,)), fp32. block_k / rows / num_warps: overrides of the stats kernel's launch table,
    0 = the table."""
    T = rows_contiguous(teacher_logits)
    R, K = T.shape
    c = center.reshape(K).to(torch.float32).contiguous()
    valid = None if row_valid is None else row_valid.contiguous()
    scale = teacher_scale(teacher_temp)  # the consumers' scale, computed on device
    f32 = dict(dtype=torch.float32, device=T.device)
    row_offset, entropy, colsum = torch.empty(R, **f32), torch.empty(R, **f32), torch.empty(K, **f32)
    BLOCK_K, ROWS, nw = stats_launch_config(R, K, T.element_size(), block_k, rows, num_warps)
    n_tiles = triton.cdiv(K, BLOCK_K)
    stat = torch.empty(3 * R * n_tiles, **f32)
    _softmax_center_stats_kernel[(n_tiles,)](
        T, c, scale, T if valid is None else valid, stat, colsum, R, K, n_tiles, R * n_tiles, T.stride(0),
        HAS_VALID=valid is not None, BLOCK_K=BLOCK_K, ROWS=ROWS, num_warps=nw, enable_fp_fusion=False)
    if R > 0:
        meta = stats_combine_meta(R, n_tiles)
        _softmax_center_combine_kernel[(triton.cdiv(R, meta["ROWS"]),)](
            stat, stat if valid is None else valid, row_offset, entropy, R, n_tiles, R * n_tiles,
            HAS_VALID=valid is not None, **meta)
    return row_offset, entropy, colsum


@softmax_center_stats_op.register_fake
def _(teacher_logits, center, teacher_temp, row_valid=None, block_k=0, rows=0, num_warps=0):
    R, K = teacher_logits.shape
    f32 = dict(dtype=torch.float32, device=teacher_logits.device)
    return torch.empty(R, **f32), torch.empty(R, **f32), torch.empty(K, **f32)


def softmax_center_stats(teacher_logits, center, teacher_temp, row_valid=None, impl="triton", *, block_k=0,
                         rows=0, num_warps=0):
    """Per-row statistics of the teacher targets and the column sums, in one read of the teacher
    logits: (row_offset (R,), entropy (R,), colsum (K,)), fp32, no gradient; q_rk =
    2^(y2_rk - row_offset_r) (teacher_probs, or made on the fly by the loss kernels).

    teacher_logits (R, K) any float dtype; center (1, K) or (K,) fp32; teacher_temp a 0-dim fp32
    device tensor (what the engine passes) or a float (made on the device with torch.full: no host
    copy); row_valid (R,) bool or None: invalid rows get row_offset +inf, entropy 0 and stay out of
    colsum. impl="triton": the custom op (CUDA, or CPU under TRITON_INTERPRET=1); "torch": the
    reference. block_k / rows / num_warps override the stats kernel's launch table (tests, tuning).
    """
    if impl not in IMPLS:
        raise ValueError(f"softmax_center_stats: impl={impl!r} is not one of {list(IMPLS)}")
    if impl == "torch":
        return softmax_center_stats_ref(teacher_logits, center, teacher_temp, row_valid)
    _check_stats_inputs(teacher_logits, center, teacher_temp, row_valid)
    check_runnable(teacher_logits, "softmax_center_stats")
    if not isinstance(teacher_temp, torch.Tensor):
        teacher_temp = torch.full((), float(teacher_temp), dtype=torch.float32, device=teacher_logits.device)
    return softmax_center_stats_op(teacher_logits.detach(), center.detach(),
                                   teacher_temp.detach().to(torch.float32).reshape(()),
                                   None if row_valid is None else row_valid.detach(), block_k, rows, num_warps)

__all__ = ["softmax_center", "softmax_center_ref", "softmax_center_op", "launch_config",
           "softmax_center_stats", "softmax_center_stats_ref", "softmax_center_stats_op", "teacher_probs",
           "stats_launch_config", "stats_combine_meta"]
