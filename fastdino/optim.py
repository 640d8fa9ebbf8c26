"""The student's optimizer: AdamW as in the official DINO, stepped with device-side inputs.

Parameter groups (`param_groups`): weights are decayed, biases and 1-d parameters (norms) are not (the
official get_params_groups rule), and the head's last layer sits in groups of its own so that it can
be frozen for the first `optim.freeze_last_layer` epochs. Four groups:
    (body, decayed), (body, not decayed), (last layer, decayed), (last layer, not decayed)

DINOAdamW.step() reads this step's inputs, all 0-dim device tensors set by `set_inputs` (no host
synchronization, so a compiled or CUDA-graph-captured step sees new values without recompiling):
    lr, wd               from the schedules
    skip                 1.0: skip the whole update (a non-finite loss, or gradients the grad scaler
                         found non-finite)
    last_layer_frozen    1.0: the last-layer groups get no update at all
A skipped group changes nothing: no weight decay, no moment update, no step count (as the official
cancel_gradients_last_layer, which sets their gradients to None, and as torch's found_inf).

Each group's update is one custom op (fastdino::adamw_), opaque to torch.compile:
    p <- p * (1 - lr * wd)      decoupled weight decay, decayed groups only (torch's foreach AdamW)
    torch's fused AdamW kernel with weight_decay 0, lr as a tensor and found_inf = the skip flag
"""
from __future__ import annotations

import torch

BETAS, EPS = (0.9, 0.999), 1e-8  # torch's AdamW defaults, as the official code


def param_groups(student: torch.nn.Module) -> list[dict]:
    """The four groups described above (empty ones left out); parameters that do not require grad
    (weight_g of a normalized last layer) are not optimized."""
    last = {id(p) for p in student.head.last_layer.parameters()}
    buckets: dict = {}
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        regularized = not (name.endswith(".bias") or p.ndim <= 1)
        buckets.setdefault((id(p) in last, regularized), []).append(p)
    groups = []
    for is_last, regularized in ((False, True), (False, False), (True, True), (True, False)):
        if buckets.get((is_last, regularized)):
            groups.append({"params": buckets[(is_last, regularized)], "regularized": regularized,
                           "last_layer": is_last})
    return groups


@torch.library.custom_op("fastdino::adamw_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "steps"))
def adamw_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
           exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], lr: torch.Tensor, wd: torch.Tensor,
           skip: torch.Tensor, decay: bool, beta1: float, beta2: float, eps: float) -> None:
    """One AdamW update of a group; nothing changes where skip (0-dim float) is 1."""
    if not params:
        return
    skip = skip.to(dtype=torch.float32)
    if decay:  # p * (1 - lr wd), or p * 1 on a skipped step
        torch._foreach_mul_(params, 1 - lr * wd * (1 - skip))
    torch._foreach_add_(steps, 1)
    torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                        weight_decay=0.0, eps=eps, amsgrad=False, maximize=False, grad_scale=None, found_inf=skip)
    torch._foreach_sub_(steps, [skip] * len(steps))  # a skipped update does not count (as torch's found_inf)


@adamw_.register_fake
def _adamw_fake(params, grads, exp_avgs, exp_avg_sqs, steps, lr, wd, skip, decay, beta1, beta2, eps):
    return None


class DINOAdamW(torch.optim.AdamW):
    """torch's fused AdamW (its state layout, state_dict and lazy state initialisation), stepped with
    device-side lr, weight decay and skip flags (module docstring). The group flags "regularized" and
    "last_layer" come from param_groups.

    static_state: create every parameter's state now and keep each group's tensor lists, so step()
    is the same Python every time (torch.compile traces it once; a CUDA graph keeps its addresses).
    DeepSpeed's ZeRO optimizers swap the groups' parameters for flat partitions after construction:
    it passes static_state=False (state made lazily, lists rebuilt every step)."""

    def __init__(self, groups: list[dict], static_state: bool = True):
        for g in groups:
            g.setdefault("regularized", True)
            g.setdefault("last_layer", False)
        super().__init__(groups, lr=0.0, betas=BETAS, eps=EPS, weight_decay=0.0, fused=True)
        self.static_state = static_state
        self.inputs: tuple | None = None
        self._lists: list | None = None
        if static_state:
            self._build_lists(init=True)

    def _group_lists(self, group: dict) -> tuple:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, [], steps)
        return params, grads, exp_avgs, exp_avg_sqs, steps

    def _build_lists(self, init: bool = False) -> None:
        if init:  # state for every parameter, as the first step would make it (zero gradients attached if none)
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
        self._lists = [self._group_lists(group) for group in self.param_groups]

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if self.static_state:  # the loaded state tensors replace the ones the lists held
            self._build_lists()

    def set_inputs(self, lr: torch.Tensor, wd: torch.Tensor, skip: torch.Tensor,
                   last_layer_frozen: torch.Tensor) -> None:
        """This step's inputs (0-dim device tensors), read by the next step()."""
        self.inputs = (lr, wd, skip, last_layer_frozen)

    @torch.no_grad()
    def step(self, closure=None):
        if self.inputs is None:
            raise RuntimeError("DINOAdamW.step: call set_inputs(lr, wd, skip, last_layer_frozen) first")
        lr, wd, skip, frozen = self.inputs
        for i, group in enumerate(self.param_groups):
            params, grads, exp_avgs, exp_avg_sqs, steps = self._lists[i] if self.static_state else self._group_lists(group)
            if not params:
                continue
            if self.static_state:  # read now, not kept: a compiled backward may hand back new view objects
                grads = [p.grad for p in params]
            device = params[0].device
            flag = torch.maximum(skip, frozen) if group["last_layer"] else skip
            adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, lr.to(device), wd.to(device), flag.to(device),
                   group["regularized"], *group["betas"], group["eps"])
        return None
