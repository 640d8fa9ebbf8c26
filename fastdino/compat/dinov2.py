"""DINOv2's loss modules (dinov2/loss/dino_clstoken_loss.py, ibot_patch_loss.py, koleo_loss.py) on
fastdino's ops: change the import,

    from dinov2.loss import DINOLoss, iBOTPatchLoss, KoLeoLoss
        ->  from fastdino.compat.dinov2 import DINOLoss, iBOTPatchLoss, KoLeoLoss

and keep the calls of DINOv2's ssl_meta_arch.py: same constructors, methods, returned values, `center`
buffers and state_dict keys.

DINOLoss(out_dim, student_temp=0.1, center_momentum=0.9)                     center (1, K)
    softmax_center_teacher(t, teacher_temp)   applies the pending center update, then
                                              softmax((t - c) / teacher_temp) over the last dim, fp32
    sinkhorn_knopp_teacher(t (R, K), teacher_temp, n_iterations=3)   Sinkhorn-Knopp targets over the
                                              rows of all ranks (R, K) fp32 (fastdino/targets.py)
    forward(student_output_list, teacher_out_softmaxed_centered_list)
        = sum over every (student s, target t) pair of  mean_b -<t_b, log_softmax(s_b / student_temp)>
          (no pair skipped: DINOv2 pairs the crops itself; lists of (B, K) views or (n, B, K) tensors)
    update_center(t (R, K))   records sum_r t_r and R, all-reduce started asynchronously (torch.distributed);
                              the next softmax_center_teacher waits for it and applies
                              c <- m c + (1 - m) sum_all_ranks / (R * world_size)    (apply_center_update)
iBOTPatchLoss(patch_out_dim, student_temp=0.1, center_momentum=0.9)          center (1, 1, K)
    softmax_center_teacher, update_center as DINOLoss's, with the batch statistic of t (A, N, K)
        sum_a mean_n t_an and A (DINOv2 passes the masked tokens as (1, n_masked, K))
    sinkhorn_knopp_teacher(t (n, K), teacher_temp, n_masked_patches_tensor, n_iterations=3)
        Sinkhorn-Knopp over the rows of all ranks; n_masked_patches_tensor (their global count) cancels
        in the algebra (kernels/sinkhorn_knopp.py), so it is accepted and not read (DINOv2 all-reduces
        it in place; here the caller's tensor is left as it is)
    forward(s (B, N, K), t (B, N, K), masks (B, N))
        = -(1/B) sum_b sum_n w_bn <t_bn, log_softmax(s_bn / student_temp)>,  w_bn = m_bn / max(sum_n m_bn, 1)
    forward_masked(s (n, K), t (n, K), masks (B, N) bool, n_masked_patches=None, masks_weight=None)
        = -(1/B) sum_{j < n_masked_patches} w_j <t_j, log_softmax(s_j / student_temp)>,
          w = masks_weight, default 1 / (masked tokens of the token's image) for the masks' True entries
KoLeoLoss()
    forward(x (B, D), eps=1e-8) = -(1/B) sum_i ln(||x_i - x_nn(i) + eps|| + eps), x L2-normalized

How they run: the centered softmax is kernels/softmax_center.py, Sinkhorn-Knopp is
kernels/sinkhorn_knopp.py's q-writing op (all-reduces over the default process group when it is initialized),
the cross-entropies are the multi-view soft-target kernel (kernels/soft_cross_entropy.py: DINO pairs
without skipping, the teacher list two views per call; iBOT rows one view and one weighted target
each, fastdino.losses.IBOTTerm), KoLeo is fastdino.losses.koleo.koleo_ref. impl="auto" | "fused" |
"reference" (keyword-only; see fastdino/compat); KoLeo has one implementation.

Where they differ from DINOv2's: no gradient reaches the targets of forward / forward_masked (DINOv2
makes them under torch.no_grad); the losses are fp32 (fp64 for fp64 inputs); the center statistics
are summed in fp32 whatever the teacher's dtype; Sinkhorn-Knopp subtracts each prototype's max
before exponentiating (no overflow at small teacher_temp; same targets up to rounding); KoLeo
computes in fp32, excludes self with -inf (not -1, which can tie with an antipodal neighbour) and
gives 0 for a batch of one (DINOv2: the constant -ln(eps (sqrt(D) + 1))); see fastdino/losses/koleo.py.
update_center's input must be 2-D (DINOLoss) or 3-D (iBOTPatchLoss), the shapes DINOv2 passes.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from fastdino.compat import (KERNEL_IMPL, accumulation_dtype, all_reduce_or_none, check_impl, distributed,
                             resolve_impl, stack_views, world_size)
from fastdino.losses.ibot import IBOTTerm
from fastdino.losses.koleo import koleo_ref
from fastdino.kernels.sinkhorn_knopp import sinkhorn_knopp
from fastdino.targets import update_center_


class _DeferredCenter(nn.Module):
    """The center protocol DINOv2's two centered losses share: update_center records the batch
    statistic and starts its all-reduce; the next softmax_center_teacher applies it first."""

    def __init__(self, center_shape: tuple, student_temp: float, center_momentum: float, impl: str, who: str):
        super().__init__()
        check_impl(impl, who)
        self.student_temp, self.center_momentum, self.requested_impl, self.impl, self._who = \
            student_temp, center_momentum, impl, None, who
        self.register_buffer("center", torch.zeros(center_shape))
        self.updated = True
        self.reduce_handle = None
        self.async_batch_center = None

    def resolve_impl(self, device: torch.device) -> str:
        """The implementation used for tensors on `device` ("fused" or "reference")."""
        return resolve_impl(self.requested_impl, device, self._who)

    def _centered_softmax(self, teacher_output: Tensor, teacher_temp) -> Tensor:
        from fastdino.kernels.softmax_center import softmax_center

        K = self.center.shape[-1]
        if teacher_output.dim() < 1 or teacher_output.shape[-1] != K:
            raise ValueError(f"{self._who}.softmax_center_teacher: the last dim of the teacher output must be "
                             f"{K}, got shape {tuple(teacher_output.shape)}")
        self.impl = self.resolve_impl(teacher_output.device)
        if isinstance(teacher_temp, Tensor):
            teacher_temp = teacher_temp.to(device=teacher_output.device, dtype=torch.float32)
        q, _, _ = softmax_center(teacher_output.detach().reshape(-1, K), self.center.view(1, K), teacher_temp,
                                 impl=KERNEL_IMPL[self.impl])
        return q.view(teacher_output.shape)

    def _sinkhorn_knopp(self, teacher_output: Tensor, teacher_temp, n_iterations: int) -> Tensor:
        if teacher_output.dim() != 2:
            raise ValueError(f"{self._who}.sinkhorn_knopp_teacher: teacher_output must be 2-D (rows, "
                             f"{self.center.shape[-1]}), got shape {tuple(teacher_output.shape)}")
        self.impl = self.resolve_impl(teacher_output.device)
        # the official API hands q to the caller: the op that writes it (the engine's targets module
        # keeps it as LogitTargets for its own loss kernels)
        return sinkhorn_knopp(teacher_output.detach(), teacher_temp, n_iterations, all_reduce_or_none(),
                              impl=KERNEL_IMPL[self.impl])[0]

    @torch.no_grad()
    def _record(self, batch_sum: Tensor) -> None:
        self.updated = False
        self.async_batch_center = batch_sum
        if distributed():
            self.reduce_handle = torch.distributed.all_reduce(batch_sum, async_op=True)

    @torch.no_grad()
    def _apply(self, n: int) -> None:
        if self.updated is False:
            if self.reduce_handle is not None:
                self.reduce_handle.wait()
                self.reduce_handle = None
            update_center_(self.center, self.async_batch_center / (n * world_size()), self.center_momentum)
            self.updated = True


class DINOLoss(_DeferredCenter):
    """DINOv2's DINOLoss (dino_clstoken_loss.py; see the header), plus impl. state_dict: {"center": (1, K)}."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, *, impl: str = "auto"):
        super().__init__((1, out_dim), student_temp, center_momentum, impl, "DINOLoss")
        self.len_teacher_output = None

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: Tensor, teacher_temp) -> Tensor:
        self.apply_center_update()
        return self._centered_softmax(teacher_output, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: Tensor, teacher_temp, n_iterations: int = 3) -> Tensor:
        return self._sinkhorn_knopp(teacher_output, teacher_temp, n_iterations)

    def forward(self, student_output_list, teacher_out_softmaxed_centered_list) -> Tensor:
        from fastdino.kernels.soft_cross_entropy import soft_cross_entropy

        s, S = stack_views(student_output_list, "DINOLoss", "student_output_list")  # (S*B, K) view-major
        q, T = stack_views(teacher_out_softmaxed_centered_list, "DINOLoss", "teacher_out_softmaxed_centered_list")
        if q.shape[0] // T != s.shape[0] // S or q.shape[1] != s.shape[1]:
            raise ValueError(f"DINOLoss: student outputs and teacher targets must be (B, K) alike, got "
                             f"{(s.shape[0] // S, s.shape[1])} and {(q.shape[0] // T, q.shape[1])}")
        self.impl = self.resolve_impl(s.device)
        B = s.shape[0] // S
        loss = 0.0
        for i in range(0, T, 2):  # the kernel takes 1 or 2 targets per student view
            n_targets = min(2, T - i)
            mean = soft_cross_entropy(s, q[i * B:(i + n_targets) * B], S, self.student_temp, n_targets=n_targets,
                                      skip_same_view=False, impl=KERNEL_IMPL[self.impl])
            loss = loss + mean * (S * n_targets)  # the kernel's mean over pairs -> DINOv2's sum over pairs
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        self.reduce_center_update(teacher_output)

    @torch.no_grad()
    def reduce_center_update(self, teacher_output: Tensor) -> None:
        if teacher_output.dim() != 2 or teacher_output.shape[1] != self.center.shape[-1]:
            raise ValueError(f"DINOLoss.update_center: teacher_output must be (rows, {self.center.shape[-1]}), "
                             f"got {tuple(teacher_output.shape)}")
        self.len_teacher_output = len(teacher_output)
        self._record(torch.sum(teacher_output, dim=0, keepdim=True, dtype=accumulation_dtype(teacher_output)))

    @torch.no_grad()
    def apply_center_update(self) -> None:
        self._apply(self.len_teacher_output)


class iBOTPatchLoss(_DeferredCenter):  # noqa: N801  (DINOv2's name)
    """DINOv2's iBOTPatchLoss (ibot_patch_loss.py; see the header), plus impl. state_dict:
    {"center": (1, 1, K)}."""

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, *,
                 impl: str = "auto"):
        super().__init__((1, 1, patch_out_dim), student_temp, center_momentum, impl, "iBOTPatchLoss")
        self.len_teacher_patch_tokens = None

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: Tensor, teacher_temp) -> Tensor:
        self.apply_center_update()
        self.center = self.center.to(device=teacher_patch_tokens.device)  # as DINOv2
        return self._centered_softmax(teacher_patch_tokens, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: Tensor, teacher_temp, n_masked_patches_tensor=None,
                               n_iterations: int = 3) -> Tensor:
        return self._sinkhorn_knopp(teacher_output, teacher_temp, n_iterations)

    def _term(self, s: Tensor, t: Tensor, weights: Tensor, n_samples: int) -> Tensor:
        self.impl = self.resolve_impl(s.device)
        term = IBOTTerm(n_samples, self.student_temp, impl=self.impl)
        return term({"patch": s}, {"patch": t, "patch_weights": weights})

    def forward(self, student_patch_tokens: Tensor, teacher_patch_tokens: Tensor, student_masks_flat: Tensor) -> Tensor:
        s, t, masks = student_patch_tokens, teacher_patch_tokens, student_masks_flat
        if s.dim() != 3 or t.shape != s.shape or masks.shape != s.shape[:2]:
            raise ValueError(f"iBOTPatchLoss: student and teacher patch tokens must be (B, N, K) and the masks (B, N), "
                             f"got {tuple(s.shape)}, {tuple(t.shape)} and {tuple(masks.shape)}")
        m = masks.to(accumulation_dtype(s))
        weights = m / m.sum(dim=-1, keepdim=True).clamp(min=1.0)  # (B, N): 1 / masked tokens of the image
        K = s.shape[-1]
        return self._term(s.reshape(-1, K), t.reshape(-1, K), weights.reshape(-1), s.shape[0])

    def forward_masked(self, student_patch_tokens_masked: Tensor, teacher_patch_tokens_masked: Tensor,
                       student_masks_flat: Tensor, n_masked_patches: int | None = None,
                       masks_weight: Tensor | None = None) -> Tensor:
        s, t, masks = student_patch_tokens_masked, teacher_patch_tokens_masked, student_masks_flat
        if masks_weight is None:
            if masks.dtype != torch.bool:
                raise ValueError(f"iBOTPatchLoss.forward_masked: student_masks_flat must be bool when masks_weight "
                                 f"is None, got {masks.dtype}")
            masks_weight = (1.0 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]
        if n_masked_patches is not None:
            s, t = s[:n_masked_patches], t[:n_masked_patches]
        return self._term(s, t, masks_weight, masks.shape[0])

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens: Tensor) -> None:
        self.reduce_center_update(teacher_patch_tokens)

    @torch.no_grad()
    def reduce_center_update(self, teacher_patch_tokens: Tensor) -> None:
        t = teacher_patch_tokens
        if t.dim() != 3 or t.shape[2] != self.center.shape[-1]:
            raise ValueError(f"iBOTPatchLoss.update_center: teacher_patch_tokens must be (A, N, "
                             f"{self.center.shape[-1]}) (DINOv2: the masked tokens as (1, n_masked, K)), "
                             f"got {tuple(t.shape)}")
        self.len_teacher_patch_tokens = len(t)
        self._record(torch.sum(t.mean(1, dtype=accumulation_dtype(t)), dim=0, keepdim=True))

    @torch.no_grad()
    def apply_center_update(self) -> None:
        self._apply(self.len_teacher_patch_tokens)


class KoLeoLoss(nn.Module):
    """DINOv2's KoLeoLoss (koleo_loss.py): forward(student_output (B, D), eps=1e-8) -> scalar, fp32
    (fp64 for fp64 features); fastdino.losses.koleo.koleo_ref (its header lists the differences)."""

    def forward(self, student_output: Tensor, eps: float = 1e-8) -> Tensor:
        return koleo_ref(student_output, eps)


__all__ = ["DINOLoss", "iBOTPatchLoss", "KoLeoLoss"]
