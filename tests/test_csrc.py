"""csrc/ (fastdino._C): the .cu compiles with nvcc for sm_80 and sm_90a, the .cpp binding compiles
against the torch headers and links to the .cu's symbols, and registers the schemas that
fastdino.multi_tensor expects; the Python side refuses (one line) without the extension or CUDA;
on a GPU with the extension built, the ops equal the references in kernels/ and trace under
torch.compile."""
import inspect
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

from fastdino import multi_tensor
from fastdino.kernels.clip_grad import clip_grad_per_tensor_ref
from fastdino.kernels.ema import ema_ref

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


def test_cpp_registers_the_schemas_multi_tensor_expects():
    """The m.def schemas parse, name the arguments of the Python wrappers, in order, and mark the
    teacher / grads lists as mutated (what torch.compile's functionalization relies on)."""
    src = open(CPP).read()
    defs = {name: schema for schema, name in re.findall(r'm\.def\("((\w+)\(.*?)"\)', src)}
    assert set(defs) == {"ema_lerp_", "clip_grad_per_tensor_"}, defs
    for name, fn, mutated in (("ema_lerp_", multi_tensor.ema_lerp_, "teacher"),
                              ("clip_grad_per_tensor_", multi_tensor.clip_grad_per_tensor_, "grads")):
        schema = torch._C.parse_schema("fastdino::" + defs[name])
        assert [a.name for a in schema.arguments] == list(inspect.signature(fn).parameters), schema
        writes = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        assert writes == [mutated], schema
    assert "TORCH_LIBRARY_FRAGMENT(fastdino" in src  # shares the namespace with kernels/ ops


def _lists(dtypes, n=9, seed=0, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7,), (13, 5), (3, 4, 5), (1,), (301,), (0,), (17, 33), (1, 1, 9), (130,)]
    t, s = [], []
    for i in range(n):
        shape, dt = shapes[i % len(shapes)], dtypes[i % len(dtypes)]
        t.append(torch.randn(shape, generator=g).to(device, dt))
        s.append(torch.randn(shape, generator=g).to(device, dt))
    return t, s


def test_python_side_refuses_without_the_extension_or_cuda():
    t, s = _lists([torch.float32], n=3, device="cpu")
    why = "is not built" if not multi_tensor.HAVE_C else "the kernels need CUDA"
    assert multi_tensor.HAVE_C or multi_tensor.WHY_NOT.startswith("fastdino._C is not built")
    with pytest.raises(RuntimeError, match=f"ema_lerp_: .*{why}"):
        multi_tensor.ema_lerp_(t, s, 0.9)
    with pytest.raises(RuntimeError, match=f"clip_grad_per_tensor_: .*{why}"):
        multi_tensor.clip_grad_per_tensor_(t, 1.0)


def _assert_close_to_ref64(out, ref, ref64, math_atol):
    """|out - ref64| <= 2 |ref - ref64| + one ulp of out's dtype + math_atol (STYLE.md)."""
    err = (out.double() - ref64).abs()
    bound = 2 * (ref.double() - ref64).abs() + torch.finfo(out.dtype).eps * ref64.abs() + math_atol
    assert (err <= bound).all(), f"max |out - ref64| - bound = {(err - bound).max().item():.3g}"


needs_c = pytest.mark.skipif(not (torch.cuda.is_available() and multi_tensor.HAVE_C),
                             reason="needs CUDA and fastdino._C (python setup.py build_ext --inplace)")


@needs_c
def test_c_ema_lerp_matches_ref_many_tensors_mixed_dtypes():
    # 100 tensors (> 48 slots per launch), mixed teacher/student dtypes, one tensor > 320 chunks
    t, s = _lists([torch.float32, torch.bfloat16, torch.float16], n=100)
    t.append(torch.randn(320 * 65536 + 4099, device="cuda"))
    s.append(torch.randn_like(t[-1]))
    t.append(torch.randn(33, device="cuda", dtype=torch.bfloat16))
    s.append(torch.randn(33, device="cuda"))  # bf16 teacher from an fp32 student
    ref, ref64 = [x.clone() for x in t], [x.double() for x in t]
    m = torch.tensor(0.993, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        multi_tensor.ema_lerp_(t, s, m)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ema_ref(ref, s, m)
    ema_ref(ref64, [x.double() for x in s], m.double())
    for a, r, r64, x in zip(t, ref, ref64, s):
        _assert_close_to_ref64(a, r, r64, 4 * torch.finfo(torch.float32).eps * (r64.abs() + x.double().abs()))
    before = [x.clone() for x in t]
    for x in s:
        x.fill_(float("nan"))
    multi_tensor.ema_lerp_(t, s, torch.ones((), device="cuda"))
    assert all(torch.equal(a, b) for a, b in zip(t, before))


@needs_c
def test_c_clip_matches_ref_many_tensors_mixed_dtypes():
    t, _ = _lists([torch.float32, torch.bfloat16, torch.float16], n=100)
    t.append(torch.randn(320 * 65536 + 4099, device="cuda") * 1e-4)  # below the clip
    t.append(torch.randn(70000, device="cuda"))  # above
    grads = [x * (0.05, 1.0)[i % 2] for i, x in enumerate(t)]
    ref, ref64 = [g.clone() for g in grads], [g.double() for g in grads]
    norms_ref, norms64 = clip_grad_per_tensor_ref(ref, 3.0), clip_grad_per_tensor_ref(ref64, 3.0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        norms = multi_tensor.clip_grad_per_tensor_(grads, 3.0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    # an fp32 sum of n squares in another order: log2 n ulps (blocked or pairwise), at least 8
    sum_eps = torch.finfo(torch.float32).eps * max(8, math.ceil(math.log2(max(g.numel() for g in grads))))
    _assert_close_to_ref64(norms, norms_ref, norms64, sum_eps * norms64)
    for g, r, r64 in zip(grads, ref, ref64):
        _assert_close_to_ref64(g, r, r64, sum_eps * r64.abs())


@needs_c
def test_c_ops_trace_under_torch_compile():
    t, s = _lists([torch.float32, torch.bfloat16], n=5)
    grads = [x * 10 for x in s]
    ref, ref_grads = [x.clone() for x in t], [g.clone() for g in grads]
    m = torch.tensor(0.9, device="cuda")

    @torch.compile(fullgraph=True)
    def step(t, s, grads, m):
        norms = multi_tensor.clip_grad_per_tensor_(grads, 3.0)
        multi_tensor.ema_lerp_(t, s, m)
        return norms

    norms = step(t, s, grads, m)
    ema_ref(ref, s, m)
    norms_ref = clip_grad_per_tensor_ref(ref_grads, 3.0)
    for a, b in zip(t + grads, ref + ref_grads):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(norms, norms_ref)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
