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
"""
from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch


class CheckpointError(RuntimeError):
    pass


def atomic_save(obj, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
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


def client_state(targets, epoch: int, step_in_epoch: int, step: int, cfg, resolved) -> dict:
    """The backend-independent entries of a checkpoint."""
    return {"dino_loss": targets.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch, "step": step,
            "rng": rng_state(), "config": cfg.to_dict(), "resolved": resolved.to_dict()}


def restore_client(ckpt: dict, targets, path: str, rank: int = 0) -> tuple[int, int, int]:
    """Load the targets' state and this rank's RNG states; returns (epoch, step_in_epoch, step)."""
    load_states([(targets, ckpt.get("dino_loss"))], path)
    try:
        per_rank = ckpt.get("rng_per_rank") or [ckpt["rng"]]
        set_rng_state(per_rank[rank] if rank < len(per_rank) else ckpt["rng"])
        return ckpt["epoch"], ckpt["step_in_epoch"], ckpt["step"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint '{path}' is not a fastdino training checkpoint (missing {e})")


def load_states(pairs, path: str) -> None:
    """obj.load_state_dict(state) for each (obj, state); a missing or mismatched entry is a one-line
    CheckpointError naming the checkpoint."""
    for obj, state in pairs:
        if state is None:
            raise CheckpointError(f"checkpoint '{path}' has no {type(obj).__name__} state")
        try:
            obj.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"checkpoint '{path}' does not match this config ({first})")


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign file
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({type(e).__name__}: {e})")
