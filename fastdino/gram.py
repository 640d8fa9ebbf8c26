"""Gram anchoring (DINOv3): the Gram teacher and when it is (re)taken from the EMA teacher.

The Gram term (fastdino/losses/gram.py) holds the patch-to-patch similarity (Gram) matrix of the
student's global crops to that of a Gram teacher: a frozen copy of the EMA teacher's backbone taken
earlier in training, fed the same crop boxes at a higher resolution (data.gram_crop_size, no
photometric distortions; fastdino/data/augment.py), its patch features resized to the student's patch
grid. As the official SSLMetaArch (dinov3/train/ssl_meta_arch.py, get_gram_teacher_output):

    T   = gram_backbone(gram crops)["x_norm_patchtokens"]       (2B, Pg, D), Pg = (S_gram / p)^2
    T  <- bicubic resize of T as a (2B, D, hg, hg) image to the student grid (hs, hs), no antialias,
          align_corners=False                                   (2B, Ps, D)
    S   = student(global crops, iBOT-masked)["x_norm_patchtokens"]   (2B, Ps, D)
    S, T <- S[masks], T[masks] (gram.tokens_used=masked) or S[~masks], T[~masks] (unmasked): the (n, D)
          patch tokens the student saw masked / unmasked, one Gram matrix over the rank's batch
          (fastdino/losses/gram.py keeps static shapes: zeroed rows, the mean rescaled to n^2)
    loss = GramLoss(S, T)  (normalized features; per image or over the rank's batch)

When (gram config section, epochs of the data's steps):
    - before gram.start_epoch: no Gram teacher forward and no Gram term (it costs nothing but the
      frozen copy's memory; the loader still makes the Gram crops);
    - at the first step of gram.start_epoch the Gram teacher becomes the EMA teacher of that moment
      (official gram_load_ema_teacher), unless gram.teacher_checkpoint gave it its first weights;
    - then every gram.update_every epochs it is refreshed from the EMA teacher (official update_gram
      with m = 0, gram.rep_update), at most gram.max_updates times (0: no limit);
    - its weight in the loss: the schedule table's gram_weight row (fastdino/schedules.py).
`load_iterations` is a pure function of the config, so a resumed run reloads at the same steps; the
Gram teacher's weights are saved in checkpoints ("gram_teacher") for the steps in between.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


class GramTeacher(nn.Module):
    """A frozen backbone (the EMA teacher's architecture); forward(gram crops) -> its normed patch
    tokens resized to the student's `student_grid` x `student_grid` patches, (n*B, student_grid^2, D)."""

    def __init__(self, backbone: nn.Module, student_grid: int):
        super().__init__()
        self.backbone = backbone
        self.student_grid = int(student_grid)
        self.backbone.requires_grad_(False)
        self.train(False)

    @classmethod
    def like(cls, teacher_backbone: nn.Module, student_grid: int) -> "GramTeacher":
        """A copy of the teacher's backbone (its weights too: replaced when the Gram phase starts)."""
        return cls(copy.deepcopy(teacher_backbone), student_grid)

    def train(self, mode: bool = True) -> "GramTeacher":
        return super().train(False)  # always eval (no drop path, no dropout), as the official gram_teacher.eval()

    @torch.no_grad()
    def load_backbone_(self, state_dict: dict) -> None:
        """Take these backbone weights (the EMA teacher's, or a checkpoint's): strict, in place."""
        self.backbone.load_state_dict(state_dict, strict=True)

    @torch.no_grad()
    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        x = crops[0] if len(crops) == 1 else torch.cat(list(crops))
        patches = self.backbone(x, is_training=True)["x_norm_patchtokens"]  # (n*B, Pg, D)
        return resize_patch_tokens(patches, self.student_grid)


def resize_patch_tokens(patches: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, g*g, D) patch tokens of a square g x g grid -> (N, grid*grid, D): bicubic, no antialias,
    align_corners=False (the official global_teacher_resize_method / _antialias defaults), computed in
    the tokens' dtype."""
    n, p, d = patches.shape
    g = int(round(p ** 0.5))
    if g * g != p:
        raise ValueError(f"resize_patch_tokens: {p} patch tokens are not a square grid")
    if g == grid:
        return patches
    image = patches.transpose(1, 2).reshape(n, d, g, g)
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    return image.flatten(2).transpose(1, 2)


def load_iterations(gram_cfg, niter_per_ep: int, epochs: int) -> list[int]:
    """The steps before which the Gram teacher takes the EMA teacher's weights (see the module
    docstring): the start of gram.start_epoch (unless gram.teacher_checkpoint gave the first weights),
    then every gram.update_every epochs, at most gram.max_updates refreshes."""
    if gram_cfg.weight <= 0:
        return []
    total = epochs * niter_per_ep
    start = gram_cfg.start_epoch * niter_per_ep
    out = [] if gram_cfg.teacher_checkpoint else [start]
    if gram_cfg.update_every > 0:
        k = 1
        while gram_cfg.max_updates == 0 or k <= gram_cfg.max_updates:
            it = start + k * gram_cfg.update_every * niter_per_ep
            if it >= total:
                break
            out.append(it)
            k += 1
    return [it for it in out if it < total]


def gram_active(gram_cfg, it: int, niter_per_ep: int) -> bool:
    """Whether step `it` runs the Gram teacher and the Gram term."""
    return gram_cfg.weight > 0 and it >= gram_cfg.start_epoch * niter_per_ep


__all__ = ["GramTeacher", "resize_patch_tokens", "load_iterations", "gram_active"]
