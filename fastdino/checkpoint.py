"""Checkpoints: the atomic write, the layout every backend shares, and one-line errors.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over
the old one (os.replace is atomic on POSIX), so a crash mid-write never corrupts the last good
checkpoint. Keys follow the official DINO checkpoint ("student", "teacher", "optimizer", "epoch",
"dino_loss" (the center), "fp16_scaler" as "scaler"); the backend writes the model and optimizer
entries (fastdino/backend.py, fastdino/ds.py), `client_state` the rest:
    epoch, step_in_epoch   where to continue (the next step of that epoch)
    step                   the next global step
    dino_loss              the teacher targets' state ({"center": (1, K)})
    rng                    torch / numpy / python (/ cuda) generator states (rng_per_rank: of every rank)
    config, resolved       the resolved config and what every "auto" became (fastdino/resolve.py)
    ibot_patch_loss        iBOT's patch targets' state (DINOv2)
    gram_teacher           the Gram teacher's backbone (DINOv3 Gram anchoring, fastdino/gram.py)
"""
from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch


class CheckpointError(RuntimeError):
    pass


def checkpoint_path(output_dir: str, backend: str) -> str:
    """Where a run of resolved backend `backend` keeps its checkpoint: OUTPUT_DIR/checkpoint.pth (local, ddp),
    or OUTPUT_DIR/deepspeed, the folder of DeepSpeed's tags (deepspeed)."""
    return os.path.join(output_dir, "deepspeed" if backend == "deepspeed" else "checkpoint.pth")


def atomic_save(obj, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        # an interrupt inside torch.save's writer surfaces as the writer's RuntimeError ("unexpected
        # pos ...") with the interrupt as its context: re-raise the interrupt itself
        cause = e
        while cause is not None and isinstance(cause, Exception):
            cause = cause.__context__
        if cause is not None and cause is not e:
            raise cause from None
        raise


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def client_state(targets, epoch: int, step_in_epoch: int, step: int, cfg, resolved, patch_targets=None,
                 gram=None) -> dict:
    """The backend-independent entries of a checkpoint (iBOT's patch targets as "ibot_patch_loss",
    the Gram teacher's backbone as "gram_teacher" once it exists: gram, fastdino.gram.GramAnchoring)."""
    state = {"dino_loss": targets.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch, "step": step,
             "rng": rng_state(), "config": cfg.to_dict(), "resolved": resolved.to_dict()}
    if patch_targets is not None:
        state["ibot_patch_loss"] = patch_targets.state_dict()
    if gram is not None and gram.teacher is not None:
        state["gram_teacher"] = gram.teacher.backbone.state_dict()
    return state


def restore_client(ckpt: dict, targets, path: str, rank: int = 0, patch_targets=None,
                   gram=None) -> tuple[int, int, int]:
    """Load the targets' state and this rank's RNG states (and the Gram teacher, gram:
    fastdino.gram.GramAnchoring); returns (epoch, step_in_epoch, step)."""
    load_states([("dino_loss", targets, ckpt.get("dino_loss"))], path)
    if patch_targets is not None:
        load_states([("ibot_patch_loss", patch_targets, ckpt.get("ibot_patch_loss"))], path)
    if gram is not None:  # Gram anchoring: absent before gram.start_epoch (and in checkpoints of other recipes)
        gram.resume_from(ckpt.get("gram_teacher"), path)
    try:
        per_rank = ckpt.get("rng_per_rank") or [ckpt["rng"]]
        set_rng_state(per_rank[rank] if rank < len(per_rank) else ckpt["rng"])
        return ckpt["epoch"], ckpt["step_in_epoch"], ckpt["step"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint '{path}' is not a fastdino training checkpoint (missing {e})")


def first_mismatch(mine: dict, saved: dict) -> str | None:
    """The first difference between two state dicts, in words: a key only one has, or a shape."""
    shape = lambda t: tuple(t.shape) if hasattr(t, "shape") else type(t).__name__  # noqa: E731
    for key, value in saved.items():
        if key not in mine:
            return f"'{key}' {shape(value)} is in the checkpoint but not in this model"
    for key, value in mine.items():
        if key not in saved:
            return f"'{key}' {shape(value)} of this model is missing from the checkpoint"
        if shape(saved[key]) != shape(value):
            return f"'{key}' is {shape(saved[key])} in the checkpoint, {shape(value)} in this model"
    return None


def load_states(entries, path: str) -> None:
    """obj.load_state_dict(state) for each (name, obj, state); a missing entry, key or shape is a
    one-line CheckpointError naming the checkpoint, the entry and the first mismatched key."""
    for name, obj, state in entries:
        if state is None:
            raise CheckpointError(f"checkpoint '{path}' has no '{name}' entry (not a fastdino training checkpoint?)")
        what = None
        if isinstance(obj, torch.nn.Module):
            what = first_mismatch(obj.state_dict(), state)
        try:
            if what is None:
                obj.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError) as e:
            what = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if what is not None:
            raise CheckpointError(f"checkpoint '{path}' does not match this config: {name} {what}")


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign file
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({type(e).__name__}: {e})")
