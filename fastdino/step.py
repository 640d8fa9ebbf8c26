"""One DINO training step (Algorithm 1 of the paper), the same for every backend and recipe.

    targets  <- teacher targets of the global crops (centering or Sinkhorn-Knopp; no grad), and with
                iBOT masks those of the global crops' masked patch tokens (the teacher sees them unmasked)
                and, with Gram anchoring, the Gram teacher's patch tokens of the Gram crops (no grad)
    loss     <- sum of the recipe's weighted terms on the student's outputs of all crops (the student
                sees the masked patches as the mask token)
    student  <- backward, per-tensor clipping, AdamW (lr, wd schedules; last layer frozen early)
    teacher  <- m * teacher + (1 - m) * student
    center   <- m_c * center + (1 - m_c) * mean of the teacher logits over all ranks (and the iBOT center)

The step holds no Python-side state and never reads a value on the host: this step's lr, weight
decay, teacher momentum, teacher temperature and last-layer flag are the device tensor `s.hp` (the
training loop copies them in, fastdino/schedules.py), the counters live on the device, gradients are
zeroed in place. So torch.compile traces it as one graph (train.compile_step) and a CUDA graph can
capture it. Where parameters and gradients live (one process, DDP, DeepSpeed ZeRO) is the backend's
business (fastdino/backend.py, fastdino/ds.py), never what the step computes.

Bad steps: a non-finite loss on any rank skips the optimizer, the teacher EMA and the center update
of that step on every rank (device flags), and is counted; the training loop stops at the next log
step naming it. Non-finite gradients with a finite loss skip the optimizer; under fp16 that is a grad
scaler overflow (the scale backs off, EMA and center still run, the run goes on, as the official
loop), under fp32/bf16 it is a bad step too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from fastdino.schedules import LAST_LAYER_FROZEN, LR, MOMENTUM, TEACHER_TEMP, WD

COUNTERS = ("step", "bad_steps", "first_bad_step", "skipped_updates")  # int64 on the device
STEP, BAD_STEPS, FIRST_BAD_STEP, SKIPPED_UPDATES = range(len(COUNTERS))


@dataclass
class StepState:
    backend: object  # fastdino.backend.Backend: student/teacher forwards, backward, optimizer, EMA
    targets: nn.Module  # teacher targets (fastdino/targets.py): q and statistics, center state
    patch_targets: nn.Module | None  # iBOT: the masked patch tokens' targets (their own center), or None
    terms: nn.ModuleList  # loss terms (fastdino/losses), each with .name and .weight
    hp: torch.Tensor  # (len(schedules.HYPERPARAMS),) fp32: this step's hyper-parameters
    counters: torch.Tensor  # (len(COUNTERS),) int64
    teacher_rows: int  # teacher rows per step over all ranks (2 * batch * world size)
    world_size: int
    autocast_dtype: torch.dtype | None  # bf16 / fp16 forwards, None: fp32
    nonfinite_grads_are_bad: bool  # False under fp16 (an overflow is the grad scaler's business)
    # DINOv3 Gram anchoring (fastdino/gram.py): the Gram teacher this step runs, on the loader's last 2 crops;
    # None (no Gram crops, no Gram term) before gram.start_epoch: the loop sets it each step
    gram_teacher: nn.Module | None = None

    def load_hyperparams(self, table: torch.Tensor, it: int) -> None:
        """Copy step `it`'s column of the schedule table into hp (device to device, no sync)."""
        self.hp.copy_(table[:, it])


def _no_mark(phase: str) -> None:
    pass


def train_step(s: StepState, crops: list[torch.Tensor], masks=None, mark=_no_mark) -> dict[str, torch.Tensor]:
    """One iteration on crop-major crops (2 global, then the locals) and, for iBOT, the batch's
    masks (fastdino.data.masking.MaskBatch on the device). Returns device tensors: the total loss,
    each term's value and the mean teacher entropy (read by the host on log steps only).
    `mark(phase)` is called as each phase ends (benchmarks/throughput.py records CUDA events there)."""
    hp, b = s.hp, s.backend
    if s.gram_teacher is not None:  # the loader's last two crops are the Gram teacher's (data.gram_crop_size)
        crops, gram_crops = crops[:-2], crops[-2:]
    device_type = crops[0].device.type
    autocast = torch.autocast(device_type, dtype=s.autocast_dtype or torch.float32,
                              enabled=s.autocast_dtype is not None)

    b.zero_grad()  # in place, before the forward: the gradient buffers are not mutated between forward
    # and backward (torch.compile's tracing of the backward needs that of the views p.grad)

    # ============ teacher: targets from the two global crops (and their masked patch tokens) ============
    with torch.no_grad(), autocast:
        teacher = b.teacher(crops[:2]) if masks is None else b.teacher(crops[:2], masks, mask_input=False)
    teacher = teacher if isinstance(teacher, dict) else {"cls": teacher}
    q, teacher_stats = s.targets(teacher["cls"], hp[TEACHER_TEMP])  # q: probabilities, or LogitTargets
    targets, patch_colsum = {"cls": q, "hp": hp}, hp.new_zeros(0)  # hp: this step's schedule values
    if masks is not None:
        real = torch.arange(masks.upper_bound, device=hp.device) < masks.n_masked  # the rest is padding
        targets["patch"], patch_stats = s.patch_targets(teacher["patch"], hp[TEACHER_TEMP], real)
        targets["patch_weights"] = masks.mask_weights
        targets["masks"] = masks  # Gram with gram.tokens_used masked / unmasked selects by them
        patch_colsum = patch_stats.get("colsum", patch_colsum)
    if s.gram_teacher is not None:  # its patch tokens of the same crops at its resolution, on the student's grid
        with torch.no_grad(), autocast:
            targets["gram"] = s.gram_teacher(gram_crops, crops[0].shape[-1])  # this step's global crop size
    mark("teacher_forward")

    # ============ student forward and the loss terms (fp32) ============
    with autocast:  # head outputs, or a dict of them and the features / patch outputs terms ask for
        student = b.student(crops) if masks is None else b.student(crops, masks)
    student = student if isinstance(student, dict) else {"cls": student}
    mark("student_forward")
    terms = [t for t in s.terms if getattr(t, "needs", None) in (None, *targets)]  # Gram: only while its teacher runs
    values = {term.name: term(student, targets) for term in terms}
    loss = sum(weight(term, hp) * values[term.name] for term in terms)
    mark("loss")

    # ============ one all-reduce: the centers' column sums (centering) and the non-finite-loss flag ============
    colsum = teacher_stats.get("colsum", hp.new_zeros(0))  # Sinkhorn-Knopp keeps no center: nothing to sum
    reduced = b.all_reduce_(torch.cat([colsum.float(), patch_colsum.float(),
                                       (~torch.isfinite(loss.detach())).float().view(1)]))
    loss_bad = reduced[-1] > 0

    # ============ student update: backward, per-tensor clipping, AdamW ============
    b.backward(loss)
    mark("backward")
    grads_bad = b.step(hp[LR], hp[WD], loss_bad, hp[LAST_LAYER_FROZEN])  # skips on device where told or non-finite
    mark("optimizer")
    bad = loss_bad | (grads_bad & s.nonfinite_grads_are_bad)

    # ============ teacher EMA ============
    b.ema_(torch.where(bad, torch.ones_like(hp[MOMENTUM]), hp[MOMENTUM]))
    mark("teacher_update")

    # ============ center EMA ============
    s.targets.update_(reduced[:colsum.numel()], s.teacher_rows, ~bad)
    if masks is not None:  # iBOT's center: the mean of the ranks' masked-token means
        s.patch_targets.update_(reduced[colsum.numel():-1], s.world_size, ~bad)

    # ============ bookkeeping on the device ============
    c = s.counters
    first = (c[BAD_STEPS] == 0) & bad
    c[FIRST_BAD_STEP] = torch.where(first, c[STEP], c[FIRST_BAD_STEP])
    c[BAD_STEPS] += bad.long()
    c[SKIPPED_UPDATES] += (grads_bad & ~bad).long()
    c[STEP] += 1
    out = {"loss": loss.detach(), "teacher_entropy": teacher_stats["entropy"].float().mean()}
    out.update({name: value.detach() for name, value in values.items()})
    return out


def weight(term: nn.Module, hp: torch.Tensor):
    """A term's weight in the loss: its own, times its row of the schedule table if it has one (Gram)."""
    row = getattr(term, "schedule_row", None)
    return term.weight if row is None else hp[row] * term.weight


def new_counters(device) -> torch.Tensor:
    c = torch.zeros(len(COUNTERS), dtype=torch.int64, device=device)
    c[FIRST_BAD_STEP] = -1
    return c


def compile_step(fn=train_step):
    """train.compile_step: the whole step as one torch.compile graph (forward, backward through
    Dynamo's autograd tracing, optimizer, EMA, center), static shapes; a graph break is an error."""
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        from fastdino.config import ConfigError

        raise ConfigError(f"config key 'train.compile_step': torch {torch.__version__} cannot trace the backward "
                          "into the graph (needs a torch with torch._dynamo.config.trace_autograd_ops); use model.compile")
    torch._dynamo.config.trace_autograd_ops = True  # trace loss.backward() into the graph
    return torch.compile(fn, fullgraph=True, dynamic=False)
