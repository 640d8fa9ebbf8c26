"""iBOT's masked-patch term (DINOv2): the student, shown global crops with some patches replaced by
the mask token, predicts the teacher's targets of those patches (the teacher saw them unmasked).

Over the static-shaped masked-token buffer of a rank (fastdino/data/masking.py MaskBatch: U =
upper_bound rows, the first n_masked real, the rest padding with weight 0):

    loss = -(1/S) sum_{t < U} w_t sum_k q_tk log_softmax(s_t / student_temp)_k

    s_t  student iBOT-head logits of masked token t (U, K)      q_t  teacher targets (U, K), fp32
    w_t  1 / (masked tokens of t's crop), 0 on padding            S    global-crop samples (2B)

This is the official iBOTPatchLoss.forward_masked (dinov2/loss/ibot_patch_loss.py) as
ssl_meta_arch.py scales it (x loss_scales 2 x ibot_loss_scale 1/2 = x 1): a crop's masked tokens
average to one term per masked crop, and the sum is divided by every global crop of the batch,
masked or not. The logged value is this loss (the official log shows half of it).

impl "reference": plain PyTorch, the formula above (log_softmax of all U rows). impl "fused": the
soft-target cross-entropy kernel (kernels/soft_cross_entropy.py) with one view and one target per
row (V = T = 1, no skipped pair) and per-row weights w_t / S: forward and backward stream the rows,
no (U, K) log-probabilities are stored.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def ibot_loss_ref(student_patch: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                  n_samples: int, student_temp: float) -> torch.Tensor:
    """The formula of the header in plain PyTorch: scalar fp32 (fp64 for fp64 logits),
    differentiable w.r.t. student_patch; no gradient to targets or weights."""
    _check(student_patch, targets, weights, n_samples)
    dt = torch.float64 if student_patch.dtype == torch.float64 else torch.float32
    log_p = F.log_softmax(student_patch.to(dt) / student_temp, dim=-1)
    per_token = -torch.sum(targets.detach().to(dt) * log_p, dim=-1)
    return torch.sum(per_token * weights.detach().to(dt)) / n_samples


def _check(student_patch, targets, weights, n_samples) -> None:
    if student_patch.dim() != 2 or targets.shape != student_patch.shape:
        raise ValueError(f"iBOT: student patch logits and targets must both be (U, K), got "
                         f"{tuple(student_patch.shape)} and {tuple(targets.shape)}")
    if weights.shape != student_patch.shape[:1]:
        raise ValueError(f"iBOT: weights must be (U,) = ({student_patch.shape[0]},), got {tuple(weights.shape)}")
    if n_samples < 1:
        raise ValueError(f"iBOT: n_samples (global crops of the batch) must be >= 1, got {n_samples}")


class IBOTTerm(nn.Module):
    """The iBOT term of the step's objective (fastdino/losses/__init__.py): student["patch"] (U, K)
    against targets["patch"] (U, K) with targets["patch_weights"] (U,) (0 on padding), divided by
    n_samples = 2B global crops of this rank. impl "fused" | "reference"; weight: DINOv2's
    ibot loss_weight (1.0)."""

    name = "ibot"

    def __init__(self, n_samples: int, student_temp: float, impl: str = "reference", weight: float = 1.0):
        super().__init__()
        if impl not in ("fused", "reference"):
            raise ValueError(f"IBOTTerm: impl={impl!r} is not one of ['fused', 'reference']")
        self.n_samples, self.student_temp, self.impl, self.weight = int(n_samples), student_temp, impl, weight

    def forward(self, student: dict, targets: dict) -> torch.Tensor:
        s, q, w = student["patch"], targets["patch"], targets["patch_weights"]
        if self.impl == "reference":
            return ibot_loss_ref(s, q.probs() if hasattr(q, "probs") else q, w, self.n_samples, self.student_temp)
        from fastdino.kernels.soft_cross_entropy import soft_cross_entropy

        _check(s, q, w, self.n_samples)
        return soft_cross_entropy(s, q, 1, self.student_temp, n_targets=1, skip_same_view=False,
                                  weights=w.float() / self.n_samples, impl="triton")

    def extra_repr(self) -> str:
        return f"n_samples={self.n_samples}, student_temp={self.student_temp}, impl={self.impl!r}"
