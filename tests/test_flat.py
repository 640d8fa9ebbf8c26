"""FlatParams: parameters and grads stay views into the flat buffers through backward, checkpoint
load, DDP wrapping and the engine's AdamW (fastdino.optim.DINOAdamW), whose device flags skip a
group (the frozen last layer) or a whole step exactly as setting grads to None / found_inf would."""
import copy
import gc
import io

import pytest
import torch
import torch.nn as nn

from fastdino.flat import ALIGN, FlatParams
from fastdino.optim import DINOAdamW

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def scalar(x) -> torch.Tensor:
    return torch.tensor(float(x), device=DEVICE)


def build_optimizer(params, lr=1e-2, weight_decay=0.0, last=()):
    """The engine's optimizer: one decayed group, and the parameters in `last` as a last-layer group;
    lr and weight decay fixed, nothing skipped (set_inputs again to change that)."""
    last_ids = {id(p) for p in last}
    groups = [{"params": [p for p in params if id(p) not in last_ids], "regularized": True}]
    if last:
        groups.append({"params": list(last), "regularized": True, "last_layer": True})
    opt = DINOAdamW(groups)
    opt.set_inputs(scalar(lr), scalar(weight_decay), scalar(0), scalar(0))
    return opt


class Tiny(nn.Module):
    """Odd shapes, a frozen parameter (like the head's weight_g) and a 'last_layer'."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(7, 13)
        self.norm = nn.LayerNorm(13)
        self.cls = nn.Parameter(torch.randn(1, 1, 13))
        self.last_layer = nn.Linear(13, 5, bias=False)
        self.weight_g = nn.Parameter(torch.ones(5, 1), requires_grad=False)

    def forward(self, x):
        return self.last_layer(self.norm(self.embed(x) + self.cls[0])) * self.weight_g.T


def _model(seed=0):
    torch.manual_seed(seed)
    return Tiny().to(DEVICE)


def _assert_views(flat: FlatParams):
    flat.check()
    for buf in flat.buffers:
        for i, s in zip(buf.index, buf.starts):
            p = flat.params[i]
            assert s % ALIGN == 0
            assert p.data_ptr() == buf.data[s:].data_ptr()
            if p.requires_grad and buf.grad is not None and p.grad is not None:
                assert p.grad.data_ptr() == buf.grad[s:].data_ptr()


def test_views_and_values_preserved():
    model = _model()
    ref = copy.deepcopy(model)
    flat = FlatParams(model)
    _assert_views(flat)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n
        assert p.grad is not None if p.requires_grad else p.grad is None
    assert flat.params_with_grad == [p for p in model.parameters() if p.requires_grad]
    mask = torch.ones_like(flat.buffers[0].data, dtype=torch.bool)
    for s, e in flat.buffers[0].segments(padded=False):
        mask[s:e] = False
    assert (flat.buffers[0].data[mask] == 0).all() and mask.any()  # padding holds zeros


def test_backward_accumulates_into_flat_grads():
    model, ref = _model(), _model()
    flat = FlatParams(model)
    x = torch.randn(4, 7, device=DEVICE)
    for _ in range(2):  # two accumulations
        model(x).square().sum().backward()
        ref(x).square().sum().backward()
    _assert_views(flat)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, msg=n)
    flat.zero_grad()
    assert all((b.grad == 0).all() for b in flat.buffers if b.grad is not None)
    _assert_views(flat)


def test_checkpoint_load_keeps_views():
    model, other = _model(0), _model(1)
    flat = FlatParams(model)
    f = io.BytesIO()
    torch.save(other.state_dict(), f)
    f.seek(0)
    model.load_state_dict(torch.load(f, map_location=DEVICE))
    _assert_views(flat)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)
    buf = flat.buffers[0]
    k = next(k for k, i in enumerate(buf.index) if flat.params[i] is model.embed.weight)
    assert torch.equal(buf.data[buf.starts[k]:][:91], other.embed.weight.reshape(-1))  # the buffer holds it


def test_fused_adamw_step_on_views_matches_plain_and_reloads():
    model, ref = _model(), _model()
    flat = FlatParams(model)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.04)
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.04,
                                foreach=False)
    assert opt.defaults.get("fused"), "torch fused AdamW should run the update"
    x = torch.randn(6, 7, device=DEVICE)
    for _ in range(3):
        flat.zero_grad()
        opt_ref.zero_grad()
        model(x).square().mean().backward()
        ref(x).square().mean().backward()
        opt.step()
        opt_ref.step()
    _assert_views(flat)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    state = copy.deepcopy(opt.state_dict())
    assert all(v["step"].item() == 3 for v in state["state"].values())
    opt2 = build_optimizer([p for p in model.parameters() if p.requires_grad])
    opt2.load_state_dict(state)
    model(x).square().mean().backward()
    opt2.step()
    assert all(v["step"].item() == 4 for v in opt2.state_dict()["state"].values())  # the loaded state is stepped
    _assert_views(flat)


def test_frozen_last_layer_and_skip_flags():
    """last_layer_frozen = 1: the last-layer group gets no update at all (no Adam step, no weight
    decay, step count unchanged), as the official cancel_gradients_last_layer (grads set to None);
    the gradient views stay attached. skip = 1: nothing moves (the found_inf of a bad step)."""
    model = _model()
    flat = FlatParams(model)
    last = list(model.last_layer.parameters())
    opt = build_optimizer(flat.params_with_grad, lr=1e-2, weight_decay=0.1, last=last)
    x = torch.randn(6, 7, device=DEVICE)
    before = [p.detach().clone() for p in model.parameters()]
    opt.set_inputs(scalar(1e-2), scalar(0.1), scalar(0), scalar(1))
    flat.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    for p, b in zip(model.parameters(), before):
        changed = not torch.equal(p, b)
        assert changed == (p.requires_grad and all(p is not q for q in last))
    assert all(opt.state[p]["step"].item() == 0 and not opt.state[p]["exp_avg"].any() for p in last)
    _assert_views(flat)
    moved = [p.detach().clone() for p in model.parameters()]
    opt.set_inputs(scalar(1e-2), scalar(0.1), scalar(1), scalar(0))  # a bad step: nothing moves
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), moved))
    assert all(v["step"].item() in (0, 1) for v in opt.state.values())
    opt.set_inputs(scalar(1e-2), scalar(0.1), scalar(0), scalar(0))  # unfrozen
    opt.step()
    assert not torch.equal(model.last_layer.weight, before[3])
    assert all(opt.state[p]["step"].item() == 1 for p in last)


def test_ddp_wrapping_keeps_views(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    backend = "nccl" if DEVICE == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model, ref = _model(), _model()
        flat = FlatParams(model)
        ddp = DDP(model, device_ids=[0] if DEVICE == "cuda" else None)
        x = torch.randn(4, 7, device=DEVICE)
        ddp(x).square().sum().backward()
        ref(x).square().sum().backward()
        _assert_views(flat)
        for p, q in zip(model.parameters(), ref.parameters()):
            if p.requires_grad:
                torch.testing.assert_close(p.grad, q.grad)
    finally:
        # the reducer goes first, while its process group is alive: a gloo group whose last reference the
        # reducer drops (GIL held) can deadlock joining a worker thread that needs the GIL (seen in CI)
        ddp = None
        gc.collect()
        dist.destroy_process_group()


def test_mixed_dtypes_make_one_buffer_each():
    ps = [nn.Parameter(torch.randn(5, 3, device=DEVICE)), nn.Parameter(torch.randn(7, device=DEVICE).bfloat16()),
          nn.Parameter(torch.randn(2, 2, device=DEVICE))]
    vals = [p.detach().clone() for p in ps]
    flat = FlatParams(ps)
    assert sorted(str(b.dtype) for b in flat.buffers) == ["torch.bfloat16", "torch.float32"]
    assert all(torch.equal(p, v) for p, v in zip(ps, vals))
    _assert_views(flat)


def test_broken_views_are_detected_and_bad_input_refused():
    model = _model()
    flat = FlatParams(model)
    model.double()  # replaces .data: the views are gone
    with pytest.raises(RuntimeError, match="no longer a view"):
        flat.check()
    with pytest.raises(ValueError, match="'1'.*dtype"):
        FlatParams([torch.zeros(3), torch.zeros(3, dtype=torch.int64)])


def test_engine_step_matches_official_step():
    """The engine's update contract end to end, 6 steps: flat grads, per-tensor clip (Clipper), last
    layer frozen for the first 3 steps (device flag), DINOAdamW, EMA with a device momentum
    (TeacherEMA); step 4 has a non-finite loss, which must reach neither the student (skip flag) nor
    the teacher (momentum 1). Compared with the official step: the reference clip, p.grad = None,
    plain AdamW, the reference EMA, the bad step not taken. Triton impls under the interpreter/CUDA."""
    import os

    from fastdino.clip import Clipper
    from fastdino.kernels.clip_grad import clip_grad_per_tensor_ref
    from fastdino.kernels.ema import ema_ref
    from fastdino.teacher import TeacherEMA

    impl = "triton" if DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "foreach"
    student, ref_student = _model(0), _model(0)
    teacher, ref_teacher = _model(1), _model(1)
    teacher.load_state_dict(student.state_dict())
    ref_teacher.load_state_dict(ref_student.state_dict())
    fs, ft = FlatParams(student), FlatParams(teacher, grads=False)
    for p in list(teacher.parameters()) + list(ref_teacher.parameters()):
        p.requires_grad_(False)
    opt = build_optimizer(fs.params_with_grad, last=list(student.last_layer.parameters()))
    ref_opt = torch.optim.AdamW([p for p in ref_student.parameters() if p.requires_grad], lr=5e-2,
                                weight_decay=0.04, foreach=False)
    ema = TeacherEMA(ft, fs, impl)
    clipper = Clipper(fs, 0.5, impl)
    g = torch.Generator().manual_seed(0)
    for it in range(6):
        x = torch.randn(8, 7, generator=g).to(DEVICE)
        m = 0.99 + 0.001 * it
        # engine
        fs.zero_grad()
        loss = student(x).square().mean() * (float("nan") if it == 4 else 1.0)
        loss.backward()
        norms = clipper.clip_()
        bad = ~(torch.isfinite(loss.detach()) & torch.isfinite(norms).all())
        opt.set_inputs(scalar(5e-2), scalar(0.04), bad.float(), scalar(it < 3))
        opt.step()
        ema.step_(torch.where(bad, scalar(1), scalar(m)))
        # official
        if it == 4:
            continue  # the official code stops on a non-finite loss; the engine skips the step
        ref_opt.zero_grad()
        ref_student(x).square().mean().backward()
        clip_grad_per_tensor_ref([p.grad for p in ref_student.parameters() if p.grad is not None], 0.5)
        if it < 3:
            for p in ref_student.last_layer.parameters():
                p.grad = None
        ref_opt.step()
        ema_ref(list(ref_teacher.parameters()), list(ref_student.parameters()), m)
    _assert_views(fs)
    _assert_views(ft)
    for (n, p), q in zip(student.named_parameters(), ref_student.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
    for (n, p), q in zip(teacher.named_parameters(), ref_teacher.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
