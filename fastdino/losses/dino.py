"""DINO's image-level term and the drop-in DINOLoss module.

    loss = mean over pairs (teacher global view i, student view v), v != i, of -sum_k q_i,k log p_v,k,
           averaged over the batch;   log p_v = log_softmax(s_v / student_temp)

With DINOv3's local-crop reweighting (loss.reweight_local) the pairs of the local views count w times,
w = the step's dino_local_weight (fastdino/schedules.py), the pair count unchanged:
    loss = (sum over global pairs + w * sum over local pairs) / (pairs * B),   pairs = 2 + 2 n_local
         = global_scale * global loss + local_scale * w * local loss   (DINOv3's compute_losses: scales
           2 / pairs and 2 n_local / pairs, each loss the mean over its own pairs and the batch)

DINOTerm is the term the engine's step sums: a soft-target cross-entropy over the multi-crop pairs
(kernels/soft_cross_entropy.py), with the head's last layer inside the kernel when the head is fused
(kernels/linear_soft_cross_entropy.py). The teacher side (centering) lives in fastdino/targets.py.

DINOLoss is the official module's interface for other DINO code (`from fastdino import DINOLoss`):
same constructor, forward(student_output, teacher_output, epoch), `center` buffer and state_dict,
same numbers; built from the same ops (centering, then the cross-entropy, then the center update,
all-reduced over ranks when torch.distributed is initialized).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from fastdino.models.head import last_layer_weight
from fastdino.schedules import DINO_LOCAL_WEIGHT, teacher_temp_schedule
from fastdino.targets import Centering, update_center_

_KERNEL_IMPL = {"fused": "triton", "reference": "torch"}


class DINOTerm(nn.Module):
    """The DINO term: student["cls"] against targets["cls"] over the (teacher view, student view != it)
    pairs. n_views = 2 global + N local crops; impl "fused" | "reference".

    head: the student's DINOHead when its last layer is fused into this term (model.fused_head):
    student["cls"] is then the bottleneck (n_views*B, D), the logits are made tile by tile in the
    kernel with the head's effective weight g * v / ||v||, in `matmul_dtype` (the autocast dtype of
    the run: bf16/fp16, or fp32).

    reweight_local: the local views' pairs count hp[DINO_LOCAL_WEIGHT] times, read on the device from
    the step's hyper-parameter tensor targets["hp"] (a new value each step recompiles and re-captures
    nothing); not with the fused head. Off: the loss of the plain mean, unchanged."""

    name = "dino"

    def __init__(self, n_views: int, student_temp: float, impl: str = "reference", weight: float = 1.0,
                 head: nn.Module | None = None, matmul_dtype: torch.dtype = torch.float32,
                 reweight_local: bool = False):
        super().__init__()
        if n_views < 2:
            raise ValueError(f"DINOTerm: n_views must be >= 2 (two global crops), got {n_views}")
        if impl not in _KERNEL_IMPL:
            raise ValueError(f"DINOTerm: impl={impl!r} is not one of {list(_KERNEL_IMPL)}")
        if reweight_local and head is not None:
            raise ValueError("DINOTerm: the fused head is not built for the local-crop reweighting")
        self.n_views, self.student_temp, self.impl, self.weight = n_views, student_temp, impl, weight
        self.matmul_dtype = matmul_dtype
        self._head = [head]  # a reference, not a submodule: the head's parameters belong to the student
        self.reweight_local = reweight_local

    def view_weights(self, targets: dict) -> torch.Tensor | None:
        """(n_views,) fp32 on the device: 1 for the 2 global views, the local weight for the others,
        read from the step's hyper-parameters targets["hp"] at DINO_LOCAL_WEIGHT; None without
        reweighting."""
        if not self.reweight_local:
            return None
        if "hp" not in targets:
            raise RuntimeError("DINOTerm: reweight_local reads the local weight from the step's hyper-parameters "
                               "(targets['hp'])")
        w = targets["hp"][DINO_LOCAL_WEIGHT:DINO_LOCAL_WEIGHT + 1].float()
        return torch.cat([w.new_ones(2), w.expand(self.n_views - 2)])

    def forward(self, student: dict, targets: dict) -> torch.Tensor:
        head, impl = self._head[0], _KERNEL_IMPL[self.impl]
        if head is None:
            from fastdino.kernels.soft_cross_entropy import soft_cross_entropy

            return soft_cross_entropy(student["cls"], targets["cls"], self.n_views, self.student_temp, impl=impl,
                                      view_weights=self.view_weights(targets))
        from fastdino.kernels.linear_soft_cross_entropy import linear_soft_cross_entropy

        dtype = self.matmul_dtype
        weight = last_layer_weight(head.last_layer).to(dtype)  # weight norm: torch autograd on a (K, D) tensor
        return linear_soft_cross_entropy(student["cls"].to(dtype), weight, targets["cls"], self.n_views,
                                         self.student_temp, impl=impl)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class DINOLoss(Centering):
    """Official interface: DINOLoss(out_dim, ncrops, warmup_teacher_temp, teacher_temp,
    warmup_teacher_temp_epochs, nepochs, student_temp=0.1, center_momentum=0.9), plus
    impl="auto"|"fused"|"reference" (auto: fused on CUDA tensors, reference elsewhere).

    forward(student_output (ncrops*B, K), teacher_output (2*B, K), epoch) -> scalar loss; updates
    `center` afterwards (all-reduced over ranks when torch.distributed is initialized; kept when the
    loss is not finite). forward(..., return_entropy=True) -> (loss, mean teacher entropy), with the
    center this step's loss used. state_dict() is {"center": (1, K)}, as the official module.
    """

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
                 nepochs, student_temp=0.1, center_momentum=0.9, impl: str = "auto"):
        if impl not in ("auto", "fused", "reference"):
            raise ValueError(f"DINOLoss: impl={impl!r} is not one of ['auto', 'fused', 'reference']")
        super().__init__(out_dim, center_momentum, "reference")
        if ncrops < 2:
            raise ValueError(f"DINOLoss: ncrops must be >= 2 (two global crops), got {ncrops}")
        self.ncrops, self.student_temp, self.requested_impl = ncrops, student_temp, impl
        self.teacher_temp_schedule = teacher_temp_schedule(warmup_teacher_temp, teacher_temp,
                                                           warmup_teacher_temp_epochs, nepochs)

    def teacher_temp(self, epoch: int) -> float:
        return float(self.teacher_temp_schedule[min(epoch, len(self.teacher_temp_schedule) - 1)])

    def resolve_impl(self, device: torch.device) -> str:
        """The implementation forward uses for tensors on `device` ("fused" or "reference")."""
        from fastdino.resolve import resolve_loss_impl

        try:
            return resolve_loss_impl(self.requested_impl, device)
        except ValueError as e:  # ConfigError names the engine's config key; the module has no config
            raise RuntimeError(f"DINOLoss: {str(e).split(': ', 1)[-1]}") from None

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int,
                return_entropy: bool = False):
        self.impl = self.resolve_impl(student_output.device)
        q, stats = super().forward(teacher_output, self.teacher_temp(epoch))
        term = DINOTerm(self.ncrops, self.student_temp, self.impl)
        loss = term({"cls": student_output}, {"cls": q})
        self._update_center(stats["colsum"], teacher_output.shape[0], loss)
        return (loss, stats["entropy"].mean()) if return_entropy else loss

    @torch.no_grad()
    def _update_center(self, colsum: torch.Tensor, rows: int, loss: torch.Tensor) -> None:
        """Column sums and a non-finite flag summed over ranks in one all-reduce: every rank skips
        the update when any loss is not finite, so the centers stay identical across ranks."""
        stats = torch.cat([colsum.float().reshape(-1), (~torch.isfinite(loss.detach())).float().reshape(1)])
        if _distributed():
            dist.all_reduce(stats)
            rows *= dist.get_world_size()
        update_center_(self.center, stats[:-1] / rows, self.center_momentum, stats[-1] == 0)

    @torch.no_grad()
    def teacher_entropy(self, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        """Mean entropy of the teacher distributions with the current center (collapse monitor)."""
        self.impl = self.resolve_impl(teacher_output.device)
        return super().forward(teacher_output, self.teacher_temp(epoch))[1]["entropy"].mean()


__all__ = ["DINOTerm", "DINOLoss"]
