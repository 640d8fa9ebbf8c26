"""The reference recipe: the drop-in DINOLoss equals the kernels' references composed as the paper
says, the center update, schedules (host arrays and the device table), config errors."""
import json
import math
import os

import numpy as np
import pytest
import torch

import fastdino  # noqa: F401  (registers fastdino.kernels from a checkout)
from fastdino import DINOLoss
from fastdino.config import REFERENCE, ConfigError, load_config, split_cli_overrides
from fastdino.kernels.soft_cross_entropy import soft_cross_entropy_ref
from fastdino.kernels.softmax_center import softmax_center_ref
from fastdino.schedules import HYPERPARAMS, Schedules, cosine_scheduler


def reference_loss(student, teacher, center, ncrops, tau_s, tau_t):
    """The official DINOLoss forward as the paper writes it: center and sharpen the teacher, then the
    cross-entropy over the (teacher view, other student view) pairs (the kernels' references)."""
    q = softmax_center_ref(teacher, center, tau_t)[0]
    return soft_cross_entropy_ref(student, q, ncrops, tau_s)


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
    expected = reference_loss(s2, teacher, center, ncrops, 0.1, tau_t)
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
    torch.testing.assert_close(l2, reference_loss(s, teacher, c1, 4, 0.1, 0.04))


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

    cfg = load_config("configs/demo.json", ["loss.warmup_teacher_temp=0.01", "loss.warmup_teacher_temp_epochs=3",
                                            "optim.freeze_last_layer=2"])
    sch = Schedules.from_config(cfg, global_batch=512, niter_per_ep=4)
    peak = cfg.optim.lr * 512 / 256
    assert sch.lr.max() == pytest.approx(peak)  # linear scaling rule
    assert sch.momentum[0] == pytest.approx(cfg.optim.momentum_teacher)
    assert sch.momentum[-1] == pytest.approx(1.0, abs=1e-3)
    assert sch.wd[0] == pytest.approx(0.04) and sch.wd[-1] == pytest.approx(0.4, abs=1e-2)
    # the device table the step reads: column it = step it's values, the teacher temperature per epoch
    table = sch.table("cpu")
    assert table.shape == (len(HYPERPARAMS), cfg.optim.epochs * 4) and table.dtype == torch.float32
    for it in (0, 5, 9, 33, cfg.optim.epochs * 4 - 1):
        values = sch.values(it)
        # gram_weight is logged only with Gram anchoring (its row is 0 here)
        assert table[:, it].tolist() == pytest.approx([values.get(k, 0.0) for k in HYPERPARAMS], rel=1e-6)
    assert sch.values(5)["teacher_temp"] == pytest.approx(0.01 + (0.02 - 0.01) / 2)  # epoch 1 of a 3-epoch warmup
    assert [sch.values(it)["last_layer_frozen"] for it in (0, 7, 8)] == [1.0, 1.0, 0.0]


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
        load_config("configs/demo.json", ["model.depth=-1"])
    with pytest.raises(ConfigError, match="'model.patch_size': dinov2_vits14 takes patch 14"):
        load_config("configs/demo.json", ["model.arch=dinov2_vits14"])
    with pytest.raises(ConfigError, match="'model.num_register_tokens'"):
        load_config("configs/demo.json", ["model.num_register_tokens=4"])
    with pytest.raises(ConfigError, match=r"'data.global_crop_size': must be a multiple of model.patch_size=14 "
                                          r"\(e.g. 56 or 70\), got 64$"):
        load_config("configs/demo.json", ["model.arch=dinov2_vits14", "model.patch_size=14"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.json")
    with pytest.raises(ConfigError, match="'optim.ema_impl': 'flat_triton' was renamed 'triton'"):
        load_config("configs/demo.json", ["optim.ema_impl=flat_triton"])
    with pytest.raises(ConfigError, match="'optim.optimizer': 'apex_adamw' was removed"):
        load_config("configs/demo.json", ["optim.optimizer=apex_adamw"])
    with pytest.raises(ConfigError, match="'train.compile_step'"):
        load_config("configs/demo.json", ["train.compile_step=true", "train.precision=fp16"])
    cfg = load_config("configs/demo.json", ["optim.lr=0.001", "train.precision=bf16"])
    assert cfg.optim.lr == 0.001 and cfg.train.precision == "bf16"
    overrides, rest = split_cli_overrides(["--config", "x.json", "--optim.lr=2e-3", "--set", "data.num_workers=0",
                                           "--train.seed", "3", "--resume"])
    assert overrides == ["optim.lr=2e-3", "data.num_workers=0", "train.seed=3"]
    assert rest == ["--config", "x.json", "--resume"]


@pytest.mark.parametrize("name", ["demo", "vits16", "vits8", "vitb16", "vitb8", "dinov3_vits16", "dinov3_vitb16",
                                  "dinov3_vitl16", "dinov3_vitl16_gram", "dinov3_vitl16_highres"])
def test_shipped_configs_are_valid(name, tmp_path, monkeypatch):
    """Every shipped config loads; the files a config starts from (the high-resolution phase: the Gram phase's
    checkpoint) must exist, so they are made here, empty, and a missing one is one line naming its key."""
    path = os.path.abspath(f"configs/{name}.json")
    monkeypatch.chdir(tmp_path)
    with open(path) as f:
        raw = json.load(f)
    needed = [v for v in (raw.get("train", {}).get("init_from"), raw.get("gram", {}).get("teacher_checkpoint")) if v]
    if needed:
        with pytest.raises(ConfigError, match=r"'(train.init_from|gram.teacher_checkpoint)': no such file"):
            load_config(path)
    for file in needed:
        os.makedirs(os.path.dirname(file), exist_ok=True)
        open(file, "w").close()
    cfg = load_config(path)
    assert cfg.model.out_dim >= 2


def test_reference_mode_is_one_switch():
    """train.reference=true resolves every component to its reference, whatever the config asks."""
    from fastdino.resolve import resolve

    cfg = load_config("configs/vits16.json", ["train.reference=true", "model.fused_head=true", "optim.ema_impl=foreach",
                                              "model.fused_residual_norm=true", "model.residual_dtype=bf16"])
    r = resolve(cfg, torch.device("cpu"))
    assert (r.loss, r.ema, r.clip, r.attn, r.packed_multicrop, r.fused_head, r.data, r.compile, r.residual_norm,
            r.residual_dtype) == ("reference", "loop", "loop", "math", False, False, "torch", "off", "off", "fp32")
    assert r.reference and set(REFERENCE) >= {"loss.impl", "optim.ema_impl", "optim.clip_impl", "model.attn"}
    assert not r.tf32 and not torch.backends.cuda.matmul.allow_tf32


def test_allow_tf32_is_applied_by_resolve():
    """train.allow_tf32 (the DINOv2 / DINOv3 configs: true, as their official train.py) is a recipe
    setting: resolve applies it process-wide, in reference mode too, and logs it."""
    from fastdino.resolve import resolve

    for extra in ([], ["train.reference=true"]):
        r = resolve(load_config("configs/dinov2_vits14.json", extra), torch.device("cpu"))
        assert r.tf32 and torch.backends.cuda.matmul.allow_tf32 and "tf32=True" in r.line()
    r = resolve(load_config("configs/vits16.json"), torch.device("cpu"))
    assert not r.tf32 and not torch.backends.cuda.matmul.allow_tf32
    fast = resolve(load_config("configs/vits16.json"), torch.device("cpu"))
    assert (fast.loss, fast.ema, fast.clip, fast.attn, fast.packed_multicrop) == \
        ("reference", "foreach", "foreach", "sdpa", True)  # what auto means on a CPU


def test_models_are_built_as_resolved():
    """The backbones take the resolved block choices: model.fused_residual_norm, model.fused_bias_gelu and
    model.residual_dtype as asked (DINOv3's MLP blocks too), all off under train.reference=true, logged on
    the resolved line."""
    from fastdino.models.vision_transformer import Mlp
    from fastdino.resolve import resolve
    from fastdino.train import build_models

    asked = ["model.fused_residual_norm=true", "model.fused_bias_gelu=true", "model.residual_dtype=bf16",
             "train.precision=bf16"]
    for extra, impl, dtype in (([], "auto", torch.bfloat16), (["train.reference=true"], None, None)):
        cfg = load_config("configs/demo.json", asked + extra)
        r = resolve(cfg, torch.device("cpu"))
        assert ("residual_dtype=bf16" in r.line()) == (dtype is not None)
        assert ("bias_gelu=torch" in r.line()) == (impl is not None) and r.bias_gelu == ("torch" if impl else "off")
        for model in build_models(cfg, r, torch.device("cpu")):
            assert {b.residual_norm_impl for b in model.backbone.blocks} == {impl}
            assert {m.bias_gelu_impl for m in model.backbone.modules() if isinstance(m, Mlp)} == {impl}
            assert model.backbone.residual_dtype == dtype
    cfg = load_config("configs/demo_dinov3.json", ["model.fused_bias_gelu=true"])
    for model in build_models(cfg, resolve(cfg, torch.device("cpu")), torch.device("cpu")):
        assert {m.bias_gelu_impl for m in model.backbone.modules() if isinstance(m, Mlp)} == {"auto"}
