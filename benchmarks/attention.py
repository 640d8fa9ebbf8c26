"""Attention backends, packed multi-crop and checkpointing for DINO ViTs: time, TFLOP/s, peak memory.

    python benchmarks/attention.py                      # CUDA: everything below at full size
    python benchmarks/attention.py --quick              # CPU smoke test (2-block tiny ViT on 32/16 px, < 1 min)
    python benchmarks/attention.py --modes step         # ViT-B/8 DINO step at batch 64: fits 80 GB?
    python benchmarks/attention.py --modes backbone --compile --json out.json

Modes (all bf16 autocast on CUDA, fp32 on CPU):
  matmul    the device's measured bf16 matmul rate (8192^3), the ceiling every TFLOP/s is compared to
  attn      attention alone (qkv (rows*N, 3*dim) -> (rows*N, dim)) at N = 197, 785 (224 px, /16, /8) and
            37, 145 (96 px locals), fwd and fwd+bwd, per backend; floor: matmul rate
  block     one transformer block fwd+bwd on global crops (B, N, dim), per backend, with peak memory
  backbone  whole backbone, 2x224 + 10x96 crops: unpacked (official: one call per resolution) vs packed,
            fwd and fwd+bwd, per backend; eager vs torch.compile of the blocks with --compile;
            activation checkpointing on/off with peak memory
  step      ViT-B/8 DINO step: student (2x224 + 10x96, packed) + teacher (2x224, no grad) + head (K=65536)
            + reference loss + backward + AdamW at batch 64, with and without checkpointing: peak memory

FLOPs (model FLOPs, recomputation not counted): per block and sequence of N tokens, dim D:
matmuls 24 N D^2 (qkv 6, proj 2, MLP 16), attention 4 N^2 D (q k^T and a v). fwd+bwd = 3x matmul
FLOPs + 3.5x attention FLOPs (flash-attention convention: backward = 2.5x forward).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastdino.models import DINOHead, MultiCropWrapper, compile_blocks  # noqa: E402
from fastdino.models.attention import BACKENDS, backend_unavailable, packed_attention  # noqa: E402
from fastdino.models.vision_transformer import Block, VisionTransformer  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
ARCH = {"S": (384, 6), "B": (768, 12), "T": (192, 3)}  # embed dim, heads (depth 12, mlp ratio 4)


# ------------------------------------------------------------------------------------------------
# timing / memory
# ------------------------------------------------------------------------------------------------
def bench_ms(fn, quick: bool) -> float:
    if CUDA:
        import triton

        return triton.testing.do_bench(fn, warmup=5 if quick else 25, rep=20 if quick else 100)
    fn()  # warm-up
    times = []
    for _ in range(1 if quick else 5):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def peak_gib(fn) -> float | None:
    """Peak allocated memory during one call of fn (GiB, absolute); None on CPU."""
    if not CUDA:
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2 ** 30


def autocast():
    return torch.autocast(DEV, dtype=torch.bfloat16, enabled=CUDA)


def tflops(flop: float, ms: float) -> float:
    return flop / ms / 1e9


def run_guarded(fn):
    """fn() or 'OOM' / the one-line error (a backend that cannot take the shape). Memory of a failed
    run is released before returning (after the except clause, so the traceback's frames are gone)."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        failure = "OOM"
    except (RuntimeError, ValueError) as e:
        failure = f"error: {str(e).splitlines()[0][:80]}"
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    return failure


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------
def attn_flop(rows: int, n: int, dim: int) -> float:
    return 4.0 * rows * n * n * dim


def vit_flop(seqs: list[tuple[int, int]], dim: int, depth: int = 12, train: bool = True) -> float:
    """seqs: (rows, tokens) per resolution group. Model FLOPs of the blocks."""
    mm = sum(24.0 * r * n * dim * dim for r, n in seqs) * depth
    at = sum(attn_flop(r, n, dim) for r, n in seqs) * depth
    return 3 * mm + 3.5 * at if train else mm + at


def tokens(px: int, patch: int) -> int:
    return (px // patch) ** 2 + 1


# ------------------------------------------------------------------------------------------------
# modes
# ------------------------------------------------------------------------------------------------
def mode_matmul(args, rows):
    n = 1024 if args.quick or not CUDA else 8192
    a = torch.randn(n, n, device=DEV, dtype=DTYPE)
    b = torch.randn(n, n, device=DEV, dtype=DTYPE)
    ms = bench_ms(lambda: a @ b, args.quick)
    rate = tflops(2.0 * n ** 3, ms)
    rows.append(dict(mode="matmul", case=f"{n}^3 {str(DTYPE)[6:]}", ms=ms, tflops=rate))
    return rate


def backends_for(args):
    names = args.backends or [b for b in BACKENDS if b != "auto"]
    return [b for b in names if backend_unavailable(b, DEV) is None]


def mode_attn(args, rows, mm_rate):
    cases = [(16, 224), (8, 224), (16, 96), (8, 96)] if not args.quick else [(8, 32), (8, 16)]
    for size in dict.fromkeys(a[0] for a in args.archs):  # attention depends on the width only
        arch = size
        dim, heads = ARCH[size]
        for patch, px in cases:
            n = tokens(px, patch)
            batch = args.batch * (2 if px == max(c[1] for c in cases) else 10)  # 2 global, 10 local crops
            for backend in backends_for(args):
                qkv = torch.randn(batch * n, 3 * dim, device=DEV, dtype=DTYPE, requires_grad=True)
                grad = torch.randn(batch * n, dim, device=DEV, dtype=DTYPE)
                groups = ((batch, n),)

                def fwd():
                    with torch.no_grad():
                        packed_attention(qkv, groups, heads, backend)

                def fwd_bwd():
                    packed_attention(qkv, groups, heads, backend).backward(grad)

                for what, fn, flop in (("fwd", fwd, attn_flop(batch, n, dim)),
                                       ("fwd+bwd", fwd_bwd, 3.5 * attn_flop(batch, n, dim))):
                    ms = run_guarded(lambda: bench_ms(fn, args.quick))
                    row = dict(mode="attn", case=f"{arch} dim={dim} N={n} rows={batch}", backend=backend, what=what)
                    add_perf(row, ms, flop, mm_rate)
                    rows.append(row)
                del qkv, grad


def add_perf(row, ms, flop, mm_rate, mem=None):
    if isinstance(ms, str):
        row["ms"] = ms
        return
    row["ms"] = ms
    row["tflops"] = tflops(flop, ms)
    row["pct_matmul"] = 100 * row["tflops"] / mm_rate if mm_rate else None
    if mem is not None:
        row["peak_gib"] = mem


def mode_block(args, rows, mm_rate):
    for arch in args.archs:
        dim, heads = ARCH[arch[0]]
        patch = int(arch.split("/")[1])
        n = tokens(224 if not args.quick else 32, patch)
        batch = 2 * args.batch  # the two global crops
        for backend in backends_for(args):
            blk = Block(dim, heads, backend=backend).to(DEV)
            x = torch.randn(batch, n, dim, device=DEV, requires_grad=True)

            def fwd_bwd():
                with autocast():
                    y = blk(x)
                y.float().sum().backward()

            def measure():
                return bench_ms(fwd_bwd, args.quick), peak_gib(fwd_bwd)

            res = run_guarded(measure)
            row = dict(mode="block", case=f"{arch} N={n} rows={batch}", backend=backend, what="fwd+bwd")
            if isinstance(res, str):
                add_perf(row, res, 0, mm_rate)
            else:
                add_perf(row, res[0], vit_flop([(batch, n)], dim, depth=1), mm_rate, res[1])
            rows.append(row)
            del blk, x


def make_vit(arch, depth=12, **kw):
    dim, heads = ARCH[arch[0]]
    return VisionTransformer(patch_size=int(arch.split("/")[1]), embed_dim=dim, num_heads=heads, depth=depth, **kw)


def multicrop_batch(args, n_local=10):
    g, l = (224, 96) if not args.quick else (32, 16)
    B = args.batch
    crops = [torch.randn(B, 3, g, g, device=DEV, dtype=DTYPE) for _ in range(2)]
    crops += [torch.randn(B, 3, l, l, device=DEV, dtype=DTYPE) for _ in range(n_local)]
    return crops, g, l


def mode_backbone(args, rows, mm_rate):
    n_local = 10 if not args.quick else 2
    crops, g, l = multicrop_batch(args, n_local)
    B = args.batch
    depth = 12 if not args.quick else 2
    for arch in args.archs:
        patch = int(arch.split("/")[1])
        dim = ARCH[arch[0]][0]
        seqs = [(2 * B, tokens(g, patch)), (n_local * B, tokens(l, patch))]
        variants = [(b, p, False, False) for b in backends_for(args) for p in (False, True)]
        if args.quick:  # smoke test: the layouts once
            variants = [("sdpa", False, False, False), ("sdpa", True, False, False)]
        variants += [(args.main_backend, True, True, False)]  # checkpointing
        if args.compile:
            variants += [(args.main_backend, True, False, True), (args.main_backend, False, False, True)]
        for backend, packed, ckpt, compiled in variants:
            model = make_vit(arch, depth, attn=backend, drop_path_rate=0.1, activation_checkpointing=ckpt).to(DEV)
            wrapper = MultiCropWrapper(model, torch.nn.Identity(), packed=packed)
            if compiled:
                compile_blocks(wrapper)

            def fwd():
                with torch.no_grad(), autocast():
                    wrapper(crops)

            def fwd_bwd():
                with autocast():
                    out = wrapper(crops)
                out.float().sum().backward()

            def measure():
                return bench_ms(fwd, args.quick), bench_ms(fwd_bwd, args.quick), peak_gib(fwd_bwd)

            res = run_guarded(measure)
            case = f"{arch} {2}x{g}+{n_local}x{l} B={B}"
            layout = ("packed" if packed else "unpacked") + (" +ckpt" if ckpt else "") + (" +compile" if compiled else "")
            for i, what in enumerate(("fwd", "fwd+bwd")):
                row = dict(mode="backbone", case=case, backend=backend, layout=layout, what=what)
                if isinstance(res, str):
                    add_perf(row, res, 0, mm_rate)
                else:
                    add_perf(row, res[i], vit_flop(seqs, dim, depth, train=i == 1), mm_rate, res[2] if i == 1 else None)
                rows.append(row)
            del model, wrapper
            if CUDA:
                torch.cuda.empty_cache()


def mode_step(args, rows, mm_rate):
    """Student + teacher + head + loss + backward + AdamW: does ViT-B/8 fit batch 64?"""
    from fastdino.losses import DINOLoss

    arch = "T/8" if args.quick else "B/8"
    out_dim = 512 if args.quick else 65536
    hidden = 256 if args.quick else 2048
    B = args.step_batch
    n_local = 10 if not args.quick else 2
    depth = 12 if not args.quick else 2
    save_batch = args.batch
    args.batch = B
    crops, g, l = multicrop_batch(args, n_local)
    args.batch = save_batch
    patch, dim = 8, ARCH[arch[0]][0]
    for ckpt in (False, True):
        def build():
            student = MultiCropWrapper(make_vit(arch, depth, attn=args.main_backend, drop_path_rate=0.1,
                                                activation_checkpointing=ckpt), DINOHead(dim, out_dim, hidden_dim=hidden), packed=True).to(DEV)
            teacher = MultiCropWrapper(make_vit(arch, depth, attn=args.main_backend),
                                       DINOHead(dim, out_dim, hidden_dim=hidden)).to(DEV)
            teacher.requires_grad_(False)
            opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4,
                                    fused=CUDA)
            loss_fn = DINOLoss(out_dim, 2 + n_local, 0.04, 0.04, 0, 10).to(DEV)
            return student, teacher, opt, loss_fn

        def measure():
            student, teacher, opt, loss_fn = build()

            def step():
                with autocast():
                    with torch.no_grad():
                        t_out = teacher(crops[:2])
                    s_out = student(crops)
                loss = loss_fn(s_out, t_out, 0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            step()  # optimizer state allocated
            mem = peak_gib(step)
            return bench_ms(step, True), mem

        res = run_guarded(measure)
        row = dict(mode="step", case=f"{arch} student 2x{g}+{n_local}x{l} + teacher 2x{g}, K={out_dim}, B={B}",
                   backend=args.main_backend, layout="packed" + (" +ckpt" if ckpt else ""), what="train step")
        seqs = [(2 * B, tokens(g, patch)), (n_local * B, tokens(l, patch))]
        flop = vit_flop(seqs, dim, depth) + vit_flop([(2 * B, tokens(g, patch))], dim, depth, train=False)
        if isinstance(res, str):
            add_perf(row, res, 0, mm_rate)
        else:
            add_perf(row, res[0], flop, mm_rate, res[1])
            row["img_per_s"] = B / res[0] * 1e3
        rows.append(row)
        if CUDA:
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
def print_table(rows, mm_rate):
    cols = ["mode", "case", "backend", "layout", "what", "ms", "tflops", "pct_matmul", "peak_gib", "img_per_s"]
    cols = [c for c in cols if any(c in r for r in rows)]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.3f}" if isinstance(v, float) and c == "ms" else f"{v:.3g}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (default on CPU)")
    p.add_argument("--modes", default="matmul,attn,block,backbone,step")
    p.add_argument("--archs", default=None, help="comma list of S/16,S/8,B/16,B/8 (T/16, T/8 for tiny)")
    p.add_argument("--backends", default=None, help="comma list (default: every backend available here)")
    p.add_argument("--main-backend", default="auto", help="backend for the checkpointing/compile/step rows")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 32 on CUDA, 2 quick)")
    p.add_argument("--step-batch", type=int, default=None, help="batch of the step mode (default 64)")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows to the backbone mode")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    args.quick = args.quick or not CUDA
    args.archs = (args.archs or ("T/8" if args.quick else "S/16,S/8,B/16,B/8")).split(",")
    args.backends = args.backends.split(",") if args.backends else None
    args.batch = args.batch or (2 if args.quick else 32)
    args.step_batch = args.step_batch or (2 if args.quick else 64)
    from fastdino.models.attention import resolve_backend

    main_arch = "B/8" if "B/8" in args.archs else args.archs[-1]
    dim, heads = ARCH[main_arch[0]]
    args.main_backend = resolve_backend(args.main_backend, DEV, shape=(785, heads, dim // heads))
    modes = args.modes.split(",")
    torch.manual_seed(0)

    rows = []
    mm_rate = mode_matmul(args, rows)
    device = (f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
              if CUDA else "cpu")
    print(f"# device: {device}, torch {torch.__version__}, dtype {DTYPE}, measured matmul {mm_rate:.1f} TFLOP/s, "
          f"main backend {args.main_backend}", flush=True)
    for mode in modes:
        if mode == "matmul":
            continue
        {"attn": mode_attn, "block": mode_block, "backbone": mode_backbone, "step": mode_step}[mode](args, rows, mm_rate)
    print_table(rows, mm_rate)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, torch=torch.__version__, matmul_tflops=mm_rate, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
