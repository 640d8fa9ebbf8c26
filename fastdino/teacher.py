"""Teacher update: teacher <- m * teacher + (1 - m) * student, for every parameter.

`ema_update_loop` is the official per-parameter loop (the reference); `ema_update_foreach` does the
same in a few multi-tensor launches. `momentum` may be a Python float or a 0-dim device tensor (no
host synchronization); a momentum of 1 leaves the teacher untouched (used to skip bad steps).
"""
from __future__ import annotations

import torch


@torch.no_grad()
def ema_update_loop(teacher_params, student_params, momentum) -> None:
    """Reference: the official `for param_q, param_k in zip(...)` loop, fp32 math."""
    for p_t, p_s in zip(teacher_params, student_params):
        p_t.copy_((p_t.float() * momentum + (1 - momentum) * p_s.detach().float()).to(p_t.dtype))


@torch.no_grad()
def ema_update_foreach(teacher_params, student_params, momentum) -> None:
    """teacher <- teacher + (1 - m) (student - teacher) with torch._foreach_* (fp32 params)."""
    teacher, student = list(teacher_params), [p.detach() for p in student_params]
    if not teacher:
        return
    if torch.is_tensor(momentum):
        weight = (1 - momentum).to(teacher[0].dtype)
        diff = torch._foreach_sub(student, teacher)
        torch._foreach_mul_(diff, weight)
        torch._foreach_add_(teacher, diff)
    else:
        torch._foreach_lerp_(teacher, student, 1.0 - float(momentum))
