"""csrc/ (fastdino._C): the .cu compiles with nvcc for sm_80 and sm_90a, the .cpp binding compiles
against the torch headers and links to the .cu's symbols; the Python side falls back to
torch._foreach_* with a logged note; on a GPU with the extension built, the ops equal the loops."""
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch
import torch.nn as nn

from fastdino import multi_tensor
from fastdino.clip import clip_gradients_loop
from fastdino.teacher import ema_update_loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU = os.path.join(ROOT, "csrc", "multi_tensor_kernel.cu")
CPP = os.path.join(ROOT, "csrc", "multi_tensor.cpp")
NVCC = shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc") or None
CXX = shutil.which("g++") or shutil.which("c++")


def _cuda_include() -> str:
    """The CUDA toolkit headers that sit beside nvcc (cuda_runtime_api.h for the binding)."""
    root = os.path.dirname(os.path.dirname(os.path.realpath(NVCC)))
    for cand in (os.path.join(root, "include"), "/usr/local/cuda/include"):
        if os.path.exists(os.path.join(cand, "cuda_runtime_api.h")):
            return cand
    pytest.skip("CUDA headers (cuda_runtime_api.h) not found beside nvcc")


def _torch_includes() -> list[str]:
    from torch.utils.cpp_extension import include_paths

    return [f"-I{p}" for p in include_paths()]


def _defined_symbols(obj: str) -> set[str]:
    out = subprocess.run(["nm", "-C", obj], capture_output=True, text=True, check=True).stdout
    return {line.split(" ", 2)[2] for line in out.splitlines() if re.match(r"^[0-9a-f]+ T ", line)}


def _undefined_fastdino_symbols(obj: str) -> set[str]:
    out = subprocess.run(["nm", "-C", obj], capture_output=True, text=True, check=True).stdout
    return {line.split("U ", 1)[1] for line in out.splitlines() if " U fastdino::" in line}


@pytest.fixture(scope="module")
def cu_object(tmp_path_factory):
    """nvcc -c for sm_80 and sm_90a (the kernels, the launcher and the dtype dispatch)."""
    if NVCC is None:
        pytest.skip("nvcc not found: the CUDA extension cannot be compiled on this machine")
    obj = str(tmp_path_factory.mktemp("nvcc") / "multi_tensor_kernel.o")
    # the flags torch's BuildExtension passes (no implicit half conversions) plus setup.py's
    cmd = [NVCC, "-c", CU, "-o", obj, "-std=c++17", "-O3", "--use_fast_math", "-Xcompiler", "-fPIC",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
           "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a", *_torch_includes()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "warning" not in res.stderr.lower(), res.stderr[-4000:]
    return obj


def test_cu_compiles_with_nvcc_for_sm80_and_sm90a(cu_object):
    cuobjdump = shutil.which("cuobjdump") or os.path.join(os.path.dirname(NVCC), "cuobjdump")
    if os.path.exists(cuobjdump):
        elf = subprocess.run([cuobjdump, "--list-elf", cu_object], capture_output=True, text=True).stdout
        assert "sm_80" in elf and "sm_90a" in elf, elf
    assert {"fastdino::mt_chunk_size()"} <= _defined_symbols(cu_object)


def test_cpp_binding_compiles_and_links_to_the_cu_symbols(cu_object, tmp_path):
    """g++ -c of the binding against the torch headers (a CPU torch lacks c10/cuda's generated
    macros header: C10_USING_CUSTOM_GENERATED_MACROS stands in); every fastdino:: symbol it needs
    is defined by the nvcc object, with the same signature."""
    if CXX is None:
        pytest.skip("no C++ compiler")
    std = "-std=c++20"  # what BuildExtension uses with torch >= 2.10; the binding is also valid C++17
    obj = str(tmp_path / "multi_tensor.o")
    cmd = [CXX, "-c", CPP, "-o", obj, std, "-O0", "-fPIC", "-DC10_USING_CUSTOM_GENERATED_MACROS",
           "-DTORCH_EXTENSION_NAME=_C", *_torch_includes(), f"-I{_cuda_include()}",
           f"-I{sysconfig.get_paths()['include']}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    needed = _undefined_fastdino_symbols(obj)
    assert len(needed) == 3, needed
    missing = needed - _defined_symbols(cu_object)
    assert not missing, f"binding declares symbols the .cu does not define: {missing}"


def _lists(dtypes, n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [(7,), (13, 5), (3, 4, 5), (1,), (301,), (0,), (17, 33), (1, 1, 9), (130,)]
    t, s = [], []
    for i in range(n):
        shape, dt = shapes[i % len(shapes)], dtypes[i % len(dtypes)]
        t.append(torch.randn(shape, generator=g).to(dev, dt))
        s.append(torch.randn(shape, generator=g).to(dev, dt))
    return t, s


def test_python_side_falls_back_to_foreach_with_a_note(caplog):
    if multi_tensor.available("cuda") and torch.cuda.is_available():
        pytest.skip("the extension is built and CUDA present: covered by the native test")
    multi_tensor._noted.clear()
    t, s = _lists([torch.float32, torch.bfloat16])
    ref = [x.clone() for x in t]
    with caplog.at_level(logging.INFO, logger="fastdino.multi_tensor"):
        multi_tensor.ema_lerp_(t, s, 0.9)
    assert any("ema_lerp_ runs torch._foreach_*" in r.getMessage() for r in caplog.records)
    ema_update_loop(ref, s, 0.9)
    for a, b in zip(t, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)
    ps = [nn.Parameter(x.clone()) for x in s]
    for p in ps:
        p.grad = torch.randn_like(p) * 5
    ref_ps = [nn.Parameter(p.detach().clone()) for p in ps]
    for p, q in zip(ref_ps, ps):
        p.grad = q.grad.clone()
    norms = multi_tensor.clip_grad_per_tensor_([p.grad for p in ps], 3.0)
    norms_ref = clip_gradients_loop(ref_ps, 3.0)
    torch.testing.assert_close(norms, torch.tensor(norms_ref, device=norms.device), rtol=1e-2, atol=1e-3)
    for p, q in zip(ps, ref_ps):
        torch.testing.assert_close(p.grad.float(), q.grad.float(), rtol=1e-2, atol=1e-3)


needs_c = pytest.mark.skipif(not (torch.cuda.is_available() and multi_tensor.HAVE_C),
                             reason="needs CUDA and fastdino._C (python setup.py build_ext --inplace)")


@needs_c
def test_c_ema_lerp_matches_loop_many_tensors_mixed_dtypes():
    # 100 tensors (> 48 slots per launch), mixed teacher/student dtypes, one tensor > 320 chunks
    t, s = _lists([torch.float32, torch.bfloat16, torch.float16], n=100)
    t.append(torch.randn(320 * 65536 + 4099, device="cuda"))
    s.append(torch.randn_like(t[-1]))
    t.append(torch.randn(33, device="cuda", dtype=torch.bfloat16))
    s.append(torch.randn(33, device="cuda"))  # bf16 teacher from an fp32 student
    ref = [x.clone() for x in t]
    m = torch.tensor(0.993, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        multi_tensor.ema_lerp_(t, s, m)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ema_update_loop(ref, s, m)
    for a, b in zip(t, ref):
        tol = 1e-6 if a.dtype == torch.float32 else 1e-2
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
    before = [x.clone() for x in t]
    for x in s:
        x.fill_(float("nan"))
    multi_tensor.ema_lerp_(t, s, torch.ones((), device="cuda"))
    assert all(torch.equal(a, b) for a, b in zip(t, before))


@needs_c
def test_c_clip_matches_loop_many_tensors_mixed_dtypes():
    t, _ = _lists([torch.float32, torch.bfloat16, torch.float16], n=100)
    t.append(torch.randn(320 * 65536 + 4099, device="cuda") * 1e-4)  # below the clip
    t.append(torch.randn(70000, device="cuda"))  # above
    ps = [nn.Parameter(x) for x in t]
    for i, p in enumerate(ps):
        p.grad = p.detach().clone() * (0.05, 1.0)[i % 2]
    ref = [nn.Parameter(p.detach().clone()) for p in ps]
    for p, q in zip(ref, ps):
        p.grad = q.grad.clone()
    # the kernel reports fp32 norms; the official loop's p.grad.norm() of a bf16/fp16 gradient is
    # itself rounded to bf16/fp16, so the norms are checked against fp32 norms of the same gradients
    norms_fp32 = torch.stack([p.grad.float().norm() for p in ps]).cpu()
    clip_gradients_loop(ref, 3.0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        norms = multi_tensor.clip_grad_per_tensor_([p.grad for p in ps], 3.0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(norms.float().cpu(), norms_fp32, rtol=1e-4, atol=1e-5)
    for p, q in zip(ps, ref):
        tol = 1e-5 if p.dtype == torch.float32 else 1e-2
        torch.testing.assert_close(p.grad.float(), q.grad.float(), rtol=tol, atol=tol)


@needs_c
def test_c_ops_trace_under_torch_compile():
    t, s = _lists([torch.float32], n=5)
    ref = [x.clone() for x in t]
    m = torch.tensor(0.9, device="cuda")

    @torch.compile(fullgraph=True)
    def step(t, s, m):
        torch.ops.fastdino.ema_lerp_(t, s, m)

    step(t, s, m)
    ema_update_loop(ref, s, m)
    for a, b in zip(t, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
