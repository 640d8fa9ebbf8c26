"""Stopping a run safely: SIGINT / SIGTERM, and checkpoints on a clock.

The first SIGINT (Ctrl-C) or SIGTERM (what SLURM and torchrun send before killing a job) asks the
training loop to stop at the next step boundary: it writes a checkpoint there (every rank at the
same step), flushes the metrics, says where in one line and exits with 128 + the signal number (130
for SIGINT, 143 for SIGTERM, as a shell reports them). A second signal aborts at once (Abort): a
checkpoint being written is abandoned, and since every checkpoint is written to a temporary file and
renamed, the previous one stays complete and loadable.

train.checkpoint_minutes: every N minutes of rank 0's clock, a checkpoint (checkpoint.pth only).

Ranks agree through one tiny all-reduce per step over a gloo group (CPU tensors: the GPU is never
synchronized for it); one process needs none.
"""
from __future__ import annotations

import logging
import signal
import threading
import time

import torch
import torch.distributed as dist

log = logging.getLogger("fastdino")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The run stopped on a signal after checkpointing at a step boundary."""

    def __init__(self, signum: int, step: int, path: str):
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}: checkpoint written to "
                         f"{path}; resume with --resume")
        self.signum, self.step, self.path = signum, step, path


class Abort(BaseException):
    """A second signal: stop now (a BaseException, like KeyboardInterrupt, so no handler swallows it)."""

    def __init__(self, signum: int):
        super().__init__(f"aborted by a second {signal.Signals(signum).name}")
        self.signum = signum


class StopControl:
    """Context manager around the training loop: installs the handlers, and poll() tells every rank,
    at a step boundary, whether to stop (the signal number, or 0) and whether a checkpoint is due."""

    def __init__(self, world_size: int = 1, is_main: bool = True, checkpoint_minutes: float = 0.0):
        self.signum, self.is_main = 0, is_main
        self.period = 60.0 * checkpoint_minutes
        self.last_checkpoint = time.monotonic()
        self.group = None
        self.distributed = world_size > 1 and dist.is_available() and dist.is_initialized()
        if self.distributed and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")  # every rank creates it, at the same point
        self._previous: dict = {}

    def __enter__(self) -> "StopControl":
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread only
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum:
            raise Abort(signum)
        self.signum = signum
        log.warning("received %s: stopping after this step with a checkpoint (send it again to abort at once)",
                    signal.Signals(signum).name)

    def poll(self) -> tuple[int, bool]:
        """(signal number to stop on, or 0; a timed checkpoint is due), the same on every rank."""
        due = self.is_main and self.period > 0 and time.monotonic() - self.last_checkpoint >= self.period
        if not self.distributed:
            return self.signum, due
        flags = torch.tensor([self.signum, int(due)], dtype=torch.int64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        return int(flags[0]), bool(flags[1])

    def checkpointed(self) -> None:
        self.last_checkpoint = time.monotonic()
