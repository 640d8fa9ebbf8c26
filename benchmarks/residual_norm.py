"""Benchmark: fused residual + drop path + LayerScale + LayerNorm (kernels/residual_layer_norm.py), the
Triton kernels vs the unfused reference in plain PyTorch (residual_layer_norm_ref: scale, add, cast,
F.layer_norm, each a kernel of its own, and autograd's backward of that chain).

Per configuration (N rows, C channels, dtype of x / y / h / out, gamma on or off; drop-path scales
always on, 0 or 1/0.9 per row) and variant (torch = residual_layer_norm_ref, the baseline; triton =
residual_layer_norm, impl="triton"), metrics:
  fwd_ms, bwd_ms   forward (h, out), and the backward from given (dh, dout) to x, y, weight, bias (and
                   gamma) on a retained graph (triton.testing.do_bench on CUDA, L2 flushed)
  fwd_GBps, bwd_GBps   the copy floor over the time: bytes the op must read + write (forward: x, y in;
                   h, out out; backward: h, dout, dh (y with gamma) in; dx, dy out), see memory_floor_bytes
  max_err_out      max |out - out of the fp32 reference| (the variants must agree)
Each metric is one JSON row: date, device, torch, triton, command, config (sizes, fwd_floor_bytes,
bwd_floor_bytes), variant, metric, value, baseline (the torch row's value for the triton rows, null for
the torch rows). Rows go to stdout, or are appended to --results. The GB/s of a copy of the same bytes
on the device is the ceiling to compare with (~3 TB/s on an H100 SXM, ~4 on an H200).

--sweep-bwd (instead of the comparison): the Triton backward alone (residual_layer_norm_bwd_op on the
saved h, mean, rstd of one forward) over a launch grid per configuration: num_warps 4 and 8; block_m
the (up to) 3 largest powers of two whose (block_m, next_pow2(C)) fp32 tiles take at most 16 registers a
thread (the launch table's backward budget); programs 1, 2, 3, 4, 8 x the SM count (1 under the
interpreter) and one per row tile (not persistent), capped at the tile count, duplicates dropped. Variant
"triton", config + launch (block_m, num_warps, programs, the multiple's label, table: whether it is the
launch table's choice), metrics:
  bwd_op_ms, bwd_op_GBps   do_bench of the op (host launch overhead included; L2 flushed)
  bwd_graph_ms, bwd_graph_GBps   CUDA only: the op's calls replayed from a CUDA graph (GPU time alone)
  max_rel_diff     max over dx, dy, dweight, dbias (dgamma) of max|this - table| / max|table|
baseline = the launch table's row for the same metric. The best launch per configuration (by graph time
on CUDA) is printed to stderr. Each launch is timed briefly (--reps default 5 ms here).

    python benchmarks/residual_norm.py --smoke                  # CPU (Triton interpreter), tiny sizes
    python benchmarks/residual_norm.py                          # CUDA: ViT-S/16 and ViT-B/8-ish sizes, bf16
    python benchmarks/residual_norm.py --dtypes bf16 fp32 --results benchmarks/results.jsonl
    python benchmarks/residual_norm.py --sweep-bwd              # CUDA: the backward's launch grid (< 1 min)
"""
from __future__ import annotations

import os
import sys

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import triton  # noqa: E402  (after TRITON_INTERPRET)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernel_bench  # noqa: E402  (the command line, timer and rows the op benchmarks share)
from kernel_bench import time_ms  # noqa: E402
import fastdino  # noqa: E402,F401  (registers fastdino.kernels from a plain checkout)
from fastdino.kernels.residual_layer_norm import (backward_programs, launch_config, memory_floor_bytes,  # noqa: E402
                                                  residual_layer_norm, residual_layer_norm_bwd_op,
                                                  residual_layer_norm_op, residual_layer_norm_ref)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (N, C, gamma): ViT-S/16 at 224 px, 256 images (197 tokens each); ViT-B at 448 px / patch 16, 64 images
# (785 tokens); with gamma: DINOv2's LayerScale.
GPU_CONFIGS = [(256 * 197, 384, False), (256 * 197, 384, True), (64 * 785, 768, False), (64 * 785, 768, True)]
SMOKE_CONFIGS = [(37, 48, True), (20, 200, False)]
EPS = 1e-6


def _inputs(N, C, gamma, dtype, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, generator=g).to(device, dtype)
    y = torch.randn(N, C, generator=g).to(device, dtype)
    weight = (1 + 0.1 * torch.randn(C, generator=g)).to(device)
    bias = (0.1 * torch.randn(C, generator=g)).to(device)
    scale = ((torch.rand(N, generator=g) < 0.9).float() / 0.9).to(device)
    gam = (0.1 * torch.randn(C, generator=g)).to(device) if gamma else None
    dh = torch.randn(N, C, generator=g).to(device, dtype)
    dout = torch.randn(N, C, generator=g).to(device, dtype)
    return x, y, weight, bias, scale, gam, dh, dout


def bench_config(N, C, gamma, dtype_name, variant, device, reps) -> dict:
    dtype = DTYPES[dtype_name]
    x, y, weight, bias, scale, gam, dh, dout = _inputs(N, C, gamma, dtype, device)
    if variant == "triton":
        def op(*a):
            return residual_layer_norm(*a[:4], scale=scale, gamma=a[4] if gamma else None, eps=EPS, impl="triton")
    else:
        def op(*a):
            return residual_layer_norm_ref(*a[:4], scale=scale, gamma=a[4] if gamma else None, eps=EPS)
    leaves = [t.clone().requires_grad_() for t in (x, y, weight, bias) + ((gam,) if gamma else ())]

    def forward():
        with torch.no_grad():
            return op(*leaves)

    h, out = op(*leaves)

    def backward():
        torch.autograd.backward([h, out], [dh, dout], retain_graph=True)

    out_ref = residual_layer_norm_ref(x, y, weight, bias, scale, gam, EPS)[1]
    metrics = {"max_err_out": (forward()[1].float() - out_ref.float()).abs().max().item()}
    metrics["fwd_ms"] = time_ms(forward, device, reps)
    metrics["bwd_ms"] = time_ms(backward, device, reps, grad_to_none=leaves)
    fwd_floor = memory_floor_bytes(N, C, x.element_size(), backward=False)
    bwd_floor = memory_floor_bytes(N, C, x.element_size(), gamma=gamma) - fwd_floor
    metrics["fwd_GBps"] = fwd_floor / (metrics["fwd_ms"] * 1e-3) / 1e9
    metrics["bwd_GBps"] = bwd_floor / (metrics["bwd_ms"] * 1e-3) / 1e9
    config = {"N": N, "C": C, "gamma": gamma, "dtype": dtype_name, "fwd_floor_bytes": fwd_floor,
              "bwd_floor_bytes": bwd_floor}
    return {"config": config, "metrics": metrics}


# ---- --sweep-bwd --------------------------------------------------------------------------------
PROGRAM_MULTIPLES = (1, 2, 3, 4, 8)  # x the SM count
SWEEP_ELEMENTS_PER_THREAD = 16  # fp32 elements of one (BLOCK_M, BLOCK_C) tile per thread: the table's backward
SWEEP_BLOCK_MS = 3  # the largest powers of two within that budget


def sweep_launches(N: int, C: int, sm_count: int) -> list[dict]:
    """The backward's launch grid (see the header): dicts of block_m, num_warps, programs (the effective
    grid, as backward_programs caps it) and label ("3xSM", "per_tile")."""
    BLOCK_C = triton.next_power_of_2(C)
    launches = []
    for num_warps in (4, 8):
        cap = max(1, SWEEP_ELEMENTS_PER_THREAD * 32 * num_warps // BLOCK_C)
        block_ms = [1 << i for i in range(cap.bit_length()) if 1 << i <= cap][-SWEEP_BLOCK_MS:]
        for block_m in block_ms:
            n_tiles = triton.cdiv(N, block_m)
            seen = set()
            for label, programs in [(f"{m}xSM", m * sm_count) for m in PROGRAM_MULTIPLES] + [("per_tile", n_tiles)]:
                P = min(programs, n_tiles)
                if P not in seen:
                    seen.add(P)
                    launches.append({"block_m": block_m, "num_warps": num_warps, "programs": P, "label": label})
    return launches


def sweep_config(N, C, gamma, dtype_name, device, reps) -> list[dict]:
    """The Triton backward over sweep_launches: [{"config", "metrics"}], the launch table's first."""
    dtype = DTYPES[dtype_name]
    x, y, weight, bias, scale, gam, dh, dout = _inputs(N, C, gamma, dtype, device)
    with torch.no_grad():
        h, _out, mean, rstd = residual_layer_norm_op(x, y, weight, bias, scale, gam, EPS, dtype, dtype, 0, 0, 0)
    y_saved = y if gamma else None  # the forward keeps the branch output only for dgamma

    def bwd(block_m, programs, num_warps):
        return residual_layer_norm_bwd_op(dh, dout, h, y_saved, weight, scale, gam, mean, rstd, dtype, dtype,
                                          block_m, programs, num_warps)

    sm_count = torch.cuda.get_device_properties(device).multi_processor_count if device == "cuda" else 1
    bm, _bc, nw = launch_config(C, backward=True)
    table = {"block_m": bm, "num_warps": nw, "programs": backward_programs(N, bm, torch.device(device))}
    launches = sweep_launches(N, C, sm_count)
    launches.sort(key=lambda l: not all(l[k] == v for k, v in table.items()))  # the table's first (the baseline)
    if not all(launches[0][k] == v for k, v in table.items()):  # the table outside the grid: time it too
        launches.insert(0, {**table, "label": f"{table['programs'] / sm_count:g}xSM"})
    want = [t for t in bwd(0, 0, 0) if t.numel()]
    fwd_floor = memory_floor_bytes(N, C, x.element_size(), backward=False)
    bwd_floor = memory_floor_bytes(N, C, x.element_size(), gamma=gamma) - fwd_floor
    results = []
    for i, launch in enumerate(launches):
        args = (launch["block_m"], launch["programs"], launch["num_warps"])
        got = [t for t in bwd(*args) if t.numel()]
        diff = max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
                   for a, b in zip(got, want))
        metrics = {"bwd_op_ms": time_ms(lambda: bwd(*args), device, reps)}
        metrics["bwd_op_GBps"] = bwd_floor / (metrics["bwd_op_ms"] * 1e-3) / 1e9
        if device == "cuda":
            metrics["bwd_graph_ms"] = kernel_bench.graph_ms(lambda: bwd(*args))
            metrics["bwd_graph_GBps"] = bwd_floor / (metrics["bwd_graph_ms"] * 1e-3) / 1e9
        metrics["max_rel_diff"] = diff
        config = {"N": N, "C": C, "gamma": gamma, "dtype": dtype_name, "bwd_floor_bytes": bwd_floor,
                  "launch": {**launch, "table": i == 0}}
        results.append({"config": config, "metrics": metrics})
    return results


def sweep_summary(results: list[dict]) -> str:
    """One line: the best launch (by graph time where measured, else op time) against the table's."""
    key = "bwd_graph_ms" if "bwd_graph_ms" in results[0]["metrics"] else "bwd_op_ms"
    best = min(results, key=lambda r: r["metrics"][key])

    def describe(r):
        launch, m = r["config"]["launch"], r["metrics"]
        graph = f", graph {m['bwd_graph_ms']:.4f} ms {m['bwd_graph_GBps']:.0f} GB/s" if "bwd_graph_ms" in m else ""
        return (f"block_m={launch['block_m']} num_warps={launch['num_warps']} programs={launch['programs']} "
                f"({launch['label']}): op {m['bwd_op_ms']:.4f} ms {m['bwd_op_GBps']:.0f} GB/s{graph}")

    c = results[0]["config"]
    return (f"# sweep {c['dtype']} N={c['N']} C={c['C']} gamma={c['gamma']}: best {describe(best)}; "
            f"table {describe(results[0])}")


def main(argv=None) -> list[dict]:
    p = kernel_bench.parser(__doc__, list(DTYPES), "default: bf16 (smoke: fp32 bf16)")
    p.add_argument("--sweep-bwd", action="store_true",
                   help="instead of the comparison: the Triton backward alone over a launch grid (see above)")
    args = p.parse_args(argv)
    device = kernel_bench.device_for(p, args)
    configs = SMOKE_CONFIGS if args.smoke else GPU_CONFIGS
    dtypes = args.dtypes or (["fp32", "bf16"] if args.smoke else ["bf16"])
    reps = args.reps or (5 if args.sweep_bwd else 20 if args.smoke else 100)
    common = kernel_bench.common_fields("residual_norm.py", device, argv)
    rows = []
    for dtype_name in dtypes:
        for N, C, gamma in configs:
            if args.sweep_bwd:
                results = sweep_config(N, C, gamma, dtype_name, device, reps)
                for r in results:
                    rows += kernel_bench.variant_rows(common, r, "triton", results[0])
                print(sweep_summary(results), file=sys.stderr, flush=True)
            else:
                base = None
                for variant in ("torch", "triton"):
                    r = bench_config(N, C, gamma, dtype_name, variant, device, reps)
                    rows += kernel_bench.variant_rows(common, r, variant, base)
                    base = base or r
                    m = r["metrics"]
                    print(f"# {variant:6s} {dtype_name} N={N} C={C} gamma={gamma}: fwd {m['fwd_ms']:.4f} ms "
                          f"{m['fwd_GBps']:.0f} GB/s, bwd {m['bwd_ms']:.4f} ms {m['bwd_GBps']:.0f} GB/s, "
                          f"max_err_out {m['max_err_out']:.3g}", file=sys.stderr, flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    kernel_bench.write_rows(rows, args.results)
    return rows


if __name__ == "__main__":
    main()
