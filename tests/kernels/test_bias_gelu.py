"""kernels/bias_gelu.py: the fused bias + exact GELU against its reference on fresh random inputs: a and
the gradients of h and the bias against the fp64 reference, with budgets from the reference's own
error (|out - ref64| <= 2 |ref - ref64| + eps max|ref64|): odd N and H (1 row, 1 column, widths that
are not powers of 2, ragged row and column tiles, several backward programs each looping over row
tiles), fp32 and bf16 h, fp32 and bf16 bias, (B, T, H) inputs and row-strided views; the reference
against torch's GELU; what the forward saves; determinism of the bias gradient; the custom ops'
registrations (opcheck, a tiny MLP under torch.compile fullgraph without recompiles); the impl switch
and its routing; one-line errors; an ahead-of-time compile for sm_80 and sm_90a at the ViT widths
checked with cuobjdump (registers, no spill stack, shared memory, 16-byte loads); the benchmark's
smoke run; real sizes on CUDA. Everything runs on CUDA where there is one (TF32 off), else on CPU with
the kernels interpreted."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastdino  # noqa: F401  (registers fastdino.kernels from a plain checkout)
from fastdino.kernels.bias_gelu import (bias_gelu, bias_gelu_bwd_op, bias_gelu_op, bias_gelu_ref, launch_config,
                                        memory_floor_bytes, triton_refusal)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
EPS = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7}  # budgets beyond the reference's own error (x max |ref64|)
NAMES = ("a", "dh", "dbias")


@pytest.fixture(autouse=True, scope="module")
def _interpreter_bf16_round_to_nearest():
    """Triton 3.9's interpreter casts fp32 to bf16 by dropping the low 16 bits (truncation); compiled
    kernels and torch round to nearest, ties to even. Round that way here (on the fp32 bit patterns),
    so that the interpreted kernels store what compiled ones would."""
    import triton.language as tl
    from triton.runtime import interpreter

    if DEV == "cuda" or not hasattr(getattr(interpreter, "InterpreterBuilder", None), "create_fp_trunc"):
        yield  # compiled kernels, or an interpreter without this hook (another Triton): nothing to patch
        return
    truncating = interpreter.InterpreterBuilder.create_fp_trunc

    def to_nearest(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return truncating(self, src, dst_type)
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        nan = np.isnan(src.data)
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)  # a NaN stays a (quiet) NaN
        return interpreter.TensorHandle(rounded, tl.bfloat16)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interpreter.InterpreterBuilder, "create_fp_trunc", to_nearest)
        yield


def _inputs(shape, dtype, bias_dtype=torch.float32, seed=0):
    """h (the fc1 output without bias: spread to |z| ~ 8, so both GELU tails and the erf's flat part
    are hit), bias (H,), da (the gradient reaching a, in h's dtype)."""
    g = torch.Generator().manual_seed(seed)
    h = 2 * torch.randn(shape, generator=g)
    bias = 0.5 * torch.randn(shape[-1], generator=g)
    da = torch.randn(shape, generator=g)
    return h.to(DEV, dtype), bias.to(DEV, bias_dtype), da.to(DEV, dtype)


def _run(fn, h, bias, da, upcast=False, **kw):
    """(a, dh, dbias) with fresh leaves; loss = <a, da>. upcast: h and bias in fp64 (the fp64 reference)."""
    if upcast:
        h, bias = h.double(), bias.double()
    hl, bl = h.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    a = fn(hl, bl, **kw)
    (a.double() * da.double()).sum().backward()
    return a.detach(), hl.grad, bl.grad


def _close(out, ref, ref64, eps, what, elementwise=True):
    """|out - ref64| <= 2 |ref - ref64| + eps max|ref64| per element, or with elementwise=False against
    the largest error of the reference over the tensor (the column sums dbias: the kernel and torch
    sum the same fp32 terms in different orders, so their per-column errors differ, of the same size)."""
    out, ref, ref64 = out.double(), ref.double(), ref64.double()
    err = (out - ref64).abs()
    ref_err = (ref - ref64).abs() if elementwise else (ref - ref64).abs().max()
    budget = 2 * ref_err + eps * ref64.abs().max().clamp_min(1e-30)
    assert (err <= budget).all(), f"{what}: max err {err.max().item():.3g}, worst err/budget {(err / budget).max():.3g}"


def _check(shape, dtype, bias_dtype=torch.float32, seed=0, view=None, **launch):
    """The kernels against the reference and the fp64 reference; view(h) makes the input the kernel sees
    (a strided view) from a contiguous h."""
    h, bias, da = _inputs(shape, dtype, bias_dtype, seed)
    if view is not None:
        h = view(h)
        da = da[..., :h.shape[-1]]
        bias = bias[:h.shape[-1]]
    got = _run(bias_gelu, h, bias, da, impl="triton", **launch)
    ref = _run(bias_gelu_ref, h, bias, da)
    ref64 = _run(bias_gelu_ref, h, bias, da, upcast=True)
    assert got[0].dtype == got[1].dtype == dtype and got[2].dtype == bias_dtype
    assert got[0].shape == got[1].shape == h.shape and got[2].shape == bias.shape
    for name, a, r, r64 in zip(NAMES, got, ref, ref64):
        per_row = name != "dbias"
        _close(a, r, r64, EPS[dtype] if per_row else EPS[bias_dtype], name, elementwise=per_row)
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N", [1, 7, 33])
@pytest.mark.parametrize("H", [1, 37, 100, 160])
def test_triton_matches_reference(N, H, dtype):
    """The launch table's tiles (one column tile here; up to 2 backward programs looping over row tiles)."""
    _check((N, H), dtype, seed=N * 1000 + H)


CASES = [  # shape, dtype, bias dtype, launch overrides
    ((33, 100), torch.float32, torch.float32, {"block_h": 32, "block_m": 4, "programs": 3}),  # 4 col tiles (last: 4
    ((33, 100), torch.bfloat16, torch.bfloat16, {"block_h": 32, "block_m": 4, "programs": 3}),  # cols), 9 row tiles
    ((33, 160), torch.bfloat16, torch.float32, {"block_h": 64, "block_m": 8, "programs": 2, "num_warps": 8}),
    ((7, 37), torch.bfloat16, torch.bfloat16, {"block_m": 2}),  # bf16 bias, 4 row tiles for 2 programs
    ((3, 11, 100), torch.bfloat16, torch.float32, {"block_h": 64}),  # (B, T, H)
]


@pytest.mark.parametrize("shape,dtype,bias_dtype,launch", CASES)
def test_triton_matches_reference_tiled(shape, dtype, bias_dtype, launch):
    """Several column tiles (one ragged), several backward programs each over several row tiles."""
    _check(shape, dtype, bias_dtype, seed=sum(shape), **launch)


def test_row_strided_view():
    """Rows that are contiguous but further apart than H (a column slice of a wider tensor) run on the
    kernel as they are: the row strides are kernel arguments."""
    got = _check((13, 160), torch.float32, view=lambda h: h[:, :100], block_h=32)
    assert got[1].is_contiguous()


def test_expanded_gradient():
    """a.sum().backward() hands the backward a gradient with zero strides (an expanded scalar): same
    gradients as the reference."""
    h, bias, _da = _inputs((7, 37), torch.float32, seed=4)
    grads = []
    for fn, kw in ((bias_gelu, {"impl": "triton"}), (bias_gelu_ref, {})):
        hl, bl = h.clone().requires_grad_(), bias.clone().requires_grad_()
        fn(hl, bl, **kw).sum().backward()
        grads.append((hl.grad, bl.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reference_matches_torch_gelu():
    """The reference is torch.nn.GELU() (exact, erf) of h + bias in fp32, and not the tanh approximation."""
    h, bias, _da = _inputs((7, 37), torch.float32)
    torch.testing.assert_close(bias_gelu_ref(h, bias), torch.nn.GELU()(h + bias), rtol=0, atol=0)
    assert (bias_gelu_ref(h, bias) - F.gelu(h + bias, approximate="tanh")).abs().max() > 1e-5
    hb, bb = h.bfloat16(), bias.bfloat16()
    want = torch.nn.GELU()(hb.float() + bb.float()).bfloat16()
    assert bias_gelu_ref(hb, bb).dtype == torch.bfloat16 and torch.equal(bias_gelu_ref(hb, bb), want)


def test_saves_h_and_bias_only():
    """The forward keeps h and the bias for the backward, not z = h + bias and not a."""
    h, bias, _da = _inputs((7, 37), torch.bfloat16)
    h, bias = h.requires_grad_(), bias.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        a = bias_gelu(h, bias, impl="triton")
    assert len(saved) == 2 and {t.data_ptr() for t in saved} == {h.data_ptr(), bias.data_ptr()}
    assert a.data_ptr() not in {t.data_ptr() for t in saved}


def test_deterministic():
    """Two runs: bitwise equal a, dh and dbias (the (P, H) partials summed in a fixed order, no atomics)."""
    h, bias, da = _inputs((33, 100), torch.bfloat16, seed=5)
    kw = dict(impl="triton", block_h=32, block_m=4, programs=3)
    first, second = _run(bias_gelu, h, bias, da, **kw), _run(bias_gelu, h, bias, da, **kw)
    for name, p, q in zip(NAMES, first, second):
        assert torch.equal(p, q), name


def test_opcheck():
    h, bias, da = _inputs((13, 37), torch.float32, seed=6)
    torch.library.opcheck(bias_gelu_op, (h.requires_grad_(), bias.requires_grad_(), 0, 0, 2, 0),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(bias_gelu_bwd_op, (da, h.detach(), bias.detach(), 0, 16, 2, 0),
                          test_utils=("test_schema", "test_faketensor"))


class _MLP(torch.nn.Module):
    """The ViT MLP with fc1's bias added by the fused op: fc2(bias_gelu(fc1 x without bias, fc1 bias))."""

    def __init__(self, dim=24, hidden=37):
        super().__init__()
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(bias_gelu(F.linear(x, self.fc1.weight), self.fc1.bias, impl="triton", programs=2))


def test_compile_fullgraph_tiny_mlp_matches_eager():
    """A tiny MLP through torch.compile(fullgraph=True): one graph holding fastdino::bias_gelu, outputs and
    every parameter's gradient equal to eager; new input values reuse the graph."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    mlp = _MLP().to(DEV)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, example_inputs)

    compiled = torch.compile(mlp, fullgraph=True, backend=backend)
    for i, seed in enumerate((7, 8)):
        x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(seed)).to(DEV)
        res = []
        for model in (compiled, mlp):
            mlp.zero_grad(set_to_none=True)
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                out = model(x)
            (out * torch.linspace(-1, 1, 24, device=DEV)).sum().backward()
            res.append([out.detach()] + [p.grad.clone() for p in mlp.parameters()])
        for a, b in zip(*res):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert len(graphs) == 1
    assert any(n.target is torch.ops.fastdino.bias_gelu.default for n in graphs[0].graph.nodes)


def test_impl_switch_and_routing():
    """triton_refusal names what the kernels do not take (fp16 / fp64 h, a bias in another dtype, rows
    that are not contiguous); impl="auto" runs the reference there (and on CPU tensors), impl="triton"
    raises the refusal as one ValueError line."""
    h, bias, _da = _inputs((5, 37), torch.float32)
    assert triton_refusal(h, bias) is None and triton_refusal(h.bfloat16(), bias) is None
    assert triton_refusal(h.bfloat16(), bias.bfloat16()) is None
    refused = [(h.half(), bias, "fp32 or bf16 h"), (h.double(), bias, "fp32 or bf16 h"),
               (h.double(), bias.double(), "fp32 or bf16 h"), (h.bfloat16(), bias.half(), "fp32 bias"),
               (h, bias.bfloat16(), "fp32 bias"),
               (h.t().contiguous().t(), bias, "rows contiguous"),
               (torch.randn(37, 3, 4, device=DEV).transpose(0, 2), bias, "rows contiguous")]
    for hh, bb, match in refused:
        reason = triton_refusal(hh, bb)
        assert reason is not None and match in reason, (hh.dtype, bb.dtype, hh.stride())
        with pytest.raises(ValueError, match=match) as e:
            bias_gelu(hh, bb, impl="triton")
        assert "\n" not in str(e.value)
        auto = bias_gelu(hh, bb, impl="auto")
        assert auto.dtype == hh.dtype and torch.equal(auto, bias_gelu_ref(hh, bb))
    # a (B, T, H) slice whose rows flatten to one row stride is taken as it is; one that does not is refused
    assert triton_refusal(torch.randn(4, 6, 40, device=DEV)[..., :37], bias) is None
    assert "rows contiguous" in triton_refusal(torch.randn(4, 6, 40, device=DEV)[:, :5, :37], bias)
    if DEV == "cpu":  # CPU tensors: the reference, whatever the dtype
        assert torch.equal(bias_gelu(h, bias, impl="auto"), bias_gelu_ref(h, bias))


def test_bad_inputs_are_one_line_errors():
    h, bias, _da = _inputs((5, 37), torch.float32)
    for impl in ("auto", "triton", "torch"):
        for args, match in [((h, bias[:36]), "bias must be"), ((h, bias[None]), "bias must be"),
                            ((h.long(), bias), "floating"), ((h, bias.long()), "floating"),
                            ((h, 1.0), "floating"), ((h[:0], bias), "rows"), ((h.new_tensor(1.0), bias), "rows")]:
            with pytest.raises(ValueError, match=match) as e:
                bias_gelu(*args, impl=impl)
            assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="impl"):
        bias_gelu(h, bias, impl="cuda")


@pytest.mark.skipif(DEV == "cuda", reason="CPU-only check")
def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    h, bias, _da = _inputs((5, 37), torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        bias_gelu(h, bias, impl="triton")


def test_launch_config_and_floor():
    assert launch_config(1536) == (8, 512, 4) and launch_config(1536, backward=True) == (4, 512, 4)
    assert launch_config(3072) == launch_config(4096) == launch_config(1536)  # one tile for the ViT widths
    assert launch_config(100) == (32, 128, 4) and launch_config(1)[:2] == (256, 16)
    assert launch_config(100, block_m=3, block_h=32, num_warps=8) == (3, 32, 8)
    assert memory_floor_bytes(10, 4, 2) == 10 * 4 * 2 * 5 and memory_floor_bytes(10, 4, 4, backward=False) == 320


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile with register and spill checks (tests/kernels/aot.py)
# ---------------------------------------------------------------------------------------------
MODULE = "fastdino.kernels.bias_gelu"
WIDTHS = (1536, 3072, 4096)  # the MLP hidden widths of ViT-S / B / L


def _aot_jobs():
    """Both kernels at the launch table's configs for H = 1536 / 3072 / 4096, bf16 and fp32 h with an
    fp32 bias (autocast's case: the parameter stays fp32), for sm_80 and sm_90a; as (H, job) pairs."""
    jobs = []
    for cap in (80, 90):
        for H in WIDTHS:
            for dt in ("bf16", "fp32"):
                t, f32 = f"*{dt}:16", "*fp32:16"
                sizes = {"N": "i32", "H": "i32:16"}
                bm, bh, nw = launch_config(H)
                fwd = {"H_ptr": t, "Bias_ptr": f32, "A_ptr": t, **sizes, "stride_h": "i32:16", "stride_a": "i32:16"}
                jobs.append((H, (MODULE, "_bias_gelu_fwd_kernel", fwd, {"BLOCK_M": bm, "BLOCK_H": bh}, nw, cap)))
                bm, bh, nw = launch_config(H, backward=True)
                bwd = {"DA_ptr": t, "H_ptr": t, "Bias_ptr": f32, "DH_ptr": t, "DBPart_ptr": f32, **sizes,
                       **{k: "i32:16" for k in ("stride_da", "stride_h", "stride_dh")}}
                jobs.append((H, (MODULE, "_bias_gelu_bwd_kernel", bwd, {"BLOCK_M": bm, "BLOCK_H": bh}, nw, cap)))
    return jobs


def test_aot_compile_sm80_sm90a():
    """Every kernel of the launch table at the ViT widths compiles for sm_80 and sm_90a with no register
    spills (ptxas stack frame 0), shared memory within the target's limit and 16-byte loads. H is a
    runtime argument and the three widths get the same tile, so identical jobs compile once."""
    from aot import aot_compile, assert_compiled

    jobs = _aot_jobs()
    unique = {}
    for _H, job in jobs:
        unique.setdefault(json.dumps(job), job)
    compiled = dict(zip(unique, aot_compile(list(unique.values()))))
    results = [compiled[json.dumps(job)] for _H, job in jobs]
    print("\n".join(f"{r['kernel']} {r['target']} H={H} {job[2]['H_ptr']} BLOCK_M={job[3]['BLOCK_M']} "
                    f"BLOCK_H={job[3]['BLOCK_H']}: {r['registers']} regs, stack {r['stack']}, shared {r['shared']}"
                    for (H, job), r in zip(jobs, results)))
    assert {H for H, _job in jobs} == set(WIDTHS) and len(unique) == 8
    assert_compiled([job for _H, job in jobs], results)


# ---------------------------------------------------------------------------------------------
# The benchmark, as CI runs it; real sizes on CUDA
# ---------------------------------------------------------------------------------------------
def test_benchmark_smoke(tmp_path):
    """benchmarks/bias_gelu.py --smoke (CPU: interpreted): rows for every configuration, variant and
    metric, appended to --results; the variants agree with the reference; triton rows carry the torch
    row's value as baseline."""
    import json

    from aot import load_benchmark

    bench = load_benchmark("bias_gelu")
    path = tmp_path / "rows.jsonl"
    rows = bench.main(["--smoke", "--results", str(path)])
    assert rows == [json.loads(line) for line in path.read_text().splitlines()]
    metrics = {"fwd_ms", "fwdbwd_ms", "fwd_GBps", "fwdbwd_GBps", "max_err_out", "max_err_dbias"}
    assert len(rows) == len(bench.SMOKE_CONFIGS) * len(bench.DTYPES) * len(bench.VARIANTS) * len(metrics)
    for key in ("date", "device", "torch", "triton", "command", "config", "variant", "metric", "value", "baseline"):
        assert all(key in r for r in rows), key
    for r in rows:
        assert r["metric"] in metrics and r["variant"] in bench.VARIANTS
        assert (r["baseline"] is None) == (r["variant"] == "torch")
        if r["metric"].startswith("max_err"):  # bf16: the torch variants' bias is rounded to bf16
            assert r["value"] <= (1e-5 if r["config"]["dtype"] == "fp32" else 0.07), r
        else:
            assert r["value"] > 0, r


@pytest.mark.skipif(DEV != "cuda", reason="real sizes: CUDA only (the AOT test covers them on CPU)")
@pytest.mark.parametrize("shape,dtype", [((50432, 1536), torch.bfloat16), ((50432, 3072), torch.bfloat16),
                                         ((256, 197, 1536), torch.bfloat16), ((50432, 1536), torch.float32)])
def test_real_size_cuda(shape, dtype):
    _check(shape, dtype, seed=11)


@pytest.mark.skipif(DEV != "cuda", reason="CUDA only")
def test_real_size_cuda_deterministic():
    h, bias, da = _inputs((50432, 1536), torch.bfloat16, seed=12)
    first, second = _run(bias_gelu, h, bias, da, impl="triton"), _run(bias_gelu, h, bias, da, impl="triton")
    for name, p, q in zip(NAMES, first, second):
        assert torch.equal(p, q), name
