"""kernels/sinkhorn_knopp.py and fastdino/targets.py: SinkhornKnopp: the Triton op against the
reference on fresh random inputs (fp32/bf16/fp16 logits, K not a multiple of the block, R = 1, R odd,
row and column splits, logits the official code overflows on); the reference against the official
steps in float64; rows sum to 1 and columns approach uniform; two ranks (two threads taking turns,
an all_reduce over both) equal one rank on the concatenated rows; a row far below every column's
max; padded rows (row_valid: the valid rows get the unpadded targets, the others zeros, on one rank
and on two, also with no valid row); the custom ops' registrations (opcheck, torch.compile without
graph breaks or recompiles, with and without an all_reduce); the launches per call (one custom op of
2 n_iterations + 3 launches without an all_reduce, the same for the statistics); one-line errors; an
ahead-of-time compile for sm_80 and sm_90a; the target module; the benchmark's CPU run.
sinkhorn_knopp_stats (q never stored): teacher_probs of its state is sinkhorn_knopp's q (the exponent
bit for bit, q to exp2's rounding) and the official targets; its torch impl against the official steps
in float64; padded rows, two ranks; the soft cross-entropy on LogitTargets of it against the loss on
sinkhorn_knopp's q (DINO and iBOT shapes, two ranks)."""
import collections
import math
import threading

import pytest
import torch
import triton

import fastdino  # noqa: F401  (registers fastdino.kernels from a plain checkout)
import fastdino.kernels.sinkhorn_knopp as sk_module
from fastdino.kernels.sinkhorn_knopp import (launch_config, sinkhorn_knopp, sinkhorn_knopp_colmax_op,
                                             sinkhorn_knopp_colsum_op, sinkhorn_knopp_op, sinkhorn_knopp_ref,
                                             sinkhorn_knopp_row_lse_op, sinkhorn_knopp_stats, sinkhorn_knopp_stats_op,
                                             sinkhorn_knopp_target_stats_op, sinkhorn_knopp_targets_op)
from fastdino.kernels.soft_cross_entropy import LogitTargets, soft_cross_entropy, teacher_scale
from fastdino.kernels.softmax_center import teacher_probs
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


# ---------------------------------------------------------------------------------------------
# sinkhorn_knopp_stats: the targets as the state they are made from (q never stored)
# ---------------------------------------------------------------------------------------------
# q made by the kernels (tl.exp2) against torch.exp2 of the same exponent (teacher_probs): on CPU the
# interpreter's np.exp2 and torch's differ by up to 2 ulp (measured); on CUDA ex2.approx.f32 and exp2f
# are each documented within 2 ulp of the exact value: 4 (not measured here)
ULPS = 4 if DEV == "cuda" else 2


def _exponent(t, stats, temp):
    """log2 q from sinkhorn_knopp_stats' state, in the contract's order, each operation rounded on
    its own (eager torch): ((float32(t) - center) * teacher_scale(temp) - col_offset) - row_offset."""
    center, col_offset, row_offset, _ = stats
    return ((t.float() - center) * teacher_scale(temp) - col_offset) - row_offset[:, None]


def _assert_exp2_of(q, exponent, what):
    """q (the kernels') is 2^exponent: bit for bit against the interpreter's own exp2 (np.exp2) on CPU,
    so the kernels' exponent has exactly these bits; within ULPS of torch.exp2 everywhere (or both
    below the smallest normal fp32, where a GPU's exp2 may flush)."""
    if DEV == "cpu":
        import numpy as np

        assert torch.equal(q, torch.from_numpy(np.exp2(exponent.numpy()))), f"{what}: not the same exponent"
    p = torch.exp2(exponent)
    ulps = (q.view(torch.int32).long() - p.view(torch.int32).long()).abs()  # q, p >= 0: bit patterns in order
    ok = (ulps <= ULPS) | (torch.maximum(q, p) < 2.0 ** -126)
    assert ok.all(), f"{what}: {ulps[~ok].max().item()} ulp from torch.exp2"


@pytest.mark.parametrize("R,K,dtype,temp,scale,n_iter", CASES)
def test_stats_make_sinkhorn_knopp_targets(R, K, dtype, temp, scale, n_iter):
    """sinkhorn_knopp_stats (Triton): teacher_probs of its (center, col_offset, row_offset) is
    sinkhorn_knopp's q (the same exponent bit for bit, exp2 within ULPS), the entropies are equal, the
    center is the column max as read; against the official targets within the reference's own error.
    The torch impl (the log-domain algorithm in PyTorch): the same center, the offsets and the entropy
    to fp32 rounding, its q against the official targets within the same budget."""
    t = _logits(R, K, dtype, seed=R * 100 + K, scale=scale)
    temp_t = torch.tensor(temp, device=DEV)
    q, entropy = sinkhorn_knopp(t, temp_t, n_iter)
    stats = sinkhorn_knopp_stats(t, temp_t, n_iter)
    center, col_offset, row_offset, entropy_stats = stats
    assert [tuple(x.shape) for x in stats] == [(K,), (K,), (R,), (R,)]
    assert all(x.dtype == torch.float32 and torch.isfinite(x).all() for x in stats)
    assert torch.equal(center, t.float().amax(0)) and torch.equal(entropy_stats, entropy)
    exponent = _exponent(t, stats, temp_t)
    _assert_exp2_of(q, exponent, "q")
    q_stats = teacher_probs(t, center, temp_t, row_offset, col_offset)
    assert torch.equal(q_stats, torch.exp2(exponent))  # teacher_probs rounds as the contract says
    ref = sinkhorn_knopp_ref(t, temp_t, n_iter)
    ref64 = sinkhorn_knopp_ref(t.double(), temp, n_iter)
    torch_stats = sinkhorn_knopp_stats(t, temp_t, n_iter, impl="torch")
    assert all(x.dtype == torch.float32 for x in torch_stats) and torch.equal(torch_stats[0], center)
    for name, o, r in zip(("col_offset", "row_offset", "entropy"), torch_stats[1:], stats[1:]):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5, msg=name)
    _, torch_col_offset, torch_row_offset, torch_entropy = torch_stats
    q_torch = teacher_probs(t, center, temp_t, torch_row_offset, torch_col_offset)
    for name, o, r, r64 in (("q", q_stats, ref[0], ref64[0]), ("entropy", entropy_stats, ref[1], ref64[1]),
                            ("torch q", q_torch, ref[0], ref64[0]), ("torch entropy", torch_entropy, ref[1], ref64[1])):
        _close(o, r, r64, 1e-5, name)
    for a, b in zip(sinkhorn_knopp_stats(t, temp, n_iter), stats):  # a float teacher_temp: the same numbers
        assert torch.equal(a, b)


@pytest.mark.parametrize("n_iter", [1, 3, 6])
def test_stats_torch_impl_matches_official_steps(n_iter):
    """In float64 the torch impl's state makes the official targets (teacher_probs), to fp64 rounding."""
    t = _logits(9, 40, torch.float64, seed=n_iter)
    center, col_offset, row_offset, entropy = sinkhorn_knopp_stats(t, 0.05, n_iter, impl="torch")
    q_official = _official_steps(t, 0.05, n_iter)
    q = teacher_probs(t, center, 0.05, row_offset, col_offset)
    assert q.dtype == torch.float64
    torch.testing.assert_close(q, q_official, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(entropy, -(q_official * q_official.log()).sum(-1), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("R,K,dtype", [(13, 1000, torch.float32), (40, 300, torch.bfloat16)])
def test_stats_row_valid(R, K, dtype):
    """Padded rows: row_offset +inf, entropy 0, q = 0 from the state; the valid rows' q is
    sinkhorn_knopp's (Triton: the same exponent) and the unpadded targets within the reference's own
    error (both impls); the center is the max over the valid rows. No valid row at all: center 0,
    every row_offset +inf, q all zeros."""
    t, valid = _padded(R, K, dtype, seed=R + K)
    temp = torch.tensor(0.05, device=DEV)
    q, entropy = sinkhorn_knopp(t, temp, 3, row_valid=valid)
    ref = sinkhorn_knopp_ref(t[valid], temp, 3)
    ref64 = sinkhorn_knopp_ref(t[valid].double(), 0.05, 3)
    for impl in ("triton", "torch"):
        stats = sinkhorn_knopp_stats(t, temp, 3, row_valid=valid, impl=impl)
        center, col_offset, row_offset, ent = stats
        assert torch.equal(center, t[valid].float().amax(0)), impl
        assert (row_offset[~valid] == float("inf")).all() and (ent[~valid] == 0).all(), impl
        assert torch.isfinite(row_offset[valid]).all() and torch.isfinite(col_offset).all(), impl
        q_stats = teacher_probs(t, center, temp, row_offset, col_offset)
        assert (q_stats[~valid] == 0).all(), impl
        if impl == "triton":
            _assert_exp2_of(q, _exponent(t, stats, temp), "q")
            assert torch.equal(ent, entropy)
        _close(q_stats[valid], ref[0], ref64[0], 1e-5, f"{impl} q")
        _close(ent[valid], ref[1], ref64[1], 1e-5, f"{impl} entropy")
    t = _logits(5, 70, torch.bfloat16, seed=17, scale=100.0)
    none = torch.zeros(5, dtype=torch.bool, device=DEV)
    for impl in ("triton", "torch"):
        center, col_offset, row_offset, ent = sinkhorn_knopp_stats(t, 0.04, 2, row_valid=none, impl=impl)
        assert (center == 0).all() and torch.isfinite(col_offset).all() and (row_offset == float("inf")).all()
        assert (ent == 0).all() and (teacher_probs(t, center, 0.04, row_offset, col_offset) == 0).all()


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("padded", [False, True], ids=["all_rows", "row_valid"])
def test_stats_two_ranks_equal_one_rank(impl, padded):
    """Rows split 5 + 4 between two ranks (padded: unequal valid counts): both ranks get the same
    center and col_offset (all-reduced state), the concatenated state equals one rank's (the center
    exactly), its targets are one rank's sinkhorn_knopp targets of the (valid) rows; the collectives
    are sinkhorn_knopp's."""
    t, valid = _padded(9, 150, torch.float32, seed=18)
    if not padded:
        t, valid = _logits(9, 150, torch.bfloat16, seed=8), None
    shards = [(t[:5], None if valid is None else valid[:5]), (t[5:], None if valid is None else valid[5:])]
    temp = torch.tensor(0.05, device=DEV)
    ranks = _TwoRanks()
    outs = ranks.run(lambda shard, all_reduce: sinkhorn_knopp_stats(shard[0], temp, 3, all_reduce, impl=impl,
                                                                    row_valid=shard[1]), shards)
    assert ranks.ops[0] == ranks.ops[1] == ["max"] + ["sum"] * 3
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    center, col_offset = outs[0][:2]
    row_offset, entropy = (torch.cat([o[i] for o in outs]) for i in (2, 3))
    one = sinkhorn_knopp_stats(t, temp, 3, impl=impl, row_valid=valid)
    assert torch.equal(center, one[0])
    for name, o, r in zip(("col_offset", "row_offset", "entropy"), (col_offset, row_offset, entropy), one[1:]):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5, msg=name)
    q = teacher_probs(t, center, temp, row_offset, col_offset)
    keep = slice(None) if valid is None else valid
    q_one, entropy_one = sinkhorn_knopp(t[keep], temp, 3, impl=impl)
    torch.testing.assert_close(q[keep], q_one, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(entropy[keep], entropy_one, rtol=1e-5, atol=1e-6)
    if valid is not None:
        assert (q[~valid] == 0).all() and (entropy[~valid] == 0).all()


def _loss_and_grad(s, targets, n_views, n_targets, skip, weights):
    s = s.clone().requires_grad_()
    loss = soft_cross_entropy(s, targets, n_views, 0.1, n_targets, skip, weights)
    loss.backward()
    return loss.detach(), s.grad


LOSS_CASES = [  # G, K, n_views, n_targets, skip_same_view, student dtype, teacher dtype, padded (iBOT)
    (3, 300, 4, 2, True, torch.float32, torch.bfloat16, False),  # DINO: 2 global + 2 local views
    (2, 1100, 3, 2, True, torch.bfloat16, torch.float32, False),  # K over several tiles and splits
    (9, 130, 1, 1, False, torch.bfloat16, torch.bfloat16, True),  # iBOT: masked tokens, padding, weights
]


@pytest.mark.parametrize("G,K,n_views,n_targets,skip,dtype,tdtype,padded", LOSS_CASES)
def test_loss_on_stats_equals_loss_on_q(G, K, n_views, n_targets, skip, dtype, tdtype, padded):
    """The soft cross-entropy (Triton) on LogitTargets of sinkhorn_knopp_stats, q made in the loss
    kernels, against the same loss on sinkhorn_knopp's stored q: loss to 1e-6 relative, gradient to
    one ulp of its dtype (iBOT: row_valid padding, per-token weights 1/valid tokens, 0 on padding)."""
    g = torch.Generator().manual_seed(G * K)
    s = (torch.randn(n_views * G, K, generator=g) * 3).to(DEV, dtype)
    t, valid, weights = _logits(n_targets * G, K, tdtype, seed=G + K), None, None
    if padded:
        t, valid = _padded(n_targets * G, K, tdtype, seed=G + K)
        weights = valid.float() / valid.sum()
    temp = torch.tensor(0.05, device=DEV)
    q, _ = sinkhorn_knopp(t, temp, 3, row_valid=valid)
    center, col_offset, row_offset, _ = sinkhorn_knopp_stats(t, temp, 3, row_valid=valid)
    fused = _loss_and_grad(s, LogitTargets(t, center, temp, row_offset, col_offset), n_views, n_targets, skip, weights)
    stored = _loss_and_grad(s, q, n_views, n_targets, skip, weights)
    torch.testing.assert_close(fused[0], stored[0], rtol=1e-6, atol=0)
    ulp = {torch.float32: 2 ** -23, torch.bfloat16: 2 ** -7}[dtype]
    torch.testing.assert_close(fused[1], stored[1], rtol=0, atol=ulp * stored[1].abs().max().item())
    assert torch.isfinite(fused[1]).all()


def test_loss_on_two_ranks_stats_equals_one_rank():
    """iBOT rows on two ranks (5 + 4 padded tokens, unequal valid counts): each rank's loss on
    LogitTargets of its sinkhorn_knopp_stats (computed with the all-reduces), summed, and the
    gradients concatenated, equal the one-rank loss on sinkhorn_knopp's q of all rows."""
    G, K = 9, 130
    t, valid = _padded(G, K, torch.bfloat16, seed=25)
    s = (torch.randn(G, K, generator=torch.Generator().manual_seed(25)) * 3).to(DEV)
    weights = valid.float() / valid.sum()  # 1 / (valid tokens over all ranks), 0 on padding
    temp = torch.tensor(0.05, device=DEV)
    cut = [slice(0, 5), slice(5, G)]
    outs = _TwoRanks().run(lambda r, all_reduce: sinkhorn_knopp_stats(t[r], temp, 3, all_reduce, row_valid=valid[r]),
                           cut)
    per_rank = [_loss_and_grad(s[r], LogitTargets(t[r], o[0], temp, o[2], o[1]), 1, 1, False, weights[r])
                for r, o in zip(cut, outs)]
    one = _loss_and_grad(s, sinkhorn_knopp(t, temp, 3, row_valid=valid)[0], 1, 1, False, weights)
    torch.testing.assert_close(per_rank[0][0] + per_rank[1][0], one[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.cat([p[1] for p in per_rank]), one[1], rtol=1e-5,
                               atol=1e-5 * one[1].abs().max().item())


def test_opcheck():
    """The one-process op and the per-step ops (the first step's c = 0 and l = 0 as None, then the
    previous op's state), and the per-step state against its definition in torch."""
    t = _logits(5, 70, torch.bfloat16, seed=11)
    temp = teacher_scale(torch.tensor(0.04, device=DEV))  # what the ops take: log2(e) / tau_t
    valid = torch.tensor([True, False, True, True, False], device=DEV)
    for v in (None, valid):
        torch.library.opcheck(sinkhorn_knopp_op, (t, temp, v, 2))
        torch.library.opcheck(sinkhorn_knopp_stats_op, (t, temp, v, 2))
    col_max = t.float().amax(0)
    col_lse = torch.rand(70, device=DEV)
    colsum = torch.rand(70, device=DEV) + 0.5
    torch.library.opcheck(sinkhorn_knopp_colsum_op, (t, temp, col_max, None, None, None))
    torch.library.opcheck(sinkhorn_knopp_row_lse_op, (t, temp, col_max, None, colsum))
    torch.library.opcheck(sinkhorn_knopp_row_lse_op, (t, temp, col_max, col_lse, colsum))
    new_col_lse, row_part = sinkhorn_knopp_row_lse_op(t, temp, col_max, col_lse, colsum)
    torch.library.opcheck(sinkhorn_knopp_colsum_op, (t, temp, col_max, new_col_lse, row_part, valid))
    torch.library.opcheck(sinkhorn_knopp_targets_op, (t, temp, col_max, new_col_lse, row_part, valid))
    torch.library.opcheck(sinkhorn_knopp_target_stats_op, (t, temp, col_max, new_col_lse, row_part, valid))
    torch.library.opcheck(sinkhorn_knopp_colmax_op, (t, valid))
    torch.testing.assert_close(sinkhorn_knopp_colmax_op(t, valid), t[valid].float().amax(0), rtol=0, atol=0)
    assert (sinkhorn_knopp_colmax_op(t, torch.zeros_like(valid)) == float("-inf")).all()
    # the state: c' = c + log2 colsum; l_r = log2 sum_k 2^(x_rk - c'_k), merged from the row partials
    torch.testing.assert_close(new_col_lse, col_lse + torch.log2(colsum), rtol=1e-6, atol=1e-6)
    x = (t.float() - col_max) * temp - new_col_lse  # log2 units
    row_lse = torch.logsumexp(x * math.log(2), dim=1) / math.log(2)
    torch.testing.assert_close(torch.logsumexp(row_part * math.log(2), dim=1) / math.log(2), row_lse,
                               rtol=1e-5, atol=1e-4)
    q, _ = sinkhorn_knopp_targets_op(t, temp, col_max, new_col_lse, row_part, None)
    torch.testing.assert_close(q, torch.exp2(x - row_lse[:, None]), rtol=1e-4, atol=1e-7)
    # padded rows: no term in the sums, q = 0
    assert torch.equal(sinkhorn_knopp_colsum_op(t, temp, col_max, new_col_lse, row_part, valid),
                       sinkhorn_knopp_colsum_op(t[valid], temp, col_max, new_col_lse, row_part[valid], None))
    q, entropy = sinkhorn_knopp_targets_op(t, temp, col_max, new_col_lse, row_part, valid)
    assert (q[~valid] == 0).all() and (entropy[~valid] == 0).all() and torch.isfinite(q).all()
    # without q: the state it is made from, the same entropy
    center, row_offset, entropy_stats = sinkhorn_knopp_target_stats_op(t, temp, col_max, new_col_lse, row_part, valid)
    assert torch.equal(center, col_max) and torch.equal(entropy_stats, entropy)
    assert (row_offset[~valid] == float("inf")).all()
    torch.testing.assert_close(row_offset[valid], row_lse[valid], rtol=1e-5, atol=1e-4)


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


def _two_equal_ranks(x, op):
    """all_reduce over two ranks holding the same rows: a sum doubles, a max is unchanged."""
    if op == "sum":
        x.mul_(2.0)


def test_compile_fullgraph_per_step_ops():
    """With an all_reduce: one op per step, the all-reduces between them, traced without graph breaks
    (the fake row partials have the real shapes) to the eager numbers; two ranks with the same rows get
    the one-process op's targets (every prototype sum doubles: c + 1, l - 1, the same q)."""
    torch._dynamo.reset()
    t, valid = _padded(40, 3000, torch.bfloat16, seed=20)  # several row and K splits
    temp = torch.tensor(0.05, device=DEV)
    compiled = torch.compile(lambda t, temp, v: sinkhorn_knopp(t, temp, 3, _two_equal_ranks, row_valid=v),
                             fullgraph=True, backend="aot_eager")
    for v in (None, valid):
        out = compiled(t, temp, v)
        for a, b in zip(out, sinkhorn_knopp(t, temp, 3, _two_equal_ranks, row_valid=v)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for a, b in zip(out, sinkhorn_knopp(t, temp, 3, row_valid=v)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("all_reduce", [None, _two_equal_ranks], ids=["one_process", "all_reduce"])
def test_stats_compile_fullgraph_no_recompile(all_reduce):
    """sinkhorn_knopp_stats traced without graph breaks (the fake outputs have the real shapes), to the
    eager numbers; a new temperature and a new mask are new data, not a new graph."""
    torch._dynamo.reset()
    t, valid = _padded(13, 300, torch.bfloat16, seed=24)
    compiled = torch.compile(lambda t, temp, v: sinkhorn_knopp_stats(t, temp, 3, all_reduce, row_valid=v),
                             fullgraph=True, backend="aot_eager")
    for i, (temp, v) in enumerate(((0.04, valid), (0.05, ~valid))):
        temp = torch.tensor(temp, device=DEV)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            out = compiled(t, temp, v)
        for a, b in zip(out, sinkhorn_knopp_stats(t, temp, 3, all_reduce, row_valid=v)):
            assert torch.equal(a, b)


_NO_LAUNCH = {f"aten::{name}" for name in (  # a cast launches through its copy_ only
    "empty", "empty_like", "new_empty", "empty_strided", "detach", "detach_", "view", "reshape", "_reshape_alias",
    "select", "slice", "as_strided", "alias", "unsqueeze", "squeeze", "expand", "t", "transpose", "lift_fresh",
    "resolve_conj", "resolve_neg", "contiguous", "to", "_to_copy")}


def _launches(monkeypatch, fn):
    """(Triton launches, torch ops that launch a kernel, fastdino custom-op calls) of fn(), Counters by
    name. Triton: counted at the kernels' launchers. Torch: the profiler's outermost aten ops outside a
    Triton launch (the interpreter's own ops run inside one) with a computing aten op in them (not an
    allocation, a view or a cast to the same dtype)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    triton_launches = collections.Counter()

    class Counted:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                # x rounded as the soft-CE kernels and teacher_probs round it (only a GPU would contract)
                assert kwargs.get("enable_fp_fusion") is False, f"{self.name}: launched with FMA contraction"
                triton_launches[self.name] += 1
                with record_function("triton_launch"):
                    return self.kernel[grid](*args, **kwargs)
            return launch

    with monkeypatch.context() as m:
        for name in ("_sk_colmax_kernel", "_sk_colsum_kernel", "_sk_row_lse_kernel", "_sk_targets_kernel"):
            m.setattr(sk_module, name, Counted(name, getattr(sk_module, name)))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()

    def computes(event):
        if event.cpu_children:
            return any(computes(c) for c in event.cpu_children)
        return event.name.startswith("aten::") and event.name not in _NO_LAUNCH

    torch_ops, custom_ops = collections.Counter(), collections.Counter()
    for e in prof.events():
        parent = e.cpu_parent
        if e.name.startswith("fastdino::"):
            custom_ops[e.name] += 1
        elif (e.name.startswith("aten::") and computes(e)
              and (parent is None or not (parent.name.startswith("aten::") or parent.name == "triton_launch"))):
            torch_ops[e.name] += 1
    return triton_launches, torch_ops, custom_ops


@pytest.mark.parametrize("stats", [False, True], ids=["q", "stats"])
@pytest.mark.parametrize("row_valid", [False, True], ids=["all_rows", "row_valid"])
@pytest.mark.parametrize("with_all_reduce", [False, True], ids=["one_process", "all_reduce"])
def test_launches_per_call(monkeypatch, with_all_reduce, row_valid, stats):
    """The host work of a call, at a shape with several row and K splits (the split sums run). Without
    an all_reduce: one custom op, 2 n_iterations + 3 launches (+1, the colmax kernel, with row_valid).
    With one: per iteration the colsum kernel, the torch sum of its splits (the vector all-reduced) and
    the row_lse kernel; the kernels merge the row partials and update c and l themselves. Both add
    teacher_scale's 2 (reciprocal, mul). sinkhorn_knopp_stats: the same launches, its targets pass
    storing l and M instead of q. (Before the state updates moved into the kernels a call took 42
    launches in 7 custom ops, 51 in 8 with row_valid, at n_iterations = 3.)"""
    R, K, n_iter = 40, 3000, 3
    assert launch_config(R, K, "col", torch.device(DEV))[4] > 1 and launch_config(R, K, "row", torch.device(DEV))[4] > 1
    t = _logits(R, K, torch.bfloat16, seed=21)
    valid = (torch.arange(R, device=DEV) % 3 != 1) if row_valid else None
    temp = torch.tensor(0.05, device=DEV)
    reduced = []  # a one-process all_reduce: records the op, launches nothing
    fn, last = (sinkhorn_knopp_stats, "target_stats") if stats else (sinkhorn_knopp, "targets")

    def call():
        reduced.clear()
        return fn(t, temp, n_iter, (lambda x, op: reduced.append(op)) if with_all_reduce else None, row_valid=valid)

    call()  # compiled (or interpreted) once before counting
    triton_launches, torch_ops, custom_ops = _launches(monkeypatch, call)
    assert reduced == (["max"] + ["sum"] * n_iter if with_all_reduce else [])
    assert triton_launches == {"_sk_colsum_kernel": n_iter, "_sk_row_lse_kernel": n_iter, "_sk_targets_kernel": 1,
                               **({"_sk_colmax_kernel": 1} if row_valid else {})}
    scale = {"aten::reciprocal": 1, "aten::mul": 1}  # teacher_scale: log2(e) / tau_t, once per call
    if not with_all_reduce:  # the column max (torch.amax, or the colmax splits' amax), the entropy splits' sum
        assert torch_ops == {"aten::amax": 1, "aten::sum": 1, **scale}
        assert custom_ops == {"fastdino::sinkhorn_knopp_stats" if stats else "fastdino::sinkhorn_knopp": 1}
        assert sum(triton_launches.values()) + sum(torch_ops.values()) == 2 * n_iter + 3 + row_valid + 2
    else:  # + the colsum splits' sums and, without row_valid, the bf16 column max cast to fp32 (all-reduced)
        assert torch_ops == {"aten::amax": 1, "aten::sum": n_iter + 1, **scale,
                             **({} if row_valid else {"aten::to": 1})}
        assert custom_ops == {"fastdino::sinkhorn_knopp_colsum": n_iter, "fastdino::sinkhorn_knopp_row_lse": n_iter,
                              f"fastdino::sinkhorn_knopp_{last}": 1,
                              **({"fastdino::sinkhorn_knopp_colmax": 1} if row_valid else {})}
        assert sum(triton_launches.values()) + sum(torch_ops.values()) == 3 * n_iter + 4 + 2


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
    for impl in ("triton", "torch"):  # the statistics check the same arguments (no global_rows)
        for args, match in [((t[0], 0.04), "2-D"), ((t, 0.0), "teacher_temp"), ((t, 0.04, 0), "n_iterations")]:
            with pytest.raises(ValueError, match=match):
                sinkhorn_knopp_stats(*args, impl=impl)
        with pytest.raises(ValueError, match="row_valid"):
            sinkhorn_knopp_stats(t, 0.04, impl=impl, row_valid=torch.ones(3, dtype=torch.bool, device=DEV))
    with pytest.raises(ValueError, match="impl"):
        sinkhorn_knopp_stats(t, 0.04, impl="cuda")


@pytest.mark.skipif(DEV == "cuda", reason="CPU-only check")
def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        sinkhorn_knopp(_logits(2, 64, torch.float32, seed=14), 0.04)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        sinkhorn_knopp_stats(_logits(2, 64, torch.float32, seed=14), 0.04)


def test_aot_compile_sm80_sm90a():
    """The four kernels at the launcher's constexprs for DINO's K=65536 (R = 2B = 128) and a small
    K, teacher logits in bf16, fp16 and fp32, in the variants launched: the first iteration (c and l
    None: 0; the column max in T's dtype, one process without row_valid) and the later ones (every
    state pointer given, with row_valid or not); the targets pass writing q or, WRITE_Q=False
    (sinkhorn_knopp_stats), l and M; BLOCK_S at its largest, cdiv(K, BLOCK_K) row partials (a few
    rows); without FMA contraction, as launched. Compiles, no spills, 16-byte loads."""
    from aot import aot_compile, assert_compiled

    f32, u8 = "*fp32:16", "*u8:16"
    row_state = {"RowPart_ptr": f32, "Valid_ptr": u8}
    targets = {"ColLse_ptr": f32, "RowPart_ptr": f32, "PartEnt_ptr": f32, "cols_per_split": "i32:16",
               "n_splits": "i32", "stride_q": "i32:16"}
    kernels = [  # name, kind, argument types, constexprs (the pointers passed as None, WRITE_Q)
        ("_sk_colmax_kernel", "col", {"Valid_ptr": u8, "Part_ptr": f32, "rows_per_split": "i32:16"}, {}),
        ("_sk_colsum_kernel", "col", {"ColLse_ptr": f32, **row_state, "Part_ptr": f32, "rows_per_split": "i32:16",
                                      "n_row_splits": "i32"}, {}),
        ("_sk_colsum_kernel", "col", {"Part_ptr": f32, "rows_per_split": "i32:16", "n_row_splits": "i32"},
         {"ColLse_ptr": None, "RowPart_ptr": None, "Valid_ptr": None}),
        ("_sk_row_lse_kernel", "row", {"ColLse_ptr": f32, "ColSum_ptr": f32, "NewColLse_ptr": f32, "RowPart_ptr": f32,
                                       "cols_per_split": "i32:16", "n_sum_splits": "i32", "n_splits": "i32"}, {}),
        ("_sk_row_lse_kernel", "row", {"ColSum_ptr": f32, "NewColLse_ptr": f32, "RowPart_ptr": f32,
                                       "cols_per_split": "i32:16", "n_sum_splits": "i32", "n_splits": "i32"},
         {"ColLse_ptr": None}),
    ] + [  # the targets pass: q (sinkhorn_knopp) or l and M (sinkhorn_knopp_stats), with row_valid or not
        ("_sk_targets_kernel", "row", {**targets, **written, **valid},
         {"WRITE_Q": write_q, **{ptr: None for ptr in ("Q_ptr", "RowOff_ptr", "Center_ptr") if ptr not in written},
          **({} if valid else {"Valid_ptr": None})})
        for write_q, written in ((True, {"Q_ptr": f32}), (False, {"RowOff_ptr": f32, "Center_ptr": f32}))
        for valid in ({"Valid_ptr": u8}, {})
    ]
    jobs = []
    for cap in (80, 90):
        for dt in ("bf16", "fp16", "fp32"):
            for name, kind, types, fixed in kernels:
                for K in (65536, 1024):
                    block_r, block_k, nw, _, _ = launch_config(128, K, kind, torch.device("cpu"))  # blocks: any device
                    constexprs = {"BLOCK_R": block_r, "BLOCK_K": block_k, **fixed}
                    if name in ("_sk_colsum_kernel", "_sk_targets_kernel"):
                        row_block_k = launch_config(128, K, "row", torch.device("cpu"))[1]
                        constexprs["BLOCK_S"] = triton.next_power_of_2(triton.cdiv(K, row_block_k))
                    # the column max in T's dtype: the first iteration's launches and, without row_valid, the targets
                    first = "Valid_ptr" in fixed or "ColLse_ptr" in fixed
                    col_max = f"*{dt}:16" if first else f32
                    jobs.append(("fastdino.kernels.sinkhorn_knopp", name,
                                 {"T_ptr": f"*{dt}:16", "Scale_ptr": "*fp32", "ColMax_ptr": col_max, "R": "i32",
                                  "K": "i32:16", "stride_t": "i32:16", **types}, constexprs,
                                 {"num_warps": nw, "enable_fp_fusion": False}, cap))
    assert_compiled(jobs, aot_compile(jobs))


# ---------------------------------------------------------------------------------------------
# The target module (fastdino/targets.py)
# ---------------------------------------------------------------------------------------------
def test_target_module_interface():
    """Centering's calls: forward(t, temp) -> (q, {"entropy": (R,)}), update_ (a no-op), an empty
    state_dict; impl "fused" (q as LogitTargets: the logits and the normalizers, nothing (R, K)
    written) and "reference" agree; all_reduce is handed to the op."""
    from fastdino.kernels.soft_cross_entropy import LogitTargets

    t = _logits(6, 90, torch.bfloat16, seed=15)
    temp = torch.tensor(0.05, device=DEV)
    fused, reference = SinkhornKnopp(90, impl="fused"), SinkhornKnopp(90, n_iterations=3, impl="reference")
    q, stats = fused(t, temp)
    q_ref, stats_ref = reference(t, temp)
    assert isinstance(q, LogitTargets) and torch.equal(q.logits, t) and q.col_offset.shape == (90,)
    assert q.shape == (6, 90) and stats["entropy"].shape == (6,)
    torch.testing.assert_close(q.probs(), q_ref, rtol=1e-5, atol=1e-7)
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
    """benchmarks/loss.py --sk at a tiny size: the reference, the fused Sinkhorn-Knopp and its statistics
    without q (interpreted on CPU, compiled on a CUDA machine)."""
    import json

    from aot import load_loss_benchmark

    bench = load_loss_benchmark()
    out = tmp_path / "sk.json"
    where = [] if torch.cuda.is_available() else ["--cpu"]
    rows = bench.main(["--sk", "--quick", *where, "--B", "2", "--K", "512", "--json", str(out)])
    assert [r["variant"] for r in rows] == ["sk_reference", "sk_fused", "sk_stats"]
    assert all(r["ms"] > 0 and r["GBps"] > 0 for r in rows)
    assert all(abs(rows[0]["entropy"] - r["entropy"]) <= 1e-4 * abs(rows[0]["entropy"]) for r in rows[1:])
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
