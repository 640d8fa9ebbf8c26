"""Drop-in loss modules for code written against other DINO libraries, on fastdino's ops.

    fastdino.compat.lightly   DINOLoss                             lightly.loss.DINOLoss
    fastdino.compat.dinov2    DINOLoss, iBOTPatchLoss, KoLeoLoss    dinov2.loss.*

Each module keeps its library's constructor, calls, returned values, buffers and state_dict keys, so
that switching is one import line; the math runs on the kernels of fastdino/kernels (centered softmax,
Sinkhorn-Knopp, the multi-view soft-target cross-entropy) and the terms of fastdino/losses, never on a
second implementation. (`from fastdino import DINOLoss` is the drop-in for the official
facebookresearch/dino DINOLoss.)

Every module also takes impl="auto" | "fused" | "reference" (keyword-only, after the library's own
arguments): "fused" runs the Triton kernels (CUDA tensors, or CPU under TRITON_INTERPRET=1),
"reference" their plain-PyTorch references (float64 when the inputs are float64), "auto" picks fused
on CUDA tensors and reference elsewhere; chosen per call from the inputs' device, recorded in `.impl`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

IMPLS = ("auto", "fused", "reference")
KERNEL_IMPL = {"fused": "triton", "reference": "torch"}  # the kernels' names for the two implementations


def check_impl(impl: str, who: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"{who}: impl={impl!r} is not one of {list(IMPLS)}")


def resolve_impl(impl: str, device: torch.device, who: str) -> str:
    """impl -> "fused" | "reference" for tensors on `device`; a one-line RuntimeError naming `who`
    when "fused" cannot run there."""
    from fastdino.resolve import resolve_loss_impl

    try:
        return resolve_loss_impl(impl, device)
    except ValueError as e:  # ConfigError names the engine's config key; these modules have no config
        raise RuntimeError(f"{who}: {str(e).split(': ', 1)[-1]}") from None


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def all_reduce_or_none():
    """The all_reduce(x, op) callable of fastdino's Sinkhorn-Knopp over the default process group
    (op "sum" | "max", in place), or None in one process."""
    if not distributed():
        return None

    def all_reduce(x: torch.Tensor, op: str) -> None:
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)

    return all_reduce


def stack_views(views, who: str, what: str) -> tuple[torch.Tensor, int]:
    """Views of one batch, view-major: ((n_views * B, K), n_views). `views` is a sequence of (B, K)
    tensors of one shape (concatenated; one view is used as it is) or an (n_views, B, K) tensor
    (reshaped: no copy when contiguous). A one-line ValueError naming `who` and `what` otherwise."""
    if isinstance(views, torch.Tensor) and views.dim() == 3:
        return views.reshape(-1, views.shape[-1]), views.shape[0]
    views = list(views)
    if not views or any(v.dim() != 2 or v.shape != views[0].shape for v in views):
        raise ValueError(f"{who}: {what} must be a non-empty list of (B, K) tensors of one shape, got shapes "
                         f"{[tuple(v.shape) for v in views]}")
    return (torch.cat(views) if len(views) > 1 else views[0]), len(views)


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """fp64 for fp64 tensors (the reference checks), fp32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


__all__ = ["IMPLS", "KERNEL_IMPL", "check_impl", "resolve_impl", "distributed", "world_size",
           "all_reduce_or_none", "stack_views", "accumulation_dtype"]
