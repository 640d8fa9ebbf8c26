"""kernels/softmax_center.py: teacher targets (q, entropy, column sums) of the Triton op against the
reference on fresh random inputs, peaked distributions included; the reference against the formula
in float64; the custom op's registration (opcheck, torch.compile without graph breaks or
recompiles when teacher_temp changes); an ahead-of-time compile for sm_80 and sm_90a."""
import pytest
import torch

import fastdino  # noqa: F401  (registers fastdino.kernels from a plain checkout)
from fastdino.kernels.softmax_center import softmax_center, softmax_center_op, softmax_center_ref

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
def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    t, c = _inputs(2, 64, torch.float32, seed=5)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        softmax_center(t, c, 0.04)


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
