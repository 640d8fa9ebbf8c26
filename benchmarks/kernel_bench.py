"""What the single-op benchmarks share (benchmarks/gram.py, benchmarks/residual_norm.py): the command
line (--smoke, --dtypes, --reps, --results), the device check, the timer, and the JSON rows (date,
device, torch, triton, command, config, variant, metric, value, baseline: the torch row's value for
the triton rows, null for the torch rows), written to stdout or appended to --results."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch


def parser(doc: str, dtypes: list[str], dtypes_help: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, CPU included (Triton interpreter): seconds")
    p.add_argument("--dtypes", nargs="*", choices=dtypes, help=dtypes_help)
    p.add_argument("--reps", type=int, default=0, help="ms of timing per measurement (default 100; smoke 20)")
    p.add_argument("--results", help="append the JSON rows to this file (one per line) instead of stdout")
    return p


def device_for(p: argparse.ArgumentParser, args) -> str:
    """cuda, or cpu for --smoke under the Triton interpreter; anything else is a one-line usage error."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        p.error("without CUDA only --smoke runs (the Triton kernels run interpreted on CPU)")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--smoke on CPU needs TRITON_INTERPRET=1 (set automatically when run as a script)")
    return device


def time_ms(fn, device: str, reps: int, grad_to_none=None) -> float:
    """Time of one call: do_bench on CUDA (L2 flushed before each call), a plain loop on CPU."""
    if device == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=5, rep=reps, grad_to_none=grad_to_none)
    fn()
    n, t0 = 0, time.perf_counter()
    while n < 2 or (time.perf_counter() - t0 < reps / 1000 and n < 20):
        fn()
        n += 1
    return (time.perf_counter() - t0) / n * 1e3


def capture(step):
    """(CUDA graph, the captured step's outputs): step warmed up on a side stream first (Triton
    compiles, the allocator makes its pools), then captured. Shared with the kernel tests."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def graph_ms(fn, calls: int = 10, replays: int = 3) -> float:
    """GPU time of one fn() call: `calls` calls captured in a CUDA graph, replayed `replays` times (after
    one untimed replay), no host work in between."""
    graph, _ = capture(lambda: [fn() for _ in range(calls)])
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / (calls * replays)
    del graph
    return ms


def common_fields(script: str, device: str, argv) -> dict:
    import triton

    return {"date": datetime.date.today().isoformat(),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "triton": triton.__version__,
            "command": f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv)}


def variant_rows(common: dict, result: dict, variant: str, base: dict | None, skip=lambda metric, value: False):
    """One row per metric of `result` ({"config", "metrics"}); baseline from `base` (the torch variant)."""
    return [{**common, "config": result["config"], "variant": variant, "metric": metric, "value": value,
             "baseline": None if base is None else base["metrics"].get(metric)}
            for metric, value in result["metrics"].items() if not skip(metric, value)]


def write_rows(rows: list[dict], results: str | None) -> None:
    if results:
        with open(results, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    else:
        for row in rows:
            print(json.dumps(row))
