"""Teacher update: teacher <- m * teacher + (1 - m) * student, for every parameter.

`ema_update_loop` is the official per-parameter loop (the reference); `ema_update_foreach` does the
same in a few multi-tensor launches. `momentum` may be a Python float or a 0-dim device tensor (no
host synchronization); a momentum of 1 leaves the teacher untouched (used to skip bad steps).

`TeacherUpdater` is what the engine calls every step; it picks the implementation once:

    impl          inputs                          launches per step
    flat_triton   FlatParams, CUDA                one per flat buffer (kernels/ema.py)
    multi_tensor  lists (DeepSpeed), CUDA         a few (csrc/, torch._foreach_* if not built)
    foreach       FlatParams: the flat buffers; lists: torch._foreach_*   a few
    loop          anything                        ~4 per parameter (the official code)
    auto          flat_triton for FlatParams on CUDA, multi_tensor for lists on CUDA, foreach on CPU

momentum == 1 keeps the teacher bit-for-bit in every impl (flat_triton, multi_tensor, loop and the
flat foreach select the old value, so even a non-finite student cannot leak in; the foreach path on
lists computes t + 0 * (s - t): exact for a finite student, -0.0 aside).
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

IMPLS = ("auto", "flat_triton", "multi_tensor", "foreach", "loop")


@torch.no_grad()
def ema_update_loop(teacher_params, student_params, momentum) -> None:
    """Reference: the official `for param_q, param_k in zip(...)` loop, fp32 math."""
    if not torch.is_tensor(momentum):
        if momentum == 1:
            return
        for p_t, p_s in zip(teacher_params, student_params):
            if p_t.dtype == p_s.dtype == torch.float32:  # exactly the official ops
                p_t.mul_(momentum).add_((1 - momentum) * p_s.detach())
            else:
                p_t.copy_(p_t.float() * momentum + (1 - momentum) * p_s.detach().float())
        return
    for p_t, p_s in zip(teacher_params, student_params):
        new = p_t.float() * momentum + (1 - momentum) * p_s.detach().float()
        # m == 1 (a skipped step): keep the teacher whatever the student holds
        p_t.copy_(torch.where(momentum == 1, p_t.float(), new))


@torch.no_grad()
def ema_update_foreach(teacher_params, student_params, momentum) -> None:
    """teacher <- teacher + (1 - m) (student - teacher) with torch._foreach_* (any float dtypes;
    the weight 1 - m stays fp32)."""
    teacher, student = list(teacher_params), [p.detach() for p in student_params]
    if not teacher:
        return
    if torch.is_tensor(momentum):
        weight = (1 - momentum.float()).reshape(())
        diff = torch._foreach_sub(student, teacher)
        torch._foreach_mul_(diff, weight)
        torch._foreach_add_(teacher, diff)
    elif float(momentum) != 1.0:
        same = all(t.dtype == s.dtype for t, s in zip(teacher, student))
        if same:
            torch._foreach_lerp_(teacher, student, 1.0 - float(momentum))
        else:
            diff = torch._foreach_sub(student, teacher)
            torch._foreach_mul_(diff, 1.0 - float(momentum))
            torch._foreach_add_(teacher, diff)


class TeacherUpdater:
    """teacher <- m teacher + (1 - m) student, the whole teacher per call, no host sync.

    teacher, student: FlatParams with the same layout (flat paths) or iterables of tensors with the
    same shapes pairwise. teacher_copy_dtype: also keep a copy of the teacher in this dtype (e.g.
    torch.bfloat16), rewritten by every step in the same pass, for the teacher's forward:
    `self.teacher_copy` is {name: view}, for torch.func.functional_call(teacher, self.teacher_copy, x).
    Flat paths only; call refresh_copy() after loading a checkpoint into the teacher.
    """

    def __init__(self, teacher, student, impl: str = "auto", teacher_copy_dtype: torch.dtype | None = None):
        from fastdino.flat import FlatParams

        if impl not in IMPLS:
            raise ValueError(f"TeacherUpdater: impl={impl!r} is not one of {list(IMPLS)}")
        self.teacher_flat = teacher if isinstance(teacher, FlatParams) else None
        self.student_flat = student if isinstance(student, FlatParams) else None
        self.teacher = self.teacher_flat.params if self.teacher_flat else list(teacher)
        self.student = self.student_flat.params if self.student_flat else list(student)
        if len(self.teacher) != len(self.student):
            raise ValueError(f"TeacherUpdater: {len(self.teacher)} teacher parameters but {len(self.student)} student parameters")
        for i, (t, s) in enumerate(zip(self.teacher, self.student)):
            if t.shape != s.shape or t.device != s.device:
                raise ValueError(f"TeacherUpdater: parameter {i} is {tuple(t.shape)} on {t.device} in the teacher "
                                 f"but {tuple(s.shape)} on {s.device} in the student")
        flat = self.teacher_flat is not None and self.student_flat is not None
        if flat and self.teacher_flat.layout() != self.student_flat.layout():
            flat = False  # different dtypes or order: the buffers do not line up, use the lists
        self.flat = flat
        cuda = bool(self.teacher) and self.teacher[0].is_cuda
        if impl == "auto":
            impl = "flat_triton" if (flat and cuda) else ("multi_tensor" if cuda else "foreach")
        if impl == "flat_triton" and not flat:
            raise ValueError("TeacherUpdater: impl='flat_triton' needs teacher and student as FlatParams with the "
                             "same layout (same parameter shapes, dtypes and order)")
        if impl == "flat_triton" and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("TeacherUpdater: impl='flat_triton' needs CUDA parameters (or TRITON_INTERPRET=1)")
        self.impl = impl
        self.teacher_copy, self._halves = None, None
        if teacher_copy_dtype is not None:
            if not (flat and impl in ("flat_triton", "foreach")):
                raise ValueError(f"TeacherUpdater: teacher_copy_dtype needs the flat paths, impl is {impl!r} "
                                 f"({'FlatParams' if flat else 'lists'})")
            self._halves, self.teacher_copy = self.teacher_flat.half_copy(teacher_copy_dtype)
        log.info("teacher update: impl=%s (%s, %d parameters%s)", impl, "flat buffers" if flat else "lists",
                 len(self.teacher), f", {teacher_copy_dtype} copy" if teacher_copy_dtype else "")

    @torch.no_grad()
    def refresh_copy(self) -> None:
        """Rewrite the teacher copy from the teacher (after loading a checkpoint into the teacher)."""
        if self._halves is not None:
            for h, buf in zip(self._halves, self.teacher_flat.buffers):
                h.copy_(buf.data)

    @torch.no_grad()
    def step(self, momentum) -> None:
        """One EMA step; momentum: float or 0-dim tensor on the parameters' device (1.0 = skip)."""
        if not self.teacher:
            return
        from fastdino.kernels.ema import ema_flat_, ema_ref, momentum_tensor

        if self.impl == "loop":
            ema_update_loop(self.teacher, self.student, momentum)
            return
        m = momentum_tensor(momentum, self.teacher[0].device)
        if self.flat and self.impl in ("flat_triton", "foreach"):
            halves = self._halves or [None] * len(self.teacher_flat.buffers)
            fn = ema_flat_ if self.impl == "flat_triton" else ema_ref
            for tb, sb, h in zip(self.teacher_flat.buffers, self.student_flat.buffers, halves):
                fn(tb.data, sb.data, m, h)
        elif self.impl == "multi_tensor":
            from fastdino.multi_tensor import ema_lerp_

            ema_lerp_(self.teacher, self.student, m)
        else:
            ema_update_foreach(self.teacher, self.student, m)
