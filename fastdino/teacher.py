"""Teacher update: teacher <- m * teacher + (1 - m) * student for every parameter, m from the
momentum schedule as a 0-dim device tensor (no host synchronization). m = 1 leaves the teacher
bit-for-bit unchanged whatever the student holds: the step passes m = 1 on a non-finite step.

The implementation is chosen once (fastdino/resolve.py) and held by a TeacherEMA:
    triton    one Triton launch per flat buffer (kernels/ema.py; student and teacher as FlatParams)
    cuda      fastdino._C's multi-tensor kernel over the parameter lists (DeepSpeed's parameters)
    foreach   torch._foreach_* over the parameter lists
    loop      the reference, one tensor at a time (kernels/ema.ema_ref: the official loop)
"""
from __future__ import annotations

import torch

from fastdino.flat import FlatParams

IMPLS = ("triton", "cuda", "foreach", "loop")


def _tensors(x) -> list[torch.Tensor]:
    return list(x.params) if isinstance(x, FlatParams) else list(x)


class TeacherEMA:
    """step_(momentum): the EMA of the whole teacher. teacher, student: FlatParams with the same
    layout (any impl) or lists of tensors with the same shapes pairwise (cuda, foreach, loop)."""

    def __init__(self, teacher, student, impl: str):
        if impl not in IMPLS:
            raise ValueError(f"TeacherEMA: impl={impl!r} is not one of {list(IMPLS)}")
        self.impl = impl
        self.teacher, self.student = _tensors(teacher), _tensors(student)
        if len(self.teacher) != len(self.student):
            raise ValueError(f"TeacherEMA: {len(self.teacher)} teacher tensors but {len(self.student)} student tensors")
        for i, (t, s) in enumerate(zip(self.teacher, self.student)):
            if t.shape != s.shape or t.device != s.device:
                raise ValueError(f"TeacherEMA: tensor {i} is {tuple(t.shape)} on {t.device} in the teacher "
                                 f"but {tuple(s.shape)} on {s.device} in the student")
        if impl == "triton":
            flat = isinstance(teacher, FlatParams) and isinstance(student, FlatParams)
            if not flat or teacher.layout() != student.layout():
                raise ValueError("TeacherEMA: impl='triton' needs teacher and student as FlatParams with the same "
                                 "layout (same parameter shapes, dtypes and order)")
            self.buffers = [(t.data, s.data) for t, s in zip(teacher.buffers, student.buffers)]

    @torch.no_grad()
    def step_(self, momentum: torch.Tensor) -> None:
        """One EMA step; momentum: 0-dim fp32 tensor on the parameters' device (1.0 = keep)."""
        if not self.teacher:
            return
        if self.impl == "triton":
            from fastdino.kernels.ema import ema_flat_

            for t, s in self.buffers:
                ema_flat_(t, s, momentum)
        elif self.impl == "cuda":
            from fastdino.multi_tensor import ema_lerp_

            ema_lerp_(self.teacher, self.student, momentum)
        elif self.impl == "foreach":
            from fastdino.kernels.ema import ema_foreach_

            ema_foreach_(self.teacher, self.student, momentum)
        else:
            from fastdino.kernels.ema import ema_ref

            ema_ref(self.teacher, self.student, momentum)
