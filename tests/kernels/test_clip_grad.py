"""Per-tensor gradient clipping: the segmented Triton kernels and the foreach version equal the
reference clip_grad_per_tensor_ref on fresh random inputs (fp32/bf16/fp16, odd and empty segments,
chunks smaller than segments, FlatParams buffers); NaN gradients are left as is; deterministic; the
custom op passes opcheck; the kernels compile for sm_80/sm_90a."""
import math
import os

import pytest
import torch
import torch.nn as nn

from fastdino.flat import FlatParams
from fastdino.kernels.clip_grad import SegmentTable, clip_grad_flat_, clip_grad_foreach_, clip_grad_per_tensor_ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
SIZES = [5, 300, 0, 64, 1, 1000, 77, 16]
SCALES = (0.02, 0.3, 2.0)  # norms from ~0.05 to ~60 around a clip of 1: some clipped, some not
CLIP = 1.0


def _pad(n):
    return (n + 15) // 16 * 16


def _flat_grad(dtype, seed, sizes=SIZES):
    """A flat buffer with one segment per size, each padded with zeros to a multiple of 16."""
    g = torch.Generator().manual_seed(seed)
    starts = [sum(_pad(n) for n in sizes[:i]) for i in range(len(sizes))]
    grad = torch.zeros(sum(_pad(n) for n in sizes), dtype=dtype, device=DEVICE)
    for i, (s, n) in enumerate(zip(starts, sizes)):
        grad[s:s + n] = (torch.randn(n, generator=g) * SCALES[i % 3]).to(DEVICE, dtype)
    return grad, starts


def _assert_clip_close(out, ref, grad0, norms, norms_ref):
    """Tolerance from the reference's own error (STYLE.md): |out - ref64| <= 2 |ref - ref64| + atol,
    ref64 the reference in fp64 on the same inputs (grad0: before clipping). atol: one ulp of the
    output dtype (the interpreter truncates to bf16/fp16 where a GPU rounds) + the relative error of
    an fp32 sum of n squares in another order (blocked or pairwise: log2 n ulps, at least 8), carried
    through the coefficient."""
    ref64 = [g.double() for g in grad0]
    norms64 = clip_grad_per_tensor_ref(ref64, CLIP)
    sum_eps = torch.finfo(F32).eps * max(8, math.ceil(math.log2(max([g.numel() for g in grad0] + [1]))))
    for o, r, r64 in zip(out, ref, ref64):
        err = (o.double() - r64).abs()
        bound = 2 * (r.double() - r64).abs() + (torch.finfo(o.dtype).eps + sum_eps) * r64.abs() + torch.finfo(o.dtype).tiny
        assert (err <= bound).all(), f"max |out - ref64| - bound = {(err - bound).max().item():.3g}"
    err = (norms.double() - norms64).abs()
    bound = 2 * (norms_ref.double() - norms64).abs() + sum_eps * norms64
    assert (err <= bound).all(), f"norms: max |out - ref64| - bound = {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("chunk,block", [(128, 64), (128, None), (4096, None)])
def test_flat_kernels_match_ref(dtype, chunk, block):
    """Segments of odd sizes (an empty one, one above the chunk size), several loop steps per chunk
    (block < chunk) or one; the padding stays zero."""
    grad, starts = _flat_grad(dtype, seed=chunk)
    grad0 = [grad[s:s + n].clone() for s, n in zip(starts, SIZES)]
    ref = [g.clone() for g in grad0]
    norms_ref = clip_grad_per_tensor_ref(ref, CLIP)
    assert (norms_ref > CLIP).any() and (norms_ref < CLIP).any()  # both branches taken
    table = SegmentTable([(s, s + _pad(n)) for s, n in zip(starts, SIZES)], DEVICE, chunk=chunk)
    norms = clip_grad_flat_(grad, table, CLIP, block=block)
    assert norms.dtype == F32 and norms.shape == (len(SIZES),)
    _assert_clip_close([grad[s:s + n] for s, n in zip(starts, SIZES)], ref, grad0, norms, norms_ref)
    pad = torch.ones_like(grad, dtype=torch.bool)
    for s, n in zip(starts, SIZES):
        pad[s:s + n] = False
    assert not grad[pad].any()


def test_flat_kernels_on_flatparams_buffers():
    """The engine's layout: one SegmentTable per FlatParams grad buffer over the parameters that
    require grad (a frozen one is skipped and untouched); the norms come back in buffer order."""
    torch.manual_seed(0)
    model = nn.ModuleList([nn.Linear(13, 5), nn.LayerNorm(7), nn.Conv2d(3, 4, 3), nn.Linear(1, 301)])
    model[1].to(BF16)
    model[3].to(F16)
    model[0].bias.requires_grad_(False)
    model.to(DEVICE)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    for i, p in enumerate(params):
        p.grad = (torch.randn(p.shape, generator=g) * SCALES[i % 3]).to(DEVICE, p.dtype)
    flat = FlatParams(model)
    frozen = model[0].bias.detach().clone()
    grad0 = [p.grad.clone() for p in params]
    ref = [p.clone() for p in grad0]
    norms_ref = clip_grad_per_tensor_ref(ref, CLIP)
    norms = torch.zeros(len(flat.params), device=DEVICE)
    for buf in flat.buffers:
        keep = [k for k, i in enumerate(buf.index) if flat.params[i].requires_grad]
        if buf.grad is None or not keep:
            continue
        segs = buf.segments(padded=True)
        table = SegmentTable([segs[k] for k in keep], DEVICE, chunk=64)
        norms[[buf.index[k] for k in keep]] = clip_grad_flat_(buf.grad, table, CLIP)
    flat.check()
    norms = norms[[i for i, p in enumerate(flat.params) if p.requires_grad]]
    _assert_clip_close([p.grad for p in flat.params_with_grad], ref, grad0, norms, norms_ref)
    assert torch.equal(model[0].bias.detach(), frozen) and model[0].bias.grad is None


def test_nan_segment_left_as_is_and_infinite_clip_measures_only():
    grad, starts = _flat_grad(F32, seed=5)
    grad[starts[1] + 3] = float("nan")  # a segment that would be clipped (norm ~5)
    grad0 = [grad[s:s + n].clone() for s, n in zip(starts, SIZES)]
    table = SegmentTable([(s, s + _pad(n)) for s, n in zip(starts, SIZES)], DEVICE, chunk=64)
    measured = grad.clone()  # clip = inf: nothing scaled, the norms still measured
    norms_inf = clip_grad_flat_(measured, table, float("inf"))
    assert torch.equal(measured.nan_to_num(), grad.nan_to_num())
    # a NaN norm gives a NaN coef, not < 1: that gradient is left as is (the official loop), the others clipped
    flat, ref, foreach = grad.clone(), [g.clone() for g in grad0], [g.clone() for g in grad0]
    runs = {"flat": ([flat[s:s + n] for s, n in zip(starts, SIZES)], clip_grad_flat_(flat, table, CLIP)),
            "ref": (ref, clip_grad_per_tensor_ref(ref, CLIP)), "foreach": (foreach, clip_grad_foreach_(foreach, CLIP))}
    keep = [i for i in range(len(SIZES)) if i != 1]
    for name, (out, norms) in runs.items():
        torch.testing.assert_close(out[1], grad0[1], rtol=0, atol=0, equal_nan=True, msg=name)
        assert norms[1].isnan() and norms[keep].isfinite().all(), name
        _assert_clip_close([out[i] for i in keep], [ref[i] for i in keep], [grad0[i] for i in keep], norms[keep],
                           runs["ref"][1][keep])
    torch.testing.assert_close(runs["flat"][1], norms_inf, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtypes", [[F32], [F32, BF16, F32, F16]])
def test_foreach_matches_ref(dtypes):
    g = torch.Generator().manual_seed(6)
    grads = [(torch.randn(n, generator=g) * SCALES[i % 3]).to(DEVICE, dtypes[i % len(dtypes)])
             for i, n in enumerate(SIZES)]
    grads[3] = grads[3].view(4, 16)  # any shape
    grad0 = [x.clone() for x in grads]
    ref = [x.clone() for x in grads]
    norms_ref = clip_grad_per_tensor_ref(ref, CLIP)
    norms = clip_grad_foreach_(grads, CLIP)
    assert norms.dtype == F32 and norms.shape == (len(SIZES),)
    _assert_clip_close(grads, ref, grad0, norms, norms_ref)
    assert clip_grad_foreach_([], CLIP).shape == (0,) and clip_grad_per_tensor_ref([], CLIP).shape == (0,)


def test_flat_clip_is_deterministic():
    grad, starts = _flat_grad(F32, seed=3, sizes=[4000, 17, 2500])
    table = SegmentTable([(s, s + _pad(n)) for s, n in zip(starts, [4000, 17, 2500])], DEVICE, chunk=32)
    grad0 = grad.clone()
    n1 = clip_grad_flat_(grad, table, 0.3)
    out1 = grad.clone()
    grad.copy_(grad0)
    n2 = clip_grad_flat_(grad, table, 0.3)
    assert torch.equal(grad, out1) and torch.equal(n1, n2)


def test_clip_grad_flat_op_opcheck():
    grad, starts = _flat_grad(BF16, seed=7, sizes=[5, 0, 40])
    t = SegmentTable([(s, s + _pad(n)) for s, n in zip(starts, [5, 0, 40])], DEVICE, chunk=32)
    args = (grad, t.chunk_start, t.chunk_end, t.chunk_seg, t.seg_lo, t.seg_hi, t.chunk, 16, t.block_p, 4, 0.5)
    torch.library.opcheck(torch.ops.fastdino.clip_grad_flat_.default, args)


def test_clip_refuses_bad_input():
    grad, starts = _flat_grad(F32, seed=8, sizes=[20, 3])
    table = SegmentTable([(0, 32), (32, 48)], DEVICE, chunk=32)
    with pytest.raises(ValueError, match="chunk must be a positive multiple of 16"):
        SegmentTable([(0, 16)], DEVICE, chunk=24)
    with pytest.raises(ValueError, match="segment 1 is \\[20, 36\\)"):
        SegmentTable([(0, 16), (20, 36)], DEVICE)
    with pytest.raises(ValueError, match="grad has 32 elements, the table's segments reach 48"):
        clip_grad_flat_(grad[:32], table, 1.0)
    with pytest.raises(ValueError, match="1-D contiguous"):
        clip_grad_flat_(grad.view(3, 16), table, 1.0)
    with pytest.raises(ValueError, match="dtype torch.float64"):
        clip_grad_flat_(grad.double(), table, 1.0)
    with pytest.raises(ValueError, match="clip must be >= 0"):
        clip_grad_flat_(grad, table, -1.0)
    with pytest.raises(ValueError, match="block must be a power of 2"):
        clip_grad_flat_(grad, table, 1.0, block=24)


@pytest.mark.skipif(not CUDA, reason="native CUDA: real sizes, no host sync, CUDA-graph capture")
def test_flat_clip_cuda_large_no_sync_graph():
    sizes = [65536 * 256, 2304 * 768, 768, 3072 * 768, 785 * 768, 1000, 7]
    grad, starts = _flat_grad(F32, seed=9, sizes=sizes)
    table = SegmentTable([(s, s + _pad(n)) for s, n in zip(starts, sizes)], "cuda")
    grad0 = [grad[s:s + n].clone() for s, n in zip(starts, sizes)]
    ref = [g.clone() for g in grad0]
    norms_ref = clip_grad_per_tensor_ref(ref, CLIP)
    flat0 = grad.clone()
    torch.cuda.set_sync_debug_mode("error")
    try:
        norms = clip_grad_flat_(grad, table, CLIP)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    _assert_clip_close([grad[s:s + n] for s, n in zip(starts, sizes)], ref, grad0, norms, norms_ref)
    out = grad.clone()
    graph = torch.cuda.CUDAGraph()
    grad.copy_(flat0)
    with torch.cuda.graph(graph):
        norms_g = clip_grad_flat_(grad, table, CLIP)
    grad.copy_(flat0)
    graph.replay()
    assert torch.equal(grad, out) and torch.equal(norms_g, norms)


def test_clip_kernels_compile_ahead_of_time_sm80_sm90a():
    """Both segmented kernels, fp32 and bf16 gradients, sm_80 and sm_90a (tests/kernels/aot.py): the
    gradient loads vectorize (segments start and end on multiples of 16 elements), no spills."""
    from aot import aot_compile

    jobs = []
    for cap in (80, 90):
        for dt in ("fp32", "bf16"):
            table = {"CHUNK_START": "*i64:16", "CHUNK_END": "*i64:16", "PARTIAL": "*fp32:16"}
            jobs.append(("fastdino.kernels.clip_grad", "_seg_sumsq_kernel", {"G_ptr": f"*{dt}:16", **table},
                         {"CHUNK": 16384, "BLOCK": 2048}, 8, cap))
            jobs.append(("fastdino.kernels.clip_grad", "_seg_scale_kernel",
                         {"G_ptr": f"*{dt}:16", **table, "CHUNK_SEG": "*i32:16", "SEG_LO": "*i32:16",
                          "SEG_HI": "*i32:16", "NORMS": "*fp32:16", "clip": "fp32", "eps": "fp32"},
                         {"CHUNK": 16384, "BLOCK": 2048, "BLOCK_P": 1024}, 8, cap))
    out = aot_compile(jobs)
    assert {o["target"] for o in out} == {"sm_80", "sm_90a"} and len(out) == 8
    for o in out:
        assert o["vector_loads"] and not o["local_memory"] and o["stack"] == 0, o
