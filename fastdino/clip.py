"""Gradient clipping of the student, in one of two modes (optim.clip_grad_mode):

    per_tensor   the official DINO clip_gradients: each tensor's gradient norm is clipped to `clip`
                 separately (not a global norm):  g <- g * min(1, clip / (||g|| + 1e-6))
    per_module   the official DINOv2 loop (`for v in model.student.values(): v.clip_grad_norm_(clip)`):
                 the global L2 norm of each student submodule's gradients (backbone, head, ibot_head:
                 the top-level children of the MultiCropWrapper) is clipped, torch's clip_grad_norm_
                 per submodule:  N_m = sqrt(sum over its tensors of ||g||^2),
                 g <- g * min(1, clip / (N_m + 1e-6)) for every tensor g of submodule m

per_module is built on the per-tensor norms: every implementation measures them (nothing scaled),
a module's norm is the root of its tensors' squared norms (as torch's clip_grad_norm_ combines its
per-tensor norms), then each tensor is scaled by its module's factor (one multiply per module, or
per contiguous run of a flat buffer).

The implementation is chosen once (fastdino/resolve.py) and held by a Clipper:
    triton    the segmented Triton kernels over the flat gradient buffers (kernels/clip_grad.py)
    cuda      fastdino._C's multi-tensor kernel over the gradient list (fastdino/multi_tensor.py)
    foreach   torch._foreach_* over the gradient list
    loop      the reference, one tensor at a time (kernels/clip_grad.clip_grad_per_tensor_ref; per_module:
              each norm summed in fp64)
None synchronizes with the host. DeepSpeed's ZeRO partitions are clipped in fastdino/ds.py (the
norms of parameters split over ranks need an all-reduce), with the same rules.
"""
from __future__ import annotations

import torch

from fastdino.flat import FlatParams

IMPLS = ("triton", "cuda", "foreach", "loop")
MODES = ("per_tensor", "per_module")
EPS = 1e-6  # as torch's clip_grad_norm_ and the official DINO clip_gradients


def module_of(names: list[str]) -> tuple[list[str], list[int]]:
    """The student submodule of each parameter name: its first component ("backbone.blocks.0.x" ->
    "backbone"). Returns (the modules in order of first appearance, the module index of each name)."""
    modules: dict[str, int] = {}
    index = [modules.setdefault(name.split(".")[0], len(modules)) for name in names]
    return list(modules), index


@torch.no_grad()
def module_coefs(norms: torch.Tensor, mask: torch.Tensor, clip: float) -> torch.Tensor:
    """(M,) fp32 scale factors min(1, clip / (N_m + 1e-6)) of the M modules, N_m the L2 norm of the
    tensor norms `norms` (n,) where mask (M, n) is True. A non-finite N_m gives 1 (the gradients are
    left as they are: the step is skipped anyway), as the per-tensor rule does. One reduction, no
    atomics: deterministic."""
    sq = norms.float().square()
    totals = torch.where(mask, sq, torch.zeros((), dtype=sq.dtype, device=sq.device)).sum(1).sqrt()
    coefs = clip / (totals + EPS)
    return torch.where(coefs < 1, coefs, torch.ones_like(coefs))


class Clipper:
    """clip_() clips the gradients of `params` (a FlatParams with grads) to norm `clip` (0: only
    measure) per `mode` (module docstring) and returns the per-tensor norms before clipping, fp32,
    one per parameter that requires grad (a device tensor: read it on log steps only; a non-finite
    one flags non-finite gradients). For per_module, params' names give the submodules (FlatParams
    of the MultiCropWrapper: "backbone.*", "head.*", "ibot_head.*")."""

    def __init__(self, params: FlatParams, clip: float, impl: str, mode: str = "per_tensor"):
        if impl not in IMPLS:
            raise ValueError(f"Clipper: impl={impl!r} is not one of {list(IMPLS)}")
        if mode not in MODES:
            raise ValueError(f"Clipper: mode={mode!r} is not one of {list(MODES)}")
        if not (clip >= 0 and clip != float("inf")):
            raise ValueError(f"Clipper: clip must be a finite number >= 0 (0 disables), got {clip}")
        self.impl, self.mode, self.flat = impl, mode, params
        self.clip = float(clip) if clip > 0 else float("inf")  # an infinite clip measures and scales nothing
        self.params = params.params_with_grad
        self._tables = []
        norm_order = list(range(len(self.params)))  # the parameter (index into self.params) of each norm
        if impl == "triton":
            from fastdino.kernels.clip_grad import SegmentTable

            position = {i: k for k, i in enumerate(i for i, p in enumerate(params.params) if p.requires_grad)}
            chunk = 16384 if params.buffers and params.buffers[0].device.type == "cuda" else 65536
            norm_order = []
            for buf in params.buffers:
                if buf.grad is None:
                    continue
                keep = [k for k, i in enumerate(buf.index) if params.params[i].requires_grad]
                segs = buf.segments(padded=True)
                self._tables.append((buf.grad, SegmentTable([segs[k] for k in keep], buf.device, chunk)))
                norm_order += [position[buf.index[k]] for k in keep]
        if mode == "per_module":
            self._build_modules(params, norm_order)

    def _build_modules(self, params: FlatParams, norm_order: list[int]) -> None:
        names = [n for n, p in zip(params.names, params.params) if p.requires_grad]
        self.modules, of = module_of(names)
        device = self.params[0].device if self.params else torch.device("cpu")
        mask = torch.zeros(len(self.modules), len(norm_order), dtype=torch.bool)
        for k, i in enumerate(norm_order):
            mask[of[i], k] = True
        self._mask = mask.to(device)
        self._members = [[i for i in range(len(self.params)) if of[i] == m] for m in range(len(self.modules))]
        # triton: the modules' contiguous runs [lo, hi) of each flat gradient buffer (parameters that do
        # not require grad inside a run have zero gradients there: scaling them changes nothing)
        self._runs = []
        if self.impl == "triton":
            top = [name.split(".")[0] for name in params.names]
            index = {name: m for m, name in enumerate(self.modules)}
            for buf in params.buffers:
                if buf.grad is None:
                    continue
                for i, (lo, hi) in zip(buf.index, buf.segments(padded=True)):
                    m = index.get(top[i])  # None: a module without trainable parameters
                    last = self._runs[-1] if self._runs else None
                    if last is not None and last[0] is buf.grad and last[3] == m and last[2] == lo:
                        self._runs[-1] = (buf.grad, last[1], hi, m)  # segments are back to back
                    else:
                        self._runs.append((buf.grad, lo, hi, m))
            self._runs = [r for r in self._runs if r[3] is not None and r[2] > r[1]]

    @torch.no_grad()
    def clip_(self) -> torch.Tensor:
        # p.grad read now, not kept: a compiled backward may hand back new view objects of the same memory
        grads = [p.grad for p in self.params]
        if self.mode == "per_module":
            norms = self._measure(grads)
            if self.clip != float("inf"):
                self._scale(grads, module_coefs(norms, self._mask, self.clip))
            return norms
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

    def _measure(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The per-tensor norms, fp32, nothing scaled (an infinite clip: the kernels write nothing)."""
        inf = float("inf")
        if self.impl == "triton":
            from fastdino.kernels.clip_grad import clip_grad_flat_

            norms = [clip_grad_flat_(grad, table, inf) for grad, table in self._tables]
            return norms[0] if len(norms) == 1 else torch.cat(norms)
        if not grads:
            return torch.zeros(0)
        if self.impl == "cuda":
            from fastdino.multi_tensor import clip_grad_per_tensor_

            return clip_grad_per_tensor_(grads, inf)
        if self.impl == "foreach":
            return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))
        return torch.stack([g.double().norm(2).float() for g in grads])  # the reference: fp64 sums

    def _scale(self, grads: list[torch.Tensor], coefs: torch.Tensor) -> None:
        """Every gradient times its module's factor (coefs (M,) fp32, 1 where not clipped)."""
        if self.impl == "triton":
            for grad, lo, hi, m in self._runs:
                grad[lo:hi].mul_(coefs[m])
            return
        for m, members in enumerate(self._members):
            group = [grads[i] for i in members]
            if not group:
                continue
            if self.impl == "loop":
                for g in group:
                    g.mul_(coefs[m])
            else:
                torch._foreach_mul_(group, coefs[m])
