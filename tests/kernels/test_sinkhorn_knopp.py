"""kernels/sinkhorn_knopp.py and fastdino/targets.py: SinkhornKnopp: the Triton op against the
reference on fresh random inputs (fp32/bf16/fp16 logits, K not a multiple of the block, R = 1, R odd,
row and column splits, logits the official code overflows on); the reference against the official
steps in float64; rows sum to 1 and columns approach uniform; two ranks (two threads taking turns,
an all_reduce over both) equal one rank on the concatenated rows; a row far below every column's
max; padded rows (row_valid: the valid rows get the unpadded targets, the others zeros, on one rank
and on two, also with no valid row); the custom ops' registrations (opcheck, torch.compile without
graph breaks or recompiles); one-line errors; an ahead-of-time compile for sm_80 and sm_90a; the
target module; the benchmark's CPU run."""
import threading

import pytest
import torch

import fastdino  # noqa: F401  (registers fastdino.kernels from a plain checkout)
from fastdino.kernels.sinkhorn_knopp import (launch_config, sinkhorn_knopp, sinkhorn_knopp_colmax_op,
                                             sinkhorn_knopp_colsum_op, sinkhorn_knopp_ref,
                                             sinkhorn_knopp_row_lse_op, sinkhorn_knopp_targets_op)
from fastdino.targets import Centering, SinkhornKnopp

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _logits(R, K, dtype, seed, scale=2.0):
    """Random teacher logits with a per-prototype offset (some prototypes favoured by every row)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(R, K, generator=g) * scale + torch.randn(1, K, generator=g) * scale / 2
    return t.to(DEV, dtype)


def _close(out, ref, ref64, eps, what):
    """|out - ref64| <= 2 |ref - ref64| + eps * max|ref64|: the reference's own error sets the budget."""
    out, ref, ref64 = out.double(), ref.double(), ref64.double()
    err = (out - ref64).abs()
    budget = 2 * (ref - ref64).abs() + eps * ref64.abs().max().clamp_min(1e-3)
    assert (err <= budget).all(), f"{what}: max err {err.max().item():.3g}, budget {budget.min().item():.3g}"


CASES = [  # R, K, dtype, teacher_temp, logit scale, n_iterations
    (4, 1000, torch.float32, 0.04, 2.0, 3),  # K not a multiple of the blocks
    (40, 300, torch.bfloat16, 0.07, 2.0, 3),  # prototype sums over 3 row splits
    (5, 3000, torch.float32, 0.04, 2.0, 3),  # row log-sum-exps over 3 column splits
    (1, 77, torch.float32, 0.04, 2.0, 3),  # R = 1, K below one block
    (7, 130, torch.float16, 0.1, 1.0, 5),  # R odd
    (6, 50, torch.float32, 0.04, 10.0, 2),  # t / tau_t up to ~700: the official exp(t/tau) is inf
]


@pytest.mark.parametrize("R,K,dtype,temp,scale,n_iter", CASES)
def test_triton_matches_reference(R, K, dtype, temp, scale, n_iter):
    t = _logits(R, K, dtype, seed=R * 100 + K, scale=scale)
    temp_t = torch.tensor(temp, device=DEV)  # as the engine passes it: a 0-dim device tensor
    out = sinkhorn_knopp(t, temp_t, n_iter)
    ref = sinkhorn_knopp_ref(t, temp_t, n_iter)
    ref64 = sinkhorn_knopp_ref(t.double(), temp, n_iter)
    for name, o, r, r64 in zip(("q", "entropy"), out, ref, ref64):
        assert o.dtype == torch.float32 and o.device.type == t.device.type, name
        assert torch.isfinite(o).all(), name
        _close(o, r, r64, 1e-5, name)
    torch.testing.assert_close(out[0].sum(-1), torch.ones(R, device=DEV), rtol=0, atol=2e-6)
    assert (out[1] >= -1e-6).all()
    for a, b in zip(sinkhorn_knopp(t, temp, n_iter), out):  # a float teacher_temp: the same numbers
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _official_steps(t, temp, n_iterations):
    """The official algorithm on one process, float64, written from the kernel file's header:
    exp(t / tau) without any shift, then the alternating normalizations with their scalars."""
    Q = torch.exp(t / temp).T
    K, B = Q.shape
    Q = Q / Q.sum()
    for _ in range(n_iterations):
        Q = Q / Q.sum(dim=1, keepdim=True) / K
        Q = Q / Q.sum(dim=0, keepdim=True) / B
    return (Q * B).T


@pytest.mark.parametrize("n_iter", [1, 3, 6])
def test_reference_matches_official_steps(n_iter):
    t = _logits(9, 40, torch.float64, seed=n_iter)
    q, entropy = sinkhorn_knopp_ref(t, 0.05, n_iter)
    q_official = _official_steps(t, 0.05, n_iter)
    torch.testing.assert_close(q, q_official, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(entropy, -(q_official * q_official.log()).sum(-1), rtol=1e-10, atol=1e-14)
    assert sinkhorn_knopp(t, 0.05, n_iter, impl="torch")[0].dtype == torch.float64
    # global_rows B_global only scales what the next normalization undoes
    torch.testing.assert_close(sinkhorn_knopp_ref(t, 0.05, n_iter, global_rows=1000)[0], q, rtol=1e-12, atol=0)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_columns_approach_uniform(impl):
    """What Sinkhorn-Knopp is for: each prototype's share of the batch, sum_r q_rk * K / R, tends to
    1 with the iterations, far from the plain softmax's."""
    R, K, temp = 96, 24, 0.1
    t = _logits(R, K, torch.float32, seed=7, scale=1.0)

    def worst(q):
        return (q.double().sum(0) * K / R - 1).abs().max().item()

    devs = [worst(sinkhorn_knopp(t, temp, n, impl=impl)[0]) for n in (1, 3, 10, 30)]  # ~1.1, .67, .44, .06
    assert devs == sorted(devs, reverse=True), devs
    assert devs[1] < worst(torch.softmax(t / temp, -1)) / 2  # ~1.97
    assert devs[-1] < 0.1


class _TwoRanks:
    """Two ranks as two threads taking turns, one running at a time (the Triton interpreter is not
    thread-safe). all_reduce(x, op): deposit x, wait for the other rank, reduce both, resume."""

    def __init__(self):
        self.turn = threading.Lock()
        self.barrier = threading.Barrier(2, timeout=120)
        self.slots = [None, None]
        self.ops = [[], []]

    def all_reduce(self, rank):
        def fn(x, op):
            self.ops[rank].append(op)
            self.slots[rank] = x.clone()
            self.turn.release()
            try:
                self.barrier.wait()
                a, b = self.slots
                y = a + b if op == "sum" else torch.maximum(a, b)
                self.barrier.wait()  # both have read the slots before either writes again
            finally:
                self.turn.acquire()
            x.copy_(y)
        return fn

    def run(self, fn, inputs):
        results, errors = [None, None], []

        def worker(rank):
            try:
                with self.turn:
                    results[rank] = fn(inputs[rank], self.all_reduce(rank))
            except BaseException as e:  # fail the other rank fast, report here
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=worker, args=(r,)) for r in (0, 1)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
        return results


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("global_rows", [7, None], ids=["B_global", "no_count"])
def test_two_ranks_equal_one_rank(impl, dtype, global_rows):
    """Rows split 3 + 4 between two ranks: the concatenated targets are the one-rank targets of all 7
    rows, with B_global given or not; the all-reduces are one "max" (the column maxima), then "sum"s
    (the official total, for the reference, and one per iteration)."""
    t = _logits(7, 150, dtype, seed=8)
    temp = torch.tensor(0.05, device=DEV)
    ranks = _TwoRanks()
    outs = ranks.run(lambda rows, all_reduce: sinkhorn_knopp(rows, temp, 3, all_reduce, global_rows=global_rows,
                                                             impl=impl), [t[:3], t[3:]])
    one = sinkhorn_knopp(t, temp, 3, impl=impl)
    torch.testing.assert_close(torch.cat([o[0] for o in outs]), one[0], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(torch.cat([o[1] for o in outs]), one[1], rtol=1e-5, atol=1e-6)
    n_sums = 3 + (impl == "torch")
    assert ranks.ops[0] == ranks.ops[1] == ["max"] + ["sum"] * n_sums


def test_row_far_below_every_column_max():
    """A row 20 logits below the rest (500 tau_t: 2^x underflows in fp32) is still a distribution:
    the fused sample normalizer is a log-sum-exp; it matches the fp64 reference, where the fp32
    reference, following the official in-place steps, divides 0 by 0."""
    t = _logits(6, 50, torch.float32, seed=9)
    t[2] -= 20
    out = sinkhorn_knopp(t, 0.04)
    ref64 = sinkhorn_knopp_ref(t.double(), 0.04)
    torch.testing.assert_close(out[0].double(), ref64[0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out[1].double(), ref64[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[0].sum(-1), torch.ones(6, device=DEV))
    assert torch.isnan(sinkhorn_knopp_ref(t, 0.04)[0][2]).all()


def _padded(R, K, dtype, seed):
    """iBOT-like padded logits: row_valid (R,) with invalid rows scattered (the first, runs, not only at
    the end); the padding copies valid rows, one shifted 30 logits above (600 tau_t: it holds every
    column's max, far above the valid rows) and one 30 below."""
    t = _logits(R, K, torch.float32, seed)
    valid = torch.rand(R, generator=torch.Generator().manual_seed(seed)) < 0.6
    valid[[0, 3, 4]] = False
    valid[[1, 2, R - 1]] = True
    pad = (~valid).nonzero()[:, 0].tolist()
    src = valid.nonzero()[:, 0].tolist()
    for i, r in enumerate(pad):
        t[r] = t[src[i % len(src)]] + (30.0 if i == 0 else -30.0 if i == 1 else 0.0)
    return t.to(dtype), valid.to(DEV)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("R,K,dtype", [(13, 1000, torch.float32), (40, 300, torch.bfloat16)])
def test_row_valid_matches_unpadded(impl, R, K, dtype):
    """Padded rows take no part: the valid rows get the targets of the valid rows alone (the reference
    without padding, within its own error), the others q = 0 and entropy = 0 exactly."""
    t, valid = _padded(R, K, dtype, seed=R + K)
    temp = torch.tensor(0.05, device=DEV)
    out = sinkhorn_knopp(t, temp, 3, row_valid=valid, impl=impl)
    ref = sinkhorn_knopp_ref(t[valid], temp, 3)
    ref64 = sinkhorn_knopp_ref(t[valid].double(), 0.05, 3)
    for name, o, r, r64 in zip(("q", "entropy"), out, ref, ref64):
        assert o.dtype == torch.float32 and o.shape[0] == R and torch.isfinite(o).all(), name
        _close(o[valid], r, r64, 1e-5, name)
        assert (o[~valid] == 0).all(), name
    torch.testing.assert_close(out[0][valid].sum(-1), torch.ones(int(valid.sum()), device=DEV), rtol=0, atol=2e-6)
    if impl == "torch":  # global_rows (valid rows over all ranks) cancels (up to rounding: atol for denormals)
        q = sinkhorn_knopp_ref(t, temp, 3, global_rows=int(valid.sum()), row_valid=valid)[0]
        torch.testing.assert_close(q, out[0], rtol=1e-6, atol=1e-30)
    t, all_rows = t[valid], valid[valid]  # every row valid: bit-identical to row_valid=None
    for a, b in zip(sinkhorn_knopp(t, temp, 3, row_valid=all_rows, impl=impl), sinkhorn_knopp(t, temp, 3, impl=impl)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_row_valid_none_valid_gives_zeros(impl):
    """No valid row at all (one process): q and entropy all zeros, nothing non-finite, even with
    padding far from zero."""
    t = _logits(5, 70, torch.bfloat16, seed=17, scale=100.0)
    q, entropy = sinkhorn_knopp(t, 0.04, 2, row_valid=torch.zeros(5, dtype=torch.bool, device=DEV), impl=impl)
    assert q.shape == (5, 70) and (q == 0).all() and (entropy == 0).all()


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("empty_rank", [False, True])
@pytest.mark.parametrize("global_rows", [True, False], ids=["B_global", "no_count"])
def test_two_ranks_row_valid(impl, empty_rank, global_rows):
    """Two ranks with padded shards of different valid counts (rank 1 possibly without a valid row):
    the valid rows of both equal one rank on the valid rows alone, with B_global given or not (as
    fastdino.targets.SinkhornKnopp calls it: a rank-local count must not stand in for it); the same
    collectives as without padding."""
    t, valid = _padded(9, 150, torch.float32, seed=18)
    if empty_rank:
        valid[5:] = False
    assert valid[:5].sum() != valid[5:].sum()  # unequal ranks: where a rank-local B would be wrong
    temp = torch.tensor(0.05, device=DEV)
    n_valid = valid.sum() if global_rows else None  # B_global: a 0-dim device tensor, no host sync

    def rank_fn(shard, all_reduce):
        rows, v = shard
        return sinkhorn_knopp(rows, temp, 3, all_reduce, global_rows=n_valid, impl=impl, row_valid=v)

    ranks = _TwoRanks()
    outs = ranks.run(rank_fn, [(t[:5], valid[:5]), (t[5:], valid[5:])])
    one = sinkhorn_knopp(t[valid], temp, 3, impl=impl)
    q, entropy = (torch.cat([o[i] for o in outs]) for i in (0, 1))
    torch.testing.assert_close(q[valid], one[0], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(entropy[valid], one[1], rtol=1e-5, atol=1e-6)
    assert (q[~valid] == 0).all() and (entropy[~valid] == 0).all()
    assert ranks.ops[0] == ranks.ops[1] == ["max"] + ["sum"] * (3 + (impl == "torch"))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets the NaN
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_nonfinite_logit_gives_nonfinite_targets(impl):
    """A NaN teacher logit is not hidden: q comes out non-finite (the step then skips the update)."""
    t = _logits(4, 64, torch.float32, seed=10)
    t[1, 5] = float("nan")
    q, entropy = sinkhorn_knopp(t, 0.04, impl=impl)
    assert not torch.isfinite(q).all() and not torch.isfinite(entropy).all()
    valid = torch.tensor([False, True, True, False], device=DEV)  # also on a valid row of padded logits
    q, entropy = sinkhorn_knopp(t, 0.04, impl=impl, row_valid=valid)
    assert not torch.isfinite(q).all() and not torch.isfinite(entropy).all()


def test_opcheck():
    t = _logits(5, 70, torch.bfloat16, seed=11)
    temp = torch.tensor(0.04, device=DEV)
    col_max = t.float().amax(0)
    col_lse = torch.rand(70, device=DEV)
    row_lse = torch.rand(5, device=DEV)
    torch.library.opcheck(sinkhorn_knopp_colsum_op, (t, temp, col_max, col_lse, row_lse))
    torch.library.opcheck(sinkhorn_knopp_row_lse_op, (t, temp, col_max, col_lse))
    torch.library.opcheck(sinkhorn_knopp_targets_op, (t, temp, col_max, col_lse, row_lse))
    valid = torch.tensor([True, False, True, True, False], device=DEV)
    torch.library.opcheck(sinkhorn_knopp_colmax_op, (t, valid))
    torch.testing.assert_close(sinkhorn_knopp_colmax_op(t, valid), t[valid].float().amax(0), rtol=0, atol=0)
    assert (sinkhorn_knopp_colmax_op(t, torch.zeros_like(valid)) == float("-inf")).all()
    row_lse = torch.where(valid, row_lse, float("inf"))  # padded rows: no term in the sums, q = 0
    assert torch.equal(sinkhorn_knopp_colsum_op(t, temp, col_max, col_lse, row_lse),
                       sinkhorn_knopp_colsum_op(t[valid], temp, col_max, col_lse, row_lse[valid]))
    q, entropy = sinkhorn_knopp_targets_op(t, temp, col_max, col_lse, row_lse)
    assert (q[~valid] == 0).all() and (entropy[~valid] == 0).all() and torch.isfinite(q).all()


def test_compile_fullgraph_no_recompile_on_new_temperature():
    torch._dynamo.reset()
    t = _logits(3, 70, torch.bfloat16, seed=12)
    compiled = torch.compile(lambda t, temp: sinkhorn_knopp(t, temp), fullgraph=True, backend="aot_eager")
    for i, temp in enumerate((0.04, 0.05)):
        temp = torch.tensor(temp, device=DEV)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            out = compiled(t, temp)
        for a, b in zip(out, sinkhorn_knopp(t, temp)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compile_fullgraph_row_valid_no_recompile():
    """row_valid is a device tensor: a new mask is new data, not a new graph; same numbers as eager."""
    torch._dynamo.reset()
    t = _logits(5, 70, torch.bfloat16, seed=19)
    temp = torch.tensor(0.05, device=DEV)
    compiled = torch.compile(lambda t, temp, v: sinkhorn_knopp(t, temp, row_valid=v), fullgraph=True,
                             backend="aot_eager")
    for i, valid in enumerate(([True, False, True, True, False], [False] * 5)):
        valid = torch.tensor(valid, device=DEV)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            out = compiled(t, temp, valid)
        for a, b in zip(out, sinkhorn_knopp(t, temp, row_valid=valid)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_inputs_raise():
    t = _logits(2, 64, torch.float32, seed=13)
    for impl in ("triton", "torch"):
        for args, match in [((t[0], 0.04), "2-D"), ((t[:0], 0.04), "2-D"), ((t.long(), 0.04), "floating"),
                            ((t, torch.ones(2, device=DEV)), "teacher_temp"), ((t, 0.0), "teacher_temp"),
                            ((t, 0.04, 0), "n_iterations"), ((t, 0.04, 2.0), "n_iterations"),
                            ((t, 0.04, 3, None, 0), "global_rows")]:
            with pytest.raises(ValueError, match=match) as e:
                sinkhorn_knopp(*args, impl=impl)
            assert "\n" not in str(e.value)
        for bad in (torch.ones(2, dtype=torch.long, device=DEV), torch.ones(3, dtype=torch.bool, device=DEV),
                    torch.ones(2, 1, dtype=torch.bool, device=DEV), [True, False]):
            with pytest.raises(ValueError, match="row_valid") as e:
                sinkhorn_knopp(t, 0.04, impl=impl, row_valid=bad)
            assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="impl"):
        sinkhorn_knopp(t, 0.04, impl="cuda")


@pytest.mark.skipif(DEV == "cuda", reason="CPU-only check")
def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        sinkhorn_knopp(_logits(2, 64, torch.float32, seed=14), 0.04)


def test_aot_compile_sm80_sm90a():
    """The four kernels at the launcher's constexprs for DINO's K=65536 (R = 2B = 128) and a small
    K, teacher logits in bf16, fp16 and fp32: compiles, no spills, 16-byte loads."""
    from aot import aot_compile, assert_compiled

    f32 = "*fp32:16"
    common = {"Temp_ptr": "*fp32", "ColMax_ptr": f32, "ColLse_ptr": f32, "R": "i32", "K": "i32:16",
              "stride_t": "i32:16"}
    kernels = {
        "_sk_colmax_kernel": ("col", {"Valid_ptr": "*u8", "Part_ptr": f32, "rows_per_split": "i32:16"}),
        "_sk_colsum_kernel": ("col", {"RowLse_ptr": f32, "Part_ptr": f32, "rows_per_split": "i32:16"}),
        "_sk_row_lse_kernel": ("row", {"PartMax_ptr": f32, "PartSum_ptr": f32, "cols_per_split": "i32:16",
                                       "n_splits": "i32"}),
        "_sk_targets_kernel": ("row", {"RowLse_ptr": f32, "Q_ptr": f32, "PartEnt_ptr": f32,
                                       "cols_per_split": "i32:16", "n_splits": "i32", "stride_q": "i32:16"}),
    }
    jobs = []
    for cap in (80, 90):
        for dt in ("bf16", "fp16", "fp32"):
            for name, (kind, types) in kernels.items():
                for K in (65536, 1024):
                    block_r, block_k, nw, _, _ = launch_config(128, K, kind, torch.device("cpu"))  # blocks: any device
                    jobs.append(("fastdino.kernels.sinkhorn_knopp", name,
                                 {"T_ptr": f"*{dt}:16", **common, **types},
                                 {"BLOCK_R": block_r, "BLOCK_K": block_k}, nw, cap))
    assert_compiled(jobs, aot_compile(jobs))


# ---------------------------------------------------------------------------------------------
# The target module (fastdino/targets.py)
# ---------------------------------------------------------------------------------------------
def test_target_module_interface():
    """Centering's calls: forward(t, temp) -> (q, {"entropy": (R,)}), update_ (a no-op), an empty
    state_dict; impl "fused" and "reference" agree; all_reduce is handed to the op."""
    t = _logits(6, 90, torch.bfloat16, seed=15)
    temp = torch.tensor(0.05, device=DEV)
    fused, reference = SinkhornKnopp(90, impl="fused"), SinkhornKnopp(90, n_iterations=3, impl="reference")
    q, stats = fused(t, temp)
    q_ref, stats_ref = reference(t, temp)
    assert q.shape == (6, 90) and stats["entropy"].shape == (6,)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats["entropy"], stats_ref["entropy"], rtol=1e-5, atol=1e-5)
    assert fused.state_dict() == {} and not list(fused.buffers())
    fused.update_(torch.ones(90), 6, torch.tensor(True))  # nothing to update
    assert set(Centering(90).state_dict()) == {"center"}  # unchanged next to it

    calls = []
    SinkhornKnopp(90, n_iterations=2, impl="fused", all_reduce=lambda x, op: calls.append(op))(t, temp)
    assert calls == ["max", "sum", "sum"]
    with pytest.raises(ValueError, match="impl"):
        SinkhornKnopp(90, impl="triton")
    with pytest.raises(ValueError, match="n_iterations"):
        SinkhornKnopp(90, n_iterations=0)
    with pytest.raises(ValueError, match="out_dim"):
        SinkhornKnopp(90)(t[:, :80], temp)


# ---------------------------------------------------------------------------------------------
# The benchmark, as CI runs it
# ---------------------------------------------------------------------------------------------
def test_benchmark_sk_rows(tmp_path):
    """benchmarks/loss.py --sk at a tiny size: the reference and the fused Sinkhorn-Knopp (interpreted on
    CPU, compiled on a CUDA machine)."""
    import json

    from aot import load_loss_benchmark

    bench = load_loss_benchmark()
    out = tmp_path / "sk.json"
    where = [] if torch.cuda.is_available() else ["--cpu"]
    rows = bench.main(["--sk", "--quick", *where, "--B", "2", "--K", "512", "--json", str(out)])
    assert [r["variant"] for r in rows] == ["sk_reference", "sk_fused"]
    assert all(r["ms"] > 0 and r["GBps"] > 0 for r in rows)
    assert abs(rows[0]["entropy"] - rows[1]["entropy"]) <= 1e-4 * abs(rows[0]["entropy"])
    assert json.loads(out.read_text())[1]["speedup"] > 0


@pytest.mark.skipif(DEV != "cuda", reason="real sizes: CUDA only (the AOT test covers them on CPU)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("R,K", [(128, 65536), (4096, 8192)])
def test_real_size_cuda(dtype, R, K):
    """DINO [CLS] rows (2B = 128, K = 65536) and iBOT-like masked-token rows (4096, K = 8192)."""
    t = _logits(R, K, dtype, seed=16)
    temp = torch.tensor(0.04, device=DEV)
    out = sinkhorn_knopp(t, temp)
    ref = sinkhorn_knopp_ref(t, temp)
    ref64 = sinkhorn_knopp_ref(t.double(), 0.04)
    for name, o, r, r64 in zip(("q", "entropy"), out, ref, ref64):
        _close(o, r, r64, 1e-5, name)
