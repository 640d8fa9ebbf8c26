"""The Gram term of the step's objective (DINOv3 Gram anchoring; fastdino/gram.py for the teacher).

    student["patch_tokens"]  the student's normed patch tokens of the 2 global crops (2B, P, D) (the
                             iBOT-masked forward, as the official "patch_pre_head")
    targets["gram"]          the Gram teacher's patch tokens of the same crops at the Gram resolution,
                             resized to the student's grid (2B, P, D), no gradient
    targets["masks"]         the iBOT MaskBatch of the global crops (read with gram.tokens_used != "all")
    loss = mean over entries of (S_n S_n^T - T_n T_n^T)^2, rows L2-normalized, per image
           (gram.img_level) or over all 2B*P tokens of the rank; gram.remove_neg /
           gram.remove_only_teacher_neg clamp negative similarities (dinov3/loss/gram_loss.py)
The op and its plain reference are kernels/gram_loss.py (the tiled kernel never stores P x P).
Its weight is the schedule table's gram_weight row (0 before gram.start_epoch, then a ramp): the
step multiplies by hp[schedule_row].

gram.tokens_used (official get_gram_teacher_output): "all" the above; "masked" / "unmasked" only the
patch tokens the student saw masked / unmasked: the official takes S[masks], T[masks] (or ~masks),
(n, D) rows of the rank's batch, and GramLoss with img_level=False (which it asserts) makes one
n x n Gram matrix of them: loss = (1/n^2) sum over selected i, j of E_ij^2. Here the shapes stay
static (CUDA graphs, train.compile_step): the selected rows in a buffer of R rows, the others zero
(masked: the U = masks.upper_bound rows that mask_indices gathers, padding zeroed; unmasked: all
2B*P rows, the masked ones zeroed). A zero row has zero similarities in both Gram matrices (also after
the removal options), so it adds 0 to the sum of E^2 and gets no gradient; the op's mean divides by
R^2, so loss = op * (R / n)^2 with n the device count of selected rows: the official number, up to
the order of the fp32 sums. No selected token (n = 0): NaN, as the official mean over an empty matrix
(the step then counts a bad step). Cost: an R x R Gram matrix (the masked rows' bound U is well
below 2B*P; unmasked costs what "all" with img_level=False does).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fastdino.schedules import GRAM_WEIGHT


IMPLS = {"fused": "auto", "reference": "torch"}  # loss.impl (resolved) -> gram_loss impl: Triton on CUDA
TOKENS_USED = ("all", "masked", "unmasked")


def selected_rows(student: torch.Tensor, teacher: torch.Tensor, masks, tokens_used: str):
    """(student rows (R, D), teacher rows (R, D), n_selected () int64 on the device): the patch tokens
    of (2B, P, D) `student` / `teacher` that the iBOT `masks` (a MaskBatch, masks (2B, P)) mark
    masked ("masked") or not ("unmasked"), in a static R-row buffer whose other rows are 0 (see the
    module docstring). The selected rows keep the official order (row-major over (2B, P))."""
    if masks.masks.shape != student.shape[:2]:
        raise ValueError(f"GramTerm: iBOT masks {tuple(masks.masks.shape)} do not match the patch tokens "
                         f"{tuple(student.shape)} (2B, P, D)")
    s, t = student.flatten(0, 1), teacher.flatten(0, 1)
    if tokens_used == "masked":  # mask_indices: the masked tokens ascending, then padding (index 0)
        keep = torch.arange(masks.upper_bound, device=s.device) < masks.n_masked
        s, t = s.index_select(0, masks.mask_indices), t.index_select(0, masks.mask_indices)
        n = masks.n_masked
    elif tokens_used == "unmasked":
        keep = ~masks.masks.flatten()
        n = keep.sum()
    else:
        raise ValueError(f"GramTerm: tokens_used={tokens_used!r} selects no rows (masked or unmasked)")
    return s.masked_fill(~keep[:, None], 0), t.masked_fill(~keep[:, None], 0), n


class GramTerm(nn.Module):
    name = "gram"
    needs = "gram"  # the targets entry it reads: the step runs it only while the Gram teacher does
    schedule_row = GRAM_WEIGHT  # the step's weight is hp[GRAM_WEIGHT] * self.weight

    def __init__(self, img_level: bool = True, remove_neg: bool = False, remove_only_teacher_neg: bool = False,
                 impl: str = "reference", tokens_used: str = "all"):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"GramTerm: impl={impl!r} is not one of {list(IMPLS)}")
        if tokens_used not in TOKENS_USED:
            raise ValueError(f"GramTerm: tokens_used={tokens_used!r} is not one of {list(TOKENS_USED)}")
        if tokens_used != "all" and img_level:
            raise ValueError(f"GramTerm: tokens_used={tokens_used!r} needs img_level=False (one Gram matrix of "
                             "the rank's selected tokens, as the official asserts)")
        self.weight = 1.0
        self.img_level, self.remove_neg, self.remove_only_teacher_neg = img_level, remove_neg, remove_only_teacher_neg
        self.impl, self.tokens_used = impl, tokens_used

    def forward(self, student: dict, targets: dict) -> torch.Tensor:
        from fastdino.kernels.gram_loss import gram_loss

        s, t = student["patch_tokens"], targets["gram"].detach()
        if s.shape != t.shape or s.dim() != 3:
            raise ValueError(f"GramTerm: student patch tokens {tuple(s.shape)} and Gram teacher tokens "
                             f"{tuple(t.shape)} must both be (2B, P, D)")
        kw = dict(remove_neg=self.remove_neg, remove_only_teacher_neg=self.remove_only_teacher_neg,
                  impl=IMPLS[self.impl])
        if self.tokens_used == "all":
            return gram_loss(s, t, img_level=self.img_level, **kw)
        if targets.get("masks") is None:
            raise ValueError(f"GramTerm: tokens_used={self.tokens_used!r} needs the iBOT masks (targets['masks'])")
        s, t, n = selected_rows(s, t, targets["masks"], self.tokens_used)
        if s.shape[0] == 0:  # no masked token can exist (upper bound 0): the official mean of nothing
            return torch.full((), float("nan"), device=s.device)
        loss = gram_loss(s, t, img_level=False, **kw)  # mean over R^2 entries, R = s.shape[0]
        return loss * (s.shape[0] / n.to(loss.dtype)).square()

    def extra_repr(self) -> str:
        return (f"img_level={self.img_level}, remove_neg={self.remove_neg}, "
                f"remove_only_teacher_neg={self.remove_only_teacher_neg}, impl={self.impl}, "
                f"tokens_used={self.tokens_used}")


__all__ = ["GramTerm", "selected_rows", "TOKENS_USED"]
