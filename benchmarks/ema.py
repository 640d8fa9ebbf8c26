"""Teacher EMA and per-tensor gradient clipping: time and GB/s against the memory-traffic floor.

    python benchmarks/ema.py                       # CUDA: ViT-S/16 and ViT-B/8 with DINO heads
    python benchmarks/ema.py --quick               # CPU smoke test (small model, Triton interpreted)
    python benchmarks/ema.py --json out.json

Parameter lists have the exact shapes of the official DINO ViT-S/16 and ViT-B/8 with their heads
(~44M and ~109M parameters, built here without the model code), fp32 as in training.

EMA variants: the reference (kernels/ema.py ema_ref over the parameter list), the baseline
(DINOv2's torch._foreach_mul_/_add_), ema_foreach_ (torch._foreach_* with the momentum on the
device), the flat Triton kernel (ema_flat_, one launch per fastdino.flat.FlatParams buffer) and the
CUDA multi-tensor kernel (fastdino._C) where built. Floor: read teacher + student, write teacher =
3 N * 4 bytes. Clipping variants: the reference (kernels/clip_grad.py clip_grad_per_tensor_ref over
the gradients; also the baseline), clip_grad_foreach_, the flat Triton segmented kernels
(clip_grad_flat_) and the CUDA multi-tensor kernels; every tensor above the clip (worst case),
floor = read N (norms) + read and write N (scale) = 3 N * 4 bytes.
CUDA mode also checks that the steps make zero host synchronizations
(torch.cuda.set_sync_debug_mode("error")) and that flat clipping + EMA replay from a CUDA graph.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

if not torch.cuda.is_available():  # the Triton kernels run interpreted on CPU (before triton imports)
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastdino  # noqa: E402,F401  (registers kernels/ as fastdino.kernels)
from fastdino import multi_tensor  # noqa: E402
from fastdino.flat import FlatParams  # noqa: E402
from fastdino.kernels.clip_grad import (SegmentTable, clip_grad_flat_, clip_grad_foreach_,  # noqa: E402
                                        clip_grad_per_tensor_ref)
from fastdino.kernels.ema import ema_flat_, ema_foreach_, ema_ref  # noqa: E402

# spec HBM bandwidth (GB/s) by device name; the measured torch copy bandwidth is reported beside it
PEAK_GBS = {"H200": 4800, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039,
            "A100-SXM4-40GB": 1555, "A100-PCIE": 1555, "A100 80GB PCIe": 1935, "L40S": 864, "A10G": 600}


def vit_dino_shapes(embed: int, depth: int, patch: int, img: int = 224, out_dim: int = 65536,
                    hidden: int = 2048, bottleneck: int = 256) -> list[tuple[str, tuple, bool]]:
    """(name, shape, requires_grad) of the official DINO ViT + DINOHead (norm_last_layer=True)."""
    tokens = 1 + (img // patch) ** 2
    s = [("cls_token", (1, 1, embed), True), ("pos_embed", (1, tokens, embed), True),
         ("patch_embed.proj.weight", (embed, 3, patch, patch), True), ("patch_embed.proj.bias", (embed,), True)]
    for i in range(depth):
        b = f"blocks.{i}."
        s += [(b + "norm1.weight", (embed,), True), (b + "norm1.bias", (embed,), True),
              (b + "attn.qkv.weight", (3 * embed, embed), True), (b + "attn.qkv.bias", (3 * embed,), True),
              (b + "attn.proj.weight", (embed, embed), True), (b + "attn.proj.bias", (embed,), True),
              (b + "norm2.weight", (embed,), True), (b + "norm2.bias", (embed,), True),
              (b + "mlp.fc1.weight", (4 * embed, embed), True), (b + "mlp.fc1.bias", (4 * embed,), True),
              (b + "mlp.fc2.weight", (embed, 4 * embed), True), (b + "mlp.fc2.bias", (embed,), True)]
    s += [("norm.weight", (embed,), True), ("norm.bias", (embed,), True),
          ("head.mlp.0.weight", (hidden, embed), True), ("head.mlp.0.bias", (hidden,), True),
          ("head.mlp.2.weight", (hidden, hidden), True), ("head.mlp.2.bias", (hidden,), True),
          ("head.mlp.4.weight", (bottleneck, hidden), True), ("head.mlp.4.bias", (bottleneck,), True),
          ("head.last_layer.weight_g", (out_dim, 1), False), ("head.last_layer.weight_v", (out_dim, bottleneck), True)]
    return s


MODELS = {
    "vits16": dict(embed=384, depth=12, patch=16),
    "vitb8": dict(embed=768, depth=12, patch=8),
    "tiny": dict(embed=64, depth=2, patch=16, img=64, out_dim=2048, hidden=256, bottleneck=64),  # CPU smoke
}


def make_params(model: str, device) -> list[tuple[str, torch.nn.Parameter]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for name, shape, rg in vit_dino_shapes(**MODELS[model]):
        p = torch.nn.Parameter(torch.randn(shape, generator=g).to(device) * 0.02, requires_grad=rg)
        out.append((name, p))
    return out


def bench(fn, device, reps: int) -> float:
    """Milliseconds per call: triton.testing.do_bench on CUDA, a perf_counter loop on CPU."""
    if device.type == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=25, rep=max(reps, 50))
    fn()
    t0 = time.perf_counter()
    n = max(1, reps // 50)
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3


def no_sync(fn) -> bool:
    """True when fn() runs with CUDA sync debug mode set to error (i.e. no host synchronization)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        ok = True
    except RuntimeError:  # "called a synchronizing CUDA operation"
        ok = False
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return ok


def peak_gbs(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, val in PEAK_GBS.items():
        if key in name:
            return float(val)
    return None


def copy_gbs(device, n: int, reps: int) -> float:
    a, b = torch.empty(n, device=device), torch.empty(n, device=device)
    ms = bench(lambda: b.copy_(a), device, reps)
    return 2 * n * 4 / ms / 1e6


def segment_tables(flat: FlatParams, chunk: int | None = None) -> list[tuple[torch.Tensor, SegmentTable]]:
    """(grad buffer, SegmentTable over its requires_grad segments) per FlatParams buffer."""
    out = []
    for buf in flat.buffers:
        keep = [k for k, i in enumerate(buf.index) if flat.params[i].requires_grad]
        if buf.grad is None or not keep:
            continue
        segs = buf.segments(padded=True)
        table = SegmentTable([segs[k] for k in keep], buf.device, chunk or (16384 if buf.device.type == "cuda" else 65536))
        out.append((buf.grad, table))
    return out


def run_model(model: str, device, reps: int, sweep: bool) -> list[dict]:
    rows = []
    student_named = make_params(model, device)
    teacher_named = [(n, torch.nn.Parameter(p.detach().clone(), requires_grad=False)) for n, p in student_named]
    fs, ft = FlatParams(student_named), FlatParams(teacher_named, grads=False)
    n_all = sum(p.numel() for p in fs.params)
    n_grad = sum(p.numel() for p in fs.params_with_grad)
    student, teacher = [p.detach() for p in fs.params], ft.params
    for p in fs.params_with_grad:  # every gradient above the clip: the worst case for clipping
        p.grad.normal_().mul_(10.0)
    grads = [p.grad for p in fs.params_with_grad]
    clip = 3.0
    m_float = 0.996
    m_dev = torch.full((), m_float, device=device)
    ema_floor = 3 * n_all * 4
    clip_floor = 3 * n_grad * 4

    def add(kind, impl, ms, floor, note="", baseline=False):
        rows.append(dict(model=model, params=n_all, op=kind, impl=impl, ms=ms, gbs=floor / ms / 1e6, note=note,
                         baseline=baseline))

    def ema_flat():
        for tb, sb in zip(ft.buffers, fs.buffers):
            ema_flat_(tb.data, sb.data, m_dev)

    tables = segment_tables(fs)

    def clip_flat():
        return [clip_grad_flat_(g, table, clip) for g, table in tables]

    cuda = device.type == "cuda"
    interp = "" if cuda else " (Triton interpreted)"
    # ---- EMA ------------------------------------------------------------------------------
    add("ema", "reference (ema_ref)", bench(lambda: ema_ref(teacher, student, m_dev), device, reps), ema_floor)

    def dinov2():
        torch._foreach_mul_(teacher, m_float)
        torch._foreach_add_(teacher, student, alpha=1 - m_float)

    add("ema", "foreach mul_/add_ (DINOv2)", bench(dinov2, device, reps), ema_floor, baseline=True)
    add("ema", "ema_foreach_", bench(lambda: ema_foreach_(teacher, student, m_dev), device, reps), ema_floor)
    if cuda or model == "tiny":
        add("ema", "flat triton", bench(ema_flat, device, reps), ema_floor, interp)
        if cuda and sweep:
            tb, sb = ft.buffers[0].data, fs.buffers[0].data
            for block, warps in ((1024, 4), (2048, 4), (4096, 4), (4096, 8), (8192, 8), (16384, 16)):
                ms = bench(lambda: ema_flat_(tb, sb, m_dev, block=block, num_warps=warps), device, reps)
                add("ema sweep", f"flat triton BLOCK={block} warps={warps}", ms, ema_floor)
    if cuda and multi_tensor.HAVE_C:
        add("ema", "multi-tensor CUDA (_C)", bench(lambda: multi_tensor.ema_lerp_(teacher, student, m_dev), device, reps),
            ema_floor)
    # ---- clipping -------------------------------------------------------------------------
    add("clip", "reference (clip_grad_per_tensor_ref)", bench(lambda: clip_grad_per_tensor_ref(grads, clip), device, reps),
        clip_floor, baseline=True)
    add("clip", "clip_grad_foreach_", bench(lambda: clip_grad_foreach_(grads, clip), device, reps), clip_floor)
    if cuda or model == "tiny":
        add("clip", "flat triton (2 launches)", bench(clip_flat, device, reps), clip_floor, interp)
        if cuda and sweep:
            for chunk in (8192, 32768):
                tables_c = segment_tables(fs, chunk)
                add("clip sweep", f"flat triton CHUNK={chunk}",
                    bench(lambda: [clip_grad_flat_(g, t, clip) for g, t in tables_c], device, reps), clip_floor)
    if cuda and multi_tensor.HAVE_C:
        add("clip", "multi-tensor CUDA (_C)", bench(lambda: multi_tensor.clip_grad_per_tensor_(grads, clip), device, reps),
            clip_floor)
    # ---- the step: clipping + teacher update ----------------------------------------------
    if cuda:
        def step():
            clip_flat()
            ema_flat()

        add("step", "flat: clip + EMA", bench(step, device, reps), ema_floor + clip_floor)
        syncs = {"flat clip + EMA": no_sync(step),
                 "foreach clip + EMA": no_sync(lambda: (clip_grad_foreach_(grads, clip),
                                                        ema_foreach_(teacher, student, m_dev))),
                 "reference clip + EMA": no_sync(lambda: (clip_grad_per_tensor_ref(grads, clip),
                                                          ema_ref(teacher, student, m_dev)))}
        if multi_tensor.HAVE_C:
            syncs["multi-tensor clip + EMA"] = no_sync(lambda: (multi_tensor.clip_grad_per_tensor_(grads, clip),
                                                               multi_tensor.ema_lerp_(teacher, student, m_dev)))
        graph = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()  # warm-up (compiles) outside the capture
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(graph):
            step()
        add("step", "flat: clip + EMA, CUDA graph replay", bench(graph.replay, device, reps), ema_floor + clip_floor)
        rows.append(dict(model=model, op="host syncs", sync_free=syncs))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small model only (the CPU default)")
    ap.add_argument("--models", default=None, help="comma list of vits16, vitb8, tiny")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--no-sweep", action="store_true", help="skip the block-size sweep (CUDA)")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = args.models.split(",") if args.models else (["tiny"] if (args.quick or device.type == "cpu")
                                                          else ["vits16", "vitb8"])
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"--models: unknown model {m!r} (known: {', '.join(MODELS)})")
    peak = peak_gbs(device)
    copy = copy_gbs(device, 1 << 26 if device.type == "cuda" else 1 << 20, args.reps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; spec HBM {peak or 'n/a'} GB/s; torch copy {copy:.1f} GB/s; "
          f"fastdino._C: {'built' if multi_tensor.HAVE_C else 'not built'}; torch {torch.__version__}")
    rows = []
    for m in models:
        rows += run_model(m, device, args.reps, sweep=not args.no_sweep)
    print("\n| model | op | impl | ms | GB/s vs floor | % spec HBM | % torch copy | x vs baseline | note |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if r["op"] == "host syncs":
            continue
        # baselines: DINOv2's foreach for EMA, the reference for clipping, their sum for the step
        base = [x["ms"] for x in rows if x["model"] == r["model"] and x.get("baseline")
                and (r["op"] == "step" or x["op"] == r["op"].split()[0])]
        r["pct_peak"] = 100 * r["gbs"] / peak if peak else None
        r["pct_copy"] = 100 * r["gbs"] / copy
        r["speedup_vs_baseline"] = sum(base) / r["ms"] if base else None
        print(f"| {r['model']} ({r['params'] / 1e6:.1f}M) | {r['op']} | {r['impl']} | {r['ms']:.3f} | {r['gbs']:.{0 if r['gbs'] >= 100 else 2}f} | "
              f"{'%.0f%%' % r['pct_peak'] if peak else 'n/a'} | {r['pct_copy']:.0f}% | "
              f"{'%.1fx' % r['speedup_vs_baseline'] if r['speedup_vs_baseline'] else ''} | {r['note']} |")
    for r in rows:
        if r["op"] == "host syncs":
            print(f"\nhost synchronizations ({r['model']}, set_sync_debug_mode('error')): " +
                  ", ".join(f"{k}: {'none' if v else 'SYNCS'}" for k, v in r["sync_free"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, peak_gbs=peak, copy_gbs=copy, torch=torch.__version__, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
