"""Teacher EMA over flat parameter buffers: the whole teacher in one launch per buffer.

    teacher <- m * teacher + (1 - m) * student          elementwise, fp32 math, m in [0, 1]
    teacher_half <- bf16(teacher)                       optional: the teacher's forward copy

`m` is read from device memory (a 0-dim tensor), so the step never synchronizes with the host and
can be captured by a CUDA graph. m == 1 leaves the teacher bit-for-bit unchanged whatever the
student holds (the engine sets m = 1 on a non-finite step): the kernel returns before touching
memory, so even a NaN student cannot reach the teacher.

Traffic floor: read teacher and student, write teacher: 3 N bytes-per-element (+ N * 2 bytes for
the bf16 copy). The kernel streams each element once (loads marked evict_first), so it runs at HBM
speed; the flat buffers come from fastdino.flat.FlatParams (every parameter a view into them).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def momentum_tensor(momentum, device) -> torch.Tensor:
    """A 0-dim fp32 tensor on `device` (a float becomes a fill kernel, not a host-to-device copy)."""
    if torch.is_tensor(momentum):
        if momentum.numel() != 1:
            raise ValueError(f"momentum: expected a 0-dim tensor, got shape {tuple(momentum.shape)}")
        if momentum.device != torch.device(device):
            raise ValueError(f"momentum: tensor is on {momentum.device}, parameters on {device} "
                             "(keep it on the device: no host synchronization in the step)")
        return momentum.reshape(())
    return torch.full((), float(momentum), dtype=torch.float32, device=device)


@torch.no_grad()
def ema_ref(teacher: torch.Tensor, student: torch.Tensor, momentum, teacher_half: torch.Tensor | None = None) -> None:
    """Reference, in place: teacher <- m teacher + (1 - m) student in fp32 (m == 1: unchanged).

    teacher, student: same shape (any dtypes); momentum: float or 0-dim tensor; teacher_half: same
    shape as teacher, receives the updated teacher cast to its dtype.
    """
    m = momentum_tensor(momentum, teacher.device).float()
    t = teacher.float()
    new = torch.where(m == 1, t, t * m + (1 - m) * student.float())
    teacher.copy_(new)
    if teacher_half is not None:
        teacher_half.copy_(teacher)


@triton.jit
def _ema_kernel(T_ptr, S_ptr, H_ptr, M_ptr, N, BLOCK: tl.constexpr, WRITE_HALF: tl.constexpr):
    # one program = BLOCK consecutive elements of the flat buffer; int64 offsets (buffers > 2^31)
    m = tl.load(M_ptr).to(tl.float32)
    if m != 1.0:  # m == 1: skip step, teacher (and its half copy) stay exactly as they are
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        t = tl.load(T_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
        s = tl.load(S_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
        new = t * m + (1.0 - m) * s
        tl.store(T_ptr + offs, new.to(T_ptr.dtype.element_ty), mask=mask)
        if WRITE_HALF:
            tl.store(H_ptr + offs, new.to(H_ptr.dtype.element_ty), mask=mask)


def ema_flat_(teacher: torch.Tensor, student: torch.Tensor, momentum, teacher_half: torch.Tensor | None = None,
              block: int | None = None, num_warps: int = 8) -> None:
    """Launch _ema_kernel over 1-D contiguous buffers teacher (N,), student (N,), teacher_half (N,).
    block: elements per program; default 4096 on a GPU, 65536 on CPU tensors (the Triton interpreter
    pays per program, not per element)."""
    if block is None:
        block = 4096 if teacher.is_cuda else 65536
    for name, x in (("teacher", teacher), ("student", student), ("teacher_half", teacher_half)):
        if x is None:
            continue
        if x.dim() != 1 or not x.is_contiguous():
            raise ValueError(f"ema_flat_: {name} must be a 1-D contiguous buffer, got shape {tuple(x.shape)}")
        if x.numel() != teacher.numel() or x.device != teacher.device:
            raise ValueError(f"ema_flat_: {name} has {x.numel()} elements on {x.device}, "
                             f"teacher has {teacher.numel()} on {teacher.device}")
    if teacher.numel() == 0:
        return
    m = momentum_tensor(momentum, teacher.device)
    grid = (triton.cdiv(teacher.numel(), block),)
    half = teacher_half if teacher_half is not None else teacher  # unused pointer when WRITE_HALF=False
    _ema_kernel[grid](teacher, student, half, m, teacher.numel(), BLOCK=block,
                      WRITE_HALF=teacher_half is not None, num_warps=num_warps)


def ema_update_(teacher: torch.Tensor, student: torch.Tensor, momentum, teacher_half: torch.Tensor | None = None,
                impl: str = "triton") -> None:
    """Public op: teacher <- m teacher + (1 - m) student on flat buffers; impl="triton"|"torch"."""
    if impl == "triton":
        ema_flat_(teacher, student, momentum, teacher_half)
    elif impl == "torch":
        ema_ref(teacher, student, momentum, teacher_half)
    else:
        raise ValueError(f"ema_update_: impl={impl!r} is not one of ['triton', 'torch']")
