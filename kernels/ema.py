"""Teacher EMA: teacher <- m * teacher + (1 - m) * student, elementwise, fp32 math, m in [0, 1].

    ema_ref(teacher, student, momentum)        the reference, over lists of tensors
    _ema_kernel                                Triton, one flat 1-D buffer per launch
    torch.ops.fastdino.ema_flat_               the launch as a custom op (+ fake impl): torch.compile
                                               traces it, a CUDA graph captures it
    ema_flat_(teacher, student, momentum)      public: validate the buffers, call the op
    ema_foreach_(teacher, student, momentum)   torch._foreach_* over lists (any device; the engine's
                                               "foreach" impl and the path when fastdino._C is not built)

`m` is read from device memory (a 0-dim fp32 tensor), so the step never synchronizes with the host
and a CUDA graph replays it with the momentum of the moment. m == 1 leaves the teacher bit-for-bit
unchanged whatever the student holds (the engine sets m = 1 on a non-finite step): the reference
selects the old value, the kernel returns before touching memory, so a NaN student cannot reach
the teacher. ema_foreach_ computes t + (1 - m)(s - t): exact at m == 1 for a finite student only.

Traffic floor: read teacher and student, write teacher (3 N elements). The kernel streams each
element once (loads marked evict_first), so it runs at HBM speed; the flat buffers come from
fastdino.flat.FlatParams (every parameter a view into them).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernel loads and stores


def momentum_tensor(momentum, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A 0-dim `dtype` tensor on `device` from a float or a 1-element tensor already there (a float
    becomes a fill kernel, not a host-to-device copy)."""
    if torch.is_tensor(momentum):
        if momentum.numel() != 1:
            raise ValueError(f"momentum: expected a 0-dim tensor, got shape {tuple(momentum.shape)}")
        if momentum.device != torch.device(device):
            raise ValueError(f"momentum: tensor is on {momentum.device}, parameters on {device} "
                             "(keep it on the device: no host synchronization in the step)")
        return momentum.reshape(()).to(dtype)
    return torch.full((), float(momentum), dtype=dtype, device=device)


def _pairs(teacher, student, what: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    if torch.is_tensor(teacher) or torch.is_tensor(student):
        raise ValueError(f"{what}: teacher and student are sequences of tensors (a flat buffer is a one-element list)")
    teacher, student = list(teacher), [s.detach() for s in student]
    if len(teacher) != len(student):
        raise ValueError(f"{what}: {len(teacher)} teacher tensors but {len(student)} student tensors")
    return teacher, student


@torch.no_grad()
def ema_ref(teacher, student, momentum) -> None:
    """Reference, in place over sequences of tensors (same shapes pairwise, any float dtypes):
    teacher_i <- m teacher_i + (1 - m) student_i in fp32 (fp64 for an fp64 teacher), cast back to
    the teacher's dtype. momentum: float or 0-dim tensor on the tensors' device. m == 1 keeps the
    teacher bit-for-bit (selected with torch.where: no host sync), even for a NaN student."""
    teacher, student = _pairs(teacher, student, "ema_ref")
    for t, s in zip(teacher, student):
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        m = momentum_tensor(momentum, t.device, dtype)
        new = t.to(dtype) * m + (1 - m) * s.to(dtype)
        t.copy_(torch.where(m == 1, t, new.to(t.dtype)))


@triton.jit
def _ema_kernel(T_ptr, S_ptr, M_ptr, N, BLOCK: tl.constexpr):
    # one program = BLOCK consecutive elements of the flat buffer; int64 offsets (buffers > 2^31)
    m = tl.load(M_ptr).to(tl.float32)
    if m != 1.0:  # m == 1: skipped step, the teacher stays exactly as it is
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        t = tl.load(T_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
        s = tl.load(S_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
        tl.store(T_ptr + offs, (t * m + (1.0 - m) * s).to(T_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("fastdino::ema_flat_", mutates_args=("teacher",))
def _ema_flat_op(teacher: torch.Tensor, student: torch.Tensor, momentum: torch.Tensor, block: int,
                 num_warps: int) -> None:
    """teacher (N,) <- m teacher + (1 - m) student (N,); momentum: 0-dim fp32 on the same device."""
    if teacher.numel() > 0:
        _ema_kernel[(triton.cdiv(teacher.numel(), block),)](teacher, student, momentum, teacher.numel(),
                                                             BLOCK=block, num_warps=num_warps)


@_ema_flat_op.register_fake
def _(teacher, student, momentum, block, num_warps):
    return None


def ema_flat_(teacher: torch.Tensor, student: torch.Tensor, momentum, *, block: int | None = None,
              num_warps: int = 8) -> None:
    """teacher <- m teacher + (1 - m) student over 1-D contiguous buffers teacher (N,), student (N,)
    (fp32/bf16/fp16, any mix), in one launch; momentum: float or 0-dim tensor on their device.
    block: elements per program; default 4096 on a GPU, 65536 on CPU tensors (the Triton
    interpreter pays per program, not per element)."""
    for name, x in (("teacher", teacher), ("student", student)):
        if x.dim() != 1 or not x.is_contiguous():
            raise ValueError(f"ema_flat_: {name} must be a 1-D contiguous buffer, got shape {tuple(x.shape)}")
        if x.dtype not in DTYPES:
            raise ValueError(f"ema_flat_: {name} has dtype {x.dtype}, the kernel takes {', '.join(map(str, DTYPES))}")
    if student.numel() != teacher.numel() or student.device != teacher.device:
        raise ValueError(f"ema_flat_: student has {student.numel()} elements on {student.device}, "
                         f"teacher has {teacher.numel()} on {teacher.device}")
    if block is None:
        block = 4096 if teacher.is_cuda else 65536
    _ema_flat_op(teacher, student.detach(), momentum_tensor(momentum, teacher.device), block, num_warps)


@torch.no_grad()
def ema_foreach_(teacher, student, momentum) -> None:
    """teacher_i <- teacher_i + (1 - m)(student_i - teacher_i) with torch._foreach_* (lists, any
    float dtypes, a few launches). The weight 1 - m stays an fp32 device tensor (no host sync);
    m == 1 adds 0 * (s - t): the teacher is kept exactly for a finite student (-0.0 becomes +0.0)."""
    teacher, student = _pairs(teacher, student, "ema_foreach_")
    if not teacher:
        return
    weight = 1 - momentum_tensor(momentum, teacher[0].device)
    diff = torch._foreach_sub(student, teacher)
    torch._foreach_mul_(diff, weight)
    torch._foreach_add_(teacher, diff)
