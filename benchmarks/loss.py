"""Benchmark: DINO loss forward+backward (with the center update), reference vs fused.

Variants: reference (the official double loop over pairs, fastdino.loss.dino_loss_pairs_ref + center
update), torch (vectorized PyTorch formulation of the one-pass algebra, kernels.dino_loss_torch),
fused (Triton kernels, CUDA only). Reports ms, GB/s against the memory-traffic floor (student read
twice, teacher read once, gradient written once), the fraction of the GPU's peak bandwidth that
is, the peak extra memory (CUDA: max_memory_allocated above the inputs) and the speedup over the
reference.

    python benchmarks/loss.py                      # CUDA: B 32/64/128, K 65536, 2+8 and 2+10 crops, fp32 and bf16
    python benchmarks/loss.py --quick              # small CPU-friendly sizes (CI smoke test)
    python benchmarks/loss.py --sweep              # CUDA: fused launch configs at B=64, K=65536, 2+10, bf16
    python benchmarks/loss.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastdino  # noqa: E402,F401  (registers fastdino.kernels from a plain checkout)
from fastdino.loss import dino_loss_pairs_ref  # noqa: E402

STUDENT_TEMP, TEACHER_TEMP, MOMENTUM = 0.1, 0.04, 0.9
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _reference(s, t, c, ncrops):
    """The official module's work: the pair loop, then the center update (gated as ours)."""
    loss = dino_loss_pairs_ref(s, t, c, ncrops, STUDENT_TEMP, TEACHER_TEMP)
    with torch.no_grad():
        new = c * MOMENTUM + (t.float().sum(0, keepdim=True) / t.shape[0]) * (1 - MOMENTUM)
        c.copy_(torch.where(torch.isfinite(loss.detach()), new, c))
    return loss


def _torch(s, t, c, ncrops):
    from fastdino.kernels.dino_loss import dino_loss_torch

    return dino_loss_torch(s, t, c, ncrops, STUDENT_TEMP, TEACHER_TEMP, MOMENTUM)[0]


def _fused(s, t, c, ncrops, **launch):
    from fastdino.kernels.dino_loss import dino_loss

    return dino_loss(s, t, c, ncrops, STUDENT_TEMP, TEACHER_TEMP, MOMENTUM, **launch)[0]


VARIANTS = {"reference": _reference, "torch": _torch, "fused": _fused}


def peak_bandwidth_gbs() -> float | None:
    """Theoretical DRAM bandwidth of GPU 0 from NVML (memory clock x bus width x 2), GB/s."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(h)
        return clock_mhz * 1e6 * bus_bits / 8 * 2 / 1e9
    except Exception:
        return None


def floor_bytes(B: int, ncrops: int, K: int, itemsize: int) -> int:
    from fastdino.kernels.dino_loss import memory_floor_bytes

    return memory_floor_bytes(ncrops * B, 2 * B, K, itemsize)


def time_ms(fn, device: str, reps: int) -> float:
    if device == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=10, rep=reps)
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while n < 3 or (time.perf_counter() - t0 < reps / 1000 and n < 50):
        fn()
        n += 1
    return (time.perf_counter() - t0) / n * 1e3


def bench_one(variant: str, B: int, K: int, ncrops: int, dtype: torch.dtype, device: str, reps: int,
              **launch) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    s = (torch.randn(ncrops * B, K, generator=g) * 0.3).to(device, dtype).requires_grad_()
    t = (torch.randn(2 * B, K, generator=g) * 0.3).to(device, dtype)
    c = torch.zeros(1, K, device=device)
    fn = VARIANTS[variant]

    def step():
        s.grad = None
        fn(s, t, c, ncrops, **launch).backward()

    peak_extra = None
    if device == "cuda":
        step()
        torch.cuda.synchronize()
        s.grad = None
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak_extra = torch.cuda.max_memory_allocated() - base
    ms = time_ms(step, device, reps)
    fb = floor_bytes(B, ncrops, K, s.element_size())
    return {"variant": variant, "B": B, "K": K, "crops": f"2+{ncrops - 2}", "dtype": str(dtype).split(".")[-1],
            "ms": ms, "floor_MB": fb / 1e6, "GBps": fb / (ms * 1e-3) / 1e9,
            "peak_extra_MB": None if peak_extra is None else peak_extra / 2**20, **launch}


def run(args) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if args.quick or device == "cpu":
        Bs, K, crops, dtypes = args.B or [4], args.K or 4096, args.crops or ["2+2", "2+4"], args.dtypes or ["fp32"]
        reps = 100
    else:
        Bs, K, crops, dtypes = args.B or [32, 64, 128], args.K or 65536, args.crops or ["2+8", "2+10"], \
            args.dtypes or ["fp32", "bf16"]
        reps = 200
    variants = args.variants or (["reference", "torch", "fused"] if device == "cuda" else ["reference", "torch"])
    peak = args.peak_gbs or (peak_bandwidth_gbs() if device == "cuda" else None)
    rows = []
    for dt in dtypes:
        for crop in crops:
            ncrops = 2 + int(crop.split("+")[1])
            for B in Bs:
                base = None
                for v in variants:
                    r = bench_one(v, B, K, ncrops, DTYPES[dt], device, reps)
                    if v == "reference":
                        base = r
                    r["speedup"] = base["ms"] / r["ms"] if base else None
                    r["mem_vs_ref"] = (r["peak_extra_MB"] / base["peak_extra_MB"]
                                       if base and r["peak_extra_MB"] and base["peak_extra_MB"] else None)
                    r["floor_frac"] = r["GBps"] / peak if peak else None
                    r["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
                    rows.append(r)
                    if device == "cuda":
                        torch.cuda.empty_cache()
    return rows


def sweep(args) -> list[dict]:
    """Fused launch configurations at the target shape (for tuning the launch heuristic)."""
    peak = args.peak_gbs or peak_bandwidth_gbs()
    rows = []
    for block_k in (512, 1024, 2048, 4096):
        for num_warps in (2, 4, 8):
            for group_b in (2, 4, 8, 16):
                r = bench_one("fused", 64, 65536, 12, torch.bfloat16, "cuda", 100,
                              block_k=block_k, num_warps=num_warps, group_b=group_b)
                r["floor_frac"] = r["GBps"] / peak if peak else None
                rows.append(r)
    from fastdino.kernels.dino_loss import launch_config

    print("default launch config for B=64, K=65536:", launch_config(64, 65536, torch.device("cuda")))
    return sorted(rows, key=lambda r: r["ms"])


def print_table(rows: list[dict]) -> None:
    cols = ["variant", "dtype", "crops", "B", "K", "ms", "GBps", "floor_frac", "peak_extra_MB", "mem_vs_ref",
            "speedup", "block_k", "num_warps", "group_b"]
    cols = [c for c in cols if any(c in r for r in rows)]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, nargs="*", help="batch sizes per GPU")
    p.add_argument("--K", type=int, help="out_dim")
    p.add_argument("--crops", nargs="*", help="like 2+8 2+10")
    p.add_argument("--dtypes", nargs="*", choices=list(DTYPES))
    p.add_argument("--variants", nargs="*", choices=list(VARIANTS))
    p.add_argument("--quick", action="store_true", help="small sizes (CPU smoke test)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    p.add_argument("--sweep", action="store_true", help="CUDA: time fused launch configurations")
    p.add_argument("--peak-gbs", type=float, help="peak DRAM bandwidth (default: from NVML)")
    p.add_argument("--json", help="write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.sweep and not torch.cuda.is_available():
        p.error("--sweep needs CUDA")
    rows = sweep(args) if args.sweep else run(args)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
