"""Per-tensor gradient clipping, as in the official DINO: each tensor's gradient norm is clipped to
`clip` separately (not a global norm):  g <- g * min(1, clip / (||g|| + 1e-6)).

`clip_gradients_loop` is the reference (two host syncs per tensor, as the official code);
`clip_gradients_foreach` does the same with no host synchronization.
"""
from __future__ import annotations

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
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    coefs = torch._foreach_add(norms, 1e-6)
    torch._foreach_reciprocal_(coefs)
    torch._foreach_mul_(coefs, clip)
    torch._foreach_clamp_max_(coefs, 1.0)
    torch._foreach_mul_(grads, coefs)
