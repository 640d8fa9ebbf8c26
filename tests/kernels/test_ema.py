"""Teacher EMA: the flat Triton kernel and every TeacherUpdater impl equal the official
per-parameter loop; momentum == 1 keeps the teacher bit-for-bit; the kernel compiles for sm_80/sm_90a."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from fastdino.flat import FlatParams
from fastdino.kernels.ema import ema_flat_, ema_ref
from fastdino.teacher import TeacherUpdater, ema_update_loop

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = [(7,), (13, 5), (3, 4, 5), (1,), (301,), (17, 33), (0,), (1, 1, 9)]
# a few ulps: the Triton interpreter truncates to bf16/fp16 (a GPU rounds), over three steps
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=3e-3, atol=3e-3)}


def _pair(dtypes, seed=0):
    """Student and teacher parameter lists of odd shapes, dtypes cycling through `dtypes`."""
    g = torch.Generator().manual_seed(seed)
    student, teacher = [], []
    for i, shape in enumerate(SHAPES):
        dt = dtypes[i % len(dtypes)]
        student.append(nn.Parameter(torch.randn(shape, generator=g).to(DEVICE, dt)))
        teacher.append(nn.Parameter(torch.randn(shape, generator=g).to(DEVICE, dt), requires_grad=False))
    return student, teacher


def _assert_close_ulp(out, ref, dtype):
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("t_dtype,s_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.bfloat16), (torch.float16, torch.float16)])
@pytest.mark.parametrize("half", [False, True])
def test_ema_kernel_matches_ref(t_dtype, s_dtype, half):
    n = 4096 + 1013  # two programs, a masked tail
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(n, generator=g).to(DEVICE, t_dtype)
    student = torch.randn(n, generator=g).to(DEVICE, s_dtype)
    m = torch.tensor(0.9, device=DEVICE)
    # the fp32 EMA value, before any rounding to the teacher's dtype: t*m + (1-m)*s as written, and
    # with either product fused into an FMA (the kernel compiles with fp fusion on), exact in fp64
    t32, s32, m32 = teacher.float(), student.float(), m.float()
    new32 = [t32 * m32 + (1 - m32) * s32,
             (t32.double() * m32.double() + ((1 - m32) * s32).double()).float(),
             ((1 - m32).double() * s32.double() + (t32 * m32).double()).float()]
    ref_t, ref_h = teacher.clone(), torch.empty(n, dtype=torch.bfloat16, device=DEVICE) if half else None
    out_h = torch.empty(n, dtype=torch.bfloat16, device=DEVICE) if half else None
    ema_ref(ref_t, student, m, ref_h)
    ema_flat_(teacher, student, m, out_h)
    _assert_close_ulp(teacher, ref_t, t_dtype)
    if half:
        _assert_close_ulp(out_h, ref_h, torch.bfloat16)
        if CUDA:  # the Triton interpreter truncates fp32 -> bf16; on a GPU it rounds to nearest, as torch
            if t_dtype == torch.float32:  # the copy is the stored teacher, rounded once
                assert torch.equal(out_h, teacher.to(torch.bfloat16))
            else:  # one rounding from the fp32 value, not bf16(fp16(value)) through the stored teacher
                single = [v.to(torch.bfloat16) for v in new32]
                assert torch.stack([out_h == h for h in single]).any(0).all()
                if t_dtype == torch.float16:  # and the two roundings differ here: the check can tell
                    assert not torch.equal(teacher.to(torch.bfloat16), single[0])


def test_ema_kernel_momentum_one_is_bitwise_noop_even_with_nan_student():
    teacher = torch.randn(3000, device=DEVICE)
    teacher[::7] = -0.0  # the sign of zero survives too
    student = torch.full_like(teacher, float("nan"))
    half = teacher.to(torch.bfloat16)
    t0, h0 = teacher.clone(), half.clone()
    for fn in (ema_flat_, ema_ref):
        fn(teacher, student, torch.ones((), device=DEVICE), half)
        assert torch.equal(teacher.view(torch.int32), t0.view(torch.int32))
        assert torch.equal(half.view(torch.int16), h0.view(torch.int16))


def _updater_inputs(impl, dtypes, seed=0):
    student, teacher = _pair(dtypes, seed)
    ref_t = [p.detach().clone() for p in teacher]
    if impl in ("flat_triton", "foreach_flat"):
        fs, ft = FlatParams(student), FlatParams(teacher, grads=False)
        return TeacherUpdater(ft, fs, impl="flat_triton" if impl == "flat_triton" else "foreach"), student, teacher, ref_t
    return TeacherUpdater(teacher, student, impl=impl), student, teacher, ref_t


IMPLS = ["flat_triton", "foreach_flat", "multi_tensor", "foreach", "loop"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("momentum_kind", ["float", "tensor"])
def test_updater_matches_loop_mixed_dtypes(impl, momentum_kind):
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float16]
    upd, student, teacher, ref_t = _updater_inputs(impl, dtypes)
    for step, m in enumerate((0.9, 0.996, 0.5)):
        mom = torch.tensor(m, device=DEVICE) if momentum_kind == "tensor" else m
        upd.step(mom)
        ema_update_loop(ref_t, student, mom)
        with torch.no_grad():  # the student moves between steps, as training does
            for p in student:
                p.add_(0.1 * torch.randn_like(p))
    for i, (out, ref) in enumerate(zip(teacher, ref_t)):
        _assert_close_ulp(out, ref, ref.dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_updater_momentum_one_keeps_teacher_bitwise(impl):
    upd, student, teacher, _ = _updater_inputs(impl, [torch.float32, torch.bfloat16])
    before = [p.detach().clone() for p in teacher]
    upd.step(torch.ones((), device=DEVICE))
    upd.step(1.0)
    for p, b in zip(teacher, before):
        assert torch.equal(p, b)
    if impl in ("flat_triton", "foreach_flat", "loop"):  # these select the old value: NaN cannot leak in
        with torch.no_grad():
            for p in student:
                p.fill_(float("nan"))
        upd.step(torch.ones((), device=DEVICE))
        for p, b in zip(teacher, before):
            assert torch.equal(p, b)


@pytest.mark.parametrize("impl", ["flat_triton", "foreach"])
def test_teacher_bf16_copy_for_forward(impl):
    torch.manual_seed(0)
    student, teacher = nn.Linear(11, 6).to(DEVICE), nn.Linear(11, 6).to(DEVICE)
    fs, ft = FlatParams(student), FlatParams(teacher, grads=False)
    upd = TeacherUpdater(ft, fs, impl=impl, teacher_copy_dtype=torch.bfloat16)
    for name, p in teacher.named_parameters():
        assert torch.equal(upd.teacher_copy[name], p.detach().to(torch.bfloat16))
    upd.step(torch.tensor(0.7, device=DEVICE))
    exact = CUDA or impl == "foreach"  # the Triton interpreter truncates fp32 -> bf16 (a GPU rounds)
    for name, p in teacher.named_parameters():
        assert upd.teacher_copy[name].dtype == torch.bfloat16
        if exact:
            assert torch.equal(upd.teacher_copy[name], p.detach().to(torch.bfloat16))
        else:
            _assert_close_ulp(upd.teacher_copy[name], p.detach(), torch.bfloat16)
    x = torch.randn(3, 11, device=DEVICE, dtype=torch.bfloat16)
    out = torch.func.functional_call(teacher, upd.teacher_copy, (x,))
    torch.testing.assert_close(out.float(), teacher(x.float()), rtol=3e-2, atol=3e-2)
    teacher.load_state_dict(student.state_dict())  # a checkpoint load: views kept, copy stale until refreshed
    upd.refresh_copy()
    for name, p in teacher.named_parameters():
        assert torch.equal(upd.teacher_copy[name], p.detach().to(torch.bfloat16))


def test_updater_refuses_bad_input():
    student, teacher = _pair([torch.float32])
    with pytest.raises(ValueError, match="impl='fast'"):
        TeacherUpdater(teacher, student, impl="fast")
    with pytest.raises(ValueError, match="8 teacher parameters but 7"):
        TeacherUpdater(teacher, student[:-1])
    with pytest.raises(ValueError, match="flat_triton.*FlatParams"):
        TeacherUpdater(teacher, student, impl="flat_triton")
    with pytest.raises(ValueError, match="teacher_copy_dtype"):
        TeacherUpdater(teacher, student, impl="foreach", teacher_copy_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="parameter 1 is"):
        TeacherUpdater(teacher, [student[0], student[2]] + student[2:])
    with pytest.raises(ValueError, match="0-dim"):
        ema_flat_(torch.zeros(4), torch.zeros(4), torch.zeros(2))


def test_flat_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if CUDA:
        pytest.skip("CPU-only check")
    student, teacher = _pair([torch.float32])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA parameters"):
        TeacherUpdater(FlatParams(teacher, grads=False), FlatParams(student), impl="flat_triton")


@pytest.mark.skipif(not CUDA, reason="native CUDA: large buffers and CUDA-graph capture")
def test_flat_ema_cuda_large_graph_and_no_sync():
    n = 25_000_003
    teacher, student = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    half = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    m = torch.tensor(0.99, device="cuda")
    ref = teacher.clone()
    ema_ref(ref, student, m)
    torch.cuda.set_sync_debug_mode("error")
    try:
        ema_flat_(teacher, student, m, half)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(teacher, ref, rtol=1e-6, atol=1e-6)
    # captured in a CUDA graph, the momentum is read from device memory at replay
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ema_flat_(teacher, student, m, half)
    for value in (0.5, 1.0):
        m.fill_(value)
        ema_ref(ref, student, m)
        graph.replay()
        torch.testing.assert_close(teacher, ref, rtol=1e-6, atol=1e-6)


AOT_SCRIPT = r"""
import json, re, sys
sys.path.insert(0, sys.argv[1])
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
import fastdino
from fastdino.kernels import ema
fn = ema._ema_kernel
fn = fn if isinstance(fn, triton.runtime.jit.JITFunction) else triton.runtime.jit.JITFunction(fn.fn)
out = []
for cap in (80, 90):
    for t, s, h, half in (("fp32", "fp32", "bf16", True), ("bf16", "fp32", "bf16", False)):
        sig = {"T_ptr": "*" + t, "S_ptr": "*" + s, "H_ptr": "*" + h, "M_ptr": "*fp32", "N": "i64",
               "BLOCK": "constexpr", "WRITE_HALF": "constexpr"}
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(5)}  # what the launcher specializes to
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs={"BLOCK": 4096, "WRITE_HALF": half}, attrs=attrs),
                           target=GPUTarget("cuda", cap, 32), options={"num_warps": 8})
        ptx = k.asm["ptx"]
        out.append({"cap": cap, "t": t, "target": re.findall(r"\.target (\w+)", ptx)[0],
                    "vector_loads": len(re.findall(r"ld\.global[\w:.]*\.v\d", ptx)), "cubin": len(k.asm["cubin"])})
print(json.dumps(out))
"""


def test_ema_kernel_compiles_ahead_of_time_sm80_sm90a():
    """Compiled in a clean process: the Triton interpreter (TRITON_INTERPRET=1) patches the language
    and would break a real compile in this one."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", AOT_SCRIPT, ROOT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert {(o["cap"], o["target"]) for o in out} == {(80, "sm_80"), (90, "sm_90a")}
    for o in out:
        assert o["cubin"] > 0 and o["vector_loads"] >= 2, o  # teacher and student loads vectorize
