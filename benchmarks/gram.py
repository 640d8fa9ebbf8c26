"""Benchmark: DINOv3 Gram anchoring loss (kernels/gram_loss.py), the tiled Triton kernel vs the official
formula in plain PyTorch (gram_loss_ref: both (B, P, P) Gram matrices materialized, autograd).

Per configuration (B images, P patches, D features, dtype, img_level, removal option) and variant
(torch = gram_loss_ref, the baseline; triton = gram_loss, impl="triton", with the default grad kernel
dx="recompute"; triton_accumulate = the same with dx="accumulate", chosen by --dx), metrics:
  ms             forward + backward to the student features (triton.testing.do_bench on CUDA, L2 flushed)
  fwd_ms         the loss alone, under torch.no_grad (the triton variants run the same loss-only kernel)
  peak_extra_MB  max_memory_allocated above the inputs during forward + backward (CUDA only)
  TFLOPs         useful FLOPs / ms: the two Gram matrices (2 * 2 B P^2 D) + dL/dS (2 B P^2 D); the
                 recompute kernel does more (Gram tiles recomputed per D chunk, see the kernel header),
                 the accumulate kernel these, plus dX read-modify-written in L2
  GBps           the memory floor (student and teacher read once, dL/dS written once) / ms
  loss           the loss value (the variants must agree)
Each metric is one JSON row: date, device, torch, triton, command, config (the sizes, the floors
flop_floor and byte_floor), variant, metric, value, baseline (the torch row's value of the same
metric for the triton rows; null for the torch rows). Rows go to stdout, or are appended to --results.

    python benchmarks/gram.py --smoke                               # CPU (Triton interpreter), tiny sizes, both dx
    python benchmarks/gram.py --dx recompute accumulate             # CUDA: both grad kernels
    python benchmarks/gram.py                                       # CUDA: P 256/1024/4096, D 384/768, bf16+fp32
    python benchmarks/gram.py --dtypes bf16 --results benchmarks/results.jsonl
    python benchmarks/gram.py --dtypes fp32 --tf32       # fp32 features with TF32 matmuls (DINOv2/v3 recipes)
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
from fastdino.kernels.gram_loss import DX_MODES, flop_floor, gram_loss, gram_loss_ref, memory_floor_bytes  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPTIONS = {"none": {}, "remove_neg": {"remove_neg": True},
           "remove_only_teacher_neg": {"remove_only_teacher_neg": True}}
# (B, P, D, img_level, option). B = 2 x images: the two global crops of a per-GPU batch. P = 256 is
# DINOv3's 256 px / patch 16 grid, 1024 and 4096 its high-resolution adaptation (512, 1024 px);
# img_level=False takes one Gram matrix over all B*P rows (N = 4096 here).
GPU_CONFIGS = [
    (64, 256, 768, True, "none"),
    (16, 1024, 768, True, "none"),
    (16, 1024, 768, True, "remove_neg"),
    (4, 4096, 384, True, "none"),
    (2, 4096, 768, True, "none"),
    (16, 256, 384, False, "none"),
]
SMOKE_CONFIGS = [(2, 24, 32, True, "none"), (2, 24, 32, False, "remove_neg")]
KERNEL_VARIANTS = {"triton": "recompute", "triton_accumulate": "accumulate"}  # variant: gram_loss(dx=...)


def _features(B, P, D, dtype, device):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(B, P, D, generator=g) + 0.4 * torch.randn(B, 1, D, generator=g)
    t = s + 0.6 * torch.randn(B, P, D, generator=g)
    return s.to(device, dtype), t.to(device, dtype)


def peak_extra_mb(fn, device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_config(B, P, D, img_level, option, dtype_name, variant, device, reps) -> dict:
    """The metrics of one (configuration, variant); an out-of-memory run gives None values."""
    dtype = DTYPES[dtype_name]
    s, t = _features(B, P, D, dtype, device)
    kw = dict(img_level=img_level, **OPTIONS[option])
    if variant in KERNEL_VARIANTS:
        def loss_fn(x, y):
            return gram_loss(x, y, impl="triton", dx=KERNEL_VARIANTS[variant], **kw)
    else:
        def loss_fn(x, y):
            return gram_loss_ref(x, y, **kw)
    x = s.clone().requires_grad_()

    def step():
        x.grad = None
        loss_fn(x, t).backward()

    def forward():
        with torch.no_grad():
            return loss_fn(s, t)

    out = {"loss": None, "ms": None, "fwd_ms": None, "peak_extra_MB": None}
    try:
        out["loss"] = float(forward())
        step()  # compile / warm up outside the peak-memory measurement
        out["peak_extra_MB"] = peak_extra_mb(step, device)
        out["ms"] = time_ms(step, device, reps)
        out["fwd_ms"] = time_ms(forward, device, reps)
    except torch.cuda.OutOfMemoryError:
        print(f"# {variant} B={B} P={P} D={D} {dtype_name}: out of memory", file=sys.stderr)
    finally:
        x.grad = None
        if device == "cuda":
            torch.cuda.empty_cache()
    N = B * P if not img_level else P  # rows per Gram matrix
    n_mats = 1 if not img_level else B
    flops = flop_floor(n_mats, N, D)
    byte_floor = memory_floor_bytes(B, P, D, s.element_size())
    if out["ms"]:
        out["TFLOPs"] = flops / (out["ms"] * 1e-3) / 1e12
        out["GBps"] = byte_floor / (out["ms"] * 1e-3) / 1e9
    config = {"B": B, "P": P, "D": D, "dtype": dtype_name, "img_level": img_level, "option": option,
              "tf32": torch.backends.cuda.matmul.allow_tf32, "flop_floor": flops, "byte_floor": byte_floor}
    return {"config": config, "metrics": out}


def main(argv=None) -> list[dict]:
    p = kernel_bench.parser(__doc__, list(DTYPES), "default: bf16 fp32 (smoke: fp32)")
    p.add_argument("--tf32", action="store_true", help="fp32 matmuls in TF32, the reference's and the kernel's "
                   "(torch.backends.cuda.matmul.allow_tf32, as train.allow_tf32 and the official DINOv2/v3 code)")
    p.add_argument("--dx", nargs="+", choices=DX_MODES, help="the grad kernels to time, each a variant "
                   "(recompute: triton, accumulate: triton_accumulate); default: recompute (smoke: both)")
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    device = kernel_bench.device_for(p, args)
    configs = SMOKE_CONFIGS if args.smoke else GPU_CONFIGS
    dtypes = args.dtypes or (["fp32"] if args.smoke else ["bf16", "fp32"])
    reps = args.reps or (20 if args.smoke else 100)
    dx_modes = args.dx or (list(DX_MODES) if args.smoke else ["recompute"])
    common = kernel_bench.common_fields("gram.py", device, argv)
    rows = []
    for dtype_name in dtypes:
        for B, P, D, img_level, option in configs:
            base = None
            for variant in ["torch"] + [v for v, mode in KERNEL_VARIANTS.items() if mode in dx_modes]:
                r = bench_config(B, P, D, img_level, option, dtype_name, variant, device, reps)
                rows += kernel_bench.variant_rows(common, r, variant, base, skip=lambda metric, value: (
                    value is None and metric == "peak_extra_MB" and device == "cpu"))
                base = base or r
                m = r["metrics"]
                print(f"# {variant:17s} {dtype_name} B={B} P={P} D={D} img_level={img_level} {option}: "
                      f"ms={m['ms']} fwd_ms={m['fwd_ms']} peak_extra_MB={m['peak_extra_MB']} "
                      f"TFLOPs={m.get('TFLOPs')} loss={m['loss']}", file=sys.stderr, flush=True)
    kernel_bench.write_rows(rows, args.results)
    return rows


if __name__ == "__main__":
    main()
