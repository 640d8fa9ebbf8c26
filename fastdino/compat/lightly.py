"""lightly's DINOLoss (lightly/loss/dino_loss.py) on fastdino's kernels: change one import line,

    from lightly.loss import DINOLoss     ->     from fastdino.compat.lightly import DINOLoss

and nothing else: the constructor, the call, the `center` buffer (1, 1, K) and the state_dict are
lightly's. Teacher views t_0..t_{T-1} (the global crops) and student views s_0..s_{S-1} (the same
global crops first, in the same order, then the local crops), each (B, K):

    q_i   = softmax((t_i - c) / teacher_temp)                       c: the center (1, 1, K)
    loss  = 1 / (n_terms * B)  sum_{i, v, v != i}  sum_b  -<q_ib, log_softmax(s_vb / student_temp)>
    n_terms = T * S - min(T, S)                  (the pairs of the same view index are skipped)

teacher_temp: the call's teacher_temp when given; else, with epoch given, torch.linspace(
warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)[epoch] while epoch <
warmup_teacher_temp_epochs, then teacher_temp; else teacher_temp (rounded to the default dtype, as
lightly's tensors are).

Center, in training mode only, after the loss: the mean of the teacher outputs over views and batch,
averaged over ranks (all-reduced when torch.distributed is initialized), is accumulated weighted by
its T * B rows; with update_center=True (the default) it is applied at once,
    c <- m c + (1 - m) accumulated mean,   m = center_momentum,
with update_center=False (gradient accumulation) by the caller's update_center(), once per optimizer
step. The loss of a call uses the center from before it. As lightly: no guard for non-finite values
(fastdino's engine and `fastdino.DINOLoss` skip such a center update; this module does not).

How it runs: one centered-softmax pass over the teacher views (kernels/softmax_center.py, which also
gives the column sums the center needs) and the multi-view soft-target cross-entropy
(kernels/soft_cross_entropy.py: T targets against S views, the same-index pairs skipped) over the
views concatenated view-major; T > 2 teacher views (lightly allows any number) take the kernel once
per pair of teacher views. impl="auto" | "fused" | "reference" (keyword-only; see fastdino/compat).

Where it differs from lightly: no gradient reaches teacher_out (lightly's examples freeze the teacher;
if teacher_out does require grad, lightly would also differentiate the teacher's softmax: the
student's gradient is the same, the teacher's parameters get none here). The loss is fp32 (fp64 for
fp64 inputs) whatever the inputs' dtype.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from torch import Tensor

from fastdino.compat import (KERNEL_IMPL, accumulation_dtype, check_impl, distributed, resolve_impl,
                             stack_views, world_size)
from fastdino.targets import update_center_

MAX_ACCUMULATED = 1000  # lightly's: accumulations without update_center() before it warns once


class DINOLoss(nn.Module):
    """lightly's DINOLoss (see the header), plus impl="auto" | "fused" | "reference".

    forward(teacher_out, student_out, teacher_temp=None, epoch=None, *, update_center=True) -> the
    scalar loss; update_center(teacher_out=None) applies the accumulated center update (after
    accumulating teacher_out, a list of views or a (T, B, K) tensor, when given).
    state_dict() is {"center": (1, 1, K)}, lightly's."""

    def __init__(self, output_dim: int = 65536, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 30, student_temp: float = 0.1, center_momentum: float = 0.9,
                 center_mode: str = "mean", *, impl: str = "auto"):
        super().__init__()
        if center_mode != "mean":
            raise ValueError(f"DINOLoss: center_mode={center_mode!r} is not supported; lightly's only mode is 'mean'")
        check_impl(impl, "DINOLoss")
        self.teacher_temp, self.student_temp, self.center_momentum = teacher_temp, student_temp, center_momentum
        self.requested_impl, self.impl = impl, None
        self.register_buffer("center", torch.zeros(1, 1, output_dim))
        # batch centers accumulated since the last update: non-persistent, as lightly's (state_dict: center only)
        self.register_buffer("_batch_center_sum", torch.zeros(1, 1, output_dim), persistent=False)
        self.register_buffer("_batch_num_elements", torch.zeros(()), persistent=False)
        self._num_accumulated = 0  # a Python int: no device sync to read it
        self._warned_missing_update = False
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.teacher_temp_schedule = torch.linspace(start=warmup_teacher_temp, end=teacher_temp,
                                                    steps=warmup_teacher_temp_epochs)

    def teacher_temperature(self, teacher_temp: float | None = None, epoch: int | None = None) -> float:
        """The teacher temperature a call with these arguments uses (see the header)."""
        if teacher_temp is None and epoch is not None and epoch < self.warmup_teacher_temp_epochs:
            return float(self.teacher_temp_schedule[epoch])
        value = self.teacher_temp if teacher_temp is None else teacher_temp
        return float(torch.as_tensor(value, dtype=torch.get_default_dtype()))

    def resolve_impl(self, device: torch.device) -> str:
        """The implementation forward uses for tensors on `device` ("fused" or "reference")."""
        return resolve_impl(self.requested_impl, device, "DINOLoss")

    def forward(self, teacher_out: list[Tensor], student_out: list[Tensor], teacher_temp: float | None = None,
                epoch: int | None = None, *, update_center: bool = True) -> Tensor:
        t, T = stack_views(teacher_out, "DINOLoss", "teacher_out")  # (T*B, K) view-major
        s, S = stack_views(student_out, "DINOLoss", "student_out")  # (S*B, K) view-major
        B, K = t.shape[0] // T, t.shape[1]
        if s.shape[0] // S != B or s.shape[1] != K or K != self.center.shape[-1]:
            raise ValueError(f"DINOLoss: teacher and student views must both be (batch_size, output_dim="
                             f"{self.center.shape[-1]}), got {(B, K)} and {(s.shape[0] // S, s.shape[1])}")
        n_terms = T * S - min(T, S)
        if n_terms == 0:
            raise ValueError(f"DINOLoss: no (teacher view, student view) pair: {T} teacher and {S} student view(s), "
                             "and the pair of the same view index is skipped")
        self.impl = self.resolve_impl(t.device)
        kernel = KERNEL_IMPL[self.impl]
        from fastdino.kernels.softmax_center import softmax_center

        q, _, colsum = softmax_center(t.detach(), self.center.view(1, K), self.teacher_temperature(teacher_temp, epoch),
                                      impl=kernel)
        loss = self._cross_entropy(s, q, S, T, B, n_terms, kernel)
        if self.training:  # as lightly: the center moves in training mode only
            self._accumulate(colsum, T * B)
            if update_center:
                self.update_center()
        return loss

    def _cross_entropy(self, s: Tensor, q: Tensor, S: int, T: int, B: int, n_terms: int, kernel: str) -> Tensor:
        """The pair sum of the header over n_terms * B, with the kernel's mean over its own pairs
        rescaled: teacher views i, i+1 pair with student views [0, i) (none skipped) and with views
        [i, S), whose first ones are their own (skipped)."""
        from fastdino.kernels.soft_cross_entropy import pair_counts, soft_cross_entropy

        if T <= 2:
            return soft_cross_entropy(s, q, S, self.student_temp, n_targets=T, skip_same_view=True, impl=kernel)
        total = 0.0
        for i in range(0, T, 2):
            q_i = q[i * B:(i + 2) * B]
            T_i = q_i.shape[0] // B
            for lo, hi, skip in ((0, min(i, S), False), (i, S, True)):
                pairs = sum(pair_counts(hi - lo, T_i, skip)) if hi > lo else 0
                if pairs:
                    part = soft_cross_entropy(s[lo * B:hi * B], q_i, hi - lo, self.student_temp, n_targets=T_i,
                                              skip_same_view=skip, impl=kernel)
                    total = total + part * (pairs / n_terms)
        return total

    @torch.no_grad()
    def _accumulate(self, colsum: Tensor, rows: int) -> None:
        """lightly's accumulation: this rank's mean (colsum / rows), averaged over ranks, weighted by rows."""
        batch_center = colsum.view(1, 1, -1) / rows
        if distributed():
            torch.distributed.all_reduce(batch_center)
            batch_center = batch_center / world_size()
        self._batch_center_sum += batch_center * rows
        self._batch_num_elements += rows
        self._num_accumulated += 1
        if self._num_accumulated > MAX_ACCUMULATED and not self._warned_missing_update:
            self._warned_missing_update = True
            warnings.warn(f"DINOLoss accumulated {self._num_accumulated} center updates without a call to "
                          "update_center(); with update_center=False call it once per optimizer step, or the center "
                          "stays frozen", UserWarning, stacklevel=3)

    @torch.no_grad()
    def update_center(self, teacher_out: list[Tensor] | Tensor | None = None) -> None:
        """c <- m c + (1 - m) accumulated mean, then the accumulation restarts; teacher_out (a list of
        (B, K) views or a (T, B, K) tensor) is accumulated first when given. Nothing accumulated:
        no change."""
        if teacher_out is not None:
            t, _ = stack_views(teacher_out, "DINOLoss.update_center", "teacher_out")
            self._accumulate(torch.sum(t, dim=0, dtype=accumulation_dtype(t)), t.shape[0])
        if self._num_accumulated == 0:
            return
        update_center_(self.center, self._batch_center_sum / self._batch_num_elements, self.center_momentum)
        self._batch_center_sum.zero_()
        self._batch_num_elements.zero_()
        self._num_accumulated = 0

    def extra_repr(self) -> str:
        return (f"output_dim={self.center.shape[-1]}, student_temp={self.student_temp}, "
                f"center_momentum={self.center_momentum}, impl={self.requested_impl!r}")


__all__ = ["DINOLoss"]
