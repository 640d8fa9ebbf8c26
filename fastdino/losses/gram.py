"""The Gram term of the step's objective (DINOv3 Gram anchoring; fastdino/gram.py for the teacher).

    student["patch_tokens"]  the student's normed patch tokens of the 2 global crops (2B, P, D) (the
                             iBOT-masked forward, as the official "patch_pre_head")
    targets["gram"]          the Gram teacher's patch tokens of the same crops at the Gram resolution,
                             resized to the student's grid (2B, P, D), no gradient
    loss = mean over entries of (S_n S_n^T - T_n T_n^T)^2, rows L2-normalized, per image
           (gram.img_level) or over all 2B*P tokens of the rank; gram.remove_neg /
           gram.remove_only_teacher_neg clamp negative similarities (dinov3/loss/gram_loss.py)
The op and its plain reference are kernels/gram_loss.py (the tiled kernel never stores P x P).
Its weight is the schedule table's gram_weight row (0 before gram.start_epoch, then a ramp): the
step multiplies by hp[schedule_row].
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fastdino.schedules import GRAM_WEIGHT


IMPLS = {"fused": "auto", "reference": "torch"}  # loss.impl (resolved) -> gram_loss impl: Triton on CUDA


class GramTerm(nn.Module):
    name = "gram"
    needs = "gram"  # the targets entry it reads: the step runs it only while the Gram teacher does
    schedule_row = GRAM_WEIGHT  # the step's weight is hp[GRAM_WEIGHT] * self.weight

    def __init__(self, img_level: bool = True, remove_neg: bool = False, remove_only_teacher_neg: bool = False,
                 impl: str = "reference"):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"GramTerm: impl={impl!r} is not one of {list(IMPLS)}")
        self.weight = 1.0
        self.img_level, self.remove_neg, self.remove_only_teacher_neg = img_level, remove_neg, remove_only_teacher_neg
        self.impl = impl

    def forward(self, student: dict, targets: dict) -> torch.Tensor:
        from fastdino.kernels.gram_loss import gram_loss

        s, t = student["patch_tokens"], targets["gram"]
        if s.shape != t.shape or s.dim() != 3:
            raise ValueError(f"GramTerm: student patch tokens {tuple(s.shape)} and Gram teacher tokens "
                             f"{tuple(t.shape)} must both be (2B, P, D)")
        return gram_loss(s, t.detach(), img_level=self.img_level, remove_neg=self.remove_neg,
                         remove_only_teacher_neg=self.remove_only_teacher_neg, impl=IMPLS[self.impl])

    def extra_repr(self) -> str:
        return (f"img_level={self.img_level}, remove_neg={self.remove_neg}, "
                f"remove_only_teacher_neg={self.remove_only_teacher_neg}, impl={self.impl}")


__all__ = ["GramTerm"]
