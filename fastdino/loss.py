"""DINOLoss: the multi-crop self-distillation objective, drop-in for the official module.

    q_i   = softmax((t_i - c) / teacher_temp(epoch))            teacher global view i (2 of them)
    log p_v = log_softmax(s_v / student_temp)                     student view v (2 global + N local)
    loss  = mean over pairs (i, v), v != i, of  -sum_k q_i,k log p_v,k,   averaged over the batch
    c    <- m c + (1 - m) mean over all teacher rows of all ranks of t    (after the loss)

Same constructor, forward arguments, `center` buffer [1, out_dim] and numbers as the official
DINOLoss. The center update is gated on device by the finiteness of the loss, so a non-finite step
leaves the center untouched without a host synchronization.

impl: "fused" runs the Triton kernels of kernels/dino_loss.py (CUDA; CPU only under
TRITON_INTERPRET=1), "reference" the official double loop below, "auto" fused on CUDA tensors and
reference elsewhere. Under torch.distributed the center statistics (teacher column sums and a
non-finite flag) are all-reduced asynchronously; the update lands before the center is next used
(next forward, teacher_entropy, state_dict, sync_center()).
"""
from __future__ import annotations

import os

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


IMPLS = ("auto", "fused", "reference")


def _fused_kernels():
    """kernels/dino_loss.py, imported lazily: `from fastdino import DINOLoss` works without triton."""
    from fastdino.kernels import dino_loss as k
    return k


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class DINOLoss(nn.Module):
    """Official interface: DINOLoss(out_dim, ncrops, warmup_teacher_temp, teacher_temp,
    warmup_teacher_temp_epochs, nepochs, student_temp=0.1, center_momentum=0.9), plus
    impl="auto"|"fused"|"reference".

    forward(student_output (ncrops*B, K), teacher_output (2*B, K), epoch) -> scalar loss; updates
    `center` afterwards (all-reduced over ranks when torch.distributed is initialized).
    forward(..., return_entropy=True) -> (loss, mean teacher entropy over the 2B teacher rows),
    computed with the center used by this step's loss (free in the fused kernels).
    state_dict() is {"center": (1, K)}, as the official module (loads its `dino_loss` entry).
    """

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
                 nepochs, student_temp=0.1, center_momentum=0.9, impl: str = "auto"):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"DINOLoss: impl={impl!r} is not one of {list(IMPLS)}")
        if ncrops < 2:
            raise ValueError(f"DINOLoss: ncrops must be >= 2 (two global crops), got {ncrops}")
        if impl == "fused":
            try:
                import triton  # noqa: F401
            except ImportError:
                raise ValueError("DINOLoss: impl='fused' needs triton (pip install triton), or use impl='auto'")
        self.out_dim, self.ncrops, self.impl = out_dim, ncrops, impl
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        # teacher temperature: linear warmup, then constant (per epoch, as in the official code)
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(max(nepochs - warmup_teacher_temp_epochs, 0)) * teacher_temp,
        ))
        self._pending = None  # in-flight all-reduce of the center statistics
        self.register_state_dict_pre_hook(lambda module, prefix, keep_vars: module.sync_center())

    def teacher_temp(self, epoch: int) -> float:
        return float(self.teacher_temp_schedule[min(epoch, len(self.teacher_temp_schedule) - 1)])

    def resolve_impl(self, device: torch.device) -> str:
        """The implementation forward uses for tensors on `device` ("fused" or "reference")."""
        if self.impl == "reference":
            return "reference"
        if self.impl == "fused":
            if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise RuntimeError(f"DINOLoss: impl='fused' needs CUDA tensors (got {device}); use impl='auto' "
                                   "or 'reference' on CPU (tests interpret the kernels with TRITON_INTERPRET=1)")
            return "fused"
        if torch.device(device).type == "cuda":
            try:
                import triton  # noqa: F401
            except ImportError:
                return "reference"
            return "fused"
        return "reference"

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int,
                return_entropy: bool = False):
        self.sync_center()  # the previous step's center update, if still in flight
        temp = self.teacher_temp(epoch)
        distributed = _distributed()
        if self.resolve_impl(student_output.device) == "fused":
            loss, entropy, teacher_sum = _fused_kernels().dino_loss(
                student_output, teacher_output, self.center, self.ncrops, self.student_temp, temp,
                None if distributed else self.center_momentum)  # single process: center updated in-kernel
            if distributed:
                self._start_center_update(teacher_sum, teacher_output.shape[0], loss)
        else:
            entropy = self.teacher_entropy(teacher_output, epoch) if return_entropy else None
            loss = dino_loss_pairs_ref(student_output, teacher_output, self.center, self.ncrops,
                                       self.student_temp, temp)
            if distributed:
                self._start_center_update(torch.sum(_upcast(teacher_output.detach()), dim=0).float(),
                                          teacher_output.shape[0], loss)
            else:
                self.update_center(teacher_output, torch.isfinite(loss.detach()))
        return (loss, entropy) if return_entropy else loss

    # ------------------------------------------------------------------ center
    @torch.no_grad()
    def _start_center_update(self, teacher_sum: torch.Tensor, n_rows: int, loss: torch.Tensor) -> None:
        """All-reduce [teacher column sums, non-finite flag] asynchronously; sync_center applies it.
        The flag is summed over ranks, so every rank skips the update when any loss is not finite
        and the centers stay identical across ranks."""
        stats = torch.cat([teacher_sum.reshape(-1).float(), (~torch.isfinite(loss.detach())).float().reshape(1)])
        handle = dist.all_reduce(stats, async_op=True)
        self._pending = (handle, stats, float(n_rows * dist.get_world_size()))

    @torch.no_grad()
    def sync_center(self) -> None:
        """Apply the pending (all-reduced) center update; a no-op when none is in flight. Waiting on
        a NCCL handle orders the streams on device, it does not block the host."""
        if self._pending is None:
            return
        handle, stats, count = self._pending
        self._pending = None
        handle.wait()
        batch_center = (stats[:-1] / count).view_as(self.center)
        new_center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        self.center.copy_(torch.where(stats[-1] == 0, new_center, self.center))

    def _load_from_state_dict(self, *args, **kwargs):
        self._pending = None  # a loaded center replaces whatever was in flight
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor, ok: torch.Tensor | None = None) -> None:
        """c <- m c + (1 - m) * batch mean of the teacher logits over all ranks; kept as is where
        `ok` (a device bool) is False. Synchronous."""
        self.sync_center()
        if _distributed():
            ok = torch.ones((), dtype=torch.bool, device=teacher_output.device) if ok is None else ok
            self._start_center_update(torch.sum(_upcast(teacher_output), dim=0).float(), teacher_output.shape[0],
                                      torch.where(ok, 0.0, float("nan")))
            self.sync_center()
            return
        batch_center = torch.sum(_upcast(teacher_output), dim=0, keepdim=True).to(self.center.dtype)
        count = torch.tensor(float(teacher_output.shape[0]), device=batch_center.device)
        new_center = self.center * self.center_momentum + (batch_center / count) * (1 - self.center_momentum)
        if ok is not None:
            new_center = torch.where(ok, new_center, self.center)
        self.center.copy_(new_center)

    @torch.no_grad()
    def teacher_entropy(self, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        """Mean entropy of the teacher distributions (collapse monitor); call before forward (or use
        forward(..., return_entropy=True))."""
        self.sync_center()
        logq = F.log_softmax((teacher_output.float() - self.center) / self.teacher_temp(epoch), dim=-1)
        return -(logq.exp() * logq).sum(-1).mean()


def _weight_norm(weight_g: torch.Tensor, weight_v: torch.Tensor) -> torch.Tensor:
    """Effective last-layer weight g * v / ||v||_row, as fastdino.models.head.WeightNormLinear."""
    return weight_v * (weight_g / weight_v.norm(dim=1, keepdim=True))


class DINOHeadLoss(DINOLoss):
    """The head's last layer (weight-normalized Linear(D, K), no bias) fused with the DINO loss:
    no (ncrops*B, K) student logits or logit gradients are stored (model.fused_head).

    Same constructor, `center` buffer, schedule and numbers as DINOLoss (the teacher logits are
    formed with F.linear, as the unfused teacher does; the student's are computed tile by tile in
    kernels/dino_head_loss.py). impl="reference" (or "auto" off CUDA) forms the student logits with
    F.linear and runs the reference loss.

    forward(student_feats (ncrops*B, D), teacher_feats (2B, D), student_weight_g (K, 1),
            student_weight_v (K, D), teacher_weight_g, teacher_weight_v, epoch, return_entropy=False)
    with the features from DINOHead.forward_bottleneck (L2-normalized). Gradients flow to
    student_feats, student_weight_v and student_weight_g (where they require grad; the weight-norm
    itself is PyTorch autograd on a (K, D) tensor). The matmul dtype follows autocast when it is
    enabled, else the features' dtype, as F.linear would.
    """

    def forward(self, student_feats: torch.Tensor, teacher_feats: torch.Tensor, student_weight_g: torch.Tensor,
                student_weight_v: torch.Tensor, teacher_weight_g: torch.Tensor, teacher_weight_v: torch.Tensor,
                epoch: int, return_entropy: bool = False):
        device = student_feats.device
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        else:
            dtype = torch.promote_types(student_feats.dtype, student_weight_v.dtype)
        with torch.autocast(device.type, enabled=False):
            student_weight = _weight_norm(student_weight_g, student_weight_v).to(dtype)
            with torch.no_grad():
                teacher_weight = _weight_norm(teacher_weight_g, teacher_weight_v).to(dtype)
                teacher_output = F.linear(teacher_feats.detach().to(dtype), teacher_weight)
            if self.resolve_impl(device) != "fused":
                student_output = F.linear(student_feats.to(dtype), student_weight)
                return super().forward(student_output, teacher_output, epoch, return_entropy)
            from fastdino.kernels.dino_head_loss import dino_head_loss

            self.sync_center()
            distributed = _distributed()
            loss, entropy, teacher_sum = dino_head_loss(
                student_feats.to(dtype), student_weight, teacher_output, self.center, self.ncrops,
                self.student_temp, self.teacher_temp(epoch), None if distributed else self.center_momentum)
            if distributed:
                self._start_center_update(teacher_sum, teacher_output.shape[0], loss)
        return (loss, entropy) if return_entropy else loss
