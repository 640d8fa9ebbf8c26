"""Benchmark: DINO loss forward+backward from teacher logits, reference vs fused; fused head.

The step timed: teacher targets by centering (q, entropy, column sums of the teacher logits for the
center update), then the multi-crop soft-target cross-entropy of the student logits against q,
forward and backward. Variants:
  reference  softmax_center_ref + soft_cross_entropy_ref (kernels/): what the official code computes
             (the double loop over pairs), plus the center's column sum;
  fused      the engine's path: softmax_center_stats (row statistics, entropy, column sums in one read
             of the teacher logits) + soft_cross_entropy on LogitTargets (q made on the fly from the
             logits, never stored), the Triton custom ops (CUDA; on CPU only under TRITON_INTERPRET=1);
  fused_q    the former fused path: softmax_center (q stored in fp32) + soft_cross_entropy on q.
Sinkhorn-Knopp rows (--sk, and in --suite): DINOv2's teacher targets from the 2B teacher logits,
3 iterations, one process: sk_reference (the official steps in PyTorch, kernels/sinkhorn_knopp.py's
sinkhorn_knopp_ref) vs sk_fused (its Triton custom ops; floor = teacher logits read once + q written
once in fp32) and sk_stats (the engine's path: the same kernels without the q write,
sinkhorn_knopp_stats; floor = the logits read once).
iBOT rows (--ibot, and in --suite): the masked-patch loss forward+backward over the static (U, K)
masked-token buffer of a batch of B images (U = IBOTMasks(16).upper_bound(B), the DINOv2 recipe at
224 px / patch 14; a real mask batch, padding weighted 0): ibot_reference (fastdino/losses/ibot.py's
ibot_loss_ref, the official forward_masked: log_softmax over all U rows) vs ibot_fused (IBOTTerm
fused: the soft-target cross-entropy kernel, V = T = 1, per-row weights); floor = memory_floor_bytes
(student read twice, targets once, gradient written once).
Two times per row:
  ms       host-inclusive: triton.testing.do_bench of one eager step (L2 flushed), what a training
           loop that launches eagerly sees when the GPU waits for the host;
  dev_ms   device: the step captured 10x in a CUDA graph and replayed (no host in the way).
plus cpu_us (host time per step with the GPU queue not full: the launch overhead alone) and, for
fused, targets_ms / fwd_ms / bwd_ms (device time of softmax_center_stats, of the loss's three forward
kernels and of its backward kernel). GB/s and floor_frac use the device time against the step's
memory-traffic floor (student read twice, teacher read once, gradient written once) at the GPU's
peak DRAM bandwidth; peak_extra_MB is max_memory_allocated above the inputs; speedup = reference ms
/ ms (dev_speedup on device times).

    python benchmarks/loss.py --suite              # CUDA, ~3 min: main table, kernel breakdown, sweep, head
    python benchmarks/loss.py                      # CUDA: B 32/64/128, K 65536, 2+8 and 2+10 crops, fp32 and bf16
    python benchmarks/loss.py --quick              # small CPU-friendly sizes (CI smoke test)
    python benchmarks/loss.py --sweep              # CUDA: loss fwd/bwd launch configs at B=64, K=65536, 2+10
    python benchmarks/loss.py --head               # F.linear + loss vs the fused last layer + loss
    python benchmarks/loss.py --profile            # CUDA: per-kernel device time of the fused step
    python benchmarks/loss.py --sk                 # Sinkhorn-Knopp teacher targets, reference vs fused
    python benchmarks/loss.py --ibot               # iBOT masked-patch loss, reference vs fused
    python benchmarks/loss.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastdino  # noqa: E402,F401  (registers fastdino.kernels from a plain checkout)
from fastdino.kernels.linear_soft_cross_entropy import linear_soft_cross_entropy_ref  # noqa: E402
from fastdino.kernels.soft_cross_entropy import memory_floor_bytes, soft_cross_entropy_ref  # noqa: E402
from fastdino.kernels.softmax_center import softmax_center_ref  # noqa: E402

STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
H100_PEAK_GBS = 3352.0  # H100 SXM HBM3, used when NVML cannot tell


def _reference(s, t, c, temp, ncrops):
    """The official module's work: teacher softmax with the center, the pair loop, the column sums."""
    q, _, colsum = softmax_center_ref(t, c, temp)
    return soft_cross_entropy_ref(s, q, ncrops, STUDENT_TEMP), colsum


def _fused(s, t, c, temp, ncrops, **launch):
    """The engine's fused path (fastdino/targets.py Centering): row statistics, entropy and column sums
    in one read of t; the loss kernels make q from t on the fly (LogitTargets: q never stored)."""
    from fastdino.kernels.soft_cross_entropy import LogitTargets, soft_cross_entropy
    from fastdino.kernels.softmax_center import softmax_center_stats

    temp_t = torch.as_tensor(temp, dtype=torch.float32, device=t.device)
    row_offset, _, colsum = softmax_center_stats(t, c, temp_t)
    return soft_cross_entropy(s, LogitTargets(t, c.view(-1), temp_t, row_offset), ncrops, STUDENT_TEMP,
                              **launch), colsum


def _fused_q(s, t, c, temp, ncrops, **launch):
    """The former fused path: q materialized in fp32 by softmax_center, then read by the loss kernels."""
    from fastdino.kernels.soft_cross_entropy import soft_cross_entropy
    from fastdino.kernels.softmax_center import softmax_center

    q, _, colsum = softmax_center(t, c, temp)
    return soft_cross_entropy(s, q, ncrops, STUDENT_TEMP, **launch), colsum


VARIANTS = {"reference": _reference, "fused": _fused, "fused_q": _fused_q}


def _triton_runs(device: str) -> bool:
    return device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def peak_bandwidth_gbs() -> float | None:
    """Theoretical DRAM bandwidth of the current GPU from NVML (memory clock x bus width x 2), GB/s."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(h)
        return clock_mhz * 1e6 * bus_bits / 8 * 2 / 1e9
    except Exception:
        return H100_PEAK_GBS if "H100" in torch.cuda.get_device_name() else None


def floor_bytes(B: int, ncrops: int, K: int, itemsize: int) -> int:
    """The step's floor: the teacher logits (2B rows, S's dtype) play the targets, read once."""
    return memory_floor_bytes(ncrops * B, 2 * B, K, itemsize, target_itemsize=itemsize)


# ---------------------------------------------------------------------------------------------- timers
def time_ms(fn, device: str, reps: int) -> float:
    """Host-inclusive time of one call: do_bench on CUDA (L2 flushed before each call)."""
    if device == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=10, rep=reps)
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while n < 3 or (time.perf_counter() - t0 < reps / 1000 and n < 50):
        fn()
        n += 1
    return (time.perf_counter() - t0) / n * 1e3


def graph_ms(fn, n_calls: int = 10, replays: int = 7) -> float | None:
    """Device time of one call: n_calls captured in one CUDA graph, replayed; median per call.
    None (with the reason on stderr) when fn cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(n_calls):
                fn()
        g.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / n_calls)
        del g
        return statistics.median(times)
    except Exception as e:  # report, don't die: the eager time is still measured
        print(f"# CUDA graph capture failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
        torch.cuda.synchronize()
        return None


def cpu_us(fn, calls: int = 20) -> float:
    """Host time per call while the GPU queue has room: launch overhead, Python included."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def peak_extra_mb(fn, device: str, reset=lambda: None) -> float | None:
    if device != "cuda":
        return None
    fn()
    torch.cuda.synchronize()
    reset()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ---------------------------------------------------------------------------------------------- loss
def _inputs(B, K, ncrops, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    s = (torch.randn(ncrops * B, K, generator=g) * 0.3).to(device, dtype).requires_grad_()
    t = (torch.randn(2 * B, K, generator=g) * 0.3).to(device, dtype)
    c = torch.zeros(1, K, device=device)
    temp = torch.full((), TEACHER_TEMP, device=device)  # a device tensor, as the engine passes it
    return s, t, c, temp


def add_row(rows: list, row: dict, base: dict, device: str) -> dict:
    """Append `row` with its comparison to the reference row `base` and the device name; returns base."""
    compare_to_reference(row, base)
    row["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    rows.append(row)
    return base


def compare_to_reference(row: dict, base: dict) -> None:
    """speedup, dev_speedup and mem_vs_ref of `row` against the reference row `base` of its group."""
    row["speedup"] = base["ms"] / row["ms"]
    if base.get("dev_ms") and row.get("dev_ms"):
        row["dev_speedup"] = base["dev_ms"] / row["dev_ms"]
    if base["peak_extra_MB"] and row["peak_extra_MB"] is not None:
        row["mem_vs_ref"] = row["peak_extra_MB"] / base["peak_extra_MB"]


def measure(row: dict, step, floor: int, device: str, reps: int, peak: float | None) -> None:
    """Time `step` into row: host-inclusive ms and GB/s against the traffic floor (bytes); on CUDA
    also the host cost per call, the CUDA-graph device time, its GB/s and its fraction of the peak."""
    row["ms"] = time_ms(step, device, reps)
    row["floor_MB"] = floor / 1e6
    row["GBps"] = floor / (row["ms"] * 1e-3) / 1e9
    if device == "cuda":
        row["cpu_us"] = cpu_us(step)
        row["dev_ms"] = graph_ms(step)
        if row["dev_ms"]:
            row["dev_GBps"] = floor / (row["dev_ms"] * 1e-3) / 1e9
            row["floor_frac"] = row["dev_GBps"] / peak if peak else None


def bench_one(variant: str, B: int, K: int, ncrops: int, dtype: torch.dtype, device: str, reps: int,
              peak: float | None = None, **launch) -> dict:
    s, t, c, temp = _inputs(B, K, ncrops, dtype, device)
    fn = VARIANTS[variant]

    def step():
        s.grad = None
        fn(s, t, c, temp, ncrops, **launch)[0].backward()

    def clear():
        s.grad = None

    row = {"variant": variant, "dtype": str(dtype).split(".")[-1], "crops": f"2+{ncrops - 2}", "B": B, "K": K}
    row["loss"] = float(fn(s, t, c, temp, ncrops, **launch)[0].detach())  # once, outside the timings
    row["peak_extra_MB"] = peak_extra_mb(step, device, clear)
    clear()
    measure(row, step, floor_bytes(B, ncrops, K, s.element_size()), device, reps, peak)
    if device == "cuda" and variant == "fused":
        row.update(fused_parts_ms(s, t, c, temp, ncrops, **launch))
    clear()
    return {**row, **launch}


def _op_args(ncrops, launch):
    """The custom ops' trailing arguments: pairing (DINO) and launch overrides (0 = the table)."""
    return (ncrops, STUDENT_TEMP, 2, True, launch.get("block_k", 0), launch.get("group_size", 0),
            launch.get("num_warps", 0), launch.get("rows", 0))


def fused_parts_ms(s, t, c, temp, ncrops, **launch) -> dict:
    """Device time of the teacher statistics (softmax_center_stats), of the loss forward on the logit
    targets (3 kernels) and of its backward kernel."""
    from fastdino.kernels.soft_cross_entropy import (soft_cross_entropy_backward_op, soft_cross_entropy_op,
                                                     teacher_scale)
    from fastdino.kernels.softmax_center import softmax_center_stats_op

    sd = s.detach()
    temp_t = torch.as_tensor(temp, dtype=torch.float32, device=t.device)
    row_offset = softmax_center_stats_op(t, c, temp_t)[0]
    logit = (c.view(-1), teacher_scale(temp_t), row_offset)
    args = _op_args(ncrops, launch)
    _, lse = soft_cross_entropy_op(sd, t, None, *args, None, *logit)
    g = torch.ones((), device=s.device)
    return {"targets_ms": graph_ms(lambda: softmax_center_stats_op(t, c, temp_t)),
            "fwd_ms": graph_ms(lambda: soft_cross_entropy_op(sd, t, None, *args, None, *logit)),
            "bwd_ms": graph_ms(lambda: soft_cross_entropy_backward_op(g, sd, t, lse, None, *args, None, *logit))}


def run(args) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if args.quick or device == "cpu":
        Bs, K, crops, dtypes = args.B or [4], args.K or 4096, args.crops or ["2+2", "2+4"], args.dtypes or ["fp32"]
        reps = 100
    else:
        Bs, K, crops, dtypes = args.B or [32, 64, 128], args.K or 65536, args.crops or ["2+8", "2+10"], \
            args.dtypes or ["fp32", "bf16"]
        reps = 200
    variants = args.variants or (list(VARIANTS) if _triton_runs(device) else ["reference"])
    peak = args.peak_gbs or (peak_bandwidth_gbs() if device == "cuda" else None)
    rows = []
    for dt in dtypes:
        for crop in crops:
            ncrops = 2 + int(crop.split("+")[1])
            for B in Bs:
                base = None
                for v in variants:
                    r = bench_one(v, B, K, ncrops, DTYPES[dt], device, reps, peak)
                    if v == "reference":
                        base = r
                    r["speedup"] = base["ms"] / r["ms"] if base else None
                    if base and base.get("dev_ms") and r.get("dev_ms"):
                        r["dev_speedup"] = base["dev_ms"] / r["dev_ms"]
                    r["mem_vs_ref"] = (r["peak_extra_MB"] / base["peak_extra_MB"]
                                       if base and r["peak_extra_MB"] and base["peak_extra_MB"] else None)
                    r["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
                    rows.append(r)
                    if device == "cuda":
                        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------- sweep
SWEEP_BLOCK_K = (512, 1024, 2048)
SWEEP_ROWS = (2, 4, 8)
SWEEP_WARPS = (4, 8)
SWEEP_PPS = (2, 4, 8)


def sweep(args) -> list[dict]:
    """Device time of the loss forward (3 kernels) and backward (1 kernel) per launch config at
    B=64, K=65536, 2+10 crops against fp32 targets; prints the constants of
    kernels/soft_cross_entropy.py to adopt."""
    from fastdino.kernels import soft_cross_entropy as sce

    peak = args.peak_gbs or peak_bandwidth_gbs()
    B, K, ncrops = 64, 65536, 12
    rows = []
    for dt in args.sweep_dtypes:
        dtype = DTYPES[dt]
        s, t, c, temp = _inputs(B, K, ncrops, dtype, "cuda")
        sd = s.detach()
        q = softmax_center_ref(t, c, temp)[0].float()
        isz = sd.element_size()
        g = torch.ones((), device="cuda")
        fwd_bytes = (ncrops * B * isz + 2 * B * 4) * K  # S and Q once
        bwd_bytes = (2 * ncrops * B * isz + 2 * B * 4) * K  # S and Q once more, dS written
        best = {}
        print_header(SWEEP_COLS)
        for block_k in SWEEP_BLOCK_K:
            for nrows in SWEEP_ROWS:
                for nw in SWEEP_WARPS:
                    for pps in SWEEP_PPS:
                        n_tiles = -(-K // block_k)
                        n_groups = max(1, min(B, -(-pps * sce.sm_count(sd.device) // n_tiles)))
                        gs = -(-B // n_groups)
                        launch = dict(block_k=block_k, group_size=gs, num_warps=nw, rows=nrows)
                        op_args = _op_args(ncrops, launch)
                        try:
                            _, lse = sce.soft_cross_entropy_op(sd, q, None, *op_args)
                        except Exception as e:  # e.g. out of resources for the largest tiles
                            print(f"# skip {launch}: {type(e).__name__}", file=sys.stderr)
                            continue
                        fwd = graph_ms(lambda: sce.soft_cross_entropy_op(sd, q, None, *op_args))
                        bwd = graph_ms(lambda: sce.soft_cross_entropy_backward_op(g, sd, q, lse, None, *op_args))
                        r = {"dtype": dt, "block_k": block_k, "rows": nrows, "num_warps": nw, "pps": pps,
                             "group_size": gs, "programs": n_tiles * -(-B // gs), "fwd_ms": fwd, "bwd_ms": bwd,
                             "fwd_frac": fwd_bytes / (fwd * 1e-3) / 1e9 / peak if fwd and peak else None,
                             "bwd_frac": bwd_bytes / (bwd * 1e-3) / 1e9 / peak if bwd and peak else None}
                        rows.append(r)
                        print_row(r, SWEEP_COLS)
                        for kind in ("fwd", "bwd"):
                            if r[f"{kind}_ms"] and (kind not in best or r[f"{kind}_ms"] < best[kind][f"{kind}_ms"]):
                                best[kind] = r
                        del lse
        torch.cuda.empty_cache()
        cur = {k: sce.launch_config(B, K, ncrops, 2, isz, sd.device, k) for k in ("fwd", "bwd")}
        print(f"\n# {dt}: current table fwd {cur['fwd']} bwd {cur['bwd']} (BLOCK_K, ROWS, num_warps, group_size)")
        for kind, table in (("fwd", "FWD_CONFIG"), ("bwd", "BWD_CONFIG")):
            if kind in best:
                r = best[kind]
                print(f"# best {kind} {dt}: {r[f'{kind}_ms']:.4f} ms ({r[f'{kind}_frac'] or 0:.2f} of peak) -> in "
                      f"kernels/soft_cross_entropy.py set {table}[{isz}] = ({r['block_k']}, {r['rows']}, "
                      f"{r['num_warps']}) and PROGRAMS_PER_SM[\"{kind}\"][{isz}] = {r['pps']}")
        print()
    return rows


# ---------------------------------------------------------------------------------------------- head
def head_variants():
    from fastdino.kernels.linear_soft_cross_entropy import linear_soft_cross_entropy
    from fastdino.kernels.soft_cross_entropy import soft_cross_entropy

    def unfused_fused_loss(x, w, q, ncrops):
        return soft_cross_entropy(F.linear(x, w), q, ncrops, STUDENT_TEMP)

    def fused_head(x, w, q, ncrops):
        return linear_soft_cross_entropy(x, w, q, ncrops, STUDENT_TEMP)

    def unfused_reference(x, w, q, ncrops):
        return linear_soft_cross_entropy_ref(x, w, q, ncrops, STUDENT_TEMP)

    return {"linear+reference": unfused_reference, "linear+fused": unfused_fused_loss, "fused_head": fused_head}


def head_bench(args) -> list[dict]:
    """Last layer (D -> K, weight given) + loss against fp32 targets, forward and backward to X and W."""
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    quick = args.quick or device == "cpu"
    B = (args.B or [4 if quick else 64])[0]
    K = args.K or (1024 if quick else 65536)
    D = 64 if quick else 256
    crops = args.crops or (["2+2"] if quick else ["2+10"])
    dtypes = args.dtypes or (["fp32"] if quick else ["bf16", "fp32"])
    names = list(head_variants()) if device == "cuda" else ["linear+reference"]
    rows = []
    for dt in dtypes:
        dtype = DTYPES[dt]
        for crop in crops:
            ncrops = 2 + int(crop.split("+")[1])
            g = torch.Generator().manual_seed(1)
            x = F.normalize(torch.randn(ncrops * B, D, generator=g), dim=-1).to(device, dtype).requires_grad_()
            w = (torch.randn(K, D, generator=g) * D ** -0.5).to(device, dtype).requires_grad_()
            q = torch.softmax(torch.randn(2 * B, K, generator=g) * 3, dim=-1).to(device)
            base = None
            for name in names:
                fn = head_variants()[name]

                def step():
                    x.grad = w.grad = None
                    fn(x, w, q, ncrops).backward()

                def clear():
                    x.grad = w.grad = None

                r = {"variant": name, "dtype": dt, "crops": crop, "B": B, "K": K, "D": D}
                r["peak_extra_MB"] = peak_extra_mb(step, device, clear)
                clear()
                r["logits_MB"] = ncrops * B * K * x.element_size() / 2**20  # one (n*B, K) tensor
                r["ms"] = time_ms(step, device, 100 if quick else 200)
                if device == "cuda":
                    r["cpu_us"] = cpu_us(step)
                    r["dev_ms"] = graph_ms(step)
                    flops = 6 * ncrops * B * K * D  # forward matmul + the two backward matmuls
                    if r["dev_ms"]:
                        r["TFLOPs"] = flops / (r["dev_ms"] * 1e-3) / 1e12
                clear()
                base = base or r
                compare_to_reference(r, base)
                rows.append(r)
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------- sinkhorn-knopp
SK_VARIANTS = {"sk_reference": "torch", "sk_fused": "triton", "sk_stats": "stats"}
SK_ITERATIONS = 3


def sk_bench(args) -> list[dict]:
    """Sinkhorn-Knopp teacher targets (q, entropy) of 2B teacher rows, reference vs fused; sk_stats:
    the engine's fused path, the normalizers and entropy without writing q (LogitTargets; floor = T
    read once)."""
    from fastdino.kernels.sinkhorn_knopp import sinkhorn_knopp, sinkhorn_knopp_stats

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    quick = args.quick or device == "cpu"
    Bs = args.B or ([4] if quick else [32, 64, 128])
    K = args.K or (4096 if quick else 65536)
    dtypes = args.dtypes or (["fp32"] if quick else ["bf16", "fp32"])
    variants = list(SK_VARIANTS) if _triton_runs(device) else ["sk_reference"]
    peak = args.peak_gbs or (peak_bandwidth_gbs() if device == "cuda" else None)
    temp = torch.full((), TEACHER_TEMP, device=device)
    rows = []
    for dt in dtypes:
        for B in Bs:
            g = torch.Generator().manual_seed(0)
            t = (torch.randn(2 * B, K, generator=g) * 0.3).to(device, DTYPES[dt])
            base = None
            for v in variants:
                def step(impl=SK_VARIANTS[v]):
                    if impl == "stats":
                        return sinkhorn_knopp_stats(t, temp, SK_ITERATIONS)[3:]
                    return sinkhorn_knopp(t, temp, SK_ITERATIONS, impl=impl)

                # T read once (and q written once in fp32, except by sk_stats)
                fb = 2 * B * K * (t.element_size() + (0 if v == "sk_stats" else 4))
                r = {"variant": v, "dtype": dt, "B": B, "R": 2 * B, "K": K, "iters": SK_ITERATIONS,
                     "entropy": float(step()[-1].mean())}
                r["peak_extra_MB"] = peak_extra_mb(step, device)
                measure(r, step, fb, device, 100 if quick else 200, peak)
                base = add_row(rows, r, base or r, device)
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------- iBOT
IBOT_VARIANTS = ("ibot_reference", "ibot_fused")


def ibot_bench(args) -> list[dict]:
    """iBOT patch loss forward+backward on a static masked-token buffer, reference vs fused."""
    import numpy as np

    from fastdino.data.masking import IBOTMasks
    from fastdino.losses.ibot import IBOTTerm

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    quick = args.quick or device == "cpu"
    Bs = args.B or ([2] if quick else [32, 64])
    K = args.K or (1024 if quick else 65536)
    grid = 4 if quick else 16
    dtypes = args.dtypes or (["fp32"] if quick else ["bf16", "fp32"])
    variants = list(IBOT_VARIANTS) if _triton_runs(device) else ["ibot_reference"]
    peak = args.peak_gbs or (peak_bandwidth_gbs() if device == "cuda" else None)
    rows = []
    for dt in dtypes:
        for B in Bs:
            mb = IBOTMasks(grid)(0, 0, np.arange(B)).to(device)
            U = mb.upper_bound
            g = torch.Generator().manual_seed(0)
            x = (torch.randn(U, K, generator=g) * 3).to(device, DTYPES[dt]).requires_grad_()
            real = (torch.arange(U) < int(mb.n_masked)).to(device)
            q = torch.where(real[:, None], torch.softmax(torch.randn(U, K, generator=g) * 2, -1).to(device), 0.0)
            targets = {"patch": q, "patch_weights": mb.mask_weights}
            floor = memory_floor_bytes(U, U, K, x.element_size())
            base = None
            for v in variants:
                term = IBOTTerm(2 * B, STUDENT_TEMP, impl="fused" if v == "ibot_fused" else "reference")

                def step(term=term):
                    x.grad = None
                    loss = term({"patch": x}, targets)
                    loss.backward()
                    return loss

                def clear():
                    x.grad = None

                r = {"variant": v, "dtype": dt, "B": B, "U": U, "n_masked": int(mb.n_masked), "K": K,
                     "loss": float(step().detach())}
                r["peak_extra_MB"] = peak_extra_mb(step, device, clear)
                measure(r, step, floor, device, 100 if quick else 200, peak)
                clear()
                base = add_row(rows, r, base or r, device)
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------- profile
def profile(args) -> None:
    """Per-kernel device time of the fused step (torch.profiler), bf16 and fp32, B=64, 2+10."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for dt in args.dtypes or ["bf16", "fp32"]:
        s, t, c, temp = _inputs(64, 65536, 12, DTYPES[dt], "cuda")

        def step():
            s.grad = None
            _fused(s, t, c, temp, 12)[0].backward()

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        n = 20
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                step()
            torch.cuda.synchronize()
        print(f"\n# fused step, {dt}, B=64, K=65536, 2+10: device time per step by kernel")
        print("| kernel | calls/step | us/step |\n|---|---|---|")
        total = 0.0
        for e in sorted(prof.key_averages(), key=lambda e: -_dev_time(e)):
            us = _dev_time(e) / n
            if us <= 0:
                continue
            total += us
            print(f"| {e.key[:70]} | {e.count / n:.0f} | {us:.1f} |")
        print(f"| total | | {total:.1f} |")


def _dev_time(e) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(e, attr, None)
        if v is not None:
            return float(v)
    return 0.0


# ---------------------------------------------------------------------------------------------- output
MAIN_COLS = ["variant", "dtype", "crops", "B", "K", "ms", "cpu_us", "dev_ms", "targets_ms", "fwd_ms", "bwd_ms",
             "dev_GBps", "floor_frac", "peak_extra_MB", "mem_vs_ref", "speedup", "dev_speedup", "GBps",
             "block_k", "num_warps", "group_size", "rows"]
SWEEP_COLS = ["dtype", "block_k", "rows", "num_warps", "pps", "group_size", "programs", "fwd_ms", "fwd_frac",
              "bwd_ms", "bwd_frac"]
SK_COLS = ["variant", "dtype", "B", "R", "K", "iters", "ms", "cpu_us", "dev_ms", "dev_GBps", "floor_frac",
           "peak_extra_MB", "mem_vs_ref", "speedup", "dev_speedup", "GBps", "entropy"]
IBOT_COLS = ["variant", "dtype", "B", "U", "n_masked", "K", "ms", "cpu_us", "dev_ms", "dev_GBps", "floor_frac",
             "peak_extra_MB", "mem_vs_ref", "speedup", "dev_speedup", "GBps", "loss"]
HEAD_COLS = ["variant", "dtype", "crops", "B", "K", "D", "ms", "cpu_us", "dev_ms", "TFLOPs", "peak_extra_MB",
             "logits_MB", "mem_vs_ref", "speedup", "dev_speedup"]


def _cell(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) and abs(v) < 10 else \
        f"{v:.1f}" if isinstance(v, float) else str(v)


def print_header(cols) -> None:
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols), flush=True)


def print_row(r: dict, cols) -> None:
    print("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |", flush=True)


def print_table(rows: list[dict], cols=None) -> None:
    cols = [c for c in (cols or MAIN_COLS) if any(c in r for r in rows)]
    print_header(cols)
    for r in rows:
        print("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
    print(flush=True)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, nargs="*", help="batch sizes per GPU")
    p.add_argument("--K", type=int, help="out_dim")
    p.add_argument("--crops", nargs="*", help="like 2+8 2+10")
    p.add_argument("--dtypes", nargs="*", choices=list(DTYPES))
    p.add_argument("--variants", nargs="*", choices=list(VARIANTS))
    p.add_argument("--quick", action="store_true", help="small sizes (CPU smoke test)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    p.add_argument("--sweep", action="store_true", help="CUDA: time the loss fwd/bwd launch configurations")
    p.add_argument("--sweep-dtypes", nargs="*", default=["bf16", "fp32"], choices=list(DTYPES))
    p.add_argument("--head", action="store_true", help="fused head (last layer + loss) table")
    p.add_argument("--profile", action="store_true", help="CUDA: per-kernel device time of the fused step")
    p.add_argument("--sk", action="store_true", help="Sinkhorn-Knopp teacher targets: reference vs fused")
    p.add_argument("--ibot", action="store_true", help="iBOT masked-patch loss: reference vs fused")
    p.add_argument("--suite", action="store_true",
                   help="CUDA: main table (B=64, 2+10/2+8, bf16/fp32), kernel breakdown, sweep, head table, "
                        "Sinkhorn-Knopp table, iBOT table")
    p.add_argument("--peak-gbs", type=float, help="peak DRAM bandwidth (default: from NVML)")
    p.add_argument("--json", help="write the rows to this JSON file")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    if (args.sweep or args.profile or args.suite) and not cuda:
        p.error("--sweep/--profile/--suite need CUDA")
    if args.variants and "fused" in args.variants and not _triton_runs("cuda" if cuda else "cpu"):
        p.error("--variants fused on CPU needs TRITON_INTERPRET=1 (the Triton interpreter)")
    out = {}
    if args.suite:
        args.B, args.crops, args.dtypes = args.B or [64], args.crops or ["2+10", "2+8"], args.dtypes or ["bf16", "fp32"]
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
              f"{__import__('triton').__version__}, peak {args.peak_gbs or peak_bandwidth_gbs()} GB/s\n")
        out["main"] = run(args)
        print("## Loss fwd+bwd from teacher logits (ms: host-inclusive do_bench; dev_ms: CUDA graph; "
              "floor_frac on dev_ms)")
        print_table(out["main"], MAIN_COLS)
        profile(args)
        print("\n## Launch sweep (device time), B=64, K=65536, 2+10")
        out["sweep"] = sweep(args)
        print("## Fused head (last layer 256->65536 + loss), fwd+bwd to X and W")
        out["head"] = head_bench(argparse.Namespace(**{**vars(args), "B": [64], "crops": ["2+10"]}))
        print_table(out["head"], HEAD_COLS)
        print("## Sinkhorn-Knopp teacher targets (3 iterations), B=64")
        out["sk"] = sk_bench(argparse.Namespace(**{**vars(args), "B": [64]}))
        print_table(out["sk"], SK_COLS)
        print("## iBOT masked-patch loss fwd+bwd, B=64 (U masked-token rows)")
        out["ibot"] = ibot_bench(argparse.Namespace(**{**vars(args), "B": [64]}))
        print_table(out["ibot"], IBOT_COLS)
        rows = out["main"]
    elif args.sweep:
        rows = out["sweep"] = sweep(args)
        print_table(sorted(rows, key=lambda r: (r["dtype"], r["fwd_ms"] or 1e9)), SWEEP_COLS)
    elif args.profile:
        profile(args)
        rows = []
    elif args.sk:
        rows = out["sk"] = sk_bench(args)
        print_table(rows, SK_COLS)
    elif args.ibot:
        rows = out["ibot"] = ibot_bench(args)
        print_table(rows, IBOT_COLS)
    elif args.head:
        rows = out["head"] = head_bench(args)
        print_table(rows, HEAD_COLS)
    else:
        rows = out["main"] = run(args)
        print_table(rows, MAIN_COLS)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out if args.suite else rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
