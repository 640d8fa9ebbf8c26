"""kernels/softmax_center.py: teacher targets (q, entropy, column sums) of the Triton op against the
reference on fresh random inputs, peaked distributions included; the reference against the formula
in float64; the custom op's registration (opcheck, torch.compile without graph breaks or
recompiles when teacher_temp changes); an ahead-of-time compile for sm_80 and sm_90a.
The same for softmax_center_stats (row_offset, entropy, column sums in one read of the teacher
logits; padded rows), with teacher_probs' q from its row_offset against the softmax."""
import math

import pytest
import torch

import fastdino  # noqa: F401  (registers fastdino.kernels from a plain checkout)
from fastdino.kernels.softmax_center import (softmax_center, softmax_center_op, softmax_center_ref,
                                             softmax_center_stats, softmax_center_stats_op,
                                             softmax_center_stats_ref, teacher_probs)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(R, K, dtype, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(R, K, generator=g) * scale).to(DEV, dtype)
    c = (torch.randn(1, K, generator=g) * 0.5).to(DEV)
    return t, c


def _close(out, ref, ref64, eps, what):
    """|out - ref64| <= 2 |ref - ref64| + eps * max|ref64|."""
    out, ref, ref64 = out.double(), ref.double(), ref64.double()
    err = (out - ref64).abs()
    budget = 2 * (ref - ref64).abs() + eps * ref64.abs().max().clamp_min(1e-3)
    assert (err <= budget).all(), f"{what}: max err {err.max().item():.3g}, budget {budget.min().item():.3g}"


CASES = [  # R, K, dtype, teacher_temp, logit scale
    (4, 1000, torch.float32, 0.04, 2.0),
    (3, 77, torch.bfloat16, 0.07, 2.0),  # K below one block
    (2, 9000, torch.float16, 0.04, 2.0),  # three blocks, the last one partial
    (1, 300, torch.float32, 0.01, 10.0),  # peaked: q ~ one-hot, entropy ~ 0
    (5, 4096, torch.bfloat16, 0.04, 0.3),  # flat-ish: entropy near log K
]


@pytest.mark.parametrize("R,K,dtype,temp,scale", CASES)
def test_triton_matches_reference(R, K, dtype, temp, scale):
    t, c = _inputs(R, K, dtype, seed=R * 100 + K, scale=scale)
    temp_t = torch.tensor(temp, device=DEV)  # as the engine passes it: a 0-dim device tensor
    out = softmax_center(t, c, temp_t)
    ref = softmax_center_ref(t, c, temp_t)
    ref64 = softmax_center_ref(t.double(), c.double(), temp)
    for name, o, r, r64 in zip(("q", "entropy", "colsum"), out, ref, ref64):
        assert o.dtype == torch.float32 and o.device.type == t.device.type, name
        _close(o, r, r64, 1e-5, name)
    assert (out[1] >= 0).all() and torch.isfinite(out[1]).all()
    torch.testing.assert_close(out[0].sum(-1), torch.ones(R, device=DEV))
    # a float teacher_temp and a (K,) center give the same numbers
    for a, b in zip(softmax_center(t, c.view(K), temp), out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reference_matches_formula():
    t, c = _inputs(3, 40, torch.float64, seed=1)
    q, entropy, colsum = softmax_center_ref(t, c.double(), 0.05)
    e = torch.exp((t - c) / 0.05)
    q_formula = e / e.sum(-1, keepdim=True)
    torch.testing.assert_close(q, q_formula, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(entropy, -(q_formula * q_formula.log()).sum(-1), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(colsum, t.sum(0), rtol=1e-14, atol=1e-14)
    assert softmax_center(t, c, 0.05, impl="torch")[0].dtype == torch.float64


def test_opcheck():
    t, c = _inputs(3, 50, torch.float32, seed=2)
    torch.library.opcheck(softmax_center_op, (t, c, torch.tensor(0.04, device=DEV)))


def test_compile_fullgraph_no_recompile_on_new_temperature():
    torch._dynamo.reset()
    t, c = _inputs(3, 70, torch.bfloat16, seed=3)
    compiled = torch.compile(lambda t, c, temp: softmax_center(t, c, temp), fullgraph=True, backend="aot_eager")
    for i, temp in enumerate((0.04, 0.05)):
        temp = torch.tensor(temp, device=DEV)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            out = compiled(t, c, temp)
        for a, b in zip(out, softmax_center(t, c, temp)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_inputs_raise():
    t, c = _inputs(2, 64, torch.float32, seed=4)
    for impl in ("triton", "torch"):
        with pytest.raises(ValueError, match="2-D"):
            softmax_center(t[0], c, 0.04, impl=impl)
        with pytest.raises(ValueError, match="center"):
            softmax_center(t, c[:, :10], 0.04, impl=impl)
        with pytest.raises(ValueError, match="teacher_temp"):
            softmax_center(t, c, torch.ones(2, device=DEV), impl=impl)
    with pytest.raises(ValueError, match="impl"):
        softmax_center(t, c, 0.04, impl="cuda")


@pytest.mark.skipif(DEV == "cuda", reason="CPU-only check")
@pytest.mark.parametrize("op", ["softmax_center", "softmax_center_stats"])
def test_cpu_without_interpreter_is_a_clear_error(monkeypatch, op):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    t, c = _inputs(2, 64, torch.float32, seed=5)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        {"softmax_center": softmax_center, "softmax_center_stats": softmax_center_stats}[op](t, c, 0.04)


def test_aot_compile_sm80_sm90a():
    """The row kernel at the launcher's constexprs for DINO's K=65536 and a small K, teacher logits
    in bf16, fp16 and fp32: compiles, no spills, 16-byte loads."""
    from aot import aot_compile, assert_compiled

    from fastdino.kernels.softmax_center import launch_config

    f32 = "*fp32:16"
    jobs = []
    for cap in (80, 90):
        for dt in ("bf16", "fp16", "fp32"):
            types = {"T_ptr": f"*{dt}:16", "C_ptr": f32, "Temp_ptr": "*fp32", "Q_ptr": f32, "Ent_ptr": f32,
                     "K": "i32:16", "stride_t": "i32:16", "stride_q": "i32:16"}
            for K in (65536, 1024):
                block_k, nw = launch_config(K)
                jobs.append(("fastdino.kernels.softmax_center", "_softmax_center_kernel", types,
                             {"BLOCK_K": block_k}, nw, cap))
    assert_compiled(jobs, aot_compile(jobs))


@pytest.mark.skipif(DEV != "cuda", reason="real sizes: CUDA only (the AOT test covers them on CPU)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_real_size_cuda(dtype):
    t, c = _inputs(128, 65536, dtype, seed=6)
    temp = torch.tensor(0.04, device=DEV)
    out = softmax_center(t, c, temp)
    ref = softmax_center_ref(t, c, temp)
    ref64 = softmax_center_ref(t.double(), c.double(), 0.04)
    for name, o, r, r64 in zip(("q", "entropy", "colsum"), out, ref, ref64):
        _close(o, r, r64, 1e-5, name)


# ---------------------------------------------------------------------------------------------
# softmax_center_stats: row_offset, entropy and column sums in one read of the teacher logits
# ---------------------------------------------------------------------------------------------
def _row_masks(R, seed):
    """row_valid variants: None (all rows), a random mix (at least one valid row, one invalid where
    R > 1), none valid."""
    g = torch.Generator().manual_seed(seed)
    some = torch.rand(R, generator=g) < 0.5
    some[torch.randint(R, (1,), generator=g)] = True
    if R > 1:
        some[torch.randint(R, (1,), generator=g)] = False
        some[0] = not some[-1]
    return {"all": None, "some": some.to(DEV), "none": torch.zeros(R, dtype=torch.bool, device=DEV)}


def _close_rows(out, ref, ref64, eps, what):
    """_close on the finite entries of ref64; where ref64 is +inf (invalid rows) out is exactly +inf.
    No NaN anywhere."""
    inf = ref64 == torch.inf
    assert not out.isnan().any(), f"{what}: NaN"
    assert torch.equal(out == torch.inf, inf), f"{what}: +inf rows differ"
    if (~inf).any():
        _close(out[~inf], ref[~inf], ref64[~inf], eps, what)


def _check_stats(t, c, temp, row_valid, **launch):
    """softmax_center_stats (Triton) against its fp32 reference and the fp64 one; teacher_probs of its
    row_offset against the softmax (softmax_center_ref in fp64), 0 on invalid rows."""
    R, K = t.shape
    temp_t = torch.tensor(temp, device=DEV)  # as the engine passes it: a 0-dim device tensor
    temp64 = temp_t.double()
    out = softmax_center_stats(t, c, temp_t, row_valid, **launch)
    ref = softmax_center_stats_ref(t, c, temp_t, row_valid)
    ref64 = softmax_center_stats_ref(t.double(), c.double(), temp64, row_valid)
    for name, o, r, r64 in zip(("row_offset", "entropy", "colsum"), out, ref, ref64):
        assert o.dtype == torch.float32 and o.device.type == t.device.type and o.shape == r64.shape, name
        _close_rows(o, r, r64, 1e-5, name)
    row_offset, entropy, _ = out
    assert (entropy >= 0).all() and torch.isfinite(entropy).all()
    valid = torch.ones(R, dtype=torch.bool, device=DEV) if row_valid is None else row_valid
    assert torch.isfinite(row_offset[valid]).all() and (row_offset[~valid] == torch.inf).all()
    assert (entropy[~valid] == 0).all()
    q = teacher_probs(t, c, temp_t, row_offset)
    assert q.dtype == torch.float32 and q.shape == (R, K)
    assert (q[~valid] == 0).all()
    if valid.any():
        q_ref = teacher_probs(t, c, temp_t, ref[0])
        q64 = softmax_center_ref(t.double(), c.double(), temp64)[0]
        _close(q[valid], q_ref[valid], q64[valid], 1e-5, "q")
        torch.testing.assert_close(q[valid].sum(-1), torch.ones(int(valid.sum()), device=DEV))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [1, 5, 67, 300])
@pytest.mark.parametrize("R", [1, 3, 7])
def test_stats_match_reference_small_blocks(R, K, dtype):
    """16-column tiles and 2-row blocks: several tiles (K = 67: 5, the last one partial; K = 300: 19)
    and row blocks (the last one partial at odd R), each row_valid variant."""
    t, c = _inputs(R, K, dtype, seed=R * 1000 + K)
    for i, row_valid in enumerate(_row_masks(R, seed=R + K).values()):
        _check_stats(t, c, (0.04, 0.07, 0.1)[i], row_valid, block_k=16, rows=2)


@pytest.mark.parametrize("R,K,dtype,temp,scale", CASES)
def test_stats_match_reference_launch_table(R, K, dtype, temp, scale):
    """The launch table's tiles, peaked and flat rows; the column sums equal softmax_center's over the
    valid rows; a float teacher_temp and a (K,) center give the same bits."""
    t, c = _inputs(R, K, dtype, seed=R * 100 + K + 1, scale=scale)
    for row_valid in _row_masks(R, seed=R).values():
        out = _check_stats(t, c, temp, row_valid)
        valid = slice(None) if row_valid is None else row_valid
        if row_valid is None or row_valid.any():
            torch.testing.assert_close(out[2], softmax_center(t[valid], c, temp)[2])
        for a, b in zip(softmax_center_stats(t, c.view(K), temp, row_valid), out):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_stats_exact_at_one_column():
    """K = 1: q = 1, so row_offset is y2 itself, bit for bit as the consumers' expression (t - c) *
    teacher_scale(teacher_temp), the entropy exactly 0 and teacher_probs exactly 1."""
    from fastdino.kernels.soft_cross_entropy import teacher_scale

    t, c = _inputs(6, 1, torch.bfloat16, seed=7, scale=5.0)
    temp = torch.tensor(0.07, device=DEV)
    row_offset, entropy, colsum = softmax_center_stats(t, c, temp)
    y2 = (t.float() - c) * teacher_scale(temp)
    assert torch.equal(row_offset, y2.view(-1))
    assert torch.equal(entropy, torch.zeros(6, device=DEV))
    assert torch.equal(teacher_probs(t, c, temp, row_offset), torch.ones(6, 1, device=DEV))
    torch.testing.assert_close(colsum, t.float().sum(0), rtol=0, atol=0)


@pytest.mark.parametrize("launch", [dict(block_k=16, rows=2), {}])
def test_stats_tied_maxima(launch):
    """Integer logits and a zero center: the row max repeated within tiles and across tiles, a constant
    row (q uniform: entropy ln K, row_offset y2 + log2 K), a row whose max is in one tile only."""
    g = torch.Generator().manual_seed(16)
    t = torch.randint(-2, 3, (5, 67), generator=g).float()
    t[0] = 1.0
    t[1, :] = -1.0
    t[1, 40] = 2.0
    t = t.to(DEV, torch.bfloat16)
    c = torch.zeros(1, 67, device=DEV)
    row_offset, entropy, _ = _check_stats(t, c, 0.1, None, **launch)
    torch.testing.assert_close(entropy[0].double(), torch.tensor(math.log(67), device=DEV, dtype=torch.float64))

@pytest.mark.parametrize("launch", [dict(block_k=16, rows=4), {}])
def test_stats_peaked_rows_keep_relative_accuracy(launch):
    """Rows with one dominant logit (entropy 1e-8 .. 1e-2 nats, Z - 1 tiny): row_offset and entropy to
    fp32 relative accuracy against the fp64 statistics of the same fp32 y2 (the kernels keep Z - 1
    apart from the 1 of the maximal element; log2 of a rounded Z would leave ~1e-7 absolute)."""
    from fastdino.kernels.soft_cross_entropy import teacher_scale

    R, K = 8, 300
    g = torch.Generator().manual_seed(15)
    t = torch.rand(R, K, generator=g) * 0.3
    t[torch.arange(R), torch.randint(K, (R,), generator=g)] = torch.linspace(0.7, 1.4, R)
    t, c, temp = t.to(DEV), torch.zeros(K, device=DEV), torch.tensor(0.04, device=DEV)
    row_offset, entropy, _ = softmax_center_stats(t, c, temp, **launch)
    y2 = ((t - c) * teacher_scale(temp)).double()  # the kernels' y2, bit for bit, in fp64
    lse2 = torch.logsumexp(y2 * math.log(2), -1) / math.log(2)
    q = torch.exp2(y2 - lse2[:, None])
    entropy64 = -(q * q.log()).sum(-1)
    assert entropy64.min() < 1e-7 and entropy64.max() > 1e-3  # the range the test is about
    torch.testing.assert_close(entropy.double(), entropy64, rtol=1e-5, atol=0)
    torch.testing.assert_close(row_offset.double(), lse2, rtol=2 ** -23, atol=0)

def test_stats_reference_matches_formula():
    t, c = _inputs(5, 40, torch.float64, seed=8)
    c = c.double()
    row_valid = torch.tensor([True, False, True, True, False], device=DEV)
    row_offset, entropy, colsum = softmax_center_stats_ref(t, c, 0.05, row_valid)
    y = (t - c) / 0.05
    q = torch.softmax(y, -1)
    v = row_valid
    torch.testing.assert_close(row_offset[v], torch.logsumexp(y, -1)[v] / math.log(2), rtol=1e-12, atol=1e-12)
    assert (row_offset[~v] == torch.inf).all() and (entropy[~v] == 0).all()
    torch.testing.assert_close(entropy[v], -(q * q.log()).sum(-1)[v], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(colsum, t[v].sum(0), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(teacher_probs(t, c, 0.05, row_offset)[v], q[v], rtol=1e-12, atol=1e-15)
    assert (teacher_probs(t, c, 0.05, row_offset)[~v] == 0).all()
    out = softmax_center_stats(t, c, 0.05, row_valid, impl="torch")
    assert all(o.dtype == torch.float64 for o in out)


def test_stats_opcheck():
    t, c = _inputs(3, 50, torch.bfloat16, seed=9)
    temp = torch.tensor(0.04, device=DEV)
    torch.library.opcheck(softmax_center_stats_op, (t, c, temp))
    torch.library.opcheck(softmax_center_stats_op, (t, c, temp, torch.tensor([True, False, True], device=DEV)))


def test_stats_compile_fullgraph_no_recompile_on_new_temperature():
    """softmax_center_stats then teacher_probs under torch.compile(fullgraph=True): no graph break, no
    recompile for a new teacher_temp or a new row_valid; the same bits as eager."""
    torch._dynamo.reset()
    t, c = _inputs(3, 70, torch.bfloat16, seed=10)

    def fn(t, c, temp, row_valid):
        row_offset, entropy, colsum = softmax_center_stats(t, c, temp, row_valid)
        return teacher_probs(t, c, temp, row_offset), row_offset, entropy, colsum

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for i, (temp, valid) in enumerate(((0.04, [True, True, False]), (0.05, [False, True, True]))):
        temp, valid = torch.tensor(temp, device=DEV), torch.tensor(valid, device=DEV)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            out = compiled(t, c, temp, valid)
        for a, b in zip(out, fn(t, c, temp, valid)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_stats_bad_inputs_raise():
    t, c = _inputs(2, 64, torch.float32, seed=11)
    for impl in ("triton", "torch"):
        with pytest.raises(ValueError, match="row_valid"):
            softmax_center_stats(t, c, 0.04, torch.ones(3, dtype=torch.bool, device=DEV), impl=impl)
        with pytest.raises(ValueError, match="row_valid"):
            softmax_center_stats(t, c, 0.04, torch.ones(2, device=DEV), impl=impl)
        with pytest.raises(ValueError, match="K = 0"):
            softmax_center_stats(t[:, :0], c[:, :0], 0.04, impl=impl)
        with pytest.raises(ValueError, match="center"):
            softmax_center_stats(t, c[:, :10], 0.04, impl=impl)
    with pytest.raises(ValueError, match="row_offset"):
        teacher_probs(t, c, 0.04, torch.zeros(3, device=DEV))
    with pytest.raises(ValueError, match="impl"):
        softmax_center_stats(t, c, 0.04, impl="cuda")


def test_stats_aot_compile_sm80_sm90a():
    """The stats kernel at the launch table's constexprs for DINO's K = 65536 (R = 128..512; R is not
    a constexpr), teacher logits in bf16, fp16 and fp32, with and without row_valid: compiles without
    FMA contraction, no spills, 16-byte loads; 1 to 4 programs per SM of a 132-SM GPU. The combine
    kernel at K = 65536's tile count and at the most tiles (MAX_STATS_TILES): no spills."""
    from aot import aot_compile, assert_compiled

    from fastdino.kernels.softmax_center import (MAX_STATS_TILES, stats_combine_meta,
                                                 stats_launch_config)

    module, f32 = "fastdino.kernels.softmax_center", "*fp32:16"
    stats, combine = [], []
    for cap in (80, 90):
        for dt, itemsize in (("bf16", 2), ("fp16", 2), ("fp32", 4)):
            block_k, rows, nw = stats_launch_config(512, 65536, itemsize)
            assert stats_launch_config(128, 65536, itemsize) == (block_k, rows, nw)
            assert 132 <= 65536 // block_k <= 4 * 132
            types = {"T_ptr": f"*{dt}:16", "C_ptr": f32, "Scale_ptr": "*fp32", "Valid_ptr": "*i1",
                     "Stat_ptr": f32, "ColSum_ptr": f32, "R": "i32", "K": "i32:16", "n_tiles": "i32",
                     "plane": "i32", "stride_t": "i32:16"}
            for has_valid in (False, True):
                stats.append((module, "_softmax_center_stats_kernel", types,
                              {"HAS_VALID": has_valid, "BLOCK_K": block_k, "ROWS": rows},
                              {"num_warps": nw, "enable_fp_fusion": False}, cap))
        types = {"Stat_ptr": f32, "Valid_ptr": "*i1", "RowOff_ptr": f32, "Ent_ptr": f32, "R": "i32",
                 "n_tiles": "i32", "plane": "i32"}
        for n_tiles in (65536 // stats_launch_config(512, 65536, 2)[0], MAX_STATS_TILES):
            meta = stats_combine_meta(512, n_tiles)
            nw = meta.pop("num_warps")
            for has_valid in (False, True):
                combine.append((module, "_softmax_center_combine_kernel", types, {"HAS_VALID": has_valid, **meta},
                                nw, cap))
    results = aot_compile(stats + combine)
    assert_compiled(stats, results[:len(stats)])
    assert_compiled(combine, results[len(stats):], vector_loads=False)  # strided (row, tile) partials


@pytest.mark.skipif(DEV != "cuda", reason="real sizes: CUDA only (the AOT test covers them on CPU)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_stats_real_size_cuda(dtype):
    t, c = _inputs(512, 65536, dtype, seed=13)
    _check_stats(t, c, 0.04, None)
    _check_stats(t, c, 0.04, torch.arange(512, device=DEV) % 3 != 0)


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs: CUDA only")
def test_stats_cuda_graph_capture():
    """Captured and replayed: a new teacher_temp and new row_valid reach the captured kernels."""
    t, c = _inputs(256, 4096, torch.bfloat16, seed=14)
    temp = torch.tensor(0.04, device=DEV)
    row_valid = torch.ones(256, dtype=torch.bool, device=DEV)

    from cuda_graph import capture

    graph, out = capture(lambda: softmax_center_stats(t, c, temp, row_valid))
    temp.fill_(0.07)
    row_valid[::2] = False
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(out, softmax_center_stats(t, c, 0.07, row_valid.clone())):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
