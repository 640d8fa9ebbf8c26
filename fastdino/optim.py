"""The student's optimizer: AdamW as in the official DINO / DINOv2, stepped with device-side inputs.

Parameter groups (`param_groups`). Every trainable parameter of the student gets three properties
(`param_multipliers`, the official DINOv2 rules of dinov2/utils/param_groups.py):
    last_layer   it sits in a module named `last_layer` (the DINO head's, an iBOT head's): such
                 groups are frozen while epoch < optim.freeze_last_layer (see freeze_mode below)
    lr_mult      layer-wise lr decay: decay ** (depth + 1 - layer_id), with the official layer ids of
                 the backbone (`vit_layer_id`): 0 for pos_embed, patch_embed, cls_token and mask_token,
                 i + 1 for block i, depth + 1 for the rest of the backbone (final norm, register
                 tokens: the official rule does not list them). Parameters outside the backbone (the
                 heads) get 1, as the official rule applied to a head on its own (no blocks) gives.
                 The patch embedding's is multiplied by optim.patch_embed_lr_mult on top.
    wd_mult      0 for biases, norms and LayerScale gammas, 1 otherwise: no decay where the DINO rule
                 says so (name ends with ".bias" or the tensor is 1-d) or the DINOv2 rule does (name
                 ends with ".bias" or contains "norm" or "gamma"). On the models here both rules give
                 the same sets, except that a BatchNorm weight of a use_bn head (1-d, which DINOv2
                 does not support) stays undecayed as in DINO.
Parameters with equal (last_layer, lr_mult, wd_mult) share a group (the official fuse_params_groups),
ordered by (last_layer, lr_mult, decayed first). With layerwise_decay 1 and patch_embed_lr_mult 1
(DINO) every lr_mult is 1 and the groups are DINO's four, in the same order and with the same
parameters as before multipliers existed (checkpointed optimizer states load unchanged):
    (body, decayed), (body, not decayed), (last layer, decayed), (last layer, not decayed)
A group dict holds "params", "last_layer" (bool), "regularized" (bool, wd_mult != 0), "lr_mult" and
"wd_mult" (Python floats, fixed at build time), plus torch's AdamW defaults.

DINOAdamW.step() reads this step's inputs, all 0-dim device tensors set by `set_inputs` (no host
synchronization, so a compiled or CUDA-graph-captured step sees new values without recompiling):
    lr, wd               from the schedules; a group uses lr * lr_mult and wd * wd_mult (the official
                         apply_optim_scheduler), computed on the device from these tensors
    skip                 1.0: skip the whole update (a non-finite loss, or gradients the grad scaler
                         found non-finite)
    last_layer_frozen    1.0: the last-layer groups are frozen, as `freeze_mode` (optim.freeze_last_layer_mode)
                         says:
                           skip     no update at all (the official DINO cancel_gradients_last_layer,
                                    which sets their gradients to None)
                           zero_lr  AdamW with lr 0 (the official DINOv2 last_layer_lr_schedule, 0 during
                                    the freeze): the weights do not change (decoupled weight decay
                                    p * (1 - 0 * wd) neither), the Adam moments and step count do
A skipped group changes nothing: no weight decay, no moment update, no step count (as torch's
found_inf).

Each group's update is one custom op (fastdino::adamw_), opaque to torch.compile:
    p <- p * (1 - lr * wd)      decoupled weight decay, decayed groups only (torch's foreach AdamW)
    torch's fused AdamW kernel with weight_decay 0, lr as a tensor and found_inf = the skip flag
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

BETAS, EPS = (0.9, 0.999), 1e-8  # torch's AdamW defaults, as the official code
# layer id 0 (official get_vit_lr_decay_rate; DINOv3's param_groups adds its storage tokens)
EMBEDDINGS = ("pos_embed", "patch_embed", "cls_token", "mask_token", "storage_tokens")
GROUP_KEYS = ("last_layer", "regularized", "lr_mult", "wd_mult")  # set at build time; a checkpoint does not change them
FREEZE_MODES = ("skip", "zero_lr")  # optim.freeze_last_layer_mode


class ParamRule(NamedTuple):
    """How one parameter is optimized."""
    last_layer: bool
    lr_mult: float
    wd_mult: float


def vit_layer_id(name: str, depth: int) -> int:
    """Official DINOv2 layer id of a ViT backbone parameter (`name` relative to the backbone, as the
    official code sees it: get_params_groups_with_decay runs on each student submodule): 0 for the
    embeddings, i + 1 for block i, depth + 1 for anything else (final norm, register tokens)."""
    parts = name.split(".")
    if parts[0] in EMBEDDINGS:
        return 0
    if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
        return int(parts[1]) + 1
    return depth + 1


def _no_weight_decay(name: str, p: torch.Tensor) -> bool:
    return name.endswith(".bias") or p.ndim <= 1 or "norm" in name or "gamma" in name


def param_multipliers(student: torch.nn.Module, layerwise_decay: float = 1.0,
                      patch_embed_lr_mult: float = 1.0) -> dict[str, ParamRule]:
    """name -> ParamRule for every named parameter of the student (a MultiCropWrapper: the
    layer-wise rule applies to `student.backbone`, a ViT with `.blocks`; see the module docstring)."""
    if not (0 < layerwise_decay <= 1 and math.isfinite(layerwise_decay)):
        raise ValueError(f"param_multipliers: layerwise_decay must be in (0, 1], got {layerwise_decay}")
    if not (patch_embed_lr_mult > 0 and math.isfinite(patch_embed_lr_mult)):
        raise ValueError(f"param_multipliers: patch_embed_lr_mult must be > 0, got {patch_embed_lr_mult}")
    blocks = getattr(getattr(student, "backbone", None), "blocks", None)
    if blocks is None and (layerwise_decay != 1 or patch_embed_lr_mult != 1):
        raise ValueError(f"param_multipliers: layer-wise lr decay needs a student with .backbone.blocks (a ViT), "
                         f"got {type(student).__name__}")
    depth = len(blocks) if blocks is not None else 0
    last = {id(p) for name, m in student.named_modules() if name.split(".")[-1] == "last_layer"
            for p in m.parameters()}
    rules = {}
    for name, p in student.named_parameters():
        lr_mult = 1.0
        if name.startswith("backbone."):
            sub = name[len("backbone."):]
            lr_mult = layerwise_decay ** (depth + 1 - vit_layer_id(sub, depth))
            if sub.split(".")[0] == "patch_embed":
                lr_mult = lr_mult * patch_embed_lr_mult
        rules[name] = ParamRule(id(p) in last, lr_mult, 0.0 if _no_weight_decay(name, p) else 1.0)
    return rules


def param_groups(student: torch.nn.Module, layerwise_decay: float = 1.0,
                 patch_embed_lr_mult: float = 1.0) -> list[dict]:
    """The student's parameter groups (module docstring): one per (last_layer, lr_mult, wd_mult),
    empty ones left out; parameters that do not require grad (weight_g of a normalized last layer, a
    frozen mask token) are not optimized."""
    rules = param_multipliers(student, layerwise_decay, patch_embed_lr_mult)
    buckets: dict[ParamRule, list] = {}
    for name, p in student.named_parameters():
        if p.requires_grad:
            buckets.setdefault(rules[name], []).append(p)
    order = sorted(buckets, key=lambda r: (r.last_layer, r.lr_mult, -r.wd_mult))
    return [{"params": buckets[r], "regularized": r.wd_mult != 0, "last_layer": r.last_layer,
             "lr_mult": r.lr_mult, "wd_mult": r.wd_mult} for r in order]


def describe_param_groups(groups: list[dict]) -> str:
    """One line for the log: how many groups, their multipliers."""
    lr = [g.get("lr_mult", 1.0) for g in groups]
    n_last = sum(bool(g.get("last_layer")) for g in groups)
    n_decayed = sum(g.get("wd_mult", 1.0 if g.get("regularized", True) else 0.0) != 0 for g in groups)
    n_params = sum(len(g["params"]) for g in groups)
    span = f"{min(lr):.4g}..{max(lr):.4g}" if lr and min(lr) != max(lr) else f"{lr[0]:.4g}" if lr else "-"
    return (f"optimizer: {len(groups)} param groups ({n_last} last layer, {n_decayed} weight-decayed), "
            f"{n_params} tensors, lr multipliers {span}")


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
    device-side lr, weight decay and skip flags (module docstring). The group entries "last_layer",
    "regularized", "lr_mult" and "wd_mult" come from param_groups; missing ones default to a plain
    decayed group (wd_mult follows "regularized" when only that is given). They are fixed at build
    time: load_state_dict keeps them (the config decides them, not the checkpoint).

    static_state: create every parameter's state now and keep each group's tensor lists, so step()
    is the same Python every time (torch.compile traces it once; a CUDA graph keeps its addresses).
    DeepSpeed's ZeRO optimizers swap the groups' parameters for flat partitions after construction
    and may step one group at a time (a one-group param_groups list): it passes static_state=False
    (state made lazily, lists rebuilt every step), and each group's multipliers are read from the
    group itself, never from its position.

    freeze_mode: how the last-layer groups are frozen while last_layer_frozen is 1 (module docstring).
    beta2: Adam's second-moment decay (optim.adamw_beta2; torch's 0.999 by default, DINOv3's 7B: 0.99)."""

    def __init__(self, groups: list[dict], static_state: bool = True, freeze_mode: str = "skip",
                 beta2: float = BETAS[1]):
        if freeze_mode not in FREEZE_MODES:
            raise ValueError(f"DINOAdamW: freeze_mode={freeze_mode!r} is not one of {list(FREEZE_MODES)}")
        if not 0.0 < beta2 < 1.0:
            raise ValueError(f"DINOAdamW: beta2 must be in (0, 1), got {beta2}")
        for g in groups:
            _set_group_keys(g)
        super().__init__(groups, lr=0.0, betas=(BETAS[0], beta2), eps=EPS, weight_decay=0.0, fused=True)
        self.static_state = static_state
        self.freeze_mode = freeze_mode
        self.inputs: tuple | None = None
        self._lists: list | None = None
        self._group_keys = [{k: g[k] for k in GROUP_KEYS} for g in self.param_groups]
        # the distinct lr multipliers other than 1: one multiply per step makes every group's lr
        lr_mults = sorted({g["lr_mult"] for g in self.param_groups} - {1.0})
        self._lr_mult_index = {m: i for i, m in enumerate(lr_mults)}
        first = next((p for g in self.param_groups for p in g["params"]), None)
        self._lr_mults = (torch.tensor(lr_mults, dtype=torch.float32, device=first.device if first is not None else None)
                          if lr_mults else None)
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
        saved = state_dict.get("param_groups", [])
        if len(saved) != len(self.param_groups):
            raise ValueError(f"has {len(saved)} param groups, this config makes {len(self.param_groups)} (they follow "
                             "optim.layerwise_decay and optim.patch_embed_lr_mult)")
        super().load_state_dict(state_dict)  # torch takes the saved group dicts: put the built entries back
        for group, keys in zip(self.param_groups, self._group_keys):
            group.update(keys)
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
        scaled_lrs = None  # lr * each distinct multiplier, made on first use (one kernel per step)
        for i, group in enumerate(self.param_groups):
            params, grads, exp_avgs, exp_avg_sqs, steps = self._lists[i] if self.static_state else self._group_lists(group)
            if not params:
                continue
            if self.static_state:  # read now, not kept: a compiled backward may hand back new view objects
                grads = [p.grad for p in params]
            device = params[0].device
            lr_mult = group.get("lr_mult", 1.0)
            wd_mult = group.get("wd_mult", 1.0 if group.get("regularized", True) else 0.0)
            group_lr, group_wd = lr, wd
            if lr_mult != 1.0:
                k = self._lr_mult_index.get(lr_mult)
                if k is None:  # a multiplier the optimizer was not built with (add_param_group)
                    group_lr = lr * lr_mult
                else:
                    if scaled_lrs is None:
                        scaled_lrs = lr * self._lr_mults.to(lr.device)
                    group_lr = scaled_lrs[k]
            if wd_mult not in (0.0, 1.0):
                group_wd = wd * wd_mult
            flag = skip
            if group["last_layer"]:
                if self.freeze_mode == "skip":
                    flag = torch.maximum(skip, frozen)
                else:  # zero_lr: this step's lr times 0 while frozen (times 1 after: the same lr, exactly)
                    group_lr = group_lr * (1 - frozen)
            adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, group_lr.to(device), group_wd.to(device),
                   flag.to(device), wd_mult != 0.0, *group["betas"], group["eps"])
        return None


def _set_group_keys(group: dict) -> None:
    """Defaults of a group given by hand: a decayed body group, lr multiplier 1."""
    if "wd_mult" in group and "regularized" in group and bool(group["regularized"]) != (group["wd_mult"] != 0):
        raise ValueError(f"DINOAdamW: a group has regularized={group['regularized']} but wd_mult={group['wd_mult']}")
    group.setdefault("regularized", group.get("wd_mult", 1.0) != 0)
    group.setdefault("wd_mult", 1.0 if group["regularized"] else 0.0)
    group.setdefault("last_layer", False)
    group.setdefault("lr_mult", 1.0)
    for key in ("lr_mult", "wd_mult"):
        value = group[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"DINOAdamW: a group's {key} must be a finite float >= 0, got {value!r}")
        group[key] = float(value)
