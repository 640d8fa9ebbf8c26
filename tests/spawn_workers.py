"""Multi-process tests: torch.multiprocessing.spawn with a deadline. A worker that hangs (a collective, a
process-group teardown) fails its test after `timeout_s` instead of stalling the whole suite."""
import time

import pytest


def spawn(fn, args: tuple, nprocs: int, timeout_s: float = 300.0) -> None:
    """mp.spawn(fn, args, nprocs) joined with a deadline; a worker's exception re-raises here as in mp.spawn."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            alive = [rank for rank, p in enumerate(ctx.processes) if p.is_alive()]
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"spawned workers {alive} of {nprocs} still running after {timeout_s:.0f} s (killed)")
