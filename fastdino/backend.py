"""Where parameters, gradients and optimizer state live: one small interface, two implementations.

    LocalBackend      one process, or DDP: student and teacher parameters in flat buffers
                      (fastdino/flat.py), Triton / foreach / loop clipping and EMA, torch's fused
                      AdamW, a grad scaler under fp16, checkpoint.pth
    DeepSpeedBackend  fastdino/ds.py: DeepSpeed's engine, ZeRO 0-3 partitions, its checkpoints

The step (fastdino/step.py) only calls:
    student(crops) / teacher(crops)       forwards (DDP- or engine-wrapped where needed)
    zero_grad(); backward(loss)
    step(lr, wd, skip, last_layer_frozen) clip the gradients (per tensor, or per student submodule:
                                          optim.clip_grad_mode, fastdino/clip.py), then AdamW unless
                                          skip (device flags); returns a device bool: the gradients
                                          were not finite
    ema_(momentum)                        teacher <- m teacher + (1 - m) student
    all_reduce_(x, op="sum")              sum (or "max") over ranks, in place (no-op in one process)
and the training loop: save(client, output_dir, keep_as), resume(arg, output_dir),
teacher_backbone_state() (Gram anchoring: every rank calls it at the same step), student_module /
teacher_module (the bare MultiCropWrappers), optimizer.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from fastdino.checkpoint import CheckpointError, atomic_save, checkpoint_path, load_checkpoint, load_states
from fastdino.clip import Clipper
from fastdino.flat import FlatParams
from fastdino.optim import DINOAdamW, describe_param_groups, param_groups
from fastdino.teacher import TeacherEMA

log = logging.getLogger("fastdino")


class LocalBackend:
    """One process or DDP (resolved.backend "local" / "ddp")."""

    def __init__(self, cfg, resolved, ctx, student_module: nn.Module, teacher_module: nn.Module):
        self.cfg, self.ctx = cfg, ctx
        self.student_module, self.teacher_module = student_module, teacher_module
        # flat buffers before DDP, the optimizer and any checkpoint load (they all keep the views)
        self.student_flat = FlatParams(student_module)
        self.teacher_flat = FlatParams(teacher_module, grads=False)
        self.clipper = Clipper(self.student_flat, cfg.optim.clip_grad, resolved.clip, cfg.optim.clip_grad_mode)
        self.ema = TeacherEMA(self.teacher_flat, self.student_flat, resolved.ema)
        o = cfg.optim  # groups by (last layer, lr multiplier, wd multiplier): fastdino/optim.py
        self.optimizer = DINOAdamW(param_groups(student_module, o.layerwise_decay, o.patch_embed_lr_mult),
                                   freeze_mode=o.freeze_last_layer_mode, beta2=o.adamw_beta2)
        if ctx.is_main:
            log.info(describe_param_groups(self.optimizer.param_groups))
        self.scaler = torch.amp.GradScaler(ctx.device.type) if resolved.precision == "fp16" else None
        self.distributed = resolved.backend == "ddp"
        self.student = student_module
        if self.distributed:
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.student = nn.parallel.DistributedDataParallel(student_module, device_ids=device_ids)
        self.teacher = teacher_module

    def teacher_backbone_state(self) -> dict:
        """The EMA teacher's backbone weights (the Gram teacher takes them, fastdino/gram.py)."""
        return self.teacher_module.backbone.state_dict()

    # ---- the step ------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        self.student_flat.zero_grad()  # in place: the p.grad views into the flat buffer stay

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, lr, wd, skip, last_layer_frozen) -> torch.Tensor:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # records its inf check for update(), on the device
        norms = self.clipper.clip_()  # per tensor or per module (optim.clip_grad_mode), no host sync
        grads_bad = ~torch.isfinite(norms).all()
        self.optimizer.set_inputs(lr, wd, (skip | grads_bad).float(), last_layer_frozen)
        self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()  # backs the scale off after an overflow, grows it after 2000 clean steps
        return grads_bad

    def ema_(self, momentum: torch.Tensor) -> None:
        self.ema.step_(momentum)

    def all_reduce_(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.distributed:  # NCCL: ordered on the device streams, the host does not wait
            dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return x

    # ---- checkpoints ---------------------------------------------------------------------------
    def checkpoint_path(self, output_dir: str) -> str:
        return checkpoint_path(output_dir, "local")

    def save(self, client: dict, output_dir: str, keep_as: str | None = None) -> None:
        """OUTPUT_DIR/checkpoint.pth (atomic), and a copy named keep_as. Every rank calls it (each
        one's RNG states are gathered: drop path draws per rank); rank 0 writes."""
        if self.distributed:
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, client["rng"])
            client = {**client, "rng_per_rank": states}
        if not self.ctx.is_main:
            return
        state = {"student": self.student_module.state_dict(), "teacher": self.teacher_module.state_dict(),
                 "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None, **client}
        atomic_save(state, self.checkpoint_path(output_dir))
        if keep_as:
            atomic_save(state, os.path.join(output_dir, keep_as))

    def resume(self, resume: str, output_dir: str) -> dict | None:
        """resume: "auto" (OUTPUT_DIR/checkpoint.pth, None when there is none) or a checkpoint path.
        Loads the models, optimizer and scaler; returns the checkpoint (its client entries)."""
        path = self.checkpoint_path(output_dir) if resume == "auto" else resume
        if resume == "auto" and not os.path.exists(path):
            return None
        ckpt = load_checkpoint(path)
        entries = [(name, obj, ckpt.get(name)) for name, obj in
                   (("student", self.student_module), ("teacher", self.teacher_module), ("optimizer", self.optimizer))]
        if self.scaler is not None and ckpt.get("scaler"):
            entries.append(("scaler", self.scaler, ckpt["scaler"]))
        load_states(entries, path)
        return ckpt


def build_backend(cfg, resolved, ctx, student_module: nn.Module, teacher_module: nn.Module):
    if resolved.backend == "deepspeed":
        from fastdino.ds import DeepSpeedBackend

        return DeepSpeedBackend(cfg, resolved, ctx, student_module, teacher_module)
    return LocalBackend(cfg, resolved, ctx, student_module, teacher_module)


__all__ = ["LocalBackend", "build_backend", "CheckpointError"]
