"""Teacher targets by centering (DINO): the teacher's softmax, its entropy and the column sums the
center update needs, in one op.

Inputs: teacher logits T (R, K) in any float dtype (R = 2B for DINO's two global views); center c
(1, K) or (K,) fp32; teacher_temp tau_t, a 0-dim fp32 device tensor (it follows a per-epoch
schedule: a device tensor changes without recompiling or re-capturing a graph).

    q_r       = softmax((t_r - c) / tau_t)                       (R, K) fp32
    entropy_r = -sum_k q_rk ln q_rk = lse(y_r) - <q_r, y_r>        (R,)  fp32,  y_r = (t_r - c) / tau_t
    colsum_k  = sum_r t_rk                                         (K,)  fp32, raw teacher logits

The entropy is taken relative to the row max M: ln2 * (log2 Z - <q, y2 - M>) with y2 = y*log2(e) and
Z = sum 2^(y2 - M); both terms are small and non-negative for a peaked q, so nothing cancels (the
naive lse - <q, y> loses everything at tau_t = 0.04 on logits of size ~10).
No gradient: the teacher is updated by EMA, the center by the engine (c <- m c + (1 - m) colsum / R,
all-reduced first where there are several ranks).

Passes: _softmax_center_kernel, grid (R,): one program per row, two sweeps over K (online max and
sum of exponentials in base 2, then q written and the entropy term accumulated); teacher_temp is
read in the kernel. The column sums are torch.sum(T, 0, dtype=fp32) (deterministic, no atomics).
Host side: no synchronization, CUDA-graph capturable; a torch.library custom op
(fastdino::softmax_center) with a fake implementation for torch.compile.

Traffic: T read three times (twice by the kernel, the second sweep mostly from L2 at DINO sizes;
once by the column sum), q written once in fp32; the floor is T once + q once.
Design limits: one row per program (fine for R >= the SM count; small R leaves SMs idle); rows of
T contiguous in K. Tuning (row blocking, the column sum fused into the sweep) comes later.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .soft_cross_entropy import LN2, LOG2E, check_runnable, rows_contiguous


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


__all__ = ["softmax_center", "softmax_center_ref", "softmax_center_op", "launch_config"]
