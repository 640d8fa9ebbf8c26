"""Per-tensor gradient clipping, as in the official DINO: each tensor's gradient norm is clipped to
`clip` separately (not a global norm):  g <- g * min(1, clip / (||g|| + 1e-6)).

`clip_gradients_loop` is the reference (two host syncs per tensor, as the official code);
`clip_gradients_foreach` does the same with no host synchronization. `GradClipper` is what the
engine calls every step: the segmented Triton kernels over the flat grad buffers of a FlatParams
(kernels/clip_grad.py, two launches per buffer), the CUDA multi-tensor kernels for lists
(fastdino.multi_tensor), torch._foreach_* on CPU.
"""
from __future__ import annotations

import os

import torch


@torch.no_grad()
def clip_gradients_loop(params, clip: float) -> list[float]:
    """Reference: the official loop. Returns the per-tensor norms before clipping."""
    norms = []
    for p in params:
        if p.grad is None:
            continue
        param_norm = p.grad.data.norm(2)
        norms.append(param_norm.item())
        clip_coef = clip / (param_norm + 1e-6)
        if clip_coef < 1:
            p.grad.data.mul_(clip_coef)
    return norms


@torch.no_grad()
def clip_gradients_foreach(params, clip: float) -> None:
    """Same semantics as clip_gradients_loop in a few multi-tensor launches, no host sync."""
    _clip_foreach_norms([p.grad for p in params if p.grad is not None], float(clip))


IMPLS = ("auto", "flat_triton", "multi_tensor", "foreach", "loop")


class GradClipper:
    """Per-tensor gradient clipping for the whole model per call, no host sync (except impl="loop").

    params: FlatParams (built with grads=True: the flat paths) or an iterable of parameters.
    clip: the max norm per tensor (0 disables). impl: "auto" = flat_triton for FlatParams on CUDA,
    multi_tensor for lists on CUDA (csrc/, torch._foreach_* where not built), foreach on CPU.

    flat_triton clips every segment of the flat grad buffers, including parameters whose p.grad was
    set to None this step (FlatParams.drop_grads / freeze_last_layer): the optimizer skips those
    anyway and zero_grad() clears them. `norms()` gives the norms before clipping of the last call,
    fp32, one per requires_grad parameter (a device tensor: read it on log steps only).
    """

    def __init__(self, params, clip: float, impl: str = "auto", chunk: int | None = None):
        from fastdino.flat import FlatParams

        if impl not in IMPLS:
            raise ValueError(f"GradClipper: impl={impl!r} is not one of {list(IMPLS)}")
        if not (clip >= 0 and clip != float("inf")):
            raise ValueError(f"GradClipper: clip must be a finite number >= 0 (0 disables), got {clip}")
        self.clip = float(clip)
        self.flat = params if isinstance(params, FlatParams) else None
        self.params = self.flat.params_with_grad if self.flat else [p for p in params if p.requires_grad]
        cuda = bool(self.params) and self.params[0].is_cuda
        flat_ok = self.flat is not None and self.flat.has_grads
        if impl == "auto":
            impl = "flat_triton" if (flat_ok and cuda) else ("multi_tensor" if cuda else "foreach")
        if impl == "flat_triton" and not flat_ok:
            raise ValueError("GradClipper: impl='flat_triton' needs a FlatParams built with grads=True")
        if impl == "flat_triton" and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("GradClipper: impl='flat_triton' needs CUDA parameters (or TRITON_INTERPRET=1)")
        self.impl, self._norms, self._tables = impl, None, []
        if impl == "flat_triton":
            from fastdino.kernels.clip_grad import SegmentTable

            if chunk is None:  # elements per program: fewer, larger programs under the CPU interpreter
                chunk = 16384 if cuda else 65536

            for buf in self.flat.buffers:
                if buf.grad is None:
                    continue
                keep = [k for k, i in enumerate(buf.index) if self.flat.params[i].requires_grad]
                segs = buf.segments(padded=True)
                self._tables.append((buf, SegmentTable([segs[k] for k in keep], buf.device, chunk)))

    @torch.no_grad()
    def clip_(self) -> None:
        """Clip every gradient to norm `clip`, in place. With clip 0 the norms are still measured
        (for grads_finite) and nothing is scaled (an infinite clip: coef = inf is never < 1)."""
        if not self.params:
            return
        clip = self.clip if self.clip > 0 else float("inf")
        if self.impl == "flat_triton":
            from fastdino.kernels.clip_grad import clip_grad_flat_

            self._norms = [clip_grad_flat_(buf.grad, table, clip) for buf, table in self._tables]
        elif self.impl == "loop":
            self._norms = [torch.tensor(clip_gradients_loop(self.params, clip))]
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            if self.impl == "multi_tensor":
                from fastdino.multi_tensor import clip_grad_per_tensor_

                self._norms = [clip_grad_per_tensor_(grads, clip)]
            else:
                self._norms = [_clip_foreach_norms(grads, clip)]

    def grads_finite(self) -> torch.Tensor:
        """Device bool: every gradient norm of the last clip_() is finite (no host sync). flat_triton
        also counts the segments of grads set to None (the frozen last layer)."""
        norms = self.norms()
        if norms is None:
            raise RuntimeError("GradClipper.grads_finite: call clip_() first")
        return torch.isfinite(norms).all()

    def norms(self) -> torch.Tensor | None:
        """Norms before clipping from the last clip_() (flat_triton: one per requires_grad parameter in
        buffer order; others: one per non-None grad), or None before the first call."""
        if self._norms is None:
            return None
        return self._norms[0] if len(self._norms) == 1 else torch.cat([n.float() for n in self._norms])


def _clip_foreach_norms(grads, clip: float) -> torch.Tensor:
    if not grads:
        return torch.zeros(0)
    norms = torch._foreach_norm(grads)
    coefs = torch._foreach_add(norms, 1e-6)
    torch._foreach_reciprocal_(coefs)
    torch._foreach_mul_(coefs, clip)
    torch._foreach_clamp_max_(coefs, 1.0)
    torch._foreach_mul_(grads, coefs)
    return torch.stack([n.float() for n in norms])
