"""Per-iteration schedules of the DINO recipe, as arrays indexed by the global step, and the device
table the step reads them from.

    lr           linear warmup from 0, then cosine to min_lr   (peak: `peak_lr`, optim.lr_scaling), or with
                 optim.lr_schedule=constant the peak lr after the warmup (DINOv3), or with rise a half cosine
                 from 0 up to the peak over the warmup epochs, then the peak (DINOv3's high-resolution
                 adaptation: linear_warmup_cosine_decay with start = peak = 0, end = its lr, cosine_epochs)
    wd           cosine from weight_decay to weight_decay_end (constant when equal)
    momentum     cosine from momentum_teacher to momentum_teacher_end (1; constant when equal: DINOv3)
    teacher_temp linear warmup over warmup_teacher_temp_epochs, then constant; loss.teacher_temp_schedule:
                 per_epoch      one value per epoch (DINO: DINOLoss.teacher_temp_schedule, np.linspace over
                                the warmup epochs)
                 per_iteration  one value per iteration (DINOv2: build_schedulers' CosineScheduler with
                                warmup_iters = warmup epochs x iterations per epoch: np.linspace over the
                                warmup iterations, its last one at teacher_temp)
    gram_weight  0 before gram.start_epoch, then a half cosine from 0 to gram.weight over gram.ramp_epochs,
                 then gram.weight (DINOv3's gram loss_weight_schedule: linear_warmup_cosine_decay with
                 start = peak = 0 until the Gram phase, cosine to its end value, then constant)
    dino_local_weight  with loss.reweight_local (DINOv3's dino.reweight_dino_local_loss): the weight of the DINO
                 term's local-crop pairs (fastdino/losses/dino.py), DINOv3's local_loss_weight_schedule:
                 linear_warmup_cosine_decay from loss.local_weight_start to _peak over local_weight_warmup_epochs,
                 a half cosine to _end over local_weight_cosine_epochs (-1: the rest of the run), then _end;
                 0 in the table (and not logged) when off
    last_layer_frozen  1 while epoch < freeze_last_layer (the heads' last layers: no update, or lr 0 under
                 optim.freeze_last_layer_mode=zero_lr; fastdino/optim.py)
Same arrays as the official `utils.cosine_scheduler` and DINOLoss.teacher_temp_schedule (DINO), and
dinov2/utils/utils.py CosineScheduler (DINOv2). An "epoch" here is the loader's steps per epoch:
data.epoch_length iterations (DINOv2 / DINOv3's OFFICIAL_EPOCH_LENGTH, 1250 in their configs), or with
0 one pass over the data (DINO).

The peak lr scales with the global batch B (`peak_lr`):
    linear_256   lr * B / 256           (DINO: main_dino.py's linear scaling rule)
    sqrt_1024    lr * sqrt(B / 1024)    (DINOv2: apply_scaling_rules_to_cfg, scaling_rule sqrt_wrt_1024)
    sqrt_1024_x4 lr * 4 * sqrt(B / 1024) (DINOv3: build_schedulers_v2, scaling_rule sqrt_wrt_1024)
min_lr is absolute under every rule (neither DINO nor DINOv2 scales it). Per-parameter-group lr and
weight decay multipliers (layer-wise decay) are applied by the optimizer (fastdino/optim.py).

The step never reads a Python float: before each step the training loop copies column `it` of
`Schedules.table(device)` into the step's hyper-parameter tensor (device to device, no host sync),
so a compiled or CUDA-graph-captured step sees new values without recompiling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

HYPERPARAMS = ("lr", "wd", "momentum", "teacher_temp", "last_layer_frozen", "gram_weight",
               "dino_local_weight")  # rows of the table
LR, WD, MOMENTUM, TEACHER_TEMP, LAST_LAYER_FROZEN, GRAM_WEIGHT, DINO_LOCAL_WEIGHT = range(len(HYPERPARAMS))
LR_SCALING = ("linear_256", "sqrt_1024", "sqrt_1024_x4")
LR_SCHEDULES = ("cosine", "constant", "rise")
TEACHER_TEMP_SCHEDULES = ("per_epoch", "per_iteration")


def peak_lr(lr: float, global_batch: int, rule: str = "linear_256") -> float:
    """The peak (post-warmup) lr for `global_batch` images per step under optim.lr_scaling `rule`."""
    if rule == "linear_256":
        return lr * global_batch / 256.0
    if rule == "sqrt_1024":
        return lr * math.sqrt(global_batch / 1024.0)
    if rule == "sqrt_1024_x4":  # DINOv3's build_schedulers_v2: lr_peak *= 4 * sqrt(B / 1024)
        return lr * 4.0 * math.sqrt(global_batch / 1024.0)
    raise ValueError(f"peak_lr: unknown lr scaling rule {rule!r} (choose one of {list(LR_SCALING)})")


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """warmup_epochs*niter_per_ep linear steps to base_value, then a half cosine to final_value."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def teacher_temp_schedule(warmup_teacher_temp: float, teacher_temp: float, warmup_epochs: int,
                          epochs: int) -> np.ndarray:
    """Teacher temperature per epoch: linear from warmup_teacher_temp to teacher_temp over
    warmup_epochs, then constant (the official DINOLoss schedule)."""
    return np.concatenate((np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs),
                           np.ones(max(epochs - warmup_epochs, 0)) * teacher_temp))


def teacher_temp_schedule_per_iteration(warmup_teacher_temp: float, teacher_temp: float, warmup_epochs: int,
                                        epochs: int, niter_per_ep: int) -> np.ndarray:
    """Teacher temperature per iteration, as DINOv2's build_schedulers: CosineScheduler(base_value =
    final_value = teacher_temp, warmup_iters = total_iters = warmup_epochs * niter_per_ep,
    start_warmup_value = warmup_teacher_temp), i.e. np.linspace(warmup_teacher_temp, teacher_temp,
    warmup_iters) (the last warmup iteration is teacher_temp), then teacher_temp (its final_value past
    total_iters)."""
    warmup_iters = warmup_epochs * niter_per_ep
    return np.concatenate((np.linspace(warmup_teacher_temp, teacher_temp, warmup_iters),
                           np.ones(max(epochs * niter_per_ep - warmup_iters, 0)) * teacher_temp))


def gram_weight_schedule(weight: float, start_epoch: int, ramp_epochs: int, epochs: int,
                         niter_per_ep: int) -> np.ndarray:
    """Gram loss weight per iteration: 0 before start_epoch, then weight * (1 - cos(pi t)) / 2 with
    t = (it - start) / ramp over ramp_epochs of iterations, then weight."""
    its = np.arange(epochs * niter_per_ep)
    start, ramp = start_epoch * niter_per_ep, ramp_epochs * niter_per_ep
    t = np.clip((its - start) / max(ramp, 1), 0.0, 1.0) if ramp > 0 else (its >= start).astype(np.float64)
    return np.where(its < start, 0.0, weight * 0.5 * (1.0 - np.cos(np.pi * t)))


def linear_warmup_cosine_decay(start: float, peak: float, end: float, warmup_iters: int, total_iters: int,
                               cosine_iters: int | None = None) -> np.ndarray:
    """total_iters values: linear from start towards peak over warmup_iters (peak itself first at the
    cosine's start), a half cosine from peak to end over cosine_iters (both included; None: all the
    iterations after the warmup), then end. DINOv3's dinov3/train/cosine_lr_scheduler.py
    linear_warmup_cosine_decay (np.linspace(start, peak, warmup, endpoint=False), the cosine over
    np.linspace(0, pi, cosine_iters), a constant tail)."""
    if cosine_iters is None:
        cosine_iters = total_iters - warmup_iters
    if warmup_iters < 0 or cosine_iters < 0 or warmup_iters + cosine_iters > total_iters:
        raise ValueError(f"linear_warmup_cosine_decay: warmup ({warmup_iters}) and cosine ({cosine_iters}) "
                         f"iterations must be >= 0 and fit in the {total_iters} iterations")
    its = np.arange(total_iters, dtype=np.float64)
    warmup = start + (peak - start) * its / max(warmup_iters, 1)
    t = np.clip((its - warmup_iters) / max(cosine_iters - 1, 1), 0.0, 1.0)  # 0 .. 1 over the cosine
    cosine = end + (peak - end) * 0.5 * (1.0 + np.cos(np.pi * t))
    return np.where(its < warmup_iters, warmup, np.where(its < warmup_iters + cosine_iters, cosine, end))


@dataclass
class Schedules:
    lr: np.ndarray  # per iteration
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray  # per epoch, or per iteration when teacher_temp_per_iteration
    freeze_last_layer: int  # epochs
    niter_per_ep: int
    teacher_temp_per_iteration: bool = False  # loss.teacher_temp_schedule == "per_iteration"
    gram_weight: np.ndarray | None = None  # per iteration; None: no Gram anchoring (all 0)
    dino_local_weight: np.ndarray | None = None  # per iteration; None: loss.reweight_local off (a row of 0)

    @classmethod
    def from_config(cls, cfg, global_batch: int, niter_per_ep: int) -> "Schedules":
        o, lo = cfg.optim, cfg.loss
        peak = peak_lr(o.lr, global_batch, o.lr_scaling)  # min_lr is not scaled (as DINO and DINOv2)
        rule = getattr(lo, "teacher_temp_schedule", "per_epoch")
        if rule not in TEACHER_TEMP_SCHEDULES:
            raise ValueError(f"Schedules: unknown teacher_temp_schedule {rule!r} (choose one of "
                             f"{list(TEACHER_TEMP_SCHEDULES)})")
        per_iteration = rule == "per_iteration"
        if per_iteration:
            teacher_temp = teacher_temp_schedule_per_iteration(lo.warmup_teacher_temp, lo.teacher_temp,
                                                               lo.warmup_teacher_temp_epochs, o.epochs, niter_per_ep)
        else:
            teacher_temp = teacher_temp_schedule(lo.warmup_teacher_temp, lo.teacher_temp,
                                                 lo.warmup_teacher_temp_epochs, o.epochs)
        lr_schedule = getattr(o, "lr_schedule", "cosine")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"Schedules: unknown lr_schedule {lr_schedule!r} (choose one of {list(LR_SCHEDULES)})")
        total = o.epochs * niter_per_ep
        if lr_schedule == "rise":  # 0 -> peak on a half cosine over the warmup epochs, then the peak
            lr = linear_warmup_cosine_decay(0.0, 0.0, peak, 0, total, o.warmup_epochs * niter_per_ep)
        else:  # constant: the cosine from peak to peak
            lr = cosine_scheduler(peak, peak if lr_schedule == "constant" else o.min_lr, o.epochs, niter_per_ep,
                                  o.warmup_epochs)
        local_weight = None
        if getattr(lo, "reweight_local", False):  # DINOv3: iterations per epoch = its OFFICIAL_EPOCH_LENGTH
            cosine_epochs = lo.local_weight_cosine_epochs
            local_weight = linear_warmup_cosine_decay(
                lo.local_weight_start, lo.local_weight_peak, lo.local_weight_end,
                lo.local_weight_warmup_epochs * niter_per_ep, o.epochs * niter_per_ep,
                None if cosine_epochs < 0 else cosine_epochs * niter_per_ep)
        return cls(
            lr=lr,
            wd=cosine_scheduler(o.weight_decay, o.weight_decay_end, o.epochs, niter_per_ep),
            momentum=cosine_scheduler(o.momentum_teacher, getattr(o, "momentum_teacher_end", 1.0), o.epochs,
                                      niter_per_ep),
            teacher_temp=teacher_temp,
            freeze_last_layer=o.freeze_last_layer,
            niter_per_ep=niter_per_ep,
            teacher_temp_per_iteration=per_iteration,
            gram_weight=(gram_weight_schedule(cfg.gram.weight, cfg.gram.start_epoch, cfg.gram.ramp_epochs, o.epochs,
                                              niter_per_ep) if getattr(cfg, "gram", None) and cfg.gram.weight > 0 else None),
            dino_local_weight=local_weight,
        )

    def gram_weights(self, its: np.ndarray) -> np.ndarray:
        return np.zeros(np.shape(its)) if self.gram_weight is None else self.gram_weight[its]

    def dino_local_weights(self, its: np.ndarray) -> np.ndarray:
        return np.zeros(np.shape(its)) if self.dino_local_weight is None else self.dino_local_weight[its]

    def _teacher_temps(self, its: np.ndarray) -> np.ndarray:
        """The teacher temperature of steps `its` (the last entry past the end of the array)."""
        index = its if self.teacher_temp_per_iteration else its // self.niter_per_ep
        return self.teacher_temp[np.minimum(index, len(self.teacher_temp) - 1)]

    def values(self, it: int) -> dict:
        """The hyper-parameters of step `it` as host floats (for the metrics log)."""
        epoch = it // self.niter_per_ep
        out = {"lr": float(self.lr[it]), "wd": float(self.wd[it]), "momentum": float(self.momentum[it]),
               "teacher_temp": float(self._teacher_temps(np.array(it))),
               "last_layer_frozen": float(epoch < self.freeze_last_layer)}
        if self.gram_weight is not None:
            out["gram_weight"] = float(self.gram_weight[it])
        if self.dino_local_weight is not None:
            out["dino_local_weight"] = float(self.dino_local_weight[it])
        return out

    def table(self, device) -> torch.Tensor:
        """(len(HYPERPARAMS), total iterations) fp32 on `device`: column `it` is step it's values."""
        its = np.arange(len(self.lr))
        epochs = its // self.niter_per_ep
        rows = [self.lr, self.wd, self.momentum, self._teacher_temps(its),
                (epochs < self.freeze_last_layer).astype(np.float64), self.gram_weights(its),
                self.dino_local_weights(its)]
        return torch.tensor(np.stack(rows), dtype=torch.float32).to(device)
