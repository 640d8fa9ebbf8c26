"""KoLeo regularizer (DINOv2): the Kozachenko-Leonenko differential-entropy estimator of the student's
[CLS] features (Sablayrolles et al. 2019, "Spreading vectors for similarity search"). It spreads the
features of a batch over the sphere.

    x_i   = f_i / max(||f_i||, eps)                 the features, L2-normalized, eps = 1e-8
    j(i)  = argmax_{j != i} <x_i, x_j>              nearest neighbour in the local batch (self excluded)
    d_i   = || x_i - x_j(i) + eps ||                torch's pairwise_distance(x_i, x_j(i), eps=eps)
    koleo = -(1/N) sum_i ln(d_i + eps)

The gradient flows through d_i into x_i and x_j(i), and through the normalization; the choice j(i)
is not differentiated. DINOv2 applies it to the backbone's [CLS] output (before the head) of each
global crop of the student separately (the two crops of one image are not each other's neighbours)
and sums the two, weight 0.1: KoLeoTerm.

Where this differs from the official KoLeoLoss (dinov2/loss/koleo_loss.py), on purpose:
  - always in fp32 (fp64 for fp64 features), autocast off. The official code turns autocast off
    but keeps the input's dtype: on fp16 features eps = 1e-8 rounds to 0, so duplicate rows (or a
    batch of one, paired with itself) give ln(0): an inf loss and NaN gradients (dinov2 issues #143,
    #307, #314). In fp32 a duplicate gives d = eps sqrt(D): a finite (large) term and a finite
    gradient, of size ~1/(N eps) when three or more rows coincide (duplicate pairs cancel): past
    fp16's range for fp16 features, where an fp16 run's grad scaler takes it as an overflow.
  - self is excluded with -inf on the diagonal of the dot products; the official -1 ties with an
    antipodal neighbour (x_j = -x_i), and then argmax may return the row itself.
  - N = 1: no neighbour, the estimator is undefined; we return 0 (connected to the graph, zero
    gradient). The official code pairs the row with itself and returns the constant
    -ln(eps (sqrt(D) + 1)) (about 15 at D = 768), also with zero gradient: only the logged value differs.
Everything else (the eps placements, the mean) is the official arithmetic: on the same fp32 input
the values agree to rounding.

Cost: one (N, N) matmul per crop (N = per-GPU batch) and an (N, D) gather: plain PyTorch.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-8


def koleo_ref(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """KoLeo of features x (N, D) in any float dtype: a scalar, fp32 (fp64 for fp64 x),
    differentiable w.r.t. x. N = 1 gives 0 (see the header)."""
    if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"koleo: features must be 2-D (N, D) with N, D >= 1, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"koleo: features must be floating point, got {x.dtype}")
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(x.device.type, enabled=False):
        x = F.normalize(x.to(dt), p=2, dim=-1, eps=eps)
        if x.shape[0] == 1:
            return (x * 0).sum()
        with torch.no_grad():
            dots = x @ x.T
            dots.fill_diagonal_(float("-inf"))
            neighbour = dots.argmax(dim=1)
        distance = F.pairwise_distance(x, x[neighbour], p=2, eps=eps)
        return -torch.log(distance + eps).mean()


class KoLeoTerm(nn.Module):
    """The KoLeo term of the step's objective (fastdino/losses/__init__.py):
    student["cls_features"], the backbone's [CLS] features of the two global crops, crop-major
    (2B, D) in any float dtype; returns koleo(crop 1 rows) + koleo(crop 2 rows), fp32. `targets` is
    not read. weight: DINOv2's koleo_loss_weight (0.1)."""

    name = "koleo"
    N_CROPS = 2  # the global crops, each its own batch of neighbours

    def __init__(self, weight: float = 0.1):
        super().__init__()
        self.weight = weight

    def forward(self, student: dict, targets: dict | None = None) -> torch.Tensor:
        features = student["cls_features"]
        if features.dim() != 2 or features.shape[0] == 0 or features.shape[0] % self.N_CROPS:
            raise ValueError(f"KoLeoTerm: student['cls_features'] must be (2B, D), the two global crops "
                             f"crop-major, got {tuple(features.shape)}")
        crop1, crop2 = features.chunk(self.N_CROPS)
        return koleo_ref(crop1) + koleo_ref(crop2)

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


__all__ = ["KoLeoTerm", "koleo_ref"]
