"""DINOLoss: the multi-crop self-distillation objective, drop-in for the official module.

    q_i   = softmax((t_i - c) / teacher_temp(epoch))            teacher global view i (2 of them)
    log p_v = log_softmax(s_v / student_temp)                     student view v (2 global + N local)
    loss  = mean over pairs (i, v), v != i, of  -sum_k q_i,k log p_v,k,   averaged over the batch
    c    <- m c + (1 - m) mean over all teacher rows of all ranks of t    (after the loss)

Same constructor, forward arguments, `center` buffer [1, out_dim] and numbers as the official
DINOLoss. The center update is gated on device by the finiteness of the loss, so a non-finite step
leaves the center untouched without a host synchronization.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 stay (the reference is float64-capable)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def dino_loss_pairs_ref(student_output: torch.Tensor, teacher_output: torch.Tensor, center: torch.Tensor,
                        ncrops: int, student_temp: float, teacher_temp: float) -> torch.Tensor:
    """The official double loop over (teacher global view, student view) pairs; fp32 math.

    student_output: (ncrops*B, K) crop-major; teacher_output: (2*B, K); center: (1, K).
    """
    student_out = (_upcast(student_output) / student_temp).chunk(ncrops)
    teacher_out = F.softmax((_upcast(teacher_output) - center) / teacher_temp, dim=-1).detach().chunk(2)
    total_loss, n_loss_terms = 0.0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue  # the same view for teacher and student is not a pair
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss = total_loss + loss.mean()
            n_loss_terms += 1
    return total_loss / n_loss_terms


class DINOLoss(nn.Module):
    """Official interface: DINOLoss(out_dim, ncrops, warmup_teacher_temp, teacher_temp,
    warmup_teacher_temp_epochs, nepochs, student_temp=0.1, center_momentum=0.9).

    forward(student_output (ncrops*B, K), teacher_output (2*B, K), epoch) -> scalar loss; updates
    `center` afterwards (all-reduced over ranks when torch.distributed is initialized).
    """

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
                 nepochs, student_temp=0.1, center_momentum=0.9, impl: str = "reference"):
        super().__init__()
        if impl not in ("reference",):
            raise ValueError(f"DINOLoss: impl={impl!r} is not available in this build")
        if ncrops < 2:
            raise ValueError(f"DINOLoss: ncrops must be >= 2 (two global crops), got {ncrops}")
        self.out_dim, self.ncrops, self.impl = out_dim, ncrops, impl
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        # teacher temperature: linear warmup, then constant (per epoch, as in the official code)
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(max(nepochs - warmup_teacher_temp_epochs, 0)) * teacher_temp,
        ))

    def teacher_temp(self, epoch: int) -> float:
        return float(self.teacher_temp_schedule[min(epoch, len(self.teacher_temp_schedule) - 1)])

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        loss = dino_loss_pairs_ref(student_output, teacher_output, self.center, self.ncrops,
                                   self.student_temp, self.teacher_temp(epoch))
        self.update_center(teacher_output, torch.isfinite(loss.detach()))
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor, ok: torch.Tensor | None = None) -> None:
        """c <- m c + (1 - m) * batch mean of the teacher logits over all ranks; kept as is where
        `ok` (a device bool) is False."""
        batch_center = torch.sum(_upcast(teacher_output), dim=0, keepdim=True).to(self.center.dtype)
        count = torch.tensor(float(teacher_output.shape[0]), device=batch_center.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            count = count * dist.get_world_size()
        new_center = self.center * self.center_momentum + (batch_center / count) * (1 - self.center_momentum)
        if ok is not None:
            new_center = torch.where(ok, new_center, self.center)
        self.center.copy_(new_center)

    @torch.no_grad()
    def teacher_entropy(self, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        """Mean entropy of the teacher distributions (collapse monitor); call before forward."""
        logq = F.log_softmax((teacher_output.float() - self.center) / self.teacher_temp(epoch), dim=-1)
        return -(logq.exp() * logq).sum(-1).mean()
