"""The reference recipe against closed forms and plain loops: loss, center, schedules, clipping, EMA,
config errors."""
import math

import numpy as np
import pytest
import torch

from fastdino import DINOLoss
from fastdino.clip import clip_gradients_foreach, clip_gradients_loop
from fastdino.config import ConfigError, load_config, split_cli_overrides
from fastdino.schedules import Schedules, cosine_scheduler
from fastdino.teacher import ema_update_foreach, ema_update_loop


def loss_double_loop(student, teacher, center, ncrops, tau_s, tau_t):
    """-sum_k q_i,k log p_v,k over pairs (i, v != i), each pair averaged over the batch, then over
    pairs; written element by element from the paper's formula, float64."""
    B = teacher.shape[0] // 2
    total, terms = 0.0, 0
    for i in range(2):
        t = (teacher[i * B:(i + 1) * B] - center) / tau_t
        q = torch.exp(t - torch.logsumexp(t, dim=-1, keepdim=True))
        for v in range(ncrops):
            if v == i:
                continue
            s = student[v * B:(v + 1) * B] / tau_s
            log_p = s - torch.logsumexp(s, dim=-1, keepdim=True)
            total = total + (-(q * log_p).sum(-1)).mean()
            terms += 1
    return total / terms


@pytest.mark.parametrize("ncrops,B,K", [(2, 1, 7), (4, 3, 33), (10, 2, 128)])
def test_reference_loss_equals_double_loop_float64(ncrops, B, K):
    g = torch.Generator().manual_seed(ncrops * 100 + B)
    student = torch.randn(ncrops * B, K, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(2 * B, K, generator=g, dtype=torch.float64) * 3
    loss_fn = DINOLoss(K, ncrops, 0.04, 0.07, 5, 20, student_temp=0.1, center_momentum=0.9).double()
    loss_fn.center.copy_(torch.randn(1, K, generator=g, dtype=torch.float64))
    center = loss_fn.center.clone()
    epoch = 2  # inside the teacher-temperature warmup: 0.04 + 2 * (0.07 - 0.04) / 4
    tau_t = 0.04 + 2 * (0.07 - 0.04) / 4

    s1 = student.clone().requires_grad_()
    loss = loss_fn(s1, teacher, epoch)
    loss.backward()
    s2 = student.clone().requires_grad_()
    expected = loss_double_loop(s2, teacher, center, ncrops, 0.1, tau_t)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-6, atol=1e-8)


def test_center_update_formula():
    K, B = 50, 4
    loss_fn = DINOLoss(K, 4, 0.04, 0.04, 0, 10, center_momentum=0.9)
    c0 = torch.randn(1, K)
    loss_fn.center.copy_(c0)
    teacher = torch.randn(2 * B, K)
    loss_fn(torch.randn(4 * B, K), teacher, 0)
    torch.testing.assert_close(loss_fn.center, 0.9 * c0 + 0.1 * teacher.mean(0, keepdim=True))
    # the loss of a step uses the center from before the step: a second call sees the new center
    c1 = loss_fn.center.clone()
    s = torch.randn(4 * B, K)
    l2 = loss_fn(s, teacher, 0)
    from fastdino.loss import dino_loss_pairs_ref
    torch.testing.assert_close(l2, dino_loss_pairs_ref(s, teacher, c1, 4, 0.1, 0.04))


def test_center_untouched_by_nonfinite_loss():
    K, B = 16, 2
    loss_fn = DINOLoss(K, 2, 0.04, 0.04, 0, 10)
    loss_fn.center.copy_(torch.randn(1, K))
    c0 = loss_fn.center.clone()
    student = torch.randn(2 * B, K)
    student[0, 3] = float("nan")
    loss = loss_fn(student, torch.randn(2 * B, K), 0)
    assert not torch.isfinite(loss)
    assert torch.equal(loss_fn.center, c0)


def test_teacher_temperature_schedule():
    loss_fn = DINOLoss(8, 2, 0.04, 0.07, 30, 100)
    assert loss_fn.teacher_temp(0) == pytest.approx(0.04)
    assert loss_fn.teacher_temp(29) == pytest.approx(0.07)
    assert loss_fn.teacher_temp(15) == pytest.approx(0.04 + 15 * 0.03 / 29)
    assert loss_fn.teacher_temp(99) == pytest.approx(0.07)


def test_cosine_schedules_closed_form():
    epochs, niter, warmup = 7, 5, 2
    s = cosine_scheduler(1.0, 0.1, epochs, niter, warmup)
    assert len(s) == epochs * niter
    np.testing.assert_allclose(s[: warmup * niter], np.linspace(0, 1.0, warmup * niter))
    n = epochs * niter - warmup * niter
    for j in (0, 3, n - 1):
        expected = 0.1 + 0.5 * 0.9 * (1 + math.cos(math.pi * j / n))
        assert s[warmup * niter + j] == pytest.approx(expected)

    cfg = load_config("configs/demo.json")
    sch = Schedules.from_config(cfg.optim, global_batch=512, niter_per_ep=4)
    peak = cfg.optim.lr * 512 / 256
    assert sch.lr.max() == pytest.approx(peak)  # linear scaling rule
    assert sch.momentum[0] == pytest.approx(cfg.optim.momentum_teacher)
    assert sch.momentum[-1] == pytest.approx(1.0, abs=1e-3)
    assert sch.wd[0] == pytest.approx(0.04) and sch.wd[-1] == pytest.approx(0.4, abs=1e-2)


def _params(seed, dtypes=(torch.float32,)):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7,), (3, 5), (64, 33), (1,), (2, 3, 4)]
    out = []
    for i, shape in enumerate(shapes):
        p = torch.nn.Parameter((torch.randn(shape, generator=g) * 5).to(dtypes[i % len(dtypes)]))
        p.grad = (torch.randn(shape, generator=g) * (0.1 if i % 2 else 10)).to(p.dtype)
        out.append(p)
    return out


def test_per_tensor_clipping_matches_loop():
    a, b = _params(0), _params(0)
    norms = clip_gradients_loop(a, 3.0)
    assert any(n > 3.0 for n in norms) and any(n < 3.0 for n in norms)  # both branches exercised
    clip_gradients_foreach(b, 3.0)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa.grad, pb.grad)
        assert pa.grad.norm() <= 3.0 + 1e-4


@pytest.mark.parametrize("momentum", [0.996, 0.5, 1.0])
def test_ema_matches_loop(momentum):
    teacher_a, teacher_b, student = _params(2), _params(2), _params(3)
    ema_update_loop(teacher_a, student, momentum)
    ema_update_foreach(teacher_b, student, momentum)
    for ta, tb in zip(teacher_a, teacher_b):
        torch.testing.assert_close(ta, tb, rtol=1e-6, atol=1e-6)
    teacher_c = _params(2)
    ema_update_foreach(teacher_c, student, torch.tensor(momentum))  # device-tensor momentum
    for ta, tc in zip(teacher_a, teacher_c):
        torch.testing.assert_close(ta, tc, rtol=1e-6, atol=1e-6)
    if momentum == 1.0:  # a skipped step leaves the teacher bit-identical
        for t0, tc in zip(_params(2), teacher_c):
            assert torch.equal(t0, tc)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config("configs/demo.json", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="'optim.lr'"):
        load_config("configs/demo.json", ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="'model.arch'"):
        load_config("configs/demo.json", ["model.arch=vit_huge"])
    with pytest.raises(ConfigError, match="'data.local_crops_scale'"):
        load_config("configs/demo.json", ["data.local_crops_scale=[0.5, 0.1]"])
    with pytest.raises(ConfigError, match="'model.depth'"):
        load_config("configs/demo.json", ["model.depth=0"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.json")
    cfg = load_config("configs/demo.json", ["optim.lr=0.001", "train.precision=bf16"])
    assert cfg.optim.lr == 0.001 and cfg.train.precision == "bf16"
    overrides, rest = split_cli_overrides(["--config", "x.json", "--optim.lr=2e-3", "--set", "data.num_workers=0",
                                           "--train.seed", "3", "--resume"])
    assert overrides == ["optim.lr=2e-3", "data.num_workers=0", "train.seed=3"]
    assert rest == ["--config", "x.json", "--resume"]


@pytest.mark.parametrize("name", ["demo", "vits16", "vits8", "vitb16", "vitb8"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(f"configs/{name}.json")
    assert cfg.model.out_dim >= 2
