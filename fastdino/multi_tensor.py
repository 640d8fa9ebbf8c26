"""Python side of the CUDA extension fastdino._C (csrc/): multi-tensor kernels for parameter lists
that are not flat (DeepSpeed-managed parameters).

    ema_lerp_(teacher, student, momentum)   teacher_i <- m teacher_i + (1 - m) student_i, fp32 math,
                                            mixed dtypes, m a 0-dim device tensor (m == 1: no-op)
    clip_grad_per_tensor_(grads, clip)      g_i <- g_i * min(1, clip / (||g_i|| + 1e-6)); returns
                                            the norms (len(grads),) fp32, no host sync

Loading the extension registers torch.ops.fastdino.{ema_lerp_, clip_grad_per_tensor_} for CUDA
tensors (csrc/multi_tensor.cpp); their fake impls are registered here, so torch.compile traces them.
No fallback here: where the extension is not built (HAVE_C is False, WHY_NOT says why) the engine
picks the torch._foreach_* versions once, at build time (kernels/ema.py ema_foreach_,
kernels/clip_grad.py clip_grad_foreach_); these functions raise without the extension or on
tensors that are not on CUDA.
"""
from __future__ import annotations

import torch

from fastdino.kernels.ema import momentum_tensor

try:
    from fastdino import _C  # noqa: F401  (loading the library registers torch.ops.fastdino.*)

    HAVE_C, WHY_NOT = True, ""
except ImportError as e:  # not built: CPU-only torch, no nvcc, or a pure-Python install
    HAVE_C, WHY_NOT = False, f"fastdino._C is not built ({e})"

if HAVE_C:
    @torch.library.register_fake("fastdino::ema_lerp_")
    def _ema_lerp_fake(teacher, student, momentum):
        return None

    @torch.library.register_fake("fastdino::clip_grad_per_tensor_")
    def _clip_fake(grads, clip):
        return torch.empty(len(grads), dtype=torch.float32, device=grads[0].device if grads else "cpu")


def _check(tensors, what: str) -> None:
    if not HAVE_C:
        raise RuntimeError(f"fastdino.multi_tensor.{what}: {WHY_NOT}; use the torch._foreach_* version instead")
    if tensors and not tensors[0].is_cuda:
        raise RuntimeError(f"fastdino.multi_tensor.{what}: tensors are on {tensors[0].device}, the kernels need CUDA")


@torch.no_grad()
def ema_lerp_(teacher, student, momentum) -> None:
    """teacher_i <- m teacher_i + (1 - m) student_i over lists of CUDA tensors (same shapes pairwise,
    fp32/bf16/fp16, any mix); momentum: float or 0-dim tensor on the tensors' device."""
    teacher, student = list(teacher), [s.detach() for s in student]
    _check(teacher, "ema_lerp_")
    if not teacher:
        return
    torch.ops.fastdino.ema_lerp_(teacher, student, momentum_tensor(momentum, teacher[0].device))


@torch.no_grad()
def clip_grad_per_tensor_(grads, clip: float) -> torch.Tensor:
    """Per-tensor clipping of a list of CUDA gradients, in place; returns the norms before clipping,
    (len(grads),) fp32."""
    grads = list(grads)
    _check(grads, "clip_grad_per_tensor_")
    return torch.ops.fastdino.clip_grad_per_tensor_(grads, float(clip))
