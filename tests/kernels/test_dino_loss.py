"""kernels/dino_loss.py: fused Triton DINO loss vs the plain-PyTorch double loop, on fresh random
inputs, gradients, teacher entropy, teacher column sums and the gated center update included.
On CPU the kernels run under TRITON_INTERPRET=1 (small shapes); an ahead-of-time compile for sm_80
and sm_90a covers the real sizes."""
import pytest
import torch

import fastdino  # noqa: F401  (registers fastdino.kernels from a plain checkout)
from fastdino.kernels.dino_loss import dino_loss, dino_loss_ref, dino_loss_torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
EPS = {torch.float32: 1e-5, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}


def _inputs(B, K, ncrops, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(ncrops * B, K, generator=g) * 3).to(DEV, dtype)  # logits/tau_s spread over ~30 nats
    t = (torch.randn(2 * B, K, generator=g) * 2).to(DEV, dtype)
    c = (torch.randn(1, K, generator=g) * 0.5).to(DEV)
    return s, t, c


def _run(fn, s, t, c, ncrops, grad_out, **kw):
    s = s.clone().requires_grad_()
    c = c.clone()
    loss, ent, tsum = fn(s, t, c, ncrops, 0.1, 0.04, 0.9, **kw)
    loss.backward(grad_out)
    return loss.detach().double(), ent.double(), tsum.double(), c.double(), s.grad.double()


def _close(out, ref, ref64, eps, what):
    """|out - ref64| <= 2 |ref - ref64| + eps * max|ref64|: the reference's own error sets the budget."""
    err = (out - ref64).abs()
    budget = 2 * (ref - ref64).abs() + eps * ref64.abs().max().clamp_min(1.0)
    assert (err <= budget).all(), f"{what}: max err {err.max().item():.3g}, budget {budget.min().item():.3g}"


CASES = [  # B, K, ncrops, dtype, block_k, group_b
    (3, 1000, 5, torch.float32, 256, 2),  # K % block != 0, odd number of locals, partial last group
    (1, 300, 2, torch.float32, 128, None),  # B = 1, no local crops
    (4, 513, 6, torch.bfloat16, 128, 3),
    (2, 77, 4, torch.float16, 32, 1),  # K below one tile of the default config
    (2, 1500, 12, torch.bfloat16, None, None),  # 2 + 10 crops, launch heuristics
]


@pytest.mark.parametrize("B,K,ncrops,dtype,block_k,group_b", CASES)
def test_fused_matches_reference(B, K, ncrops, dtype, block_k, group_b):
    s, t, c = _inputs(B, K, ncrops, dtype, seed=B * 1000 + K)
    grad_out = torch.tensor(0.7, device=DEV)  # not 1: the upstream gradient must be applied
    out = _run(dino_loss, s, t, c, ncrops, grad_out, block_k=block_k, group_b=group_b)
    ref = _run(dino_loss_ref, s, t, c, ncrops, grad_out)
    ref64 = _run(dino_loss_ref, s.double(), t.double(), c, ncrops, grad_out.double())
    eps = EPS[dtype]
    for name, o, r, r64 in zip(("loss", "entropy", "teacher_sum", "center", "grad"), out, ref, ref64):
        _close(o, r, r64, eps if name == "grad" else 1e-5, name)
    # the center moved (the update was applied, not skipped)
    assert (out[3] - c.double()).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_formulation_matches_reference(dtype):
    s, t, c = _inputs(3, 200, 5, dtype, seed=7)
    grad_out = torch.tensor(1.3, device=DEV, dtype=dtype)
    out = _run(dino_loss_torch, s, t, c, 5, grad_out)
    ref = _run(dino_loss_ref, s, t, c, 5, grad_out)
    ref64 = _run(dino_loss_ref, s.double(), t.double(), c, 5, grad_out.double())
    for name, o, r, r64 in zip(("loss", "entropy", "teacher_sum", "center", "grad"), out, ref, ref64):
        _close(o, r, r64, 1e-5 if dtype == torch.float32 else 1e-12, name)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees the inf/nan
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_center_update_skipped_when_loss_not_finite(bad):
    s, t, c = _inputs(2, 100, 4, torch.float32, seed=3)
    s[5, 17] = float(bad)
    c0 = c.clone()
    loss, _, tsum = dino_loss(s, t, c, 4, 0.1, 0.04, 0.9, block_k=64)
    assert not torch.isfinite(loss)
    assert torch.equal(c, c0)  # gated on device
    torch.testing.assert_close(tsum, t.float().sum(0), rtol=1e-5, atol=1e-5)


def test_no_center_update_without_momentum():
    s, t, c = _inputs(2, 100, 3, torch.float32, seed=4)
    c0 = c.clone()
    dino_loss(s, t, c, 3, 0.1, 0.04, None, block_k=64)
    assert torch.equal(c, c0)


def test_bad_inputs_raise():
    s, t, c = _inputs(2, 64, 4, torch.float32, seed=5)
    with pytest.raises(ValueError, match="ncrops"):
        dino_loss(s, t, c, 3, 0.1, 0.04)
    with pytest.raises(ValueError, match="teacher_output"):
        dino_loss(s, t[:3], c, 4, 0.1, 0.04)
    with pytest.raises(ValueError, match="center"):
        dino_loss(s, t, c[:, :10], 4, 0.1, 0.04)


@pytest.mark.skipif(DEV == "cuda", reason="CPU-only check")
def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    s, t, c = _inputs(2, 64, 4, torch.float32, seed=6)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dino_loss(s, t, c, 4, 0.1, 0.04)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation for real GPUs (no GPU needed): every kernel, real sizes' constexprs.
# In a subprocess without TRITON_INTERPRET: the interpreter's patches of triton.language break the
# code generator in the same process.
# ---------------------------------------------------------------------------------------------
_AOT_SCRIPT = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
sys.path.insert(0, sys.argv[1])
import fastdino
jobs = json.loads(sys.stdin.read())
out = []
for module, kernel, types, constexprs, num_warps, capability in jobs:
    fn = getattr(importlib.import_module(module), kernel)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        ty = types[name]
        if ty.endswith(":16"):  # the divisibility by 16 the JIT infers for aligned pointers/strides
            ty = ty[:-3]
            attrs[(i,)] = [["tt.divisibility", 16]]
        signature[name] = ty
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = num_warps if isinstance(num_warps, dict) else {"num_warps": num_warps}
    c = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    ptx = c.asm["ptx"]
    target = [line.split()[1] for line in ptx.splitlines() if line.startswith(".target")][0]
    out.append({"kernel": kernel, "target": target, "vector_loads": "ld.global.v4" in ptx,
                "local_memory": "ld.local" in ptx, "shared": c.metadata.shared})
print(json.dumps(out))
"""


def aot_compile(jobs):
    """Compile [(module, kernel, types, constexprs, num_warps or options dict, capability)] for real
    GPUs; returns per job: target, vectorized loads, local-memory spills, shared memory bytes."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, root], input=json.dumps(jobs), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _loss_jobs():
    """Every kernel at the real sizes' constexprs: the launch table's configs and the sweep's range."""
    from fastdino.kernels.dino_loss import BWD_CONFIG, FWD_CONFIG

    f32 = "*fp32:16"
    common = {"B": "i32", "K": "i32:16", "n_views": "i32", "group_b": "i32", "n_tiles": "i32",
              "stride_s": "i32:16", "stride_t": "i32:16", "stride_ds": "i32:16",
              "s_scale": "fp32", "t_scale": "fp32", "grad_scale": "fp32"}
    combine = {"SStat_ptr": f32, "TStat_ptr": f32, "Lse_ptr": f32, "RowStat_ptr": f32,
               "B": "i32", "n_views": "i32", "n_tiles": "i32", "inv_student_temp": "fp32"}
    center = {"RowStat_ptr": f32, "TSumPart_ptr": f32, "C_ptr": f32, "Res_ptr": f32, "B": "i32", "K": "i32:16",
              "n_groups": "i32", "loss_scale": "fp32", "ent_scale": "fp32", "center_momentum": "fp32",
              "count": "fp32"}
    mod = "fastdino.kernels.dino_loss"
    jobs = []
    for cap in (80, 90):
        for dt, size in (("bf16", 2), ("fp32", 4)):
            p = f"*{dt}:16"
            configs = {FWD_CONFIG[size], BWD_CONFIG[size], (2048, 8, 8)}  # table + the sweep's largest
            for block_k, rows, nw in sorted(configs):
                jobs.append((mod, "_dino_loss_fwd_kernel", {**common, "S_ptr": p, "T_ptr": p, "C_ptr": f32,
                             "SStat_ptr": f32, "TStat_ptr": f32, "TSumPart_ptr": f32},
                             {"BLOCK_K": block_k, "ROWS": rows}, nw, cap))
                jobs.append((mod, "_dino_loss_bwd_kernel", {**common, "S_ptr": p, "T_ptr": p, "C_ptr": f32,
                             "Lse_ptr": f32, "GradOut_ptr": f32, "DS_ptr": p},
                             {"BLOCK_K": block_k, "ROWS": rows}, nw, cap))
        jobs.append((mod, "_dino_loss_combine_kernel", combine, {"BLOCK_T": 256, "V_BLOCK": 16}, 8, cap))
        for update in (True, False):
            jobs.append((mod, "_dino_center_kernel", center,
                         {"UPDATE_CENTER": update, "BLOCK_B": 64, "G_BLOCK": 8, "BLOCK": 512}, 4, cap))
    return jobs


def test_aot_compile_sm80_sm90a():
    results = aot_compile(_loss_jobs())
    assert {r["target"] for r in results} == {"sm_80", "sm_90a"}
    for r in results:
        assert not r["local_memory"], f"{r['kernel']} ({r['target']}) spills to local memory"
        if r["kernel"] in ("_dino_loss_fwd_kernel", "_dino_loss_bwd_kernel"):
            assert r["vector_loads"], f"{r['kernel']} ({r['target']}): S/T loads are not 16-byte vectorized"


def test_benchmark_script_runs(tmp_path):
    """benchmarks/loss.py on CPU (reference and torch variants), as CI runs it."""
    import importlib.util
    import json
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "loss.py")
    spec = importlib.util.spec_from_file_location("bench_loss", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "loss.json"
    rows = bench.main(["--quick", "--cpu", "--B", "2", "--K", "512", "--crops", "2+1", "--json", str(out)])
    assert [r["variant"] for r in rows] == ["reference", "torch"]
    assert all(r["ms"] > 0 and r["GBps"] > 0 for r in rows)
    assert json.loads(out.read_text())[1]["speedup"] > 0


@pytest.mark.skipif(DEV != "cuda", reason="real sizes: CUDA only (the AOT test covers them on CPU)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("launch", [{}, {"block_k": 512, "rows": 2, "num_warps": 4, "group_b": 3},
                                    {"block_k": 2048, "rows": 8, "num_warps": 8, "group_b": 16}])
def test_real_size_matches_reference_cuda(dtype, launch):
    """B=64, K=65536, 2+10 crops: the launch table and the sweep's corner configs."""
    s, t, c = _inputs(64, 65536, 12, dtype, seed=11)
    grad_out = torch.tensor(0.7, device=DEV)
    out = _run(dino_loss, s, t, c, 12, grad_out, **launch)
    ref = _run(dino_loss_torch, s, t, c, 12, grad_out)
    ref64 = _run(dino_loss_torch, s.double(), t.double(), c, 12, grad_out.double())
    for name, o, r, r64 in zip(("loss", "entropy", "teacher_sum", "center", "grad"), out, ref, ref64):
        _close(o, r, r64, EPS[dtype] if name == "grad" else 1e-5, name)
