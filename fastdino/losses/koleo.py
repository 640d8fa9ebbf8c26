"""KoLeo regularizer (DINOv2, DINOv3): the Kozachenko-Leonenko differential-entropy estimator of the
student's [CLS] features (Sablayrolles et al. 2019, "Spreading vectors for similarity search"). It
spreads the features of a batch over the sphere.

    x_i   = f_i / max(||f_i||, eps)                 the features, L2-normalized, eps = 1e-8
    j(i)  = argmax_{j in S, j != i} <x_i, x_j>      nearest neighbour in the neighbour set S (self excluded)
    d_i   = || x_i - x_j(i) + eps ||                torch's pairwise_distance(x_i, x_j(i), eps=eps)
    koleo = -(1/|R|) sum_{i in R} ln(d_i + eps)     R: the rows averaged

DINOv2 (and DINOv3 by default): S = R = the rank's own batch of one crop (koleo_ref(x)). The gradient
flows through d_i into x_i and x_j(i), and through the normalization; the choice j(i) is not
differentiated. Both apply it to the backbone's [CLS] output (before the head) of each global crop of
the student separately (the two crops of one image are not each other's neighbours) and sum the two,
weight 0.1: KoLeoTerm.

DINOv3's distributed KoLeo (KoLeoLossDistributed in dinov3/loss/koleo_loss.py, cfg.dino.
koleo_loss_distributed; on in dinov3_vit7b16_high_res_adapt.yaml with koleo_distributed_loss_group_size
16 at 8 images per GPU): S = the batches of a group of consecutive ranks, all-gathered; R = the rank's
own rows. The group size counts images, a multiple of the per-GPU batch B (None: the global batch);
rank r is in group r // (group size / B). Each rank's term is the mean over its own rows; the gathered
rows carry gradients back to their ranks (torch.distributed.nn.all_gather there, _GatherRows here: each
rank receives the sum over the group of the gradients w.r.t. its rows). With DDP's mean of the ranks'
gradients, the step follows the mean of the ranks' terms: over one group of equal batches, the KoLeo of
the group's whole batch (S = R = all its rows). KoLeoTerm(group_ranks=G). What is not built:
  - topk: the official class can average over the k nearest neighbours of each row; every official
    config sets koleo_topk 1 and the non-distributed path asserts 1. Only k = 1 is here.
  - koleo_distributed_loss_group_data (true in the configs, "group data from adjacent ranks to make sure
    koleo is applied on the same data distribution"): no released code reads it.
  - koleo_distributed_replicas: the official code asserts it is 0.

Where this differs from the official KoLeoLoss / KoLeoLossDistributed, on purpose:
  - always in fp32 (fp64 for fp64 features), autocast off; the distributed term gathers fp32 rows. The
    official code turns autocast off but keeps the input's dtype: on fp16 features eps = 1e-8 rounds to
    0, so duplicate rows (or a batch of one, paired with itself) give ln(0): an inf loss and NaN
    gradients (dinov2 issues #143, #307, #314). In fp32 a duplicate gives d = eps sqrt(D): a finite
    (large) term and a finite gradient, of size ~1/(N eps) when three or more rows coincide (duplicate
    pairs cancel): past fp16's range for fp16 features, where an fp16 run's grad scaler takes it as an
    overflow.
  - self is excluded with -inf in the dot products; the official -1 ties with an antipodal neighbour
    (x_j = -x_i), and then argmax may return the row itself.
  - a neighbour set of one row: no neighbour, the estimator is undefined; we return 0 (connected to the
    graph, zero gradient). The official code pairs the row with itself and returns the constant
    -ln(eps (sqrt(D) + 1)) (about 15 at D = 768), also with zero gradient: only the logged value differs.
  - the distributed term gathers the raw rows and normalizes after the gather (the official: before;
    a row-wise op, the same values), one gather for both crops, and sends the gradients back with an
    all_reduce of the group's (2 G B, D) gradient, on any backend (the official: a reduce-scatter on
    NCCL; the same sums, G times its traffic: 0.5 MB at the 7B recipe's G = 2, B = 8, D = 4096).
Everything else (the eps placements, the mean) is the official arithmetic: on the same fp32 input
the values agree to rounding.

Cost: one (B, G B) matmul per crop (B = per-GPU batch, G ranks per group; G = 1 without distribution)
and a (B, D) gather; distributed, one all_gather of the rank's (2B, D) fp32 features per step and one
all_reduce of their gradient in backward: plain PyTorch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-8


def koleo_ref(x: torch.Tensor, eps: float = EPS, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """KoLeo of features x (M, D) in any float dtype: a scalar, fp32 (fp64 for fp64 x),
    differentiable w.r.t. x. rows = (start, stop): the mean over x[start:stop] only, whose neighbours
    are searched among all M rows (a rank's own rows in its group's gathered batch); None: all rows.
    M = 1 gives 0 (see the header)."""
    if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"koleo: features must be 2-D (N, D) with N, D >= 1, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"koleo: features must be floating point, got {x.dtype}")
    start, stop = rows if rows is not None else (0, x.shape[0])
    if not 0 <= start < stop <= x.shape[0]:
        raise ValueError(f"koleo: rows must be (start, stop) with 0 <= start < stop <= {x.shape[0]}, got {rows}")
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(x.device.type, enabled=False):
        x = F.normalize(x.to(dt), p=2, dim=-1, eps=eps)
        if x.shape[0] == 1:
            return (x * 0).sum()
        own = x[start:stop]
        with torch.no_grad():
            dots = own @ x.T
            dots.diagonal(start).fill_(float("-inf"))  # (i, start + i): each row itself
            neighbour = dots.argmax(dim=1)
        distance = F.pairwise_distance(own, x[neighbour], p=2, eps=eps)
        return -torch.log(distance + eps).mean()


class _GatherRows(torch.autograd.Function):
    """The rows (N, D) of every rank of a process group, concatenated in group-rank order (G N, D).
    Backward: the gradient w.r.t. the gathered rows is summed over the group (all_reduce) and each
    rank keeps its own slice: the gradient of the sum of the ranks' losses w.r.t. its rows."""

    @staticmethod
    def forward(ctx, x, group, rank_in_group, group_ranks):
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(group_ranks)]
        dist.all_gather(parts, x, group=group)
        ctx.group, ctx.own = group, slice(rank_in_group * x.shape[0], (rank_in_group + 1) * x.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.own], None, None, None


class KoLeoTerm(nn.Module):
    """The KoLeo term of the step's objective (fastdino/losses/__init__.py):
    student["cls_features"], the backbone's [CLS] features of the two global crops, crop-major
    (2B, D) in any float dtype; returns koleo(crop 1 rows) + koleo(crop 2 rows), fp32. `targets` is
    not read. weight: DINOv2's koleo_loss_weight (0.1).

    group_ranks: 1 (DINOv2): each rank's batch is its own neighbour set. G > 1 (DINOv3's distributed
    KoLeo): ranks [kG, (k+1)G) pool their batches as the neighbour set of each crop, each rank averaging
    over its own rows (see the header). Needs torch.distributed initialized with G dividing the world
    size, and every rank building the term together (the process groups are made here); every rank
    of a group must have the same B."""

    name = "koleo"
    N_CROPS = 2  # the global crops, each its own batch of neighbours

    def __init__(self, weight: float = 0.1, group_ranks: int = 1):
        super().__init__()
        self.weight = weight
        self.group_ranks = group_ranks
        self.rank_in_group = 0
        self._group = None  # the process group of this rank's KoLeo group; None: the default (whole world)
        if group_ranks < 1:
            raise ValueError(f"KoLeoTerm: group_ranks must be >= 1, got {group_ranks}")
        if group_ranks > 1:
            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError(f"KoLeoTerm: group_ranks={group_ranks} needs torch.distributed initialized")
            world, rank = dist.get_world_size(), dist.get_rank()
            if world % group_ranks:
                raise ValueError(f"KoLeoTerm: group_ranks={group_ranks} must divide the world size {world}")
            self.rank_in_group = rank % group_ranks
            if group_ranks < world:  # every rank creates every group, in the same order
                groups = [dist.new_group(list(range(first, first + group_ranks)))
                          for first in range(0, world, group_ranks)]
                self._group = groups[rank // group_ranks]

    def forward(self, student: dict, targets: dict | None = None) -> torch.Tensor:
        features = student["cls_features"]
        if features.dim() != 2 or features.shape[0] == 0 or features.shape[0] % self.N_CROPS:
            raise ValueError(f"KoLeoTerm: student['cls_features'] must be (2B, D), the two global crops "
                             f"crop-major, got {tuple(features.shape)}")
        if self.group_ranks == 1:
            crop1, crop2 = features.chunk(self.N_CROPS)
            return koleo_ref(crop1) + koleo_ref(crop2)
        B, D = features.shape[0] // self.N_CROPS, features.shape[1]
        dt = torch.float64 if features.dtype == torch.float64 else torch.float32
        gathered = _GatherRows.apply(features.to(dt), self._group, self.rank_in_group, self.group_ranks)
        gathered = gathered.view(self.group_ranks, self.N_CROPS, B, D)  # (rank, crop, image, D)
        own = (self.rank_in_group * B, (self.rank_in_group + 1) * B)
        crop1, crop2 = (gathered[:, c].reshape(self.group_ranks * B, D) for c in range(self.N_CROPS))
        return koleo_ref(crop1, rows=own) + koleo_ref(crop2, rows=own)

    def extra_repr(self) -> str:
        return f"weight={self.weight}" + (f", group_ranks={self.group_ranks}" if self.group_ranks > 1 else "")


__all__ = ["KoLeoTerm", "koleo_ref"]
