"""kernels/residual_layer_norm.py: the fused residual + drop path + LayerScale + LayerNorm against its
reference on fresh random inputs: h, out and the gradients of x, y, gamma, weight, bias, against the
fp64 reference with budgets from the reference's own error (|out - ref64| <= 2 |ref - ref64| + eps
max|ref64|): odd N and C (not powers of 2, ragged row tiles, several backward programs each looping
over tiles), fp32 and bf16 inputs, with and without gamma and drop-path scales (zeros included), bf16
or fp32 out and residual dtypes, (B, T, C) inputs; the reference against the unfused module chain;
determinism; the custom ops' registrations (opcheck, torch.compile fullgraph without recompiles); the
impl switch; one-line errors; an ahead-of-time compile for sm_80 and sm_90a checked with cuobjdump
(registers, no spill stack, shared memory, 16-byte loads); the benchmark's smoke runs (comparison and
backward launch sweep); the ViT with the fused op against the unfused one. Everything runs on CUDA
where there is one (TF32 off), else on CPU with the kernels interpreted."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastdino  # noqa: F401  (registers fastdino.kernels from a plain checkout)
from fastdino.kernels.residual_layer_norm import (launch_config, residual_layer_norm, residual_layer_norm_bwd_op,
                                                  residual_layer_norm_op, residual_layer_norm_ref)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
EPS = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7}  # budgets beyond the reference's own error (x max |ref64|)
LN_EPS = 1e-6
NAMES = ("h", "out", "dx", "dy", "dweight", "dbias", "dgamma")


@pytest.fixture(autouse=True, scope="module")
def _interpreter_bf16_rounding():
    """Triton 3.9's interpreter casts fp32 to bf16 by truncation; compiled kernels (and torch) round to
    nearest even. Round as they do, through torch, so that h matches the reference bit for bit."""
    if DEV == "cuda":
        yield
        return
    import triton.language as tl
    from triton.runtime import interpreter

    fp_trunc = interpreter.InterpreterBuilder.create_fp_trunc

    def patched(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return fp_trunc(self, src, dst_type)
        data = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
        return interpreter.TensorHandle(data.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interpreter.InterpreterBuilder, "create_fp_trunc", patched)
        yield


def _inputs(shape, dtype, seed, gamma=True, drop=True):
    """x, y, weight, bias, scale, gamma: a residual stream with a per-row offset (the mean matters),
    scales 0 or 1/0.7 with at least one zero row (drop path) or None, gamma around 0.1 or None."""
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = torch.randn(shape, generator=g) * 2 + torch.randn(*shape[:-1], 1, generator=g)
    y = torch.randn(shape, generator=g)
    weight = 1 + 0.3 * torch.randn(C, generator=g)
    bias = 0.2 * torch.randn(C, generator=g)
    scale = None
    if drop:
        scale = (torch.rand(shape[:-1], generator=g) < 0.7).float() / 0.7
        scale.view(-1)[1] = 0.0
    gam = 0.1 + 0.05 * torch.randn(C, generator=g) if gamma else None
    cast = lambda t, dt: None if t is None else t.to(DEV, dt)  # noqa: E731
    return (cast(x, dtype), cast(y, dtype), cast(weight, torch.float32), cast(bias, torch.float32),
            cast(scale, torch.float32), cast(gam, torch.float32))


def _grads_out(shape, seed):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(shape, generator=g).to(DEV), torch.randn(shape, generator=g).to(DEV)


def _run(fn, inputs, dh, dout, upcast=False, **kw):
    """(h, out, dx, dy, dweight, dbias, dgamma) with fresh leaves; loss = <h, dh> + <out, dout>. upcast:
    every input and output dtype in fp64 (the fp64 reference)."""
    x, y, weight, bias, scale, gamma = inputs
    if upcast:
        x, y, weight, bias, gamma = (None if t is None else t.double() for t in (x, y, weight, bias, gamma))
        kw = {**kw, "residual_dtype": torch.float64, "out_dtype": torch.float64}
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, y, weight, bias, gamma)]
    h, out = fn(leaves[0], leaves[1], leaves[2], leaves[3], scale, leaves[4], LN_EPS, **kw)
    ((h.double() * dh.double()).sum() + (out.double() * dout.double()).sum()).backward()
    return [h.detach(), out.detach()] + [None if t is None else t.grad for t in leaves]


def _close(out, ref, ref64, eps, what, elementwise=True):
    """|out - ref64| <= 2 |ref - ref64| + eps max|ref64|, element by element, or with elementwise=False
    at the tensor-wide max of the reference's error (the column sums dweight, dbias, dgamma: with bf16
    tensors the reference's autograd rounds the gradient reaching h to bf16, the kernel keeps it fp32,
    so the two sums carry different rounding errors per channel, of the same size)."""
    out, ref, ref64 = out.double(), ref.double(), ref64.double()
    err = (out - ref64).abs()
    ref_err = (ref - ref64).abs() if elementwise else (ref - ref64).abs().max()
    budget = 2 * ref_err + eps * ref64.abs().max().clamp_min(1e-30)
    assert (err <= budget).all(), f"{what}: max err {err.max().item():.3g}, worst err/budget {(err / budget).max():.3g}"


def _check(shape, dtype, gamma=True, drop=True, seed=0, residual_dtype=None, out_dtype=None, **launch):
    inputs = _inputs(shape, dtype, seed, gamma, drop)
    dh, dout = _grads_out(shape, seed)
    kw = dict(residual_dtype=residual_dtype, out_dtype=out_dtype)
    got = _run(residual_layer_norm, inputs, dh, dout, impl="triton", **kw, **launch)
    ref = _run(residual_layer_norm_ref, inputs, dh, dout, **kw)
    ref64 = _run(residual_layer_norm_ref, inputs, dh, dout, upcast=True)
    assert got[0].dtype == (residual_dtype or dtype) and got[1].dtype == (out_dtype or dtype)
    assert got[2].dtype == dtype and got[3].dtype == dtype and got[0].shape == shape
    for name, a, r, r64 in zip(NAMES, got, ref, ref64):
        if r64 is None:
            assert a is None, name
            continue
        per_row = name in ("h", "out", "dx", "dy")
        _close(a, r, r64, EPS[dtype] if per_row else 1e-5, name, elementwise=per_row)
    return got


CASES = [  # shape, dtype, gamma, drop, residual_dtype, out_dtype, launch overrides
    ((37, 48), torch.float32, True, True, None, None, {"programs": 3}),  # 3 programs, 10 tiles of 4 rows (last: 1)
    ((37, 48), torch.bfloat16, False, True, None, torch.float32, {"programs": 2}),
    ((37, 200), torch.float32, False, False, None, torch.bfloat16, {"block_m": 8, "programs": 2}),  # C not 2^k
    ((37, 200), torch.bfloat16, True, True, torch.float32, torch.bfloat16, {"block_m": 8, "num_warps": 8}),  # fp32 h
    ((3, 7, 48), torch.bfloat16, True, True, None, None, {}),  # (B, T, C): one scale per token row
]


@pytest.mark.parametrize("shape,dtype,gamma,drop,residual_dtype,out_dtype,launch", CASES)
def test_triton_matches_reference(shape, dtype, gamma, drop, residual_dtype, out_dtype, launch):
    _check(shape, dtype, gamma, drop, seed=sum(shape), residual_dtype=residual_dtype, out_dtype=out_dtype, **launch)


def test_dropped_rows_pass_the_residual_through():
    """scale 0: h = x exactly and dy = 0 on those rows; the other rows' dy is nonzero."""
    inputs = _inputs((13, 48), torch.float32, 3)
    dh, dout = _grads_out((13, 48), 3)
    h, _out, _dx, dy, *_ = _run(residual_layer_norm, inputs, dh, dout, impl="triton")
    dropped = inputs[4] == 0
    assert dropped.any() and (~dropped).any()
    assert torch.equal(h[dropped], inputs[0][dropped])
    assert (dy[dropped] == 0).all() and (dy[~dropped] != 0).all()


def test_branch_output_kept_only_with_gamma():
    """The forward saves y for the backward only with gamma (dgamma reads it): without, the branch
    output is not kept alive by this op."""
    for gamma in (False, True):
        x, y, weight, bias, scale, gam = _inputs((13, 48), torch.float32, 12, gamma=gamma)
        x, y = x.requires_grad_(), y.requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.data_ptr()) or t, lambda t: t):
            residual_layer_norm(x, y, weight, bias, scale, gam, impl="triton")
        assert (y.data_ptr() in saved) == gamma and x.data_ptr() not in saved


def test_reference_matches_unfused_modules():
    """The reference equals the chain it fuses: x + drop_scale * ls(y), then nn.LayerNorm (fp32)."""
    x, y, weight, bias, scale, gamma = _inputs((2, 5, 48), torch.float32, 4)
    ln = torch.nn.LayerNorm(48, eps=LN_EPS, device=DEV)
    with torch.no_grad():
        ln.weight.copy_(weight)
        ln.bias.copy_(bias)
    h_mod = x + (y * gamma) * scale[..., None]
    h, out = residual_layer_norm_ref(x, y, weight, bias, scale, gamma, LN_EPS)
    torch.testing.assert_close(h, h_mod, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, ln(h_mod), rtol=1e-5, atol=1e-5)
    h2, out2 = residual_layer_norm_ref(x, y, weight, bias, None, None, LN_EPS)
    torch.testing.assert_close(out2, F.layer_norm(x + y, (48,), weight, bias, LN_EPS))
    assert (h2 - h).abs().max() > 0.1  # the options change the result


def test_deterministic():
    """Two runs: bitwise equal outputs and gradients (partials summed in a fixed order, no atomics)."""
    inputs = _inputs((37, 48), torch.bfloat16, 5)
    dh, dout = _grads_out((37, 48), 5)
    a = _run(residual_layer_norm, inputs, dh, dout, impl="triton", programs=3)
    b = _run(residual_layer_norm, inputs, dh, dout, impl="triton", programs=3)
    for name, p, q in zip(NAMES, a, b):
        assert torch.equal(p, q), name


def test_opcheck():
    x, y, weight, bias, scale, gamma = _inputs((13, 48), torch.float32, 6)
    args = (x.requires_grad_(), y.requires_grad_(), weight.requires_grad_(), bias, scale, gamma.requires_grad_(),
            LN_EPS, torch.float32, torch.bfloat16, 0, 2, 0)
    torch.library.opcheck(residual_layer_norm_op, args, test_utils=("test_schema", "test_faketensor",
                                                                    "test_autograd_registration"))
    h, _out, mean, rstd = residual_layer_norm_op(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    torch.library.opcheck(residual_layer_norm_bwd_op, (torch.randn_like(h), torch.randn_like(h), h, y.detach(),
                                                       weight.detach(), scale, gamma.detach(), mean, rstd,
                                                       torch.float32, torch.float32, 0, 2, 0),
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_matches_eager():
    """Forward and backward through torch.compile in one graph; new values reuse it."""
    torch._dynamo.reset()

    def step(x, y, weight, bias, scale, gamma, eps):
        h, out = residual_layer_norm(x, y, weight, bias, scale, gamma, eps, impl="triton", programs=2)
        return h * 2, out

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for i, seed in enumerate((7, 8)):
        inputs = _inputs((13, 48), torch.float32, seed)
        dh, dout = _grads_out((13, 48), seed)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = _run(compiled, inputs, dh, dout)
        want = _run(step, inputs, dh, dout)
        for name, a, b in zip(NAMES, got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_impl_switch_and_bad_inputs():
    x, y, weight, bias, scale, gamma = _inputs((5, 48), torch.float32, 9)
    for impl in ("triton", "torch"):
        for args, match in [((x, y[:, :40], weight, bias), "y"), ((x, y, weight[:40], bias), "weight"),
                            ((x, y, weight, bias, scale[:3]), "scale"),
                            ((x, y, weight, bias, None, gamma[:3]), "gamma"),
                            ((x, y.long(), weight, bias), "floating")]:
            with pytest.raises(ValueError, match=match) as e:
                residual_layer_norm(*args, impl=impl)
            assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="fp32 or bf16"):
        residual_layer_norm(x.half(), y.half(), weight, bias, impl="triton")
    with pytest.raises(ValueError, match="scale"):
        residual_layer_norm(x, y, weight, bias, scale.requires_grad_(), impl="triton")
    with pytest.raises(ValueError, match="impl"):
        residual_layer_norm(x, y, weight, bias, impl="cuda")
    auto = residual_layer_norm(x.double(), y.double(), weight, bias, impl="auto")  # fp64: the reference
    assert auto[0].dtype == torch.float64


@pytest.mark.skipif(DEV == "cuda", reason="CPU-only check")
def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, y, weight, bias, _s, _g = _inputs((5, 48), torch.float32, 10)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        residual_layer_norm(x, y, weight, bias, impl="triton")


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile with register and spill checks (tests/kernels/aot.py)
# ---------------------------------------------------------------------------------------------
MODULE = "fastdino.kernels.residual_layer_norm"


def _aot_jobs():
    """Both kernels at the launch table's configs for C = 384 / 768 / 1024 (ViT-S / B / L), bf16 and
    fp32 tensors (bf16 out with fp32), with scale and gamma (the most work); the backward also
    without gamma (the default ViT)."""
    f32 = "*fp32:16"
    jobs = []
    for cap in (80, 90):
        for C in (384, 768, 1024):
            for dt in ("bf16", "fp32"):
                t = f"*{dt}:16"
                strides = {"C": "i32:16", "N": "i32"}
                bm, bc, nw = launch_config(C)
                fwd = {"X_ptr": t, "Y_ptr": t, "S_ptr": f32, "G_ptr": f32, "W_ptr": f32, "B_ptr": f32, "H_ptr": t,
                       "Out_ptr": "*bf16:16", "Mean_ptr": f32, "Rstd_ptr": f32, "eps": "fp32", **strides,
                       **{k: "i32:16" for k in ("stride_x", "stride_y", "stride_h", "stride_o")}}
                jobs.append((MODULE, "_residual_layer_norm_fwd_kernel", fwd,
                             {"HAS_SCALE": True, "HAS_GAMMA": True, "BLOCK_M": bm, "BLOCK_C": bc}, nw, cap))
                bm, bc, nw = launch_config(C, backward=True)
                bwd = {"DH_ptr": t, "DOut_ptr": "*bf16:16", "H_ptr": t, "Y_ptr": t, "S_ptr": f32, "G_ptr": f32,
                       "W_ptr": f32, "Mean_ptr": f32, "Rstd_ptr": f32, "DX_ptr": t, "DY_ptr": t, "DWPart_ptr": f32,
                       "DBPart_ptr": f32, "DGPart_ptr": f32, **strides,
                       **{k: "i32:16" for k in ("stride_dh", "stride_do", "stride_h", "stride_y", "stride_dx",
                                                "stride_dy")}}
                for has_gamma in (True, False):
                    jobs.append((MODULE, "_residual_layer_norm_bwd_kernel", bwd,
                                 {"HAS_SCALE": True, "HAS_GAMMA": has_gamma, "BLOCK_M": bm, "BLOCK_C": bc}, nw, cap))
    return jobs


def test_aot_compile_sm80_sm90a():
    """Every kernel of the launch table at ViT widths compiles for sm_80 and sm_90a with no register
    spills (ptxas stack frame 0), shared memory within the target's limit and 16-byte loads."""
    from aot import aot_compile, assert_compiled

    jobs = _aot_jobs()
    results = aot_compile(jobs)
    print("\n".join(f"{r['kernel']} {r['target']} BLOCK_C={j[3]['BLOCK_C']} {j[2]['H_ptr']} gamma={j[3]['HAS_GAMMA']}: "
                    f"{r['registers']} regs, stack {r['stack']}, shared {r['shared']}"
                    for j, r in zip(jobs, results)))
    assert_compiled(jobs, results)


def test_launch_config():
    assert launch_config(384) == (8, 512, 4) and launch_config(384, backward=True) == (4, 512, 4)
    assert launch_config(768)[:2] == (4, 1024) and launch_config(48, block_m=3)[:2] == (3, 64)
    assert launch_config(8192)[0] == 1
    assert launch_config(384, backward=True, num_warps=8) == (4, 512, 8)


# ---------------------------------------------------------------------------------------------
# The benchmark, as CI runs it; real sizes on CUDA
# ---------------------------------------------------------------------------------------------
def test_benchmark_smoke(tmp_path):
    """benchmarks/residual_norm.py --smoke on CPU: reference and interpreted kernel rows, results agree."""
    from aot import smoke_rows

    rows = smoke_rows("residual_norm", tmp_path / "rows.jsonl")
    assert all(r["value"] <= 1e-2 for r in rows if r["metric"] == "max_err_out")
    assert all(r["value"] > 0 for r in rows if r["metric"] in ("fwd_ms", "bwd_ms"))


def test_benchmark_sweep_bwd_smoke(tmp_path):
    """benchmarks/residual_norm.py --smoke --sweep-bwd (CPU: interpreted): per configuration one row per
    metric and launch of the grid (num_warps 4 and 8, persistent and one program per tile), the launch
    table's first and the baseline of all; every launch's gradients equal the table's within bf16
    rounding."""
    import json

    import triton
    from aot import load_benchmark

    bench = load_benchmark("residual_norm")
    path = tmp_path / "rows.jsonl"
    rows = bench.main(["--smoke", "--sweep-bwd", "--dtypes", "bf16", "--results", str(path)])
    assert rows == [json.loads(line) for line in path.read_text().splitlines()]
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 1
    metrics = {"bwd_op_ms", "bwd_op_GBps", "max_rel_diff"} | ({"bwd_graph_ms", "bwd_graph_GBps"} if DEV == "cuda"
                                                              else set())
    for N, C, gamma in bench.SMOKE_CONFIGS:
        mine = [r for r in rows if (r["config"]["N"], r["config"]["C"], r["config"]["gamma"]) == (N, C, gamma)]
        launches = [r["config"]["launch"] for r in mine if r["metric"] == "bwd_op_ms"]
        key = lambda l: (l["block_m"], l["num_warps"], l["programs"])  # noqa: E731
        assert sorted(map(key, launches)) == sorted(map(key, bench.sweep_launches(N, C, sm_count)))
        bm, _bc, nw = launch_config(C, backward=True)
        assert [l["table"] for l in launches] == [True] + [False] * (len(launches) - 1)
        assert launches[0]["block_m"] == bm and launches[0]["num_warps"] == nw
        assert {l["num_warps"] for l in launches} == {4, 8}
        assert any(l["programs"] == triton.cdiv(N, l["block_m"]) > 1 for l in launches)  # one program per tile
        assert len(mine) == len(launches) * len(metrics) and {r["metric"] for r in mine} == metrics
        table = {r["metric"]: r["value"] for r in mine if r["config"]["launch"]["table"]}
        for r in mine:
            assert r["baseline"] == table[r["metric"]] and r["variant"] == "triton"
            assert r["value"] <= 2 ** -7 if r["metric"] == "max_rel_diff" else r["value"] > 0, r


@pytest.mark.skipif(DEV != "cuda", reason="real sizes: CUDA only (the AOT test covers them on CPU)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,gamma", [((64, 197, 384), False), ((16, 785, 768), True), ((4, 257, 1024), True)])
def test_real_size_cuda(dtype, shape, gamma):
    _check(shape, dtype, gamma, True, seed=11, out_dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# In the ViT: model.fused_residual_norm
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dinov2", [False, True], ids=["vit", "dinov2-layerscale"])
def test_vit_blocks_with_the_fused_op_equal_the_unfused_blocks(dinov2):
    """set_residual_norm(model, "triton"): every block's attention residual (drop path, LayerScale)
    and norm2, and block 0's MLP residual and block 1's norm1, as the fused op (interpreted on CPU).
    Unpacked and packed crops, drop path on (the same
    draws from the same seed): the features and every parameter's gradient are as close to the fp64
    unfused model's as the fp32 unfused model's are (2x its max error + 1e-5 of the tensor's max)."""
    from fastdino.models import set_residual_norm
    from fastdino.models.vision_transformer import VisionTransformer

    opts = dict(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=2, drop_path_rate=0.3, attn="math")
    if dinov2:
        opts.update(layerscale_init=0.5, num_register_tokens=2, mask_token=True)
    torch.manual_seed(0)
    plain = VisionTransformer(**opts).to(DEV)
    fused = copy.deepcopy(plain)
    set_residual_norm(fused, "triton")
    assert all(b.residual_norm_impl == "triton" for b in fused.blocks)
    plain64 = copy.deepcopy(plain).double()
    crops = [torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32), torch.randn(5, 3, 16, 16)]
    for packed in (False, True):
        outs, grads = [], []
        for model in (fused, plain, plain64):
            dt = next(model.parameters()).dtype
            cs = [c.to(DEV, dt) for c in crops]
            model.zero_grad()
            torch.manual_seed(1)  # the same drop-path draws
            out = model.forward_packed(cs) if packed else torch.cat([model(torch.cat(cs[:2])), model(cs[2])])
            (out * torch.linspace(-1, 1, out.shape[-1], device=DEV, dtype=dt)).sum().backward()
            outs.append(out.detach())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        _close(*outs, 1e-5, f"features (packed={packed})", elementwise=False)
        assert grads[0].keys() == grads[1].keys() == grads[2].keys()
        for n in grads[0]:
            _close(grads[0][n], grads[1][n], grads[2][n], 1e-5, f"grad {n} (packed={packed})", elementwise=False)


def test_fused_residual_norm_config_key():
    from fastdino.config import ConfigError, load_config
    from fastdino.models import build_backbone

    cfg = load_config(None, ["model.arch=vit_tiny", "model.depth=1", "model.fused_residual_norm=true"])
    assert build_backbone(cfg.model, teacher=False).blocks[0].residual_norm_impl == "auto"
    assert build_backbone(load_config(None, ["model.depth=1"]).model, teacher=False).blocks[0].residual_norm_impl is None
    with pytest.raises(ConfigError, match="model.fused_residual_norm"):
        load_config(None, ["model.arch=dinov3_vits16", "model.fused_residual_norm=true"])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_vit_block_chain_under_autocast(checkpointing):
    """The chain of fused blocks (block i's MLP residual + block i+1's norm1): no norm1 but block 0's
    runs, the normed rows are stored in the autocast dtype (what the next Linear reads), and under bf16
    autocast the features and gradients match the unfused model's to bf16 rounding (with activation
    checkpointing too); fp32 without autocast is covered by the test above."""
    from fastdino.models import set_residual_norm
    from fastdino.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    plain = VisionTransformer(img_size=32, patch_size=16, embed_dim=48, depth=3, num_heads=2, drop_path_rate=0.2,
                              attn="math", layerscale_init=0.5, activation_checkpointing=checkpointing).to(DEV).train()
    fused = set_residual_norm(copy.deepcopy(plain), "triton")
    calls, mlp_inputs = [], []
    for i, blk in enumerate(fused.blocks):
        blk.norm1.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
        blk.mlp.register_forward_pre_hook(lambda m, a: mlp_inputs.append(a[0].dtype))
    x = torch.randn(4, 3, 32, 32, device=DEV)
    res = []
    for model in (fused, plain):
        torch.manual_seed(1)
        with torch.autocast(DEV, dtype=torch.bfloat16):
            out = model(x)
        (out.float() * torch.linspace(-1, 1, out.shape[-1], device=DEV)).sum().backward()
        res.append((out.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    assert set(calls) == {0} and set(mlp_inputs) == {torch.bfloat16}
    (out_f, g_f), (out_p, g_p) = res
    scale = out_p.abs().max().item()
    assert (out_f - out_p).abs().max().item() <= 2 ** -6 * scale
    assert g_f.keys() == g_p.keys()
    for n in g_p:
        assert (g_f[n] - g_p[n]).abs().max().item() <= 2 ** -5 * g_p[n].abs().max().item() + 1e-6, n
