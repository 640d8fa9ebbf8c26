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

When (gram config section, epochs of the data's steps), fastdino.gram.GramAnchoring:
    - before gram.start_epoch there is no Gram teacher at all: no memory (it is built at the start
      epoch's first step), no Gram-teacher crops (the loader makes them from that step on:
      fastdino/data/crop_plan.py), no forward and no Gram term;
    - at the first step of gram.start_epoch the Gram teacher becomes the EMA teacher of that moment
      (official gram_load_ema_teacher), unless gram.teacher_checkpoint gives it its first weights;
    - then every gram.update_every epochs it is refreshed from the EMA teacher (official update_gram
      with m = 0, gram.rep_update), at most gram.max_updates times (0: no limit);
    - its weight in the loss: the schedule table's gram_weight row (fastdino/schedules.py).
`load_iterations` is a pure function of the config, so a resumed run reloads at the same steps; the
Gram teacher's weights are saved in checkpoints ("gram_teacher") once it exists, and a resumed run
rebuilds it from them. The student's patch grid is read from the student's crops at each step, so
the crop sets of data.crop_sets (several resolutions) need nothing more.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger("fastdino")


class GramTeacher(nn.Module):
    """A frozen backbone (the EMA teacher's architecture); forward(gram crops, S) -> its normed patch
    tokens resized to the patch grid g = S / patch of the student's S-px global crops, (n*B, g^2, D)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "GramTeacher":
        return super().train(False)  # always eval (no drop path, no dropout), as the official gram_teacher.eval()

    @torch.no_grad()
    def load_backbone_(self, state_dict: dict) -> None:
        """Take these backbone weights (the EMA teacher's, or a checkpoint's): strict, in place."""
        self.backbone.load_state_dict(state_dict, strict=True)

    @torch.no_grad()
    def forward(self, crops: list[torch.Tensor], student_crop_size: int) -> torch.Tensor:
        x = crops[0] if len(crops) == 1 else torch.cat(list(crops))
        patches = self.backbone(x, is_training=True)["x_norm_patchtokens"]  # (n*B, Pg, D)
        return resize_patch_tokens(patches, int(student_crop_size) // self.backbone.patch_size)


class GramAnchoring:
    """The Gram teacher over a run (see the module docstring): `before_step(it, ema_state)` is the
    Gram teacher step `it` runs, or None before gram.start_epoch; it is built on the first step that
    needs it (make_backbone(): a fresh backbone of the teacher's architecture, unpartitioned, on the
    run's device) and loaded there: from a resumed checkpoint's "gram_teacher", else
    gram.teacher_checkpoint, else the EMA teacher (ema_state(): its backbone's state dict, called on
    every rank at the same steps).

    `teacher` is None until then: the step runs no Gram teacher and no Gram term, the loader makes no
    Gram crops (the same steps: gram_from = start), checkpoints hold no "gram_teacher"."""

    def __init__(self, gram_cfg, make_backbone, steps_per_epoch: int, epochs: int, checkpoint_state=None):
        self.cfg, self.make_backbone = gram_cfg, make_backbone
        self.start = gram_cfg.start_epoch * steps_per_epoch
        self.loads = set(load_iterations(gram_cfg, steps_per_epoch, epochs))
        self.checkpoint_state = checkpoint_state  # () -> gram.teacher_checkpoint's backbone weights, or None
        self.teacher: GramTeacher | None = None

    def resume_from(self, state: dict | None, path: str = "") -> None:
        """A checkpoint's "gram_teacher" weights: the Gram teacher is built and takes them now (a
        mismatch is one CheckpointError line); None (it had none yet): none until a step needs it."""
        from fastdino.checkpoint import load_states

        self.teacher = None
        if state is not None:
            self.teacher = GramTeacher(self.make_backbone())
            load_states([("gram_teacher", self.teacher.backbone, state)], path)

    def before_step(self, it: int, ema_state) -> GramTeacher | None:
        if it < self.start:
            return None
        if self.teacher is None:
            self.teacher = GramTeacher(self.make_backbone())
            if self.cfg.teacher_checkpoint and it not in self.loads:
                self.teacher.load_backbone_(self.checkpoint_state())
            elif it not in self.loads:  # resumed past the start from a checkpoint without a Gram teacher
                log.warning("step %d: the checkpoint holds no Gram teacher: it takes the EMA teacher's weights now", it)
                self.teacher.load_backbone_(ema_state())
        if it in self.loads:
            self.teacher.load_backbone_(ema_state())
            log.info("step %d: the Gram teacher takes the EMA teacher's weights", it)
        return self.teacher


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


__all__ = ["GramTeacher", "GramAnchoring", "resize_patch_tokens", "load_iterations"]
