"""kernels/linear_soft_cross_entropy.py: the fused last layer + soft-target cross-entropy against the
unfused head (F.linear logits) + reference loss: loss and gradients for the features and the
last-layer weight, a frozen last layer included; degenerate sizes (batch 1, K = 1..3: zero and tiny
losses, against an element-by-element float64 formula); the custom ops' registrations (opcheck,
torch.compile without graph breaks); an ahead-of-time compile for sm_80 and sm_90a with the
shared-memory limits, the combine that finishes the forward included. Interpreted on CPU: fp32 and
fp16 (the interpreter's bf16 tl.dot is wrong; bf16 runs on CUDA)."""
import pytest
import torch
import torch.nn.functional as F

import fastdino  # noqa: F401  (registers fastdino.kernels from a plain checkout)
from fastdino.kernels.linear_soft_cross_entropy import (linear_soft_cross_entropy,
                                                        linear_soft_cross_entropy_backward_op,
                                                        linear_soft_cross_entropy_op, linear_soft_cross_entropy_ref)
from test_soft_cross_entropy import DEGENERATE, _degenerate, _loss_log1p

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
EPS = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}
TAU = 0.1


def _inputs(B, K, D, n_views, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n_views * B, D, generator=g), dim=-1).to(DEV, dtype)
    w = F.normalize(torch.randn(K, D, generator=g), dim=-1).to(DEV, dtype)
    q = torch.softmax(torch.randn(2 * B, K, generator=g) * 3, dim=-1).to(DEV)
    return x, w, q


def _run(fn, x, w, q, n_views, train_weight=True, **kw):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_(train_weight)
    loss = fn(x, w, q, n_views, TAU, **kw)
    loss.backward(torch.tensor(0.7, device=DEV))  # not 1: the upstream gradient must be applied
    return [a.detach().double() if a is not None else None for a in (loss, x.grad, w.grad)]


CASES = [  # B, K, D, n_views, block_k
    (3, 200, 32, 5, 32),  # K % block != 0, odd number of locals
    (1, 100, 24, 2, 0),  # B = 1, no locals, D not a power of two, the launch table
    (20, 150, 32, 4, 64),  # image block partly masked (B < BLOCK_B)
    (2, 70, 16, 1, 32),  # one view: paired with target 1 only
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,K,D,n_views,block_k", CASES)
def test_fused_head_matches_unfused(B, K, D, n_views, block_k, dtype):
    x, w, q = _inputs(B, K, D, n_views, dtype, seed=B + K + D)
    out = _run(linear_soft_cross_entropy, x, w, q, n_views, block_k=block_k)
    ref = _run(linear_soft_cross_entropy_ref, x, w, q, n_views)
    ref64 = _run(linear_soft_cross_entropy_ref, x.double(), w.double(), q.double(), n_views)
    for name, o, r, r64 in zip(("loss", "dfeats", "dweight"), out, ref, ref64):
        err = (o - r64).abs()
        budget = 2 * (r - r64).abs() + EPS[dtype] * r64.abs().max().clamp_min(1.0 if name == "loss" else 1e-3)
        assert (err <= budget).all(), f"{name}: max err {err.max().item():.3g}"


# ---------------------------------------------------------------------------------------------
# Degenerate sizes: losses that are 0 or tiny (the plain kernel's cases, through the last layer)
# ---------------------------------------------------------------------------------------------
DEGENERATE_DTYPES = [torch.float32, torch.float16] if DEV == "cpu" else [torch.bfloat16, torch.float16]


def _head_for_logits(s, D, dtype, seed):
    """Features (V, D) and a last layer (K, D) of unit rows, in `dtype`, whose logits are s (V, K) up to
    the rounding of both to dtype: x = s (W W^T)^-1 W."""
    g = torch.Generator().manual_seed(seed)
    w = F.normalize(torch.randn(s.shape[1], D, generator=g, dtype=torch.float64), dim=-1)
    x = s.cpu().double() @ torch.linalg.solve(w @ w.T, w)
    return x.to(DEV, dtype), w.to(DEV, dtype)


@pytest.mark.parametrize("dtype", DEGENERATE_DTYPES)
@pytest.mark.parametrize("K,gap,tail", DEGENERATE)
def test_degenerate_sizes_zero_and_tiny_losses(K, gap, tail, dtype):
    """Batch 1, 2 + 1 views, K = 1..3 (test_soft_cross_entropy.py's cases, as logits of a last layer):
    the fused head's loss within 1e-8 of the float64 reference and relatively accurate where it is tiny
    (every term of the combine is >= 0), its gradients within an element-by-element budget, and at
    K = 1 loss and gradients exactly 0. The kernel's fp32 logits differ from the float64 ones by at
    most dot_err (the fp32 sum of D products), which the budgets carry."""
    n_views, D = 3, 24
    s, q = _degenerate(K, n_views, gap, tail, seed=K * 10 + gap)
    x, w = _head_for_logits(s, D, dtype, seed=K)
    loss, dx, dw = _run(linear_soft_cross_entropy, x, w, q, n_views)
    ref64 = _run(linear_soft_cross_entropy_ref, x.double(), w.double(), q.double(), n_views)
    x64, w64 = x.double(), w.double()
    s64 = F.linear(x64, w64)
    dot_err = D * 2 ** -24 * (x64.abs() @ w64.abs().T).max().item()
    exact = _loss_log1p(s64, q, n_views, 2, True, TAU)
    assert abs(loss.item() - ref64[0].item()) <= 1e-8
    assert abs(loss.item() - exact) <= (1e-5 + 2 * dot_err / TAU) * exact, f"loss {loss.item():.9g}, exact {exact:.9g}"
    if K == 1:  # targets exactly 1
        assert loss.item() == 0.0 and not dx.any() and not dw.any()
    # dS = 0.7 / (P tau) (n_v p - Q_v), element by element: p to the plain kernel's relative budget (the
    # rounding of s / tau and lse; ex2.approx) plus the logits' error, Q_v = q_0 + q_1 to 2^-23; then
    # through the last layer, dS rounded to the matmul dtype (eps; below the smallest fp16 subnormal: sub)
    n_pairs = 2 * n_views - 2
    coef = 0.7 / (n_pairs * TAU)
    p = torch.softmax(s64 / TAU, dim=-1)
    n_v = torch.tensor([1.0, 1.0] + [2.0] * (n_views - 2), dtype=torch.float64, device=DEV)[:, None]
    Q = torch.stack([q[1], q[0]] + [q[0] + q[1]] * (n_views - 2)).double()
    ds64 = coef * (n_v * p - Q)
    p_rel = 2 * (s64.abs().max().item() / TAU) * 2 ** -24 + 2 ** -21 + 2 * dot_err / TAU
    ds_budget = coef * (n_v * p * p_rel + Q * 2 ** -23)
    eps = EPS[dtype] if dtype != torch.float32 else 2 ** -20
    sub = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    for name, out, ref, budget in (
            ("dfeats", dx, ref64[1], (ds_budget + eps * ds64.abs() + sub) @ w64.abs() + sub),
            ("dweight", dw, ref64[2], (ds_budget + eps * ds64.abs() + sub).T @ x64.abs() + sub)):
        err = (out - ref).abs()
        assert (err <= budget).all(), f"{name}: max err {err.max().item():.3g}, err/budget {(err / budget).max():.3g}"


def test_frozen_last_layer():
    """weight without grad: no dW (the kernel is not launched), the same dX."""
    x, w, q = _inputs(3, 120, 32, 4, torch.float32, seed=1)
    loss, dx, dw = _run(linear_soft_cross_entropy, x, w, q, 4, train_weight=False, block_k=32)
    ref = _run(linear_soft_cross_entropy_ref, x, w, q, 4, train_weight=False)
    assert dw is None
    torch.testing.assert_close(loss, ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx, ref[1], rtol=1e-5, atol=1e-7)
    _, lse = linear_soft_cross_entropy_op(x, w, q, 4, TAU, 0, 32)
    dx2, dw2 = linear_soft_cross_entropy_backward_op(torch.tensor(0.7, device=DEV), x, w, q, lse, 4, TAU, True,
                                                     False, 0, 32)
    assert dw2.numel() == 0
    torch.testing.assert_close(dx2.double(), dx)


def test_impl_switch_and_lse():
    x, w, q = _inputs(2, 90, 16, 3, torch.float32, seed=2)
    torch.testing.assert_close(linear_soft_cross_entropy(x, w, q, 3, TAU, impl="torch"),
                               linear_soft_cross_entropy_ref(x, w, q, 3, TAU))
    _, lse = linear_soft_cross_entropy_op(x, w, q, 3, TAU, 0, 32)
    torch.testing.assert_close(lse, torch.logsumexp(F.linear(x, w).double() / TAU, -1).float(), rtol=1e-6,
                               atol=1e-5)


def test_opcheck():
    x, w, q = _inputs(2, 40, 16, 3, torch.float32, seed=3)
    torch.library.opcheck(linear_soft_cross_entropy_op, (x.requires_grad_(), w.requires_grad_(), q, 3, TAU, 0, 16))
    _, lse = linear_soft_cross_entropy_op(x.detach(), w.detach(), q, 3, TAU, 0, 16)
    g = torch.tensor(0.7, device=DEV)
    for need_dx, need_dw in ((True, True), (True, False)):
        torch.library.opcheck(linear_soft_cross_entropy_backward_op,
                              (g, x.detach(), w.detach(), q, lse, 3, TAU, need_dx, need_dw, 0, 16))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    x, w, q = _inputs(2, 60, 16, 3, torch.float32, seed=4)

    def step(x, w, q):
        return linear_soft_cross_entropy(x, F.normalize(w, dim=-1), q, 3, TAU, block_k=32) * 0.7

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    outs = []
    for fn in (step, compiled):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(xg, wg, q)
        loss.backward()
        outs.append((loss.detach(), xg.grad, wg.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_bad_inputs_raise():
    x, w, q = _inputs(2, 64, 16, 4, torch.float32, seed=5)
    with pytest.raises(ValueError, match="disagree"):
        linear_soft_cross_entropy(x, w[:, :8], q, 4, TAU)
    with pytest.raises(ValueError, match="dtype"):
        linear_soft_cross_entropy(x, w.half(), q, 4, TAU)
    with pytest.raises(ValueError, match="targets must be"):
        linear_soft_cross_entropy(x, w, q[:2], 4, TAU)
    with pytest.raises(ValueError, match="multiple of n_views"):
        linear_soft_cross_entropy(x, w, q, 3, TAU, impl="torch")


@pytest.mark.skipif(DEV == "cuda", reason="CPU-only check")
def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, q = _inputs(2, 64, 16, 4, torch.float32, seed=6)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        linear_soft_cross_entropy(x, w, q, 4, TAU)


KERNELS = {"fwd": "_linear_soft_ce_fwd_kernel", "dw": "_linear_soft_ce_bwd_dw_kernel",
           "dx": "_linear_soft_ce_bwd_dx_kernel"}


def _launcher_configs(itemsize, D=256):
    """Every (kind, BLOCK_B, BLOCK_K, BLOCK_D, num_warps, num_stages) head_launch_config picks at D for
    any batch size, reduced to the largest BLOCK_B per kind: the others differ only by a smaller
    BLOCK_B, i.e. smaller X/Q/dS tiles (asserted here), so they need no more shared memory."""
    from fastdino.kernels.linear_soft_cross_entropy import head_launch_config

    seen = {}
    for B in (1, 3, 16, 17, 32, 48, 64, 65, 128, 1024):
        for kind, cfg in head_launch_config(B, D, itemsize).items():
            seen.setdefault(kind, set()).add(cfg)
    out = {}
    for kind, cfgs in seen.items():
        top = max(cfgs)
        assert all(c[1:] == top[1:] and c[0] <= top[0] for c in cfgs), f"{kind}: {sorted(cfgs)}"
        out[kind] = top
    return out


def _head_jobs(dtypes):
    mod = "fastdino.kernels.linear_soft_cross_entropy"
    f32 = "*fp32:16"
    common = {"B": "i32", "K": "i32:16", "D": "i32:16", "n_views": "i32", "n_tiles": "i32", "n_bblocks": "i32",
              "tiles_per_chunk": "i32", "stride_x": "i32:16", "stride_w": "i32:16", "stride_q": "i32:16",
              "stride_dw": "i32:16", "s_scale": "fp32", "inv_student_temp": "fp32", "grad_scale": "fp32",
              "Q_ptr": f32, "SStat_ptr": f32, "QStat_ptr": f32, "Lse_ptr": f32, "GradOut_ptr": f32, "DXPart_ptr": f32}
    jobs = []
    for cap in (80, 90):
        for dt, itemsize, prec in dtypes:
            p = f"*{dt}:16"
            types = {**common, "X_ptr": p, "W_ptr": p, "DW_ptr": p}
            for kind, (bb, bk, bd, nw, ns) in _launcher_configs(itemsize).items():
                options = {"num_warps": nw, "num_stages": ns}
                if kind != "fwd":  # the launchers' backward options: no FMA contraction
                    options["enable_fp_fusion"] = False
                jobs.append((mod, KERNELS[kind], types,
                             {"BLOCK_B": bb, "BLOCK_K": bk, "BLOCK_D": bd, "DOT_PRECISION": prec}, options, cap))
    return jobs


# the largest ptxas spill stack the accepted configs compile with (triton 3.9), bytes per thread: a few
# hundred (bf16 dX on sm_90a 184, TF32 dX on sm_80 336), against 10-19 KB for the refused fp32 IEEE dots
SMALL_SPILL = 384


def _combine_jobs():
    """kernels/soft_cross_entropy.py's combine at the tiles of the head's forward (K=65536, D=256, 2+10
    views): 512 tiles for 2-byte inputs, 1024 for fp32, past the plain kernel's MAX_TILES."""
    from fastdino.kernels.linear_soft_cross_entropy import head_launch_config
    from fastdino.kernels.soft_cross_entropy import combine_meta

    f32 = "*fp32:16"
    types = {"SStat_ptr": f32, "QStat_ptr": f32, "ViewWeight_ptr": f32, "Lse_ptr": f32, "GroupLoss_ptr": f32,
             "G": "i32", "n_views": "i32", "n_tiles": "i32", "s_scale": "fp32", "inv_student_temp": "fp32"}
    jobs = []
    for cap in (80, 90):
        for itemsize in (2, 4):
            meta = combine_meta(12, -(-65536 // head_launch_config(64, 256, itemsize)["fwd"][1]))
            nw = meta.pop("num_warps")
            jobs.append(("fastdino.kernels.soft_cross_entropy", "_soft_ce_combine_kernel", types,
                         {**meta, "N_TARGETS": 2, "SKIP_SAME_VIEW": True, "HAS_VIEW_WEIGHTS": False}, nw, cap))
    return jobs


def test_aot_compile_sm80_sm90a():
    """Every head kernel at D=256 with the launcher's own configs, for each accepted input dtype (fp32
    with TF32 dots, bf16, fp16; fp32 targets) and sm_80/sm_90a: compiles, at most SMALL_SPILL bytes of
    spill stack, and its shared memory fits the target; the combine that finishes the forward, at the
    head's tile counts, without spills."""
    from aot import SMEM_LIMIT, aot_compile

    jobs = _head_jobs((("fp32", 4, "tf32"), ("bf16", 2, "ieee"), ("fp16", 2, "ieee")))
    assert len(jobs) == 2 * 3 * 3
    combine = _combine_jobs()
    assert sorted({j[3]["BLOCK_T"] for j in combine}) == [512, 1024]
    results = aot_compile(jobs + combine)
    assert {r["target"] for r in results} == {"sm_80", "sm_90a"}
    for job, r in zip(jobs + combine, results):
        what = f"{r['kernel']} ({r['target']}, X {job[2].get('X_ptr')}, {job[3]}, {job[4]})"
        assert r["shared"] <= SMEM_LIMIT[r["target"]], f"{what}: {r['shared']} B of shared memory"
        assert not r["local_memory"], f"{what} spills to local memory"
        spill = 0 if r["kernel"] == "_soft_ce_combine_kernel" else SMALL_SPILL
        assert r["stack"] <= spill, f"{what} spills: {r['stack']} B of stack at {r['registers']} registers"


def test_fp32_ieee_dots_spill_and_are_refused(monkeypatch):
    """Why fp32 with IEEE dots is refused on a GPU (issue: 116 ms on an H100 vs 0.3 ms in bf16): the
    forward and dX kernels compile with kilobytes of spill stack at 32 registers. If a Triton release
    fixes that, this test fails and the refusal (FP32_IEEE_REFUSED) can go."""
    from aot import aot_compile

    from fastdino.kernels import linear_soft_cross_entropy as L

    jobs = [j for j in _head_jobs((("fp32", 4, "ieee"),)) if j[5] == 80 and j[1] != KERNELS["dw"]]
    for r in aot_compile(jobs):
        assert r["stack"] > 4096 and r["registers"] <= 64, r
    x, w, q = (torch.zeros(4, 8), torch.zeros(16, 8), torch.zeros(4, 16))  # B = 2 images, 2 views
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # the check, without a GPU
    monkeypatch.setattr(L, "check_runnable", lambda *a: None)
    with pytest.raises(ValueError, match="spill") as e:
        L.linear_soft_cross_entropy(x, w, q, 2, 0.1)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(DEV != "cuda", reason="real sizes: CUDA only (the AOT test covers them on CPU)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_real_size_cuda(dtype):
    """B=64, K=65536, D=256, 2+10 crops."""
    x, w, q = _inputs(64, 65536, 256, 12, dtype, seed=7)
    out = _run(linear_soft_cross_entropy, x, w, q, 12)
    ref = _run(linear_soft_cross_entropy_ref, x, w, q, 12)
    ref64 = _run(linear_soft_cross_entropy_ref, x.double(), w.double(), q.double(), 12)
    for name, o, r, r64 in zip(("loss", "dfeats", "dweight"), out, ref, ref64):
        err = (o - r64).abs()
        budget = 2 * (r - r64).abs() + EPS[dtype] * r64.abs().max().clamp_min(1.0 if name == "loss" else 1e-3)
        assert (err <= budget).all(), f"{name}: max err {err.max().item():.3g}"


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs: CUDA only")
def test_cuda_graph_capture():
    x, w, q = _inputs(64, 8192, 256, 12, torch.bfloat16, seed=8)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    grad_out = torch.tensor(0.7, device=DEV)

    def step():
        xg.grad = wg.grad = None
        loss = linear_soft_cross_entropy(xg, wg, q, 12, TAU)
        loss.backward(grad_out)
        return loss

    from cuda_graph import capture

    graph, loss = capture(step)
    graph.replay()
    torch.cuda.synchronize()
    ref = _run(linear_soft_cross_entropy, x, w, q, 12)  # eager, the same upstream gradient
    for a, b in zip((loss, xg.grad, wg.grad), ref):
        torch.testing.assert_close(a.double(), b)
