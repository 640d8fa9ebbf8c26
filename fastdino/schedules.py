"""Per-iteration schedules of the DINO recipe, as arrays indexed by the global step.

    lr        linear warmup from 0, then cosine to min_lr   (peak = lr * global_batch / 256)
    wd        cosine from weight_decay to weight_decay_end
    momentum  cosine from momentum_teacher to 1             (teacher EMA)
Same arrays as the official `utils.cosine_scheduler`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


@dataclass
class Schedules:
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray

    @classmethod
    def from_config(cls, optim, global_batch: int, niter_per_ep: int) -> "Schedules":
        peak_lr = optim.lr * global_batch / 256.0  # linear scaling rule
        return cls(
            lr=cosine_scheduler(peak_lr, optim.min_lr, optim.epochs, niter_per_ep, optim.warmup_epochs),
            wd=cosine_scheduler(optim.weight_decay, optim.weight_decay_end, optim.epochs, niter_per_ep),
            momentum=cosine_scheduler(optim.momentum_teacher, 1.0, optim.epochs, niter_per_ep),
        )
