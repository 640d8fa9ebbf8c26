"""The student's optimizer: AdamW with weight decay on weights only (not on biases and norms).

The weight decay of group 0 follows the cosine schedule; group 1 (biases, norms, 1-d params) never
decays. torch's fused AdamW is the default: one launch for all parameters, and it honours a device
`found_inf` flag, so a non-finite step is skipped with no host synchronization.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("fastdino")


def get_params_groups(model: torch.nn.Module) -> list[dict]:
    """[regularized weights, not-regularized biases/norms], as the official get_params_groups."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen weights (weight_g of a normalized last layer)
        if name.endswith(".bias") or param.ndim <= 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def build_optimizer(param_groups: list[dict], name: str, device: torch.device) -> torch.optim.Optimizer:
    if name == "apex_adamw":
        try:
            from apex.optimizers import FusedAdam
        except ImportError:
            raise ValueError("config key 'optim.optimizer': apex_adamw needs NVIDIA apex, which is not installed")
        return FusedAdam(param_groups, lr=0.0, adam_w_mode=True)
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(param_groups, lr=0.0, fused=fused)  # lr and wd are set every step


def set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        if i == 0:  # only the first group is regularized
            group["weight_decay"] = wd
