"""kernels/gram_loss.py: the tiled Gram anchoring loss (DINOv3) against its reference on fresh random
inputs, loss and student gradient, against the fp64 reference with budgets from the reference's own
fp32/bf16 error: every removal option, both img_level settings ((B, P, D) and (N, D) rows), fp32,
bf16 and mixed features, P below one tile and over several (ragged), D over several K steps and D
chunks, apply_norm off, rows with (near-)zero norm; the loss-only kernel (no gradient wanted) too.
Each with both grad kernels (dx="recompute": Gram tiles recomputed per D chunk; dx="accumulate": dX
summed over the column blocks in global memory), which must also agree with each other closely.
fp32 features run the "tf32x3" dots (TF32 not allowed, PyTorch's default): the Triton interpreter
ignores input_precision and multiplies in fp32, so on CPU these tests check the kernels' math, and
on CUDA the 3xTF32 accuracy, against the same fp64 budgets. impl="auto" takes the reference for
fp32 features without TF32 (CUDA test).
The reference against a literal transcription of the official module (in-place masked assignments);
the options change the result on these inputs; determinism (both grad kernels); the custom op's
registrations (opcheck, torch.compile without graph breaks or recompiles); the impl switch; one-line
errors; an ahead-of-time compile of every kernel for sm_80 and sm_90a checked with cuobjdump
(registers, no spill stack, shared memory); the benchmark's CPU smoke run (both grad kernels)."""

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastdino  # noqa: F401  (registers fastdino.kernels from a plain checkout)
from fastdino.kernels import gram_loss as gram_module
from fastdino.kernels.gram_loss import (CLAMPS, DX_MODES, GRAM_ACCUMULATE_CONFIG, GRAM_CONFIG, dot_kind, gram_loss,
                                        gram_loss_op, gram_loss_ref, launch_config)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
OPTIONS = {"none": {}, "remove_neg": {"remove_neg": True}, "remove_only_teacher_neg": {"remove_only_teacher_neg": True}}
EPS = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7}  # gradient budgets (x max |grad|); the loss: 1e-5


@pytest.fixture(autouse=True, scope="module")
def _interpreter_bf16_dot():
    """Triton 3.9's interpreter multiplies bf16 tl.dot operands as their uint16 bit patterns (numpy
    has no bf16): upcast them to fp32 first, which is exact, as the tensor cores' bf16 products are."""
    if DEV == "cuda":
        yield
        return
    import triton.language as tl
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def upcast(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def patched(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, upcast(a), upcast(b), d, input_precision, max_num_imprecise_acc)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interpreter.InterpreterBuilder, "create_dot", patched)
        yield


def _features(B, P, D, dtype, seed, teacher_dtype=None):
    """Student and Gram-teacher patch features: a shared per-image direction (Gram entries mostly
    positive, some negative), the teacher a noisy copy (every sign pattern of (G_s, G_t) occurs),
    row norms spread over e^(+-1) so that the normalization matters."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, P, D, generator=g) + 0.4 * torch.randn(B, 1, D, generator=g)
    t = s + 0.6 * torch.randn(B, P, D, generator=g)
    s = s * torch.randn(B, P, 1, generator=g).exp()
    t = t * torch.randn(B, P, 1, generator=g).exp() * 3
    return s.to(DEV, dtype), t.to(DEV, teacher_dtype or dtype)


def _run(fn, s, t, grad_out=0.7, **kw):
    """(loss, d loss * grad_out / d student) with fresh leaves."""
    x = s.detach().clone().requires_grad_()
    loss = fn(x, t, **kw)
    (loss * grad_out).backward()
    return loss.detach(), x.grad


def _close(out, ref, ref64, eps, what, rows=False):
    """|out - ref64| <= 2 |ref - ref64| + eps * max|ref64| (per row of the last dim with rows=True):
    the reference's own error sets the budget."""
    out, ref, ref64 = out.double(), ref.double(), ref64.double()
    err = (out - ref64).abs()
    scale = ref64.abs().amax(-1, keepdim=True) if rows else ref64.abs().max()
    budget = 2 * (ref - ref64).abs() + eps * scale.clamp_min(1e-30)
    assert (err <= budget).all(), f"{what}: max err {err.max().item():.3g}, worst err/budget {(err / budget).max():.3g}"


def _check_against_reference(s, t, img_level, option, eps, **launch):
    kw = dict(img_level=img_level, **OPTIONS[option])
    out = _run(gram_loss, s, t, impl="triton", **kw, **launch)
    ref = _run(gram_loss_ref, s, t, **kw)
    ref64 = _run(gram_loss_ref, s.double(), t.double(), **kw)
    assert out[0].dtype == torch.float32 and out[0].shape == () and out[1].dtype == s.dtype
    _close(out[0], ref[0], ref64[0], 1e-5, "loss")
    _close(out[1], ref[1], ref64[1], eps, "grad")
    with torch.no_grad():  # the loss-only kernel (triangle of tiles)
        loss_only = gram_loss(s, t, impl="triton", **kw, **launch)
    _close(loss_only, ref[0], ref64[0], 1e-5, "loss (no grad)")
    return out


CASES = [  # B, P, D, dtype, img_level, option, launch overrides
    (2, 13, 40, torch.float32, True, "none", {}),  # P below the smallest tile (16), D not a power of 2
    (1, 7, 40, torch.float32, True, "remove_only_teacher_neg", {}),
    (3, 37, 24, torch.bfloat16, True, "remove_neg", {"block_m": 16}),  # 3 row blocks, the last ragged
    (2, 37, 40, torch.float32, True, "none", {"block_m": 16, "block_k": 16, "block_dv": 16}),  # 3 K steps, 3 D chunks
    (2, 13, 40, torch.bfloat16, True, "remove_only_teacher_neg", {"block_m": 16, "block_k": 16, "block_dv": 32}),
    (2, 13, 40, torch.bfloat16, False, "none", {"block_m": 16}),  # one Gram over the 26 rows of the batch
    (3, 37, 24, torch.float32, False, "remove_only_teacher_neg", {"block_m": 32, "block_dv": 16}),
    (2, 37, 24, torch.float32, False, "remove_neg", {"block_m": 32}),
    # 3 column blocks (the last ragged) x 3 D chunks (the last ragged), bf16 and a removal option
    (2, 37, 40, torch.bfloat16, True, "remove_only_teacher_neg", {"block_m": 16, "block_dv": 16}),
]


@pytest.mark.parametrize("dx", DX_MODES)
@pytest.mark.parametrize("B,P,D,dtype,img_level,option,launch", CASES)
def test_triton_matches_reference(B, P, D, dtype, img_level, option, launch, dx):
    s, t = _features(B, P, D, dtype, seed=B * 1000 + P * 10 + D)
    _check_against_reference(s, t, img_level, option, EPS[dtype], dx=dx, **launch)


@pytest.mark.parametrize("dx", DX_MODES)
@pytest.mark.parametrize("option", ["none", "remove_neg"])
def test_rows_input_batch_level(option, dx):
    """(N, D) rows (the official masked / unmasked token selection), img_level=False."""
    s, t = _features(1, 29, 24, torch.float32, seed=21)
    _check_against_reference(s[0], t[0], False, option, EPS[torch.float32], dx=dx, block_m=16)


@pytest.mark.parametrize("dx", DX_MODES)
def test_mixed_dtypes(dx):
    """bf16 student, fp32 teacher (the fp32 launch row; W rounded to bf16 for the student's dot)."""
    s, t = _features(2, 13, 24, torch.bfloat16, seed=22, teacher_dtype=torch.float32)
    _check_against_reference(s, t, True, "remove_neg", EPS[torch.bfloat16], dx=dx)


@pytest.mark.parametrize("dx", DX_MODES)
@pytest.mark.parametrize("dtype,option", [(torch.float32, "remove_neg"), (torch.bfloat16, "none")])
def test_without_normalization(dtype, option, dx):
    """apply_norm=False (the official gram.normalized: false): raw features, no projection term; 2
    column blocks (the last ragged) and 2 D chunks."""
    s, t = _features(2, 21, 24, dtype, seed=23)
    s, t = s * 0.3, t * 0.1
    kw = dict(apply_norm=False, **OPTIONS[option])
    out = _run(gram_loss, s, t, impl="triton", dx=dx, block_m=16, block_dv=16, **kw)
    ref = _run(gram_loss_ref, s, t, **kw)
    ref64 = _run(gram_loss_ref, s.double(), t.double(), **kw)
    _close(out[0], ref[0], ref64[0], 1e-5, "loss")
    _close(out[1], ref[1], ref64[1], EPS[dtype], "grad")
    normalized = gram_loss_ref(s, t, **OPTIONS[option])
    assert abs(normalized.item() - ref[0].item()) > 0.1 * abs(ref[0].item())


@pytest.mark.parametrize("dx", DX_MODES)
def test_zero_and_tiny_norm_rows(dx):
    """Rows with norm below F.normalize's eps (1e-12): zero rows on both sides and a 1e-14 student
    row, whose gradient is ds/eps (no projection), ~1e8 here; compared row by row."""
    s, t = _features(2, 13, 24, torch.float32, seed=24)
    s[0, 3] = 0
    t[1, 5] = 0
    s[1, 7] = s[1, 7] / s[1, 7].norm() * 1e-14
    out = _run(gram_loss, s, t, impl="triton", dx=dx)
    ref = _run(gram_loss_ref, s, t)
    ref64 = _run(gram_loss_ref, s.double(), t.double())
    _close(out[0], ref[0], ref64[0], 1e-5, "loss")
    _close(out[1], ref[1], ref64[1], 1e-5, "grad", rows=True)
    assert out[1][1, 7].abs().max() > 1e6  # the clamped row's gradient: ds / eps


def _official_gram_loss(output_feats, target_feats, img_level, remove_neg, remove_only_teacher_neg):
    """The official GramLoss.forward (apply_norm=True), written from the kernel file's header, with
    its in-place masked assignments."""
    output_feats, target_feats = output_feats.float(), target_feats.float()
    target_feats = F.normalize(target_feats, dim=-1)
    if not img_level and target_feats.dim() == 3:
        target_feats = target_feats.flatten(0, 1)
    target_sim = torch.matmul(target_feats, target_feats.transpose(-1, -2))
    output_feats = F.normalize(output_feats, dim=-1)
    if not img_level and output_feats.dim() == 3:
        output_feats = output_feats.flatten(0, 1)
    student_sim = torch.matmul(output_feats, output_feats.transpose(-1, -2))
    if remove_neg:
        target_sim[target_sim < 0] = 0.0
        student_sim[student_sim < 0] = 0.0
    elif remove_only_teacher_neg:
        student_sim[(student_sim < 0) & (target_sim < 0)] = 0.0
        target_sim[target_sim < 0] = 0.0
    return torch.nn.MSELoss()(student_sim, target_sim)


@pytest.mark.parametrize("img_level", [True, False])
def test_reference_matches_official_module(img_level):
    """The reference's torch.where equals the official in-place masking, loss and gradient (0 at the
    replaced entries), for every option; and the options change the result on these features (so
    the option tests above can fail)."""
    s, t = _features(2, 11, 16, torch.float32, seed=25)
    results = {}
    for option, kw in OPTIONS.items():
        flags = (kw.get("remove_neg", False), kw.get("remove_only_teacher_neg", False))
        ours = _run(gram_loss_ref, s, t, img_level=img_level, **kw)
        official = _run(lambda x, y: _official_gram_loss(x, y, img_level, *flags), s, t)
        torch.testing.assert_close(ours[0], official[0], rtol=1e-6, atol=0)
        torch.testing.assert_close(ours[1], official[1], rtol=1e-5, atol=1e-12)
        results[option] = ours
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert abs(results[a][0] - results[b][0]) > 1e-3 * results[a][0], (a, b)
            assert (results[a][1] - results[b][1]).abs().max() > 1e-3 * results[a][1].abs().max(), (a, b)


# (B, P, D, launch) of the determinism and mode-agreement tests: several column blocks and D chunks
# (ragged) in the interpreter; on CUDA a real size at the launch tables, where a missing barrier or a
# race in the accumulate kernel's read-modify-writes would show.
BIG = (2, 1024, 768, {}) if DEV == "cuda" else (2, 37, 40, {"block_m": 16, "block_dv": 16})


@pytest.mark.parametrize("dx", DX_MODES)
def test_deterministic(dx):
    """Two runs, bit for bit: each program owns its rows of dX (accumulate: read-modify-written in
    place, no atomics) and its loss partial."""
    B, P, D, launch = BIG
    s, t = _features(B, P, D, torch.bfloat16, seed=26)
    a = _run(gram_loss, s, t, impl="triton", dx=dx, remove_neg=True, **launch)
    b = _run(gram_loss, s, t, impl="triton", dx=dx, remove_neg=True, **launch)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("dtype,clamp,normalize", [(torch.float32, "none", True),
                                                   (torch.bfloat16, "remove_only_teacher_neg", True),
                                                   (torch.float32, "remove_neg", False)])
def test_dx_modes_agree(dtype, clamp, normalize):
    """The op's fp32 loss and dX from the two grad kernels: the same sums in another order (accumulate
    adds each column block's product to the stored partial sum, recompute accumulates in the dot).
    The interpreter adds in the same order in both (np.matmul + the running sum): bit for bit. On
    CUDA within fp32 rounding (1e-5 of the largest entry; bf16 2^-10, for a W entry whose bf16
    rounding flips with a last-bit change of its Gram entries)."""
    B, P, D, launch = BIG
    s, t = _features(B, P, D, dtype, seed=36)
    blocks = [launch.get(k, 0) for k in ("block_m", "block_k", "block_dv")]
    rec = gram_loss_op(s, t, CLAMPS[clamp], normalize, True, False, *blocks)
    acc = gram_loss_op(s, t, CLAMPS[clamp], normalize, True, True, *blocks)
    scale = rec[1].abs().max().item()
    tol = 0.0 if DEV == "cpu" else (1e-5 if dtype == torch.float32 else 2 ** -10)
    torch.testing.assert_close(acc[0], rec[0], rtol=tol, atol=0)
    torch.testing.assert_close(acc[1], rec[1], rtol=0, atol=tol * scale)
    assert acc[1].shape == (B, P, D) and scale > 0


def test_impl_switch():
    s, t = _features(2, 7, 24, torch.float32, seed=27)
    ref = gram_loss_ref(s, t, remove_neg=True)
    assert torch.equal(gram_loss(s, t, remove_neg=True, impl="torch"), ref)
    if DEV == "cpu":  # auto: the reference off CUDA
        assert torch.equal(gram_loss(s, t, remove_neg=True), ref)
    half = gram_loss(s.half(), t.half(), impl="auto")  # fp16: the reference, fp32 math
    assert half.dtype == torch.float32 and torch.isfinite(half)
    assert gram_loss(s.double(), t.double()).dtype == torch.float64
    for impl in ("triton", "torch"):  # no gradient to the teacher
        x, y = s.clone().requires_grad_(), t.clone().requires_grad_()
        gram_loss(x, y, impl=impl).backward()
        assert y.grad is None and x.grad is not None


@pytest.mark.skipif(DEV != "cuda", reason="impl='auto' runs the kernel on CUDA only")
def test_auto_takes_reference_for_fp32_without_tf32(caplog, monkeypatch):
    """impl="auto" with fp32 features: the reference (bit for bit) when TF32 is off, logging why once;
    the kernel (bit for bit, it is deterministic) when TF32 is allowed."""
    s, t = _features(2, 64, 48, torch.float32, seed=35)
    monkeypatch.setattr(gram_module, "_logged_reasons", set())
    matmul, saved = torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        with caplog.at_level(logging.INFO, logger="fastdino"):
            for _ in range(2):
                assert torch.equal(gram_loss(s, t), gram_loss_ref(s, t))
        assert [r.getMessage() for r in caplog.records].count(
            "gram_loss(impl='auto'): the reference for " + gram_module.AUTO_TORCH_KINDS["tf32x3"]) == 1
        matmul.allow_tf32 = True
        assert torch.equal(gram_loss(s, t), gram_loss(s, t, impl="triton"))
    finally:
        matmul.allow_tf32 = saved


def test_opcheck():
    s, t = _features(2, 13, 24, torch.float32, seed=28)
    for with_grad, accumulate in ((True, False), (True, True), (False, False)):
        torch.library.opcheck(gram_loss_op, (s.clone().requires_grad_(with_grad), t, CLAMPS["remove_neg"], True,
                                             with_grad, accumulate, 16, 0, 0))


@pytest.mark.parametrize("dx", DX_MODES)
def test_compile_fullgraph_matches_eager(dx):
    """Forward and backward through torch.compile in one graph; new feature values reuse it."""
    torch._dynamo.reset()

    def step(s, t):
        return gram_loss(s, t, remove_only_teacher_neg=True, impl="triton", dx=dx, block_m=16) * 0.5

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for i, seed in enumerate((29, 30)):
        s, t = _features(2, 21, 24, torch.float32, seed=seed)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = _run(compiled, s, t)
        want = _run(step, s, t)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_inputs_raise():
    s, t = _features(2, 7, 24, torch.float32, seed=31)
    for impl in ("triton", "torch"):
        for args, kw, match in [((s, t[:, :5]), {}, "one shape"), ((s[0], t[0]), {}, "img_level=True"),
                                ((s[0, 0], t[0, 0]), {"img_level": False}, "img_level=False"),
                                ((s[:, :0], t[:, :0]), {}, ">= 1"), ((s.long(), t.long()), {}, "floating"),
                                ((s, t), {"remove_neg": True, "remove_only_teacher_neg": True}, "exclude")]:
            with pytest.raises(ValueError, match=match) as e:
                gram_loss(*args, impl=impl, **kw)
            assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="fp32 or bf16"):
        gram_loss(s.half(), t.half(), impl="triton")
    with pytest.raises(ValueError, match="impl"):
        gram_loss(s, t, impl="cuda")
    for impl in ("triton", "torch"):
        with pytest.raises(ValueError, match="dx='fast' is not one of") as e:
            gram_loss(s, t, impl=impl, dx="fast")
        assert "\n" not in str(e.value)


@pytest.mark.skipif(DEV == "cuda", reason="CPU-only check")
def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    s, t = _features(1, 7, 24, torch.float32, seed=32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        gram_loss(s, t, impl="triton")


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile with register and spill checks (tests/kernels/aot.py)
# ---------------------------------------------------------------------------------------------
MODULE = "fastdino.kernels.gram_loss"
# the argument types of every kernel but the features' (D a multiple of 16, as ViT widths are)
AOT_TYPES = {"XNorm_ptr": "*fp32:16", "YNorm_ptr": "*fp32:16", "LossPart_ptr": "*fp32:16", "DX_ptr": "*fp32:16",
             "P": "i32", "D": "i32:16", "n_blocks": "i32", "stride_xb": "i32:16", "stride_xp": "i32:16",
             "stride_yb": "i32:16", "stride_yp": "i32:16", "eps": "fp32", "grad_scale": "fp32"}


def _aot_jobs():
    """The loss-only and recompute grad kernels at GRAM_CONFIG (P = 4096, D = 768), each dot kind:
    bf16 features, fp32 with TF32 dots, fp32 with 3xTF32 dots; remove_neg (the most elementwise
    work); the grad kernel also with the other options and without normalization for bf16 and 3xTF32
    (the rows at the register limit), and with a bf16 student and an fp32 teacher (the fp32 row)."""
    jobs = []
    for cap in (80, 90):
        for kind in GRAM_CONFIG:
            dt = "bf16" if kind == "bf16" else "fp32"
            types = {**AOT_TYPES, "X_ptr": f"*{dt}:16", "Y_ptr": f"*{dt}:16"}
            bm, bk, bdv, nw, ns = launch_config(4096, 768, kind)
            variants = [(1, True)] + ([(0, True), (2, True), (1, False)] if kind != "tf32" else [])
            base = {"DOT_PRECISION": "ieee" if kind == "bf16" else kind, "BLOCK_M": bm, "BLOCK_K": bk}
            options = {"num_warps": nw, "num_stages": ns}
            for clamp, normalize in variants:
                jobs.append((MODULE, "_gram_loss_grad_kernel", types,
                             {**base, "CLAMP": clamp, "NORMALIZE": normalize, "BLOCK_DV": bdv}, options, cap))
            jobs.append((MODULE, "_gram_loss_fwd_kernel", types, {**base, "CLAMP": 1, "NORMALIZE": True}, options, cap))
            if kind == "tf32x3":
                jobs.append((MODULE, "_gram_loss_grad_kernel", {**types, "X_ptr": "*bf16:16"},
                             {**base, "CLAMP": 1, "NORMALIZE": True, "BLOCK_DV": bdv}, options, cap))
    return jobs


def test_aot_compile_sm80_sm90a():
    """Every kernel of the launch table compiles for sm_80 and sm_90a with no register spills (ptxas
    stack frame 0), shared memory within the target's limit and 16-byte loads (ld.global.v4, or
    cp.async of 16 bytes where the D loop is pipelined through shared memory): tests/kernels/aot.py."""
    from aot import aot_compile, assert_compiled

    jobs = _aot_jobs()
    assert_compiled(jobs, aot_compile(jobs))


def _aot_accumulate_jobs():
    """The accumulate grad kernel at GRAM_ACCUMULATE_CONFIG (P = 4096, D = 768) for each dot kind and
    target: remove_neg, normalized; also every other option and apply_norm=False; and a bf16 student
    with an fp32 teacher for the fp32 rows (W and X_j in bf16, Y in fp32)."""
    jobs = []
    for cap in (80, 90):
        for kind in GRAM_ACCUMULATE_CONFIG:
            dt = "bf16" if kind == "bf16" else "fp32"
            bm, bk, bdv, nw, ns = launch_config(4096, 768, kind, accumulate=True)
            base = {"DOT_PRECISION": "ieee" if kind == "bf16" else kind, "BLOCK_M": bm, "BLOCK_K": bk,
                    "BLOCK_DV": bdv}
            students = [dt] + (["bf16"] if kind != "bf16" else [])
            for student in students:
                types = {**AOT_TYPES, "X_ptr": f"*{student}:16", "Y_ptr": f"*{dt}:16"}
                variants = [(1, True), (0, True), (2, True), (1, False)] if student == dt else [(1, True)]
                for clamp, normalize in variants:
                    jobs.append((MODULE, "_gram_loss_grad_accumulate_kernel", types,
                                 {**base, "CLAMP": clamp, "NORMALIZE": normalize}, {"num_warps": nw, "num_stages": ns},
                                 cap))
    return jobs


def test_aot_compile_accumulate_sm80_sm90a():
    """The accumulate grad kernel compiles for sm_80 and sm_90a at every GRAM_ACCUMULATE_CONFIG row
    with no register spills (ptxas stack 0; the bf16 row at GRAM_CONFIG's BLOCK_DV 256 spilled on
    sm_80, hence its own table), shared memory within the target's limit and 16-byte loads; the
    registers, stack and shared memory of each job are printed (pytest -s)."""
    from aot import aot_compile, assert_compiled

    jobs = _aot_accumulate_jobs()
    results = aot_compile(jobs)
    for job, r in zip(jobs, results):
        c = job[3]
        print(f"{r['target']} {c['DOT_PRECISION']:6s} X {job[2]['X_ptr']:9s} CLAMP={c['CLAMP']} "
              f"NORMALIZE={c['NORMALIZE']:d} BLOCK_M/K/DV={c['BLOCK_M']}/{c['BLOCK_K']}/{c['BLOCK_DV']}: "
              f"{r['registers']} registers, stack {r['stack']} B, shared {r['shared']} B")
    assert_compiled(jobs, results)


def test_launch_config():
    assert launch_config(7, 24, "bf16")[:3] == (16, 32, 32)  # small P, D: the smallest tiles that cover them
    assert launch_config(4096, 768, "bf16") == GRAM_CONFIG["bf16"]
    assert launch_config(4096, 768, "bf16", block_m=16, block_k=16, block_dv=16)[:3] == (16, 16, 16)
    for kind in GRAM_CONFIG:  # the accumulate grad kernel's own table
        assert launch_config(4096, 768, kind, accumulate=True) == GRAM_ACCUMULATE_CONFIG[kind]
    assert launch_config(7, 24, "bf16", accumulate=True)[:3] == (16, 32, 32)
    assert dot_kind(torch.bfloat16, torch.bfloat16) == "bf16"
    matmul, saved = torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32
    try:
        for allow_tf32, kind in ((False, "tf32x3"), (True, "tf32")):  # TF32 off: ~fp32 accuracy from 3xTF32
            matmul.allow_tf32 = allow_tf32
            assert dot_kind(torch.float32, torch.float32) == kind
            assert dot_kind(torch.bfloat16, torch.float32) == kind  # a bf16 student with an fp32 teacher
    finally:
        matmul.allow_tf32 = saved


# ---------------------------------------------------------------------------------------------
# The benchmark, as CI runs it; real sizes on CUDA
# ---------------------------------------------------------------------------------------------
def test_benchmark_smoke(tmp_path):
    """benchmarks/gram.py --smoke on CPU: the rows appended to --results, every field; the reference
    and both grad kernels ("triton": recompute, "triton_accumulate") per configuration, the kernel
    rows with the reference's value as baseline; the losses agree; every time positive."""
    from aot import load_benchmark

    results = tmp_path / "rows.jsonl"
    rows = load_benchmark("gram").main(["--smoke", "--results", str(results)])
    assert [json.loads(line) for line in results.read_text().splitlines()] == rows
    for key in ("date", "device", "torch", "triton", "command", "config", "metric", "value", "baseline"):
        assert all(key in r for r in rows), key
    configs = {json.dumps(r["config"], sort_keys=True) for r in rows}
    assert len(configs) == 2
    for config in configs:
        mine = [r for r in rows if json.dumps(r["config"], sort_keys=True) == config]
        assert {r["variant"] for r in mine} == {"torch", "triton", "triton_accumulate"}
        base = {r["metric"]: r["value"] for r in mine if r["variant"] == "torch"}
        assert all(r["baseline"] == (None if r["variant"] == "torch" else base[r["metric"]]) for r in mine)
        loss = {r["variant"]: r["value"] for r in mine if r["metric"] == "loss"}
        assert all(abs(v - loss["torch"]) <= 1e-5 * abs(loss["torch"]) for v in loss.values())
    assert all(r["value"] > 0 for r in rows if r["metric"] == "ms")


@pytest.mark.skipif(DEV != "cuda", reason="real sizes: CUDA only (the AOT test covers them on CPU)")
@pytest.mark.parametrize("dx", DX_MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,P,D,img_level,option", [(8, 256, 768, True, "none"), (2, 1024, 384, True, "remove_neg"),
                                                    (2, 256, 384, False, "remove_only_teacher_neg")])
def test_real_size_cuda(dtype, B, P, D, img_level, option, dx):
    s, t = _features(B, P, D, dtype, seed=33)
    _check_against_reference(s, t, img_level, option, EPS[dtype], dx=dx)


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs: CUDA only")
@pytest.mark.parametrize("dx", DX_MODES)
def test_cuda_graph_capture(dx):
    """Forward and backward captured and replayed: no host synchronization in the op."""
    from cuda_graph import capture

    s, t = _features(8, 256, 384, torch.bfloat16, seed=34)
    x = s.clone().requires_grad_()

    def step():
        x.grad = None
        loss = gram_loss(x, t, impl="triton", dx=dx)
        (loss * 0.7).backward()
        return loss

    graph, loss = capture(step)
    graph.replay()
    torch.cuda.synchronize()
    want = _run(gram_loss, s, t, impl="triton", dx=dx)
    torch.testing.assert_close(loss, want[0], rtol=0, atol=0)
    torch.testing.assert_close(x.grad, want[1], rtol=0, atol=0)
