"""Data pipeline throughput: images/s of each backend (torch, dali) for 2+8 and 2+10 crops.

Images/s counts source images (each giving 2 global 224 px + N local 96 px crops) delivered as
normalized device tensors, after a warm-up batch (pipeline build, worker start). Baseline: the torch
backend (PIL decode + crop in DataLoader workers, photometric ops batched on the device). Issue-6
target: DALI >= 4,000 images/s for 2+10 crops on an H100 from ImageNet-size JPEGs.

    python benchmarks/data.py --backend all --device cuda            # GPU machine (DALI importable)
    python benchmarks/data.py --quick                                # CPU smoke test (CI)
The JPEG folder (~500x375 images, ImageNet-like size and quality) is generated when absent.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from multiprocessing import Pool

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from fastdino.config import DataConfig  # noqa: E402
from fastdino.data import build_train_loader, dali_available  # noqa: E402


def _write_one(args):
    from PIL import Image

    from fastdino.data.demo import render_demo_image

    root, i, w, h = args
    label = i % 4
    pixels = render_demo_image(i, label, 4, max(w, h), seed=0)[:h, :w]
    Image.fromarray(pixels).save(os.path.join(root, f"class_{label:02d}", f"img_{i:05d}.jpg"), quality=90)


def make_jpeg_folder(root: str, n: int, w: int = 500, h: int = 375) -> str:
    """n JPEGs of w x h in root/class_XX/ (skipped if present with n images)."""
    from fastdino.data import ImageFolder

    try:
        if len(ImageFolder(root)) == n:
            return root
    except Exception:
        pass
    tmp = root + ".tmp"
    for c in range(4):
        os.makedirs(os.path.join(tmp, f"class_{c:02d}"), exist_ok=True)
    with Pool(min(os.cpu_count() or 1, 16)) as pool:
        pool.map(_write_one, [(tmp, i, w, h) for i in range(n)], chunksize=16)
    if os.path.isdir(root):
        import shutil

        shutil.rmtree(root)
    os.rename(tmp, root)
    return root


def bench(backend: str, n_local: int, args, device: torch.device, photometric: str = "auto",
          host_workers: int | None = None) -> dict:
    cfg = DataConfig(path=args.data, backend=backend, num_workers=args.workers, local_crops_number=n_local,
                     global_crop_size=args.global_size, local_crop_size=args.local_size,
                     photometric_impl=photometric)
    loader = build_train_loader(cfg, args.batch_size, seed=0, device=device, dtype=torch.bfloat16)
    if loader.backend == "dali" and host_workers is not None:
        loader.host_workers = host_workers  # processes making the host side (data.num_workers by default)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    it = loader.epoch(0)
    t0 = time.perf_counter()
    next(it)  # warm-up: pipeline build / worker start / first decode
    sync()
    warm = time.perf_counter() - t0
    steps, epoch = 0, 0
    t0 = time.perf_counter()
    while steps < args.steps:
        try:
            next(it)
        except StopIteration:
            epoch += 1
            it = loader.epoch(epoch)
            continue
        steps += 1
    sync()
    dt = time.perf_counter() - t0
    row = {"backend": loader.backend, "photometric": loader.photometric, "crops": f"2+{n_local}",
           "batch": args.batch_size, "steps": steps,
            "images_per_s": steps * args.batch_size / dt, "ms_per_batch": 1e3 * dt / steps, "warmup_s": warm,
            "cpu_cores": len(os.sched_getaffinity(0)), "workers_or_threads": args.workers, "device": str(device)}
    if loader.backend == "dali":
        row["host_workers"] = loader.host_workers
        row.update(dali_stages(loader, min(args.steps, 5), sync))
        row.update(host_stream(loader, args.steps, args.busy_ms))
        loader.close()  # release the pipeline's memory before the next row
    return row


def dali_stages(loader, reps: int, sync) -> dict:
    """Where a DALI batch's time goes. In-loop counters (ms per batch; the host side runs beside the consumer,
    in data.num_workers processes or a thread): host_read (file reads + header checks), host_params (draws),
    host_wait / dali_wait (consumer blocked on the host queue / on DALI outputs). Then each stage alone,
    synchronized: host batch, DALI graph (decode + crops, one batch, no overlap), photometric (each impl of
    data.photometric_impl on CUDA: torch's batched ops and the fused Triton kernels)."""
    from fastdino.data.dali import build_pipeline

    t = loader.timing
    out = {f"loop_{k[:-2]}_ms": 1e3 * t[k] / max(t["batches"], 1)
           for k in ("host_read_s", "host_params_s", "host_wait_s", "dali_wait_s", "photometric_s")}
    t0 = time.perf_counter()
    items = [loader._host_batch(0, s % loader.steps_per_epoch) for s in range(reps)]
    out["alone_host_ms"] = 1e3 * (time.perf_counter() - t0) / reps
    layout = loader.plan.layout(0)
    pipe = build_pipeline(loader.plan.specs(layout), loader.batch_size, loader.device_id, loader.num_threads,
                          loader.seed)

    def run(item):
        for name in pipe.fastdino_inputs:
            pipe.feed_input(name, item["feed"][name])
        pipe.schedule_run()  # first call prefetches PIPELINE_DEPTH iterations: feed that many
        return pipe.outputs()

    from fastdino.data.dali import PIPELINE_DEPTH

    for name in pipe.fastdino_inputs:  # prime the prefetch
        for _ in range(PIPELINE_DEPTH - 1):
            pipe.feed_input(name, items[0]["feed"][name])
    outs = run(items[0])
    for _ in range(PIPELINE_DEPTH - 1):
        outs = pipe.outputs()
    t0 = time.perf_counter()
    for i in range(reps):
        outs = run(items[i])
    out["alone_dali_ms"] = 1e3 * (time.perf_counter() - t0) / reps
    sync()
    own = loader.photometric
    for impl in ("torch", "triton") if loader.device.type == "cuda" else (own,):  # both impls of the colour ops
        loader.photometric = impl
        loader.to_crops(outs, items[-1]["feed"]["photometric"], layout)  # warm-up (Triton compiles)
        sync()
        t0 = time.perf_counter()
        for i in range(reps):
            loader.to_crops(outs, items[-1]["feed"]["photometric"], layout)
        sync()
        out[f"alone_photometric_{impl}_ms"] = 1e3 * (time.perf_counter() - t0) / reps
    loader.photometric = own
    del pipe, outs
    return out


def host_stream(loader, steps: int, busy_ms: float) -> dict:
    """The host side by itself, as the loader runs it (data.num_workers worker processes, or with 0 a thread
    of this process): ms per batch pulling `steps` batches, first with nothing else running, then with this
    thread busy in Python for busy_ms per batch (a training step's Python work holding the GIL). A thread
    shares the GIL with that work; worker processes do not."""
    out = {}
    for name, busy in (("stream", 0.0), ("stream_gil_busy", busy_ms)):
        items = loader._host_items(0, 0)
        n = min(steps, loader.steps_per_epoch)
        next(items)  # workers started, first batch made
        t0 = time.perf_counter()
        for _ in range(n - 1):
            end = time.perf_counter() + busy / 1e3
            while time.perf_counter() < end:  # pure Python: holds the GIL
                pass
            next(items)
        out[f"host_{name}_ms"] = 1e3 * (time.perf_counter() - t0) / max(n - 1, 1)
        items.close()
    out["host_busy_ms"] = busy_ms
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="all", choices=["all", "torch", "dali"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", default=None, help="JPEG folder (default: generated under /tmp)")
    p.add_argument("--num-images", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30, help="timed batches after the warm-up batch")
    p.add_argument("--workers", type=int, default=min(len(os.sched_getaffinity(0)), 16),
                   help="DataLoader workers (torch) / DALI CPU threads")
    p.add_argument("--locals", default="8,10", help="local crop counts to measure")
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--quick", action="store_true", help="CPU smoke test: few small batches")
    p.add_argument("--photometric", default="auto", choices=["auto", "torch", "triton", "both"],
                   help="data.photometric_impl of the loaders (both: a row of each)")
    p.add_argument("--host-workers", default=None,
                   help="DALI: comma list of host-side worker process counts to measure (0: a thread of the "
                        "training process; default: --workers, as data.num_workers)")
    p.add_argument("--busy-ms", type=float, default=30.0,
                   help="DALI host stream: Python work per batch in the consumer thread (holds the GIL)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.num_images, args.batch_size, args.steps, args.workers = 32, 4, 2, 2
        args.global_size, args.local_size = 96, 48
    args.data = args.data or f"/tmp/fastdino_bench_jpegs_{args.num_images}"
    make_jpeg_folder(args.data, args.num_images)
    device = torch.device(args.device)
    backends = ["torch", "dali"] if args.backend == "all" else [args.backend]
    if "dali" in backends and not dali_available():
        print("dali: not importable, skipped")
        backends.remove("dali")
    impls = ["torch", "triton"] if args.photometric == "both" else [args.photometric]
    if "triton" in impls and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        print("photometric triton: needs CUDA (or TRITON_INTERPRET=1), skipped")
        impls = [i for i in impls if i != "triton"] or ["torch"]
    hosts = [None] if args.host_workers is None else [int(h) for h in args.host_workers.split(",")]
    rows = [bench(b, int(n), args, device, impl, h) for b in backends for n in args.locals.split(",") for impl in impls
            for h in (hosts if b == "dali" else [None])]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n### data pipeline throughput ({name}, {rows[0]['cpu_cores'] if rows else '?'} CPU cores, "
          f"{args.global_size}/{args.local_size} px crops, bf16 out)\n")
    print("| backend | photometric | crops | batch | images/s | ms/batch | warm-up s | workers/threads "
          "| host workers |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['photometric']} | {r['crops']} | {r['batch']} | {r['images_per_s']:.0f} | "
              f"{r['ms_per_batch']:.1f} | {r['warmup_s']:.1f} | {r['workers_or_threads']} | "
              f"{r.get('host_workers', '-')} |")
    stages = [r for r in rows if "alone_dali_ms" in r]
    if stages:
        print("\n#### DALI backend: ms per batch by stage (loop: counters during the timed run; alone: each "
              "stage by itself, synchronized)\n")
        prefixes = ("loop_", "alone_", "host_s", "host_b")
        keys = list(dict.fromkeys(k for r in stages for k in r if k.startswith(prefixes)))
        print("| crops | photometric | host workers | " + " | ".join(keys) + " |")
        print("|---|---|---|" + "---|" * len(keys))
        for r in stages:
            print(f"| {r['crops']} | {r['photometric']} | {r['host_workers']} | "
                  + " | ".join(f"{r[k]:.1f}" if k in r else "-" for k in keys) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
