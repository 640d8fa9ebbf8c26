"""Atomic training checkpoints.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over
the old one (os.replace is atomic on POSIX), so a crash mid-write never corrupts the last good
checkpoint. Keys follow the official DINO checkpoint ("student", "teacher", "optimizer", "epoch",
"dino_loss", "fp16_scaler" as "scaler") plus "step", "step_in_epoch", "rng" and "config".
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


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign file
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({type(e).__name__}: {e})")
