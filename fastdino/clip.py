"""Per-tensor gradient clipping of the student, as the official DINO: each tensor's gradient norm is
clipped to `clip` separately (not a global norm):  g <- g * min(1, clip / (||g|| + 1e-6)).

The implementation is chosen once (fastdino/resolve.py) and held by a Clipper:
    triton    the segmented Triton kernels over the flat gradient buffers (kernels/clip_grad.py)
    cuda      fastdino._C's multi-tensor kernel over the gradient list (fastdino/multi_tensor.py)
    foreach   torch._foreach_* over the gradient list
    loop      the reference, one tensor at a time (kernels/clip_grad.clip_grad_per_tensor_ref)
None synchronizes with the host. DeepSpeed's ZeRO partitions are clipped in fastdino/ds.py (the
norms of parameters split over ranks need an all-reduce), with the same rule.
"""
from __future__ import annotations

import torch

from fastdino.flat import FlatParams

IMPLS = ("triton", "cuda", "foreach", "loop")


class Clipper:
    """clip_() clips every gradient of `params` (a FlatParams with grads) to norm `clip` (0: only
    measure) and returns the norms before clipping, fp32, one per parameter that requires grad
    (a device tensor: read it on log steps only)."""

    def __init__(self, params: FlatParams, clip: float, impl: str):
        if impl not in IMPLS:
            raise ValueError(f"Clipper: impl={impl!r} is not one of {list(IMPLS)}")
        if not (clip >= 0 and clip != float("inf")):
            raise ValueError(f"Clipper: clip must be a finite number >= 0 (0 disables), got {clip}")
        self.impl, self.flat = impl, params
        self.clip = float(clip) if clip > 0 else float("inf")  # an infinite clip measures and scales nothing
        self.params = params.params_with_grad
        self._tables = []
        if impl == "triton":
            from fastdino.kernels.clip_grad import SegmentTable

            chunk = 16384 if params.buffers and params.buffers[0].device.type == "cuda" else 65536
            for buf in params.buffers:
                if buf.grad is None:
                    continue
                keep = [k for k, i in enumerate(buf.index) if params.params[i].requires_grad]
                segs = buf.segments(padded=True)
                self._tables.append((buf.grad, SegmentTable([segs[k] for k in keep], buf.device, chunk)))

    @torch.no_grad()
    def clip_(self) -> torch.Tensor:
        # p.grad read now, not kept: a compiled backward may hand back new view objects of the same memory
        grads = [p.grad for p in self.params]
        if self.impl == "triton":
            from fastdino.kernels.clip_grad import clip_grad_flat_

            norms = [clip_grad_flat_(grad, table, self.clip) for grad, table in self._tables]
            return norms[0] if len(norms) == 1 else torch.cat(norms)
        if self.impl == "cuda":
            from fastdino.multi_tensor import clip_grad_per_tensor_

            return clip_grad_per_tensor_(grads, self.clip)
        if self.impl == "foreach":
            from fastdino.kernels.clip_grad import clip_grad_foreach_

            return clip_grad_foreach_(grads, self.clip)
        from fastdino.kernels.clip_grad import clip_grad_per_tensor_ref

        return clip_grad_per_tensor_ref(grads, self.clip)
