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

    python benchmarks/residual_norm.py --smoke                  # CPU (Triton interpreter), tiny sizes
    python benchmarks/residual_norm.py                          # CUDA: ViT-S/16 and ViT-B/8-ish sizes, bf16
    python benchmarks/residual_norm.py --dtypes bf16 fp32 --results benchmarks/results.jsonl
"""
from __future__ import annotations

import os
import sys

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernel_bench  # noqa: E402  (the command line, timer and rows the op benchmarks share)
from kernel_bench import time_ms  # noqa: E402
import fastdino  # noqa: E402,F401  (registers fastdino.kernels from a plain checkout)
from fastdino.kernels.residual_layer_norm import (memory_floor_bytes, residual_layer_norm,  # noqa: E402
                                                  residual_layer_norm_ref)

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


def main(argv=None) -> list[dict]:
    p = kernel_bench.parser(__doc__, list(DTYPES), "default: bf16 (smoke: fp32 bf16)")
    args = p.parse_args(argv)
    device = kernel_bench.device_for(p, args)
    configs = SMOKE_CONFIGS if args.smoke else GPU_CONFIGS
    dtypes = args.dtypes or (["fp32", "bf16"] if args.smoke else ["bf16"])
    reps = args.reps or (20 if args.smoke else 100)
    common = kernel_bench.common_fields("residual_norm.py", device, argv)
    rows = []
    for dtype_name in dtypes:
        for N, C, gamma in configs:
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
