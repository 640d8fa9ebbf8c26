"""Flat parameter storage: every nn.Parameter a view into one contiguous buffer per (device, dtype).

    flat = FlatParams(student)            # after .to(device), before DDP / optimizer / checkpoint load
    flat.buffers[i].data                  # (N_i,) the parameters, one segment per parameter
    flat.buffers[i].grad                  # (N_i,) the gradients (p.grad are views into it)
    flat.params_with_grad                 # what the optimizer gets (requires_grad parameters)
    flat.zero_grad()                      # instead of optimizer.zero_grad(): zeros the flat grads

Then the teacher EMA is one elementwise kernel per buffer (kernels/ema.py) and per-tensor clipping
one segmented pass (kernels/clip_grad.py). The views survive what the engine does to them:
load_state_dict and DDP's broadcast copy in place, fused AdamW updates its tensor lists in place,
and autograd accumulates into an existing .grad in place. What breaks them: module.to()/.cuda()/
.half() afterwards (they replace .data), load_state_dict(assign=True), optimizer.zero_grad() with
set_to_none=True (grads re-allocated by the next backward) and DDP(gradient_as_bucket_view=True).
`check()` raises if a view is broken. Nothing in the engine sets a gradient to None (the frozen last
layer is skipped by the optimizer's device flag instead, fastdino/optim.py).

Segments start on multiples of ALIGN elements and the padding between them holds zeros (in data
and grad), so kernels can vectorize and pad reads change no norm.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

ALIGN = 16  # elements: 64 bytes for fp32, vector loads in the kernels


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _named(params) -> list[tuple[str, torch.Tensor]]:
    """nn.Module, iterable of (name, tensor) or iterable of tensors -> [(name, tensor)], deduplicated."""
    if isinstance(params, nn.Module):
        items = list(params.named_parameters())
    else:
        items = list(params)
        if items and not isinstance(items[0], tuple):
            items = [(str(i), p) for i, p in enumerate(items)]
    seen, out = set(), []
    for name, p in items:
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"FlatParams: parameter '{name}' is a {type(p).__name__}, not a tensor")
        if id(p) in seen:  # tied weights: one segment
            continue
        seen.add(id(p))
        if p.is_sparse or p.layout != torch.strided:
            raise ValueError(f"FlatParams: parameter '{name}' is not a dense strided tensor")
        if not (p.is_floating_point()):
            raise ValueError(f"FlatParams: parameter '{name}' has dtype {p.dtype}, expected a floating dtype")
        out.append((name, p))
    return out


@dataclass
class FlatBuffer:
    """One (device, dtype) group: data (N,), grad (N,) or None, and the segments in it."""
    device: torch.device
    dtype: torch.dtype
    data: torch.Tensor
    grad: torch.Tensor | None
    index: list[int] = field(default_factory=list)  # indices into FlatParams.params
    starts: list[int] = field(default_factory=list)  # segment start (multiple of ALIGN)
    numels: list[int] = field(default_factory=list)

    def segments(self, padded: bool = True) -> list[tuple[int, int]]:
        """[(start, end)] per segment; padded ends are rounded up to ALIGN (the padding is zero)."""
        return [(s, s + (_align(n) if padded else n)) for s, n in zip(self.starts, self.numels)]


class FlatParams:
    """Re-point parameters (and their gradients) into flat contiguous buffers, once.

    params: nn.Module, iterable of (name, parameter) or of parameters. grads: also allocate flat
    gradient buffers and attach p.grad views for the parameters that require grad.
    """

    def __init__(self, params, grads: bool = True):
        named = _named(params)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.has_grads = grads
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(self.params):
            groups.setdefault((p.device, p.dtype), []).append(i)
        self.buffers: list[FlatBuffer] = []
        with torch.no_grad():
            for (device, dtype), idx in groups.items():
                starts, pos = [], 0
                for i in idx:
                    starts.append(pos)
                    pos += _align(self.params[i].numel())
                data = torch.zeros(pos, dtype=dtype, device=device)
                need_grad = grads and any(self.params[i].requires_grad for i in idx)
                grad = torch.zeros(pos, dtype=dtype, device=device) if need_grad else None
                buf = FlatBuffer(device, dtype, data, grad, list(idx), starts, [self.params[i].numel() for i in idx])
                for i, s in zip(idx, starts):
                    p = self.params[i]
                    view = data[s:s + p.numel()].view(p.shape)
                    view.copy_(p.detach())
                    p.data = view
                    if grad is not None and p.requires_grad:
                        gview = grad[s:s + p.numel()].view(p.shape)
                        if p.grad is not None:
                            gview.copy_(p.grad)
                        p.grad = gview
                self.buffers.append(buf)

    # ----- views ---------------------------------------------------------------------------------
    @property
    def params_with_grad(self) -> list[torch.Tensor]:
        """The parameters that require grad, in module order (give these to the optimizer)."""
        return [p for p in self.params if p.requires_grad]

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        return list(zip(self.names, self.params))

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def layout(self) -> list[tuple]:
        """(dtype, device, shapes) per buffer: equal layouts mean segment-by-segment equal buffers."""
        return [(b.dtype, b.device, [tuple(self.params[i].shape) for i in b.index]) for b in self.buffers]

    # ----- gradients -----------------------------------------------------------------------------
    @torch.no_grad()
    def zero_grad(self) -> None:
        """Zero the flat gradient buffers in place (one launch each; the p.grad views stay). Use
        instead of optimizer.zero_grad()."""
        for buf in self.buffers:
            if buf.grad is not None:
                buf.grad.zero_()

    def check(self) -> None:
        """Raise if a parameter's data (or an attached grad) is no longer a view into its buffer."""
        for buf in self.buffers:
            for i, s in zip(buf.index, buf.starts):
                p, name = self.params[i], self.names[i]
                if p.data_ptr() != buf.data[s:].data_ptr() or not p.is_contiguous():
                    raise RuntimeError(f"FlatParams: parameter '{name}' is no longer a view into its flat buffer "
                                       "(module.to()/load_state_dict(assign=True) after FlatParams?)")
                if buf.grad is not None and p.requires_grad and p.grad is not None \
                        and p.grad.data_ptr() != buf.grad[s:].data_ptr():
                    raise RuntimeError(f"FlatParams: grad of '{name}' is no longer a view into the flat grad buffer "
                                       "(optimizer.zero_grad(set_to_none=True)? use FlatParams.zero_grad())")
