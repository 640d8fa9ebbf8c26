"""fastdino.DINOLoss as a drop-in: a minimal training loop written against the official DINOLoss
interface reproduces the official loss trajectory, center and weights with impl="reference" and
impl="fused" (interpreted on CPU); official checkpoints' `dino_loss` entry loads; under
torch.distributed the center is all-reduced (asynchronously) to the same numbers."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from fastdino import DINOLoss
from fastdino.kernels.soft_cross_entropy import soft_cross_entropy_ref
from fastdino.kernels.softmax_center import softmax_center_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


class OfficialDINOLoss(nn.Module):
    """The official module's behaviour: its interface and order of work (teacher softmax with the old
    center, cross-entropy over the pairs, then the synchronous, ungated center update), with the math
    from the kernels' references."""

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
                 nepochs, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp, self.center_momentum, self.ncrops = student_temp, center_momentum, ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp))

    def forward(self, student_output, teacher_output, epoch):
        q = softmax_center_ref(teacher_output.detach(), self.center, float(self.teacher_temp_schedule[epoch]))[0]
        total = soft_cross_entropy_ref(student_output, q, self.ncrops, self.student_temp)
        with torch.no_grad():
            batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
            self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        return total


def _train(loss_fn, steps=6, B=3, K=257, ncrops=4, seed=0):
    """Tiny student/teacher MLPs, official-style loop: loss, backward, step, EMA teacher."""
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, K)).to(DEV)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, K)).to(DEV)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(seed + 1)
    losses = []
    for it in range(steps):
        crops = [torch.randn(B, 16, generator=g).to(DEV) for _ in range(ncrops)]
        teacher_output = teacher(torch.cat(crops[:2]))
        student_output = student(torch.cat(crops))
        loss = loss_fn(student_output, teacher_output, epoch=it // 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(0.9).add_(ps.detach(), alpha=0.1)
        losses.append(loss.item())
    return np.array(losses), loss_fn.center.detach().cpu(), [p.detach().cpu() for p in student.parameters()]


ARGS = (257, 4, 0.04, 0.07, 2, 5)  # out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup epochs, nepochs


@pytest.mark.parametrize("impl", ["reference", "fused", "auto"])
def test_training_loop_reproduces_official_trajectory(impl):
    ref_losses, ref_center, ref_params = _train(OfficialDINOLoss(*ARGS).to(DEV))
    losses, center, params = _train(DINOLoss(*ARGS, impl=impl).to(DEV))
    assert np.isfinite(ref_losses).all() and np.ptp(ref_losses) > 1e-3  # the loss moved
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(center, ref_center, rtol=1e-4, atol=1e-5)
    for p, r in zip(params, ref_params):  # fp32 rounding differences grow a little over 6 SGD steps
        torch.testing.assert_close(p, r, rtol=1e-3, atol=1e-4)


def test_official_checkpoint_entry_loads():
    official = OfficialDINOLoss(*ARGS)
    official.center = torch.randn(1, 257)
    ckpt = {"dino_loss": official.state_dict()}
    ours = DINOLoss(*ARGS)
    ours.load_state_dict(ckpt["dino_loss"])
    assert torch.equal(ours.center, official.center)
    assert list(ours.state_dict()) == ["center"]


def test_return_entropy_matches_teacher_entropy():
    for impl in ("reference", "fused"):
        m = DINOLoss(*ARGS, impl=impl).to(DEV)
        m.center.normal_()
        s, t = torch.randn(12, 257, device=DEV), torch.randn(6, 257, device=DEV)
        expected = m.teacher_entropy(t, 1)
        _, entropy = m(s, t, 1, return_entropy=True)
        torch.testing.assert_close(entropy, expected, rtol=1e-5, atol=1e-6)


def test_impl_errors_are_clear(monkeypatch):
    with pytest.raises(ValueError, match="impl"):
        DINOLoss(*ARGS, impl="triton")
    if DEV == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        m = DINOLoss(*ARGS, impl="fused")
        with pytest.raises(RuntimeError, match="CUDA"):
            m(torch.randn(12, 257), torch.randn(6, 257), 0)
        assert DINOLoss(*ARGS, impl="auto").resolve_impl(torch.device("cpu")) == "reference"


def _dist_worker(rank, world, path, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    torch.manual_seed(0)
    s = torch.randn(world, 12, 257).to(DEV)
    t = (torch.randn(world, 6, 257) * 3).to(DEV)
    result = {}
    for impl in ("reference", "fused"):
        m = DINOLoss(*ARGS, impl=impl).to(DEV)
        loss = m(s[rank], t[rank], 0)
        sd = m.state_dict()
        result[impl] = {"center": sd["center"].cpu(), "loss": loss.detach().cpu()}
    if rank == 0:
        torch.save(result, out)
    dist.barrier()  # neither rank tears gloo down while the other still uses it
    dist.destroy_process_group()


def test_distributed_center_is_all_reduced(tmp_path):
    from spawn_workers import spawn

    out = str(tmp_path / "rank0.pt")
    spawn(_dist_worker, args=(2, str(tmp_path / "store"), out), nprocs=2)
    got = torch.load(out)
    torch.manual_seed(0)
    s, t = torch.randn(2, 12, 257), torch.randn(2, 6, 257) * 3
    expected = 0.1 * torch.cat([t[0], t[1]]).mean(0, keepdim=True)  # center starts at 0, momentum 0.9
    single_loss = DINOLoss(*ARGS, impl="reference")(s[0], t[0], 0)
    for impl in ("reference", "fused"):
        torch.testing.assert_close(got[impl]["center"], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[impl]["loss"], single_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs need a GPU")
def test_fused_module_step_is_cuda_graph_capturable():
    """forward + backward of DINOLoss(impl="fused") captured in a CUDA graph and replayed gives
    the eager loss, gradient and center trajectory (no host sync, no per-call host tensors)."""
    B, K, ncrops = 8, 4096, 6
    g = torch.Generator().manual_seed(3)
    s_in = [(torch.randn(ncrops * B, K, generator=g) * 2).cuda() for _ in range(3)]
    t_in = [(torch.randn(2 * B, K, generator=g) * 2).cuda() for _ in range(3)]
    eager = DINOLoss(K, ncrops, 0.04, 0.04, 0, 10, impl="fused").cuda()
    graphed = DINOLoss(K, ncrops, 0.04, 0.04, 0, 10, impl="fused").cuda()
    s = torch.zeros_like(s_in[0], requires_grad=True)
    t = torch.zeros_like(t_in[0])

    def step():
        s.grad = None
        loss = graphed(s, t, epoch=0)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles the kernels) on the inputs of step 0
        with torch.no_grad():
            s.copy_(s_in[0])
            t.copy_(t_in[0])
        step()
    torch.cuda.current_stream().wait_stream(side)
    graphed.center.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    graphed.center.zero_()  # capture does not run the kernels, but be explicit
    for i in range(3):
        with torch.no_grad():
            s.copy_(s_in[i])
            t.copy_(t_in[i])
        graph.replay()
        s_e = s_in[i].clone().requires_grad_()
        loss_e = eager(s_e, t_in[i], epoch=0)
        loss_e.backward()
        torch.testing.assert_close(static_loss, loss_e.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s.grad, s_e.grad, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(graphed.center, eager.center, rtol=1e-6, atol=1e-7)
