"""Teacher targets: what the student is trained to predict, made from the teacher's logits.

DINO centers and sharpens (Caron et al. 2021):

    q_i = softmax((t_i - c) / teacher_temp)         each teacher row (the 2 global crops of each image)
    c  <- m c + (1 - m) mean of t over all teacher rows of all ranks      after the step (m = 0.9)

The targets are the teacher's business: a target module turns teacher logits into probabilities and
statistics and owns its state (the center); the student-side cross-entropy (fastdino/losses) only
reads the probabilities. Sinkhorn-Knopp (DINOv2) will be a second target module with the same calls.

    q, stats = targets(teacher_logits, teacher_temp)    stats: entropy (rows,), colsum (K,) fp32
    targets.update_(colsum_all_ranks, rows_all_ranks, ok)        the center update, gated on device
"""
from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def update_center_(center: torch.Tensor, batch_mean: torch.Tensor, momentum: float,
                   ok: torch.Tensor | None = None) -> None:
    """The official center update c <- m c + (1 - m) batch_mean, in place; kept as it is where the
    device bool `ok` is False (a non-finite step), with no host synchronization."""
    new = center * momentum + batch_mean.view_as(center) * (1 - momentum)
    center.copy_(new if ok is None else torch.where(ok, new, center))


class Centering(nn.Module):
    """DINO's teacher targets: q = softmax((t - c) / teacher_temp), center c (1, K) fp32.

    impl: "fused" (the Triton op of kernels/softmax_center.py) or "reference" (its plain-PyTorch
    reference). state_dict() is {"center": (1, K)}, the official DINOLoss entry."""

    def __init__(self, out_dim: int, center_momentum: float = 0.9, impl: str = "reference"):
        super().__init__()
        if impl not in ("fused", "reference"):
            raise ValueError(f"Centering: impl={impl!r} is not one of ['fused', 'reference']")
        self.center_momentum, self.impl = center_momentum, impl
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def forward(self, teacher_logits: torch.Tensor, teacher_temp) -> tuple[torch.Tensor, dict]:
        """teacher_logits (R, K) any float dtype; teacher_temp a 0-dim device tensor (or a float).
        Returns q (R, K) fp32 and {"entropy": (R,) fp32, "colsum": (K,) fp32 column sums of t}."""
        from fastdino.kernels.softmax_center import softmax_center

        q, entropy, colsum = softmax_center(teacher_logits.detach(), self.center, teacher_temp,
                                            impl="triton" if self.impl == "fused" else "torch")
        return q, {"entropy": entropy, "colsum": colsum}

    @torch.no_grad()
    def update_(self, colsum: torch.Tensor, rows: int, ok: torch.Tensor | None = None) -> None:
        """colsum: column sums of the teacher logits over all `rows` teacher rows of all ranks."""
        update_center_(self.center, colsum.float() / rows, self.center_momentum, ok)
