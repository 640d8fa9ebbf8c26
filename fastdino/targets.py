"""Teacher targets: what the student is trained to predict, made from the teacher's logits.

DINO centers and sharpens (Caron et al. 2021):

    q_i = softmax((t_i - c) / teacher_temp)         each teacher row (the 2 global crops of each image)
    c  <- m c + (1 - m) mean of t over all teacher rows of all ranks      after the step (m = 0.9)

DINOv2 offers Sinkhorn-Knopp instead (from SwAV, Caron et al. 2020): a few alternating
normalizations of exp(t / teacher_temp), each prototype's column to 1/K of the batch (sums all-reduced
over ranks), then each row to 1, so that the targets of a batch use all prototypes equally
(kernels/sinkhorn_knopp.py has the steps).

The targets are the teacher's business: a target module turns teacher logits into probabilities and
statistics and owns its state; the student-side cross-entropy (fastdino/losses) only reads the
probabilities. Both modules answer the same calls:

    q, stats = targets(teacher_logits, teacher_temp)    q (rows, K) fp32, rows summing to 1 (Centering
                                                        fused: LogitTargets, the logits and row statistics
                                                        q is made of, read by the loss kernels: q is
                                                        never stored); stats["entropy"] (rows,) fp32
    targets.update_(colsum_all_ranks, rows_all_ranks, ok)        after the step, gated on device

iBOT's patch targets (DINOv2) are a second target module of the same kind over the static-shaped
masked-token rows (fastdino/data/masking.py MaskBatch), called with row_valid (rows,) bool, False on
padding: Centering keeps its own center, updated as the official iBOTPatchLoss: stats["colsum"] is
then the mean of this rank's valid rows (zeros when it has none; the official mean of no rows is
NaN), and update_ divides the all-reduced sum by the world size (the mean of the ranks' means);
SinkhornKnopp runs over the valid rows of all ranks only (B = their global count), padding gets q = 0.

How they differ:
    Centering       state: the center (1, K), its state_dict entry; forward is local (no collective),
                    stats also hold "colsum" (K,), which the step all-reduces for update_ (the EMA).
                    Collapse is held off across steps, by the center's running mean.
    SinkhornKnopp   no state (empty state_dict; update_ is a no-op); forward is collective: it
                    all-reduces the column maxima once ("max") and the prototype sums once per
                    iteration ("sum"; the reference also the official total) through its
                    all_reduce(x, op), in place (None: one process); stats hold only "entropy".
                    Collapse is held off within each batch, by the equipartition of the prototypes.
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

    impl: "fused" (kernels/softmax_center.py's softmax_center_stats: one read of the logits for the
    row statistics, the entropy and the column sums; q returned as LogitTargets, which the fused loss
    kernels turn into q tile by tile, and probs() materializes for anything else) or "reference" (the
    plain-PyTorch softmax, q stored). state_dict() is {"center": (1, K)}, the official DINOLoss entry."""

    def __init__(self, out_dim: int, center_momentum: float = 0.9, impl: str = "reference"):
        super().__init__()
        if impl not in ("fused", "reference"):
            raise ValueError(f"Centering: impl={impl!r} is not one of ['fused', 'reference']")
        self.center_momentum, self.impl = center_momentum, impl
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def forward(self, teacher_logits: torch.Tensor, teacher_temp,
                row_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """teacher_logits (R, K) any float dtype; teacher_temp a 0-dim device tensor (or a float).
        Returns q (R, K) fp32 (fused: LogitTargets) and {"entropy": (R,) fp32, "colsum": (K,) fp32
        column sums of t}.
        row_valid (R,) bool (iBOT rows): "colsum" is the mean of the valid rows, entropy 0 elsewhere."""
        t = teacher_logits.detach()
        if self.impl == "fused":  # q is not stored: the loss kernels make it from t and the row statistics
            from fastdino.kernels.soft_cross_entropy import LogitTargets
            from fastdino.kernels.softmax_center import softmax_center_stats

            if not isinstance(teacher_temp, torch.Tensor):
                teacher_temp = torch.tensor(float(teacher_temp), device=t.device)
            center = self.center.detach().clone().view(-1)  # the loss's backward reads it; the center moves
            row_offset, entropy, colsum = softmax_center_stats(t, center, teacher_temp, row_valid, impl="triton")
            if row_valid is not None:  # the mean of the valid rows
                colsum = colsum / row_valid.sum().clamp(min=1)
            return LogitTargets(t, center, teacher_temp, row_offset), {"entropy": entropy, "colsum": colsum}
        from fastdino.kernels.softmax_center import softmax_center

        q, entropy, colsum = softmax_center(t, self.center, teacher_temp, impl="torch")
        if row_valid is not None:  # a (1, R) x (R, K) product: no (R, K) temporary
            colsum = (row_valid.to(t.dtype)[None] @ t).view(-1).float() / row_valid.sum().clamp(min=1)
            entropy = torch.where(row_valid, entropy, 0.0)
        return q, {"entropy": entropy, "colsum": colsum}

    @torch.no_grad()
    def update_(self, colsum: torch.Tensor, rows: int, ok: torch.Tensor | None = None) -> None:
        """colsum: column sums of the teacher logits over all `rows` teacher rows of all ranks."""
        update_center_(self.center, colsum.float() / rows, self.center_momentum, ok)


class SinkhornKnopp(nn.Module):
    """DINOv2's Sinkhorn-Knopp teacher targets, n_iterations (3) alternating normalizations of
    exp(t / teacher_temp) over the teacher rows of all ranks (kernels/sinkhorn_knopp.py).

    impl: "fused" (the Triton ops of kernels/sinkhorn_knopp.py's sinkhorn_knopp_stats: the column
    maxima and the prototype and sample log-normalizers, no (R, K) write; q returned as LogitTargets,
    made tile by tile by the fused loss kernels, probs() for anything else) or "reference" (the
    plain-PyTorch steps of the official code, q stored).
    all_reduce(x, op): reduces a (K,) fp32 tensor in place over ranks, op "sum" or "max"; None in one
    process. A plain attribute, set by whoever owns the process group (the backend). No state: the
    state_dict is empty and update_ does nothing (the arguments are accepted for Centering's calls)."""

    def __init__(self, out_dim: int, n_iterations: int = 3, impl: str = "reference", all_reduce=None):
        super().__init__()
        if impl not in ("fused", "reference"):
            raise ValueError(f"SinkhornKnopp: impl={impl!r} is not one of ['fused', 'reference']")
        if isinstance(n_iterations, bool) or not isinstance(n_iterations, int) or n_iterations < 1:
            raise ValueError(f"SinkhornKnopp: n_iterations must be an int >= 1, got {n_iterations!r}")
        self.out_dim, self.n_iterations, self.impl, self.all_reduce = out_dim, n_iterations, impl, all_reduce

    @torch.no_grad()
    def forward(self, teacher_logits: torch.Tensor, teacher_temp,
                row_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """teacher_logits (R, K) any float dtype, this rank's rows; teacher_temp a 0-dim device
        tensor (or a float). Returns q (R, K) fp32 (fused: LogitTargets) and {"entropy": (R,) fp32}.
        row_valid (R,) bool (iBOT rows): only the valid rows of all ranks take part; the others get
        q = 0, entropy 0."""
        if teacher_logits.dim() != 2 or teacher_logits.shape[1] != self.out_dim:
            raise ValueError(f"SinkhornKnopp: teacher_logits must be (R, out_dim={self.out_dim}), "
                             f"got {tuple(teacher_logits.shape)}")
        t = teacher_logits.detach()
        if self.impl == "fused":  # q is not stored: the loss kernels make it from t and the normalizers
            from fastdino.kernels.sinkhorn_knopp import sinkhorn_knopp_stats
            from fastdino.kernels.soft_cross_entropy import LogitTargets

            if not isinstance(teacher_temp, torch.Tensor):
                teacher_temp = torch.tensor(float(teacher_temp), device=t.device)
            center, col_offset, row_offset, entropy = sinkhorn_knopp_stats(
                t, teacher_temp, self.n_iterations, self.all_reduce, row_valid=row_valid, impl="triton")
            return LogitTargets(t, center, teacher_temp, row_offset, col_offset), {"entropy": entropy}
        from fastdino.kernels.sinkhorn_knopp import sinkhorn_knopp

        q, entropy = sinkhorn_knopp(t, teacher_temp, self.n_iterations, self.all_reduce, impl="torch",
                                    row_valid=row_valid)
        return q, {"entropy": entropy}

    def update_(self, colsum: torch.Tensor | None = None, rows: int | None = None,
                ok: torch.Tensor | None = None) -> None:
        """Nothing to update: Sinkhorn-Knopp keeps no state between steps."""

    def extra_repr(self) -> str:
        return f"out_dim={self.out_dim}, n_iterations={self.n_iterations}, impl={self.impl!r}"
