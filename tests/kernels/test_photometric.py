"""kernels/photometric.py: the fused photometric op (colour jitter in each sample's order, grayscale,
blur, solarize, normalization, cast) against the reference, fastdino.data.augment.photometric, on
small odd images (tiny ones hit the blur's pad clamp) with parameters from the real draws, each op
forced on for some samples and off for others, every jitter order across samples, uint8 and float
inputs, fp32 and bf16 outputs; a check that every op (and the order) shows in the output; an
ahead-of-time compile for sm_80 and sm_90a at DINO's sizes; on CUDA the real sizes and no host sync;
benchmarks/photometric.py's smoke run.

Bound. fp32 output: |fast - ref| <= FP32_BOUND = 1e-5 on the normalized values. The only
differences are the order of two sums, the contrast mean (per-tile sums) and the blur's taps, each
~1 ulp; but the hue conversion's own rounding is ~1e-6 in [0, 1] (k = n + 6h carries ~5e-7, times
v s), and a 1-ulp change of the contrast mean before it moves that rounding: 3e-6 normalized on a 7x7
image here (the means 1 ulp apart, the rest identical), up to 5e-6 over other seeds and over 9.6M
values at 224 px. A sample with neither jitter nor blur is bit for bit the reference. bf16 output:
within 1 bf16 ulp of the reference's bf16 (a rounding boundary between the two fp32 values) plus
FP32_BOUND, and bit for bit without jitter and blur. Solarize is a step at 128/255: after a jitter or
blur, pixels whose pre-solarize value is within 1e-5 (normalized) of it may flip and are not compared
(at most 0.1% of the pixels, checked)."""
import itertools
import os
import sys

import pytest
import torch

import fastdino  # noqa: F401  (registers fastdino.kernels from a plain checkout)
from fastdino.data import augment
from fastdino.kernels.photometric import (NO_FMA, NP, launch_config, pack_params, photometric, photometric_fused,
                                          photometric_ref)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FP32_BOUND = 1e-5
PERMS = list(itertools.permutations(range(4)))
SPECS = augment.crop_specs(13, 7, 2)  # the recipe's per-crop probabilities: blur 1 / .1 / .5, solarize .2 on crop 1


# ---------------------------------------------------------------------------------------------
# Inputs: images with the special pixels, the real draws with forced flags
# ---------------------------------------------------------------------------------------------
SPECIAL = torch.tensor([[128, 128, 128],  # gray, exactly at the solarize threshold
                        [255, 255, 0],  # max tie r == g (hue)
                        [200, 40, 200],  # max tie r == b
                        [0, 0, 0], [255, 255, 255], [7, 7, 8]], dtype=torch.uint8)


def _images(B, H, W, dtype, seed):
    """[B, 3, H, W] uint8 (random, the SPECIAL pixels first) or float32 in [0, 1] (torch.rand, the SPECIAL
    pixels / 255 first)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        x = torch.randint(0, 256, (B, 3, H, W), generator=g, dtype=torch.uint8)
        special = SPECIAL
    else:
        x = torch.rand((B, 3, H, W), generator=g).to(dtype)
        special = (SPECIAL.float() / 255.0).to(dtype)
    n = min(len(SPECIAL), H * W)
    x.view(B, 3, H * W)[:, :, :n] = special[:n].T
    return x


def _pattern(i, B):
    """Forced flags of sample i (B = 5: each on for some samples and off for others; sample 3 has
    neither jitter nor blur, sample 1 jitter but no blur, sample 2 blur and solarize)."""
    return {"jitter": i % 5 != 3, "gray": i % 3 == 0, "blur": i % 2 == 0, "solarize": i % 5 in (1, 2, 3)}


def _params(B, seed, first_perm=0, flags=_pattern, **fixed):
    """stack_params of B samples' real draws (uniforms keyed by (seed, 0, i, crop i % len(SPECS)), with
    that crop spec's probabilities), flags forced by flags(i, B), order PERMS[(first_perm + i) % 24];
    `fixed` sets a parameter for every sample."""
    rows = []
    for i in range(B):
        c = i % len(SPECS)
        u = augment.uniforms(seed, 0, i, c)
        d = {k: v.item() for k, v in augment.photometric_params(u, SPECS[c].p_blur, SPECS[c].p_solarize).items()
             if k != "order"}
        d.update(flags(i, B), order=PERMS[(first_perm + i) % 24], **fixed)
        rows.append(d)
    return augment.stack_params(rows)


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------
def _threshold_normalized():
    thr = torch.tensor(augment.SOLARIZE_THRESHOLD, dtype=torch.float32)
    return (thr - torch.tensor(augment.IMAGENET_MEAN)) / torch.tensor(augment.IMAGENET_STD)


def _near_threshold(x, p):
    """Pixels (bool [B, 3, H, W]) where solarize may flip: of samples solarized after a jitter or blur
    (whose sums are ordered differently), with a pre-solarize value (the reference's without solarize,
    normalized) within 1e-5 of the threshold. Samples with neither are compared bit for bit."""
    ref = photometric_ref(x, dict(p, solarize=torch.zeros_like(p["solarize"])), torch.float32)
    thr = _threshold_normalized().to(ref.device).view(1, 3, 1, 1)
    inexact = p["solarize"] & (p["jitter"] | p["blur"])
    return inexact.to(ref.device).view(-1, 1, 1, 1) & ((ref - thr).abs() <= 1e-5)


def _bf16_ulp(ref):
    """The bf16 ulp of each value's binade (8 significant bits); that of the smallest normal at 0."""
    _, e = torch.frexp(ref.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny))
    return torch.ldexp(torch.ones_like(ref, dtype=torch.float32), e - 8)


def _compare(out, ref, near, bound, what):
    """fp32: |out - ref| <= bound; bf16: <= 1 bf16 ulp + bound; pixels `near` the solarize step skipped.
    Returns the largest error compared."""
    assert out.dtype == ref.dtype and out.shape == ref.shape and out.device == ref.device, what
    err = (out.float() - ref.float()).abs()
    tol = bound if out.dtype == torch.float32 else _bf16_ulp(ref) + bound
    bad = (err > tol) & ~near
    assert not bad.any(), (f"{what}: {int(bad.sum())} values off, max err {err[~near].max().item():.3g} "
                           f"(bound {bound}) in samples {bad.flatten(1).any(1).nonzero().flatten().tolist()}")
    return err[~near].max().item()


def _check(x, p, dtypes=(torch.float32, torch.bfloat16), **launch):
    """Fused against the reference on device DEV in each output dtype; samples with neither jitter nor
    blur are the reference's bits. Returns the largest error compared."""
    x = x.to(DEV)
    near = _near_threshold(x, p)
    assert near.float().mean() <= 1e-3, "solarize: too many pixels near the threshold to skip"
    err = 0.0
    for dtype in dtypes:
        out = photometric_fused(x, p, dtype, **launch)
        ref = photometric_ref(x, p, dtype)
        err = max(err, _compare(out, ref, near, FP32_BOUND, f"{tuple(x.shape)} {x.dtype} -> {dtype}"))
        exact = (~(p["jitter"] | p["blur"])).to(DEV)
        assert torch.equal(out[exact], ref[exact]), "no jitter, no blur: not the reference's bits"
    return err


# ---------------------------------------------------------------------------------------------
# Against the reference (interpreted on CPU, compiled on CUDA)
# ---------------------------------------------------------------------------------------------
CASES = [  # H, W, input dtype, launch overrides (several pixel tiles of the contrast sum; blur strips, column blocks)
    (7, 7, torch.uint8, {}),
    (7, 7, torch.float32, {}),
    (13, 13, torch.uint8, dict(block=64)),  # 3 tiles, the last one partial
    (13, 13, torch.float32, dict(block=64, rows=8)),  # 2 row strips of the blur, the last one partial
    (20, 20, torch.uint8, dict(block=128, block_w=16, rows=8)),  # 4 tiles; 2 column blocks x 3 row strips
    (3, 5, torch.uint8, {}),  # pad clamp: 2 rows, 4 columns of reflect padding; taps beyond weigh 0
    (3, 5, torch.float32, {}),
    (1, 6, torch.float32, {}),  # one row: the vertical blur is the center tap alone (not 1: taps normalized over 13)
]


@pytest.mark.parametrize("H,W,dtype,launch", CASES)
def test_matches_reference(H, W, dtype, launch):
    x = _images(5, H, W, dtype, seed=H * 100 + W)
    p = _params(5, seed=H + W, first_perm=H * W % 24)
    _check(x, p, **launch)


def test_every_order():
    """All 24 jitter orders (one per sample), each sample jittered; blur, gray and solarize on some."""
    x = _images(24, 5, 6, torch.uint8, seed=3)
    p = _params(24, seed=4, flags=lambda i, B: {"jitter": True, "gray": i % 5 == 0, "blur": i % 4 == 1,
                                                 "solarize": i % 3 == 0})
    assert sorted(map(tuple, p["order"].tolist())) == PERMS
    _check(x, p, dtypes=(torch.float32,))


def test_packed_params():
    """One fp32 row per sample: the draws, the slot of contrast, the blur slots and their samples, and
    the reference's Gaussian taps (normalized over 13)."""
    p = _params(5, seed=1)
    packed, n_blur, any_jitter = pack_params(p)
    assert packed.shape == (5, NP) and packed.dtype == torch.float32 and any_jitter
    blur = p["blur"]
    assert n_blur == int(blur.sum())
    assert packed[:, 11].tolist() == [float(i) for i in (blur.long().cumsum(0) - 1).where(blur, -1).tolist()]
    assert packed[:n_blur, 13].tolist() == blur.nonzero().flatten().float().tolist()
    assert packed[:, 9].tolist() == [float(o.index(1)) for o in p["order"].tolist()]
    t = torch.arange(-6, 7, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / p["sigma"][2]) ** 2)
    assert torch.equal(packed[2, 14:27], k / k.sum())


# ---------------------------------------------------------------------------------------------
# Every op shows in the output: the comparison above fails without it
# ---------------------------------------------------------------------------------------------
def test_every_op_changes_the_output():
    """All samples jittered (factors well away from identity), blurred and solarized, gray off. The fused
    op with one op neutralized (its factor at identity, its flag off, or the order reversed) is far from
    the reference with it; and gray on is far from gray off. So each op is computed, in the order drawn."""
    B, H, W = 2, 6, 7
    x = _images(B, H, W, torch.uint8, seed=5).to(DEV)
    base = _params(B, seed=6, first_perm=5, flags=lambda i, B: {"jitter": True, "gray": False, "blur": True,
                                                                  "solarize": True},
                   brightness=1.3, contrast=0.65, saturation=1.2, hue=0.08, sigma=1.5)
    ref = photometric_ref(x, base)
    near = _near_threshold(x, base)
    _compare(photometric_fused(x, base), ref, near, FP32_BOUND, "all ops")
    ones = torch.ones(B, dtype=torch.float32)
    variants = {"brightness": dict(brightness=ones), "contrast": dict(contrast=ones),
                "saturation": dict(saturation=ones), "hue": dict(hue=0 * ones),
                "order": dict(order=base["order"].flip(1)), "blur": dict(blur=torch.zeros(B, dtype=torch.bool)),
                "solarize": dict(solarize=torch.zeros(B, dtype=torch.bool)),
                "gray": dict(gray=torch.ones(B, dtype=torch.bool))}
    for name, change in variants.items():
        out = photometric_fused(x, dict(base, **change))
        err = (out - ref).abs()[~near].max().item()
        assert err > 100 * FP32_BOUND, f"{name}: the output does not show it ({err:.3g})"
        with pytest.raises(AssertionError):
            _compare(out, ref, near, FP32_BOUND, name)


def test_impl_switch_and_bad_inputs():
    x = _images(2, 4, 4, torch.uint8, seed=7).to(DEV)
    p = _params(2, seed=8)
    assert torch.equal(photometric(x, p, impl="torch"), photometric_ref(x, p))
    assert torch.equal(photometric(x, p), photometric_fused(x, p))
    assert photometric_fused(x[:0], {k: v[:0] for k, v in p.items()}).shape == (0, 3, 4, 4)
    with pytest.raises(ValueError, match="impl"):
        photometric(x, p, impl="cuda")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        photometric_fused(x[:, :2], p)
    with pytest.raises(ValueError, match="uint8 or float"):
        photometric_fused(x.int(), p)
    with pytest.raises(ValueError, match="batch size"):
        photometric_fused(x[:1], p)
    with pytest.raises(ValueError, match="lacks"):
        photometric_fused(x, {k: v for k, v in p.items() if k != "sigma"})
    with pytest.raises(ValueError, match="permutations"):
        photometric_fused(x, dict(p, order=torch.zeros(2, 4, dtype=torch.int64)))


# ---------------------------------------------------------------------------------------------
# Real GPUs
# ---------------------------------------------------------------------------------------------
def test_aot_compile_sm80_sm90a():
    """The three kernels at the launch table's constexprs for DINO's 224 and 96 px crops, uint8 and fp32
    inputs, fp32 and bf16 outputs: compile for sm_80 and sm_90a without FMA contraction and without
    spills; the fp32-input passes load 16 bytes per thread (uint8 pixels: 8; the blur gathers)."""
    from aot import aot_compile, assert_compiled

    module, f32 = "fastdino.kernels.photometric", "*fp32:16"
    jobs, vector = [], []
    for cap in (80, 90):
        for size in (224, 96):
            cfg = launch_config(size, size)
            opts = {"num_warps": cfg["num_warps"], **NO_FMA}
            for xin, out in (("u8", "fp32"), ("u8", "bf16"), ("fp32", "bf16")) if size == 224 else (("fp32", "fp32"),):
                meta = {"IS_U8": xin == "u8", "NP_": NP, "BLOCK": cfg["BLOCK"]}
                jobs.append((module, "_color_kernel", {"X_ptr": f"*{xin}:16", "P_ptr": f32, "Part_ptr": f32,
                                                       "Out_ptr": f"*{out}:16", "S_ptr": f32, "HW": "i32:16",
                                                       "n_tiles": "i32"},
                             dict(meta, T_BLOCK=cfg["T_BLOCK"]), opts, cap))
                vector.append(xin == "fp32")
                if out != "bf16":
                    jobs.append((module, "_contrast_sum_kernel", {"X_ptr": f"*{xin}:16", "P_ptr": f32,
                                                                  "Part_ptr": f32, "HW": "i32:16", "n_tiles": "i32"},
                                 meta, opts, cap))
                    vector.append(xin == "fp32")
        cfg = launch_config(224, 224)
        assert {(cfg[k], launch_config(96, 96)[k]) for k in ("BW", "RS", "blur_warps")} == {(32, 32), (1, 1)}
        for out in ("fp32", "bf16"):  # the same blur constexprs at both sizes
            jobs.append((module, "_blur_kernel", {"S_ptr": f32, "P_ptr": f32, "Out_ptr": f"*{out}:16",
                                                  "H": "i32:16", "W": "i32:16", "n_cb": "i32"},
                         {"NP_": NP, "BW": cfg["BW"], "RS": cfg["RS"]},
                         {"num_warps": cfg["blur_warps"], **NO_FMA}, cap))
            vector.append(False)
    results = aot_compile(jobs, processes=4)
    assert_compiled(jobs, results, vector_loads=False)
    for job, r, v in zip(jobs, results, vector):
        assert r["vector_loads"] or not v, f"{r['kernel']} ({r['target']}, {job[2]['X_ptr']}): no 16-byte loads"


_PTX_SCRIPT = r"""
import json, re, sys, triton
from triton.backends.compiler import GPUTarget
sys.path.insert(0, sys.argv[1])
import fastdino
from fastdino.kernels import photometric as K
f32, out = "*fp32", {}
for name, sig, const, nw in (
        ("_color_kernel", dict(X_ptr="*u8", P_ptr=f32, Part_ptr=f32, Out_ptr="*bf16", S_ptr=f32, HW="i32",
                               n_tiles="i32"),
         dict(IS_U8=True, NP_=K.NP, BLOCK=1024, T_BLOCK=64), 4),
        ("_blur_kernel", dict(S_ptr=f32, P_ptr=f32, Out_ptr="*bf16", H="i32", W="i32", n_cb="i32"),
         dict(NP_=K.NP, BW=32, RS=32), 1)):
    src = triton.compiler.ASTSource(fn=getattr(K, name), signature={**sig, **{k: "constexpr" for k in const}},
                                    constexprs=const)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": nw, **K.NO_FMA}).asm["ptx"]
    out[name] = {k: len(re.findall(k, ptx))
                 for k in (r"div\.rn\.f32", r"div\.(full|approx)", r"\bfma\.", r"rcp\.approx")}
print(json.dumps(out))
"""


def test_compiled_arithmetic_is_the_references():
    """The compiled kernels (sm_90a, as the launcher compiles them) divide with div.rn (IEEE, as torch)
    and contract nothing into FMAs: no div.full / div.approx / rcp.approx, no fma."""
    import json
    import subprocess

    from aot import ROOT

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _PTX_SCRIPT, ROOT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kernel, n in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        assert n[r"div\.rn\.f32"] > 0, kernel
        assert n[r"div\.(full|approx)"] == n[r"\bfma\."] == n[r"rcp\.approx"] == 0, (kernel, n)


def _loader_batch(B, seed=0, n_local=10, global_size=224, local_size=96):
    """One loader batch as the DALI path makes it (benchmarks/photometric.py's loader_batch)."""
    from aot import load_benchmark

    return load_benchmark("photometric").loader_batch(B, DEV, n_local, global_size, local_size, seed)


@pytest.mark.skipif(DEV != "cuda", reason="real sizes: CUDA only (the AOT test covers them on CPU)")
def test_real_size_cuda():
    for x, p in _loader_batch(16):
        _check(x, p)


@pytest.mark.skipif(DEV != "cuda", reason="host synchronization: CUDA only")
def test_no_host_sync_cuda():
    (x, p), _ = _loader_batch(4)
    photometric_fused(x, p, torch.bfloat16)  # compiled, allocator warm
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = photometric_fused(x, p, torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.shape == x.shape


# ---------------------------------------------------------------------------------------------
# Benchmark hook (CPU-safe: tiny sizes under the interpreter)
# ---------------------------------------------------------------------------------------------
def test_benchmark_smoke(tmp_path):
    """benchmarks/photometric.py --smoke (interpreted on CPU, compiled on a CUDA machine): a torch and a
    triton row per metric; the fused passes' launches (at most 3 per size group) and modeled traffic
    between the uint8 read + output write and all its terms."""
    import json

    from aot import load_benchmark

    out = tmp_path / "rows.jsonl"
    load_benchmark("photometric").main(["--smoke", "--results", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by = {(r["variant"], r["metric"]): r for r in rows}
    assert by[("torch", "ms_per_batch")]["value"] > 0 and by[("triton", "images_per_s")]["value"] > 0
    assert by[("triton", "ms_per_batch")]["baseline"] == by[("torch", "ms_per_batch")]["value"]
    assert 2 <= by[("triton", "kernels")]["value"] <= 6
    assert 3 + 6 <= by[("triton", "bytes_per_pixel")]["value"] <= 3 + 6 + 3 + 24
