"""Benchmark: fused bias + exact GELU (kernels/bias_gelu.py) for the ViT MLP's first Linear, the Triton
kernels vs the unfused eager PyTorch chain.

Per configuration (N rows, H the MLP hidden width, dtype of h / a / da / dh; the bias is fp32, the
parameter's dtype) and variant:
  torch           the baseline: F.gelu(h + bias) (bias cast to h's dtype, as autocast casts the Linear's
                  bias) with autograd's backward: add, gelu, gelu_backward, and the bias gradient as a
                  sum over the rows of dz, each a kernel of its own
  torch_epilogue  the chain as the ViT runs it, cuBLAS adding the bias in the matmul's epilogue: z = h +
                  bias is made before the timing; F.gelu(z), then gelu_backward and dz.sum(0) (the
                  Linear's bias gradient); the fair baseline for the backward's saved pass
  triton          bias_gelu(h, bias, impl="triton")
metrics:
  fwd_ms, fwdbwd_ms   the forward (no grad), and the forward with grad + the backward from a given da to
                  h and the bias (triton.testing.do_bench on CUDA, L2 flushed; a plain loop on CPU)
  fwd_GBps, fwdbwd_GBps   the fused op's floor over the time: bytes it must move (forward: h in, a out;
                  backward: da, h in, dh out), memory_floor_bytes; the same floor for every variant, so
                  the GB/s compare like inverse times. The unfused chain's own floor (config
                  unfused_floor_bytes) has one more (N, H) pass in the backward: dz re-read for the
                  bias gradient (and for torch, z written and re-read in the forward)
  max_err_out, max_err_dbias   max |a - a_ref|, max |dbias - dbias_ref| against bias_gelu_ref with the
                  fp32 bias (the variants must agree: the torch variants' bf16 bias differs by its
                  rounding)
Each metric is one JSON row: date, device, torch, triton, command, config (N, H, dtype, fwd_floor_bytes,
fwdbwd_floor_bytes, unfused_floor_bytes), variant, metric, value, baseline (the torch row's value for
the other variants, null for the torch rows). Rows go to stdout, or are appended to --results; a table
goes to stderr. The GB/s of a device-to-device copy is the ceiling (~3 TB/s on an H100 SXM, ~4 on an
H200).

Sizes: N = 256 images x (2 x 197 + 10 x 37) tokens = 195584 rows (ViT-S/16 and ViT-B/16 with 2 global
224-px and 10 local 96-px crops), H = 1536 (ViT-S) and 3072 (ViT-B).

    python benchmarks/bias_gelu.py --smoke                      # CPU (Triton interpreter), tiny sizes
    python benchmarks/bias_gelu.py                              # CUDA: ViT-S and ViT-B, bf16 and fp32
    python benchmarks/bias_gelu.py --dtypes bf16 --results benchmarks/results.jsonl
"""
from __future__ import annotations

import os
import sys

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernel_bench  # noqa: E402  (the command line, timer and rows the op benchmarks share)
from kernel_bench import time_ms  # noqa: E402
import fastdino  # noqa: E402,F401  (registers fastdino.kernels from a plain checkout)
from fastdino.kernels.bias_gelu import bias_gelu, bias_gelu_ref, memory_floor_bytes  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TOKENS = 2 * 197 + 10 * 37  # per image: 2 global crops (224 px, 14x14 + CLS) and 10 local (96 px, 6x6 + CLS)
GPU_CONFIGS = [(256 * TOKENS, 1536), (256 * TOKENS, 3072)]  # (N, H): ViT-S/16, ViT-B/16 MLP hidden widths
SMOKE_CONFIGS = [(33, 100), (20, 160)]
VARIANTS = ("torch", "torch_epilogue", "triton")


def _inputs(N, H, dtype, device):
    g = torch.Generator().manual_seed(0)
    h = (2 * torch.randn(N, H, generator=g)).to(device, dtype)
    bias = (0.5 * torch.randn(H, generator=g)).to(device)
    da = torch.randn(N, H, generator=g).to(device, dtype)
    return h, bias, da


def bench_config(N, H, dtype_name, variant, device, reps) -> dict:
    dtype = DTYPES[dtype_name]
    h, bias, da = _inputs(N, H, dtype, device)
    if variant == "torch_epilogue":
        z = (h + bias.to(dtype)).requires_grad_()  # what the Linear with its bias would have written
        leaves = [z]

        def run(grad):
            with torch.set_grad_enabled(grad):
                a = F.gelu(z)
            if not grad:
                return a, None
            dz, = torch.autograd.grad(a, z, da)
            return a, dz.sum(0)  # the Linear's bias gradient
    else:
        hl, bl = h.clone().requires_grad_(), bias.clone().requires_grad_()
        leaves = [hl, bl]
        if variant == "torch":
            def op(x, b):
                return F.gelu(x + b.to(x.dtype))
        else:
            def op(x, b):
                return bias_gelu(x, b, impl="triton")

        def run(grad):
            with torch.set_grad_enabled(grad):
                a = op(hl, bl)
            if not grad:
                return a, None
            torch.autograd.backward(a, da)
            return a, bl.grad

    h_ref, b_ref = h.clone().requires_grad_(), bias.clone().requires_grad_()
    a_ref = bias_gelu_ref(h_ref, b_ref)
    a_ref.backward(da)
    a, dbias = run(True)
    metrics = {"max_err_out": (a.float() - a_ref.float()).abs().max().item(),
               "max_err_dbias": (dbias.float() - b_ref.grad.float()).abs().max().item()}
    for t in leaves:
        t.grad = None
    metrics["fwd_ms"] = time_ms(lambda: run(False), device, reps)
    metrics["fwdbwd_ms"] = time_ms(lambda: run(True), device, reps, grad_to_none=leaves)
    s = h.element_size()
    fwd_floor, fwdbwd_floor = memory_floor_bytes(N, H, s, backward=False), memory_floor_bytes(N, H, s)
    metrics["fwd_GBps"] = fwd_floor / (metrics["fwd_ms"] * 1e-3) / 1e9
    metrics["fwdbwd_GBps"] = fwdbwd_floor / (metrics["fwdbwd_ms"] * 1e-3) / 1e9
    config = {"N": N, "H": H, "dtype": dtype_name, "fwd_floor_bytes": fwd_floor, "fwdbwd_floor_bytes": fwdbwd_floor,
              "unfused_floor_bytes": fwdbwd_floor + N * H * s}
    return {"config": config, "metrics": metrics}


def table(results: list[tuple[str, dict]]) -> str:
    """Rows of (variant, result): ms, GB/s of the fused floor and the speedup over the torch row of the same
    configuration."""
    lines = [f"{'dtype':5s} {'N':>7s} {'H':>5s} {'variant':15s} {'fwd ms':>9s} {'GB/s':>6s} {'x':>5s} "
             f"{'fwd+bwd ms':>10s} {'GB/s':>6s} {'x':>5s}"]
    base = {}
    for variant, r in results:
        c, m = r["config"], r["metrics"]
        key = (c["dtype"], c["N"], c["H"])
        base.setdefault(key, m)
        b = base[key]
        lines.append(f"{c['dtype']:5s} {c['N']:7d} {c['H']:5d} {variant:15s} {m['fwd_ms']:9.4f} {m['fwd_GBps']:6.0f} "
                     f"{b['fwd_ms'] / m['fwd_ms']:5.2f} {m['fwdbwd_ms']:10.4f} {m['fwdbwd_GBps']:6.0f} "
                     f"{b['fwdbwd_ms'] / m['fwdbwd_ms']:5.2f}")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = kernel_bench.parser(__doc__, list(DTYPES), "default: bf16 fp32")
    args = p.parse_args(argv)
    device = kernel_bench.device_for(p, args)
    configs = SMOKE_CONFIGS if args.smoke else GPU_CONFIGS
    reps = args.reps or (20 if args.smoke else 100)
    common = kernel_bench.common_fields("bias_gelu.py", device, argv)
    rows, results = [], []
    for dtype_name in args.dtypes or list(DTYPES):
        for N, H in configs:
            base = None
            for variant in VARIANTS:
                r = bench_config(N, H, dtype_name, variant, device, reps)
                rows += kernel_bench.variant_rows(common, r, variant, base)
                base = base or r
                results.append((variant, r))
                if device == "cuda":
                    torch.cuda.empty_cache()
    print(table(results), file=sys.stderr, flush=True)
    kernel_bench.write_rows(rows, args.results)
    return rows


if __name__ == "__main__":
    main()
