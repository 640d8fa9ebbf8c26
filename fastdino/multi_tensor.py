"""Python side of the CUDA extension fastdino._C (csrc/): multi-tensor kernels for parameter lists
that are not flat (DeepSpeed-managed parameters), with a torch._foreach_* fallback.

    ema_lerp_(teacher, student, momentum)   teacher_i <- m teacher_i + (1 - m) student_i, fp32 math,
                                            mixed dtypes, m a 0-dim device tensor (m == 1: no-op)
    clip_grad_per_tensor_(grads, clip)      g_i <- g_i * min(1, clip / (||g_i|| + 1e-6)); returns
                                            the norms (len(grads),) fp32, no host sync

The extension registers torch.ops.fastdino.{ema_lerp_, clip_grad_per_tensor_} for CUDA tensors
(with fake impls here, so torch.compile can trace them). Where it is not built (no nvcc, CPU-only
torch) or the tensors are not on CUDA, the same calls run torch._foreach_* and the first such call
logs a note saying why.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

try:
    from fastdino import _C  # noqa: F401  (loading the library registers torch.ops.fastdino.*)

    HAVE_C, _WHY = True, ""
except ImportError as e:  # not built: CPU-only torch, no nvcc, or a pure-Python install
    HAVE_C, _WHY = False, f"fastdino._C is not built ({e})"

if HAVE_C:
    @torch.library.register_fake("fastdino::ema_lerp_")
    def _ema_lerp_fake(teacher, student, momentum):
        return None

    @torch.library.register_fake("fastdino::clip_grad_per_tensor_")
    def _clip_fake(grads, clip):
        return torch.empty(len(grads), dtype=torch.float32, device=grads[0].device if grads else "cpu")

_noted: set = set()


def _note(what: str, why: str) -> None:
    if what not in _noted:
        _noted.add(what)
        log.info("fastdino.multi_tensor: %s runs torch._foreach_* (%s)", what, why)


def available(device: torch.device | str = "cuda") -> bool:
    """True when the CUDA multi-tensor kernels can run on tensors of `device`."""
    return HAVE_C and torch.device(device).type == "cuda"


def _use_c(tensors, what: str) -> bool:
    if not tensors:
        return False
    if not HAVE_C:
        _note(what, _WHY)
        return False
    if not tensors[0].is_cuda:
        _note(what, f"tensors are on {tensors[0].device}")
        return False
    return True


@torch.no_grad()
def ema_lerp_(teacher, student, momentum) -> None:
    """teacher <- m teacher + (1 - m) student over lists of tensors (same shapes pairwise, any float
    dtypes); momentum: float or 0-dim tensor on the tensors' device."""
    from fastdino.kernels.ema import momentum_tensor
    from fastdino.teacher import ema_update_foreach

    teacher, student = list(teacher), [p.detach() for p in student]
    if len(teacher) != len(student):
        raise ValueError(f"ema_lerp_: {len(teacher)} teacher tensors but {len(student)} student tensors")
    if not teacher:
        return
    m = momentum_tensor(momentum, teacher[0].device)
    if _use_c(teacher, "ema_lerp_"):
        torch.ops.fastdino.ema_lerp_(teacher, student, m.float())
    else:
        ema_update_foreach(teacher, student, m)


@torch.no_grad()
def clip_grad_per_tensor_(grads, clip: float) -> torch.Tensor:
    """Per-tensor clipping of a list of gradients, in place; returns the norms before clipping."""
    grads = list(grads)
    if _use_c(grads, "clip_grad_per_tensor_"):
        return torch.ops.fastdino.clip_grad_per_tensor_(grads, float(clip))
    from fastdino.clip import _clip_foreach_norms

    return _clip_foreach_norms(grads, float(clip))
