"""Teacher EMA: the flat Triton kernel and the foreach version equal the reference ema_ref on fresh
random inputs (fp32/bf16/fp16, odd sizes, FlatParams buffers with padding); momentum == 1 keeps the
teacher bit-for-bit even with a NaN student; the custom op passes opcheck and traces under
torch.compile(fullgraph=True) with the clipping op; the kernel compiles for sm_80/sm_90a."""
import os

import pytest
import torch
import torch.nn as nn

from fastdino.flat import FlatParams
from fastdino.kernels.clip_grad import SegmentTable, clip_grad_flat_, clip_grad_per_tensor_ref
from fastdino.kernels.ema import ema_flat_, ema_foreach_, ema_ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
SHAPES = [(7,), (13, 5), (3, 4, 5), (1,), (301,), (17, 33), (0,), (1, 1, 9)]


def _randn(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(DEVICE, dtype)


def _assert_ema_close(out, ref, teacher, student, m, math_dtype=F32):
    """Tolerance from the reference's own error (STYLE.md): |out - ref64| <= 2 |ref - ref64| + atol,
    ref64 the reference in fp64; atol = one ulp of the output dtype (the interpreter truncates to
    bf16/fp16 where a GPU rounds) + the rounding bound of m t + (1 - m) s evaluated in `math_dtype`
    in any order (FMA on a GPU). teacher, student: the inputs before the update."""
    t64, s64 = teacher.double(), student.double()
    m64 = m.double() if torch.is_tensor(m) else torch.tensor(m, dtype=torch.float64)
    ref64 = t64.clone()
    ema_ref([ref64], [s64], m64.to(ref64.device))
    err = (out.double() - ref64).abs()
    atol = (torch.finfo(out.dtype).eps * ref64.abs() + 4 * torch.finfo(math_dtype).eps * (t64.abs() + s64.abs())
            + torch.finfo(out.dtype).tiny)
    bound = 2 * (ref.double() - ref64).abs() + atol
    assert (err <= bound).all(), f"max |out - ref64| - bound = {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("t_dtype,s_dtype", [(F32, F32), (BF16, F32), (F32, BF16), (F16, F16), (BF16, BF16)])
@pytest.mark.parametrize("n,block", [(0, None), (1, 1024), (2 * 1024 + 77, 1024), (5000, None)])
def test_ema_flat_matches_ref(t_dtype, s_dtype, n, block):
    """n = 2 * 1024 + 77: three programs and a masked tail; block None: the default."""
    g = torch.Generator().manual_seed(n)
    teacher, student = _randn(n, t_dtype, g), _randn(n, s_dtype, g)
    t0 = teacher.clone()
    m = torch.tensor(0.9, device=DEVICE)
    ref = teacher.clone()
    ema_ref([ref], [student], m)
    ema_flat_(teacher, student, m, block=block)
    _assert_ema_close(teacher, ref, t0, student, m)


@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_momentum_one_keeps_teacher_bitwise_even_with_nan_student(dtype):
    g = torch.Generator().manual_seed(0)
    teacher = _randn(3000, dtype, g)
    teacher[::7] = -0.0  # the sign of zero survives too
    bits = {F32: torch.int32, BF16: torch.int16, F16: torch.int16}[dtype]
    t0 = teacher.clone()
    nan = torch.full_like(teacher, float("nan"))
    for m in (torch.ones((), device=DEVICE), 1.0):
        ema_flat_(teacher, nan, m, block=1024)
        ema_ref([teacher], [nan], m)
        assert torch.equal(teacher.view(bits), t0.view(bits))
    finite = _randn(3000, dtype, g)  # the foreach version adds 0 * (s - t): exact for a finite student
    ema_foreach_([teacher], [finite], torch.ones((), device=DEVICE))
    assert torch.equal(teacher, t0)


def test_momentum_zero_copies_the_student_exactly():
    """t * 0 + 1 * s is exact: flat kernel and reference give the student, rounded to the teacher's dtype."""
    g = torch.Generator().manual_seed(1)
    for t_dtype, s_dtype in ((F32, F32), (BF16, BF16), (F32, F16)):
        student = _randn(1111, s_dtype, g)
        for fn in (lambda t: ema_flat_(t, student, 0.0, block=512), lambda t: ema_ref([t], [student], 0.0)):
            teacher = _randn(1111, t_dtype, g)
            fn(teacher)
            assert torch.equal(teacher, student.to(t_dtype))


def _modules(seed):
    """Student and teacher with parameters of odd shapes in fp32, bf16 and fp16 (three flat buffers)."""
    torch.manual_seed(seed)
    student = nn.ModuleList([nn.Linear(13, 5), nn.LayerNorm(7), nn.Conv2d(3, 4, 3), nn.Linear(1, 301)])
    student[1].to(BF16)
    student[3].to(F16)
    teacher = nn.ModuleList([nn.Linear(13, 5), nn.LayerNorm(7), nn.Conv2d(3, 4, 3), nn.Linear(1, 301)])
    teacher[1].to(BF16)
    teacher[3].to(F16)
    student.to(DEVICE), teacher.to(DEVICE)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


@pytest.mark.parametrize("momentum_kind", ["float", "tensor"])
def test_ema_flat_on_flatparams_buffers_equals_ref_per_parameter(momentum_kind):
    """The engine's layout: one launch per FlatParams buffer equals the reference over the parameter
    list, segment by segment; the zero padding between segments stays zero."""
    student, teacher = _modules(0)
    fs, ft = FlatParams(student), FlatParams(teacher, grads=False)
    assert fs.layout() == ft.layout() and len(ft.buffers) == 3
    for m in (0.9, 0.996, 0.5):
        m = torch.tensor(m, device=DEVICE) if momentum_kind == "tensor" else m
        t0 = [p.detach().clone() for p in ft.params]
        ref = [p.clone() for p in t0]
        ema_ref(ref, fs.params, m)
        for tb, sb in zip(ft.buffers, fs.buffers):
            ema_flat_(tb.data, sb.data, m, block=256)
        for out, r, t, s in zip(ft.params, ref, t0, fs.params):
            _assert_ema_close(out, r, t, s.detach(), m)
        with torch.no_grad():  # the student moves between steps, as training does
            for p in fs.params:
                p.add_(0.1 * torch.randn_like(p))
    ft.check()
    for buf in ft.buffers:
        pad = torch.ones_like(buf.data, dtype=torch.bool)
        for s, e in buf.segments(padded=False):
            pad[s:e] = False
        assert not buf.data[pad].any()


@pytest.mark.parametrize("momentum_kind", ["float", "tensor"])
def test_ema_foreach_matches_ref_mixed_dtypes(momentum_kind):
    g = torch.Generator().manual_seed(2)
    dtypes = [(F32, F32), (BF16, F32), (F32, BF16), (F16, F16), (BF16, BF16)]
    teacher = [_randn(shape, dtypes[i % 5][0], g) for i, shape in enumerate(SHAPES)]
    student = [nn.Parameter(_randn(shape, dtypes[i % 5][1], g)) for i, shape in enumerate(SHAPES)]
    m = torch.tensor(0.996, device=DEVICE) if momentum_kind == "tensor" else 0.996
    t0 = [t.clone() for t in teacher]
    ref = [t.clone() for t in teacher]
    ema_ref(ref, student, m)
    ema_foreach_(teacher, student, m)
    for out, r, t, s in zip(teacher, ref, t0, student):
        # foreach rounds s - t and its product with 1 - m in the promoted dtype of the pair
        _assert_ema_close(out, r, t, s.detach(), m, math_dtype=torch.promote_types(t.dtype, s.dtype))


@pytest.mark.parametrize("t_dtype,s_dtype", [(F32, F32), (BF16, F32)])
def test_ema_flat_op_opcheck(t_dtype, s_dtype):
    g = torch.Generator().manual_seed(3)
    args = (_randn(50, t_dtype, g), _randn(50, s_dtype, g), torch.tensor(0.9, device=DEVICE), 32, 4)
    torch.library.opcheck(torch.ops.fastdino.ema_flat_.default, args)


def test_ema_refuses_bad_input():
    z = torch.zeros(4, device=DEVICE)
    with pytest.raises(ValueError, match="0-dim"):
        ema_flat_(z, z, torch.zeros(2, device=DEVICE))
    with pytest.raises(ValueError, match="teacher must be a 1-D contiguous"):
        ema_flat_(torch.zeros(2, 2, device=DEVICE), z, 0.9)
    with pytest.raises(ValueError, match="student must be a 1-D contiguous"):
        ema_flat_(z, torch.zeros(8, device=DEVICE)[::2], 0.9)
    with pytest.raises(ValueError, match="student has 5 elements"):
        ema_flat_(z, torch.zeros(5, device=DEVICE), 0.9)
    with pytest.raises(ValueError, match="dtype torch.float64"):
        ema_flat_(z.double(), z, 0.9)
    with pytest.raises(ValueError, match="sequences of tensors"):
        ema_ref(z, z, 0.9)
    with pytest.raises(ValueError, match="2 teacher tensors but 1"):
        ema_foreach_([z, z], [z], 0.9)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # torch's own, importing inductor
def test_clip_and_ema_step_compiles_fullgraph_and_equals_eager():
    """Clip then EMA on flat buffers, as the step does, under torch.compile(fullgraph=True): no
    graph break, the ops run in place (inductor calls them on the inputs, no copies), bit-for-bit
    equal to eager, and a new momentum value (device data) does not recompile."""
    from torch._inductor.utils import run_and_get_code

    g = torch.Generator().manual_seed(4)
    sizes = [5, 300, 0, 64, 77]
    ends = torch.tensor([(n + 15) // 16 * 16 for n in sizes]).cumsum(0).tolist()
    starts = [0] + ends[:-1]
    table = SegmentTable(list(zip(starts, ends)), DEVICE, chunk=64)
    student, teacher0 = _randn(ends[-1], F32, g), _randn(ends[-1], BF16, g)
    grad0 = torch.zeros(ends[-1], device=DEVICE)  # segments padded with zeros, as FlatParams lays them out
    for s, n in zip(starts, sizes):
        grad0[s:s + n] = _randn(n, F32, g, 0.2)

    def step(teacher, student, grad, m):
        norms = clip_grad_flat_(grad, table, 1.0)
        ema_flat_(teacher, student, m)
        return norms

    compiled = torch.compile(step, fullgraph=True)
    torch._dynamo.reset()
    for i, value in enumerate((0.9, 0.5)):
        m = torch.tensor(value, device=DEVICE)
        t_e, g_e, t_c, g_c = teacher0.clone(), grad0.clone(), teacher0.clone(), grad0.clone()
        n_e = step(t_e, student, g_e, m)
        if i == 0:
            n_c, (code,) = run_and_get_code(compiled, t_c, student, g_c, m)
            call = code[code.index("def call("):]
            assert "torch.ops.fastdino.clip_grad_flat_.default(" in call and "torch.ops.fastdino.ema_flat_.default(" in call
            assert ".copy_(" not in call and "clone" not in call, call  # reinplaced: no buffer copies
        else:
            with torch.compiler.set_stance("fail_on_recompile"):
                n_c = compiled(t_c, student, g_c, m)
        assert torch.equal(t_c, t_e) and torch.equal(g_c, g_e) and torch.equal(n_c, n_e)
    norms_ref = clip_grad_per_tensor_ref([grad0[s:s + n].clone() for s, n in zip(starts, sizes)], 1.0)
    assert (norms_ref > 1).any() and (norms_ref < 1).any()  # both branches of the clip taken
    torch.testing.assert_close(n_e, norms_ref, rtol=1e-5, atol=0)


@pytest.mark.skipif(not CUDA, reason="native CUDA: large buffers, no host sync, CUDA-graph capture")
def test_ema_flat_cuda_large_graph_and_no_sync():
    n = 25_000_003
    teacher, student = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    m = torch.tensor(0.99, device="cuda")
    t0, ref = teacher.clone(), teacher.clone()
    ema_ref([ref], [student], m)
    torch.cuda.set_sync_debug_mode("error")
    try:
        ema_flat_(teacher, student, m)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    _assert_ema_close(teacher, ref, t0, student, m)
    # captured in a CUDA graph, the momentum is read from device memory at replay
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ema_flat_(teacher, student, m)
    for value in (0.5, 1.0):
        m.fill_(value)
        t0, ref = teacher.clone(), teacher.clone()
        ema_ref([ref], [student], m)
        graph.replay()
        _assert_ema_close(teacher, ref, t0, student, m)


def test_ema_kernel_compiles_ahead_of_time_sm80_sm90a():
    """fp32 and bf16 teachers for sm_80 and sm_90a (tests/kernels/aot.py): vectorized loads, no spills."""
    from aot import aot_compile

    jobs = [("fastdino.kernels.ema", "_ema_kernel", {"T_ptr": f"*{t}:16", "S_ptr": "*fp32:16", "M_ptr": "*fp32:16",
                                                     "N": "i64:16"}, {"BLOCK": 4096}, 8, cap)
            for cap in (80, 90) for t in ("fp32", "bf16")]
    out = aot_compile(jobs)
    assert {o["target"] for o in out} == {"sm_80", "sm_90a"}
    for o in out:
        assert o["vector_loads"] and not o["local_memory"] and o["stack"] == 0, o  # loads vectorize, no spills
