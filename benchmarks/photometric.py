"""Benchmark: the photometric half of the DINO recipe on one loader batch (kernels/photometric.py), the
fused Triton passes vs the torch reference (fastdino.data.augment.photometric: one batched op at a time
on host-selected subsets), as the DALI loader runs it: per size group (2 global crops, N local crops)
of `batch` images, crop-major uint8 [F*B, 3, S, S] on the device and the group's real draws
(fastdino.data.dali.host_params), normalized output in bf16.

Per configuration (batch, n_local, crop sizes, output dtype) and variant (torch = the reference, the
baseline; triton = the fused passes), metrics:
  ms_per_batch     all size groups of one batch (triton.testing.do_bench on CUDA, L2 flushed)
  images_per_s     batch / ms_per_batch
  bytes_per_pixel  (triton) the fused passes' modeled DRAM traffic per output pixel: the uint8 read, once
                   more where jittered (the contrast sums), the fp32 scratch written and read where blurred,
                   the output written
  kernels          (triton) launches per batch (one parameter copy per size group besides)
Each metric is one JSON row (benchmarks/kernel_bench.py): to stdout, or appended to --results. Target
(issue 18): the DALI loader at >= 4,000 images/s for 2+10 crops; on an H100 the torch ops took 23.1 ms
alone per batch of 128 (RESULTS.md), a quarter of that budget by themselves.

    python benchmarks/photometric.py --smoke                  # CPU (Triton interpreter), tiny sizes
    python benchmarks/photometric.py                          # CUDA: batch 128 and 256, 2 + 10 crops
    python benchmarks/photometric.py --results benchmarks/results.jsonl
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # the interpreter must be chosen before triton is imported
    if not __import__("torch").cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import fastdino  # noqa: E402,F401  (registers fastdino.kernels from a plain checkout)
import kernel_bench  # noqa: E402
from fastdino.data.augment import crop_specs  # noqa: E402
from fastdino.kernels.photometric import photometric  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GPU_CONFIGS = [(128, 10, 224, 96), (256, 10, 224, 96)]  # batch, n_local, global size, local size
SMOKE_CONFIGS = [(1, 1, 6, 4)]


def loader_batch(batch: int, device, n_local: int = 10, global_size: int = 224, local_size: int = 96,
                 seed: int = 0) -> list[tuple[torch.Tensor, dict]]:
    """One loader batch as the DALI path makes it: per size group, crop-major uint8 [F*B, 3, S, S]
    (random pixels) on `device` and the group's host parameters (dali.host_params: the real draws)."""
    from fastdino.data.dali import host_params, size_groups

    specs = crop_specs(global_size, local_size, n_local)
    feed = host_params(specs, seed, 0, np.arange(batch), np.full(batch, 500), np.full(batch, 375))
    g = torch.Generator().manual_seed(seed)
    groups = []
    for ids, p in zip(size_groups(specs), feed["photometric"]):
        S = specs[ids[0]].size
        x = torch.randint(0, 256, (len(ids) * batch, 3, S, S), generator=g, dtype=torch.uint8)
        groups.append((x.to(device), p))
    return groups


def fused_traffic(groups, dtype) -> tuple[float, int]:
    """(modeled bytes per output pixel, kernel launches) of the fused passes on these groups."""
    out_bytes = torch.empty((), dtype=dtype).element_size() * 3
    pixels = sum(x.shape[0] * x.shape[2] * x.shape[3] for x, _ in groups)
    traffic = sum(x.shape[2] * x.shape[3] * (x.shape[0] * (3 + out_bytes) + 3 * int(p["jitter"].sum())
                                            + 24 * int(p["blur"].sum())) for x, p in groups)
    kernels = sum(1 + bool(p["jitter"].any()) + bool(p["blur"].any()) for _, p in groups)
    return traffic / pixels, kernels


def bench_config(batch, n_local, global_size, local_size, dtype_name, device, reps) -> list[tuple[str, dict]]:
    dtype = DTYPES[dtype_name]
    groups = loader_batch(batch, device, n_local, global_size, local_size)
    config = {"batch": batch, "n_local": n_local, "global_size": global_size, "local_size": local_size,
              "dtype": dtype_name}
    out = []
    for variant in ("torch", "triton"):
        def run(impl=variant):
            return [photometric(x, p, dtype, impl=impl) for x, p in groups]

        ms = kernel_bench.time_ms(run, device, reps)
        metrics = {"ms_per_batch": ms, "images_per_s": batch / ms * 1e3}
        if variant == "triton":
            metrics["bytes_per_pixel"], metrics["kernels"] = fused_traffic(groups, dtype)
        out.append((variant, {"config": config, "metrics": metrics}))
    return out


def main(argv=None) -> list[dict]:
    p = kernel_bench.parser(__doc__, list(DTYPES), "default: bf16")
    args = p.parse_args(argv)
    device = kernel_bench.device_for(p, args)
    reps = args.reps or (20 if args.smoke else 100)
    common = kernel_bench.common_fields("photometric.py", device, argv)
    rows = []
    for dtype_name in args.dtypes or ["bf16"]:
        for cfg in SMOKE_CONFIGS if args.smoke else GPU_CONFIGS:
            base = None
            for variant, r in bench_config(*cfg, dtype_name, device, reps):
                rows += kernel_bench.variant_rows(common, r, variant, base)
                base = base or r
                print(f"# {variant:6s} {dtype_name} {r['config']}: {r['metrics']}", file=sys.stderr, flush=True)
    kernel_bench.write_rows(rows, args.results)
    return rows


if __name__ == "__main__":
    main()
