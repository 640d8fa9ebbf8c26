"""The student's optimization rules (fastdino/optim.py, fastdino/schedules.py): DINOv2's layer-wise lr
decay, patch-embedding lr multiplier and weight-decay exemptions per parameter, checked by name
against a reference written here from the official rule (dinov2/utils/param_groups.py, applied to
each student submodule on its own as SSLMetaArch.get_params_groups does); one DINOAdamW step against
torch's AdamW with one group per parameter; DINO v1 groups unchanged; the frozen last layers of every
head; the sqrt_wrt_1024 lr scaling; the backends (local, compiled step, DDP and DeepSpeed ZeRO 1-3)
with many groups."""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from fastdino.config import load_config  # noqa: E402
from fastdino.models import DINOHead, MultiCropWrapper, dinov2_vits14, vit_tiny  # noqa: E402
from fastdino.optim import DINOAdamW, describe_param_groups, param_groups, param_multipliers  # noqa: E402
from fastdino.schedules import Schedules, cosine_scheduler, peak_lr  # noqa: E402

DECAY, PATCH_MULT = 0.9, 0.2  # DINOv2's recipe (ssl_default_config: layerwise_decay 0.9, patch_embed_lr_mult 0.2)


# ------------------------------------------------------------------------------------------------
# models and the reference rule
# ------------------------------------------------------------------------------------------------
def dinov2_student(depth=3, registers=4, ffn="mlp", ibot_head=True, seed=0) -> MultiCropWrapper:
    """A small DINOv2-layout student (LayerScale, mask token, registers), a DINO head and, set by hand
    as the official SSLMetaArch names it, a separate iBOT head whose weight_g trains."""
    torch.manual_seed(seed)
    backbone = dinov2_vits14(num_register_tokens=registers, depth=depth, embed_dim=48, num_heads=2, img_size=28,
                             ffn=ffn, attn="math")
    student = MultiCropWrapper(backbone, DINOHead(48, 24, hidden_dim=32, bottleneck_dim=16))
    if ibot_head:
        setattr(student, "ibot_head", DINOHead(48, 20, hidden_dim=32, bottleneck_dim=16, norm_last_layer=False))
    return student


def official_rule(student, decay: float, patch_mult: float) -> dict[str, tuple[bool, float, float]]:
    """name -> (is_last_layer, lr_multiplier, wd_multiplier) as the official code computes them: the
    rule runs on each submodule of the student separately (backbone, dino_head, ibot_head), with the
    names inside it; a submodule with `blocks` is a backbone (force_is_backbone), its layers counted
    from len(blocks); a head has no blocks, so 0 layers and every multiplier decay ** 0."""
    out = {}
    for prefix, sub in student.named_children():
        n_blocks = len(sub.blocks) if hasattr(sub, "blocks") else 0
        for name, p in sub.named_parameters():
            layer = n_blocks + 1
            if n_blocks > 0:
                if any(key in name for key in ("pos_embed", "patch_embed", "mask_token", "cls_token")):
                    layer = 0
                elif "blocks." in name and "residual." not in name:
                    layer = int(name[name.index("blocks."):].split(".")[1]) + 1
            lr = decay ** (n_blocks + 1 - layer)
            if "patch_embed" in name:
                lr = lr * patch_mult
            wd = 0.0 if (name.endswith(".bias") or "norm" in name or "gamma" in name) else 1.0
            out[f"{prefix}.{name}"] = ("last_layer" in name, lr, wd)
    return out


def old_param_groups(student) -> list[dict]:
    """fastdino's param_groups before multipliers (DINO v1): the structure checkpoints hold."""
    last = {id(p) for p in student.head.last_layer.parameters()}
    buckets: dict = {}
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        regularized = not (name.endswith(".bias") or p.ndim <= 1)
        buckets.setdefault((id(p) in last, regularized), []).append(p)
    return [{"params": buckets[k], "regularized": k[1], "last_layer": k[0]}
            for k in ((False, True), (False, False), (True, True), (True, False)) if buckets.get(k)]


def _structure(groups):
    return [([id(p) for p in g["params"]], g["regularized"], g["last_layer"]) for g in groups]


# ------------------------------------------------------------------------------------------------
# the multipliers of every parameter
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("registers, ffn", [(0, "mlp"), (4, "mlp"), (4, "swiglu")])
@pytest.mark.parametrize("decay, patch_mult", [(DECAY, PATCH_MULT), (0.75, 1.0), (1.0, 1.0)])
def test_multipliers_match_official_rule(registers, ffn, decay, patch_mult):
    student = dinov2_student(registers=registers, ffn=ffn)
    student.backbone.mask_token.requires_grad = True  # trained with iBOT
    rules = param_multipliers(student, decay, patch_mult)
    reference = official_rule(student, decay, patch_mult)
    assert list(rules) == list(reference) == [n for n, _ in student.named_parameters()]
    for name, rule in rules.items():
        assert tuple(rule) == reference[name], name  # exactly: the same float operations
    depth = len(student.backbone.blocks)
    expect = {"backbone.pos_embed": decay ** (depth + 1), "backbone.cls_token": decay ** (depth + 1),
              "backbone.mask_token": decay ** (depth + 1),
              "backbone.patch_embed.proj.weight": decay ** (depth + 1) * patch_mult,
              "backbone.blocks.0.attn.qkv.weight": decay ** depth, f"backbone.blocks.{depth - 1}.ls2.gamma": decay,
              "backbone.norm.weight": 1.0, "head.mlp.0.weight": 1.0, "ibot_head.last_layer.weight_v": 1.0}
    if registers:
        expect["backbone.register_tokens"] = 1.0  # not an embedding to the official rule: layer depth + 1
    for name, lr in expect.items():
        assert rules[name].lr_mult == pytest.approx(lr, rel=1e-12), name
    assert {n for n, r in rules.items() if r.last_layer} == {n for n in rules if ".last_layer." in n}
    assert {n for n, r in rules.items() if r.last_layer and n.startswith("ibot_head.")}  # the iBOT head's too

    groups = param_groups(student, decay, patch_mult)
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in trainable)
    by_id = {id(p): rules[n] for n, p in student.named_parameters()}
    for g in groups:  # every member has the group's multipliers; groups are distinct
        assert {by_id[id(p)] for p in g["params"]} == {(g["last_layer"], g["lr_mult"], g["wd_mult"])}
        assert g["regularized"] == (g["wd_mult"] != 0)
    keys = [(g["last_layer"], g["lr_mult"], g["wd_mult"]) for g in groups]
    assert len(set(keys)) == len(keys) == len({by_id[id(p)] for p in trainable})
    assert keys == sorted(keys, key=lambda k: (k[0], k[1], -k[2]))
    if decay == 1.0 and patch_mult == 1.0:  # the DINO structure, also on a DINOv2 layout (no iBOT head before)
        plain = dinov2_student(registers=registers, ffn=ffn, ibot_head=False)
        assert _structure(param_groups(plain, decay, patch_mult)) == _structure(old_param_groups(plain))


def test_weight_decay_rules_agree_on_every_model():
    """No weight decay: DINO's rule (".bias" or 1-d), DINOv2's (".bias", "norm" or "gamma"): the same
    parameters on every backbone here (DINOv2-layout models have no BatchNorm)."""
    students = [dinov2_student(registers=4, ffn=f) for f in ("mlp", "swiglu")]
    students.append(MultiCropWrapper(vit_tiny(patch_size=16, depth=2, attn="math"), DINOHead(192, 32, hidden_dim=64)))
    for s in students:
        for name, p in s.named_parameters():
            assert (name.endswith(".bias") or p.ndim <= 1) == (name.endswith(".bias") or "norm" in name
                                                               or "gamma" in name), name


@pytest.mark.parametrize("overrides", [[], ["model.norm_last_layer=false"], ["model.use_bn_in_head=true"],
                                       ["model.arch=dinov2_vits14", "model.patch_size=14", "model.num_register_tokens=4",
                                        "data.global_crop_size=28", "data.local_crop_size=14"]])
def test_dino_groups_unchanged(overrides):
    """layerwise_decay 1, patch_embed_lr_mult 1: the four DINO groups, same order and parameters as
    before (checkpointed optimizer states and the parity tests depend on it), all multipliers 1."""
    from fastdino.resolve import resolve
    from fastdino.train import build_models

    cfg = load_config(None, ["model.arch=vit_tiny", "model.depth=2", "model.out_dim=64", *overrides])
    assert cfg.optim.layerwise_decay == 1.0 and cfg.optim.patch_embed_lr_mult == 1.0  # the defaults
    student, _ = build_models(cfg, resolve(cfg, torch.device("cpu")), torch.device("cpu"))
    for groups in (param_groups(student), param_groups(student, cfg.optim.layerwise_decay,
                                                       cfg.optim.patch_embed_lr_mult)):
        assert _structure(groups) == _structure(old_param_groups(student))
        assert all(g["lr_mult"] == 1.0 and g["wd_mult"] == float(g["regularized"]) for g in groups)
    opt = DINOAdamW(param_groups(student))
    assert [(g["last_layer"], g["regularized"]) for g in opt.param_groups][:2] == [(False, True), (False, False)]
    assert "lr multipliers 1," in describe_param_groups(opt.param_groups) + ","


def test_bad_multipliers_are_refused():
    student = dinov2_student()
    for decay, mult in ((0.0, 1.0), (1.5, 1.0), (0.9, 0.0), (0.9, float("nan"))):
        with pytest.raises(ValueError):
            param_groups(student, decay, mult)
    with pytest.raises(ValueError, match="backbone.blocks"):
        param_groups(torch.nn.Sequential(torch.nn.Linear(2, 2)), 0.9)
    with pytest.raises(ValueError, match="wd_mult"):
        DINOAdamW([{"params": [torch.nn.Parameter(torch.ones(2))], "regularized": True, "wd_mult": 0.0}])


# ------------------------------------------------------------------------------------------------
# the optimizer step
# ------------------------------------------------------------------------------------------------
def _random_grads(student, step: int):
    g = torch.Generator().manual_seed(100 + step)
    return {n: torch.randn(p.shape, generator=g) for n, p in student.named_parameters() if p.requires_grad}


def _set_grads(student, grads):
    for n, p in student.named_parameters():
        if p.requires_grad:
            p.grad = grads[n].clone()


SCHEDULE = [(1e-2, 0.04, 1.0), (8e-3, 0.1, 0.0), (5e-3, 0.3, 0.0)]  # (lr, wd, last layer frozen) per step


def _reference_run(student, decay, patch_mult, steps=SCHEDULE):
    """torch's AdamW (single-tensor), one group per parameter: lr * lr_mult, weight_decay * wd_mult,
    set each step as the official apply_optim_scheduler does; a frozen last layer gets no gradient
    (the official DINO cancel_gradients_last_layer: torch skips it entirely)."""
    rules = official_rule(student, decay, patch_mult)
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p], "name": n} for n, p in named], foreach=False, fused=False)
    for it, (lr, wd, frozen) in enumerate(steps):
        _set_grads(student, _random_grads(student, it))
        for group in opt.param_groups:
            last, lr_mult, wd_mult = rules[group["name"]]
            group["lr"], group["weight_decay"] = lr * lr_mult, wd * wd_mult
            if last and frozen:
                group["params"][0].grad = None
        opt.step()
    return opt


def optimizer_step(opt, lr, wd, frozen, one_group_at_a_time=False):
    """One DINOAdamW step with device-tensor inputs; one_group_at_a_time: as DeepSpeed ZeRO-1/2 step it
    (a one-group param_groups list per call, lists rebuilt each call)."""
    opt.set_inputs(torch.tensor(lr), torch.tensor(wd), torch.tensor(0.0), torch.tensor(frozen))
    if one_group_at_a_time:
        groups = opt.param_groups
        for g in groups:
            opt.param_groups = [g]
            opt.step()
        opt.param_groups = groups
    else:
        opt.step()


def _dino_run(student, decay, patch_mult, steps=SCHEDULE, one_group_at_a_time=False):
    opt = DINOAdamW(param_groups(student, decay, patch_mult), static_state=not one_group_at_a_time)
    for it, (lr, wd, frozen) in enumerate(steps):
        _set_grads(student, _random_grads(student, it))
        optimizer_step(opt, lr, wd, frozen, one_group_at_a_time)
    return opt


@pytest.mark.parametrize("one_group_at_a_time", [False, True], ids=["static", "per-group"])
def test_adamw_step_matches_torch_with_per_parameter_groups(one_group_at_a_time):
    """Three steps (new lr / wd each step, the last layers frozen on the first) with decay 0.9 and
    patch mult 0.2 equal torch's AdamW with per-parameter lr * lr_mult and wd * wd_mult."""
    ours, ref = dinov2_student(), dinov2_student()
    ours.backbone.mask_token.requires_grad = ref.backbone.mask_token.requires_grad = True
    start = copy.deepcopy(ours.state_dict())
    opt = _dino_run(ours, DECAY, PATCH_MULT, one_group_at_a_time=one_group_at_a_time)
    _reference_run(ref, DECAY, PATCH_MULT)
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, theirs[name], rtol=1e-6, atol=1e-7, msg=name)
    # the multipliers matter: every parameter moved, and by less where its lr multiplier is small
    moved = {n: (p - start[n]).abs().max().item() for n, p in ours.named_parameters() if p.requires_grad}
    assert all(v > 0 for v in moved.values())
    assert moved["backbone.patch_embed.proj.weight"] < 0.5 * moved["head.mlp.0.weight"]
    state_steps = {n: opt.state[p]["step"].item() for n, p in ours.named_parameters() if p.requires_grad}
    assert all(s == (2 if ".last_layer." in n else 3) for n, s in state_steps.items())  # frozen: not counted


def test_frozen_last_layers_of_every_head_with_many_groups():
    """While frozen, the DINO head's and the iBOT head's last layers do not move (no decay, no moment,
    no step count), in groups among many; everything else does; released, they move."""
    student = dinov2_student()
    groups = param_groups(student, DECAY, PATCH_MULT)
    assert len(groups) > 8 and sum(g["last_layer"] for g in groups) == 1  # weight_v, weight_g: both decayed
    last = [n for n, _ in student.named_parameters() if ".last_layer." in n]
    assert {"head.last_layer.weight_v", "ibot_head.last_layer.weight_v", "ibot_head.last_layer.weight_g"} <= set(last)
    opt = DINOAdamW(groups)
    frozen_before = {n: p.detach().clone() for n, p in student.named_parameters()}
    for it in range(2):
        _set_grads(student, _random_grads(student, it))
        opt.set_inputs(torch.tensor(1e-2), torch.tensor(0.5), torch.tensor(0.0), torch.tensor(1.0))
        opt.step()
    for n, p in student.named_parameters():
        if not p.requires_grad:
            continue
        if n in last:
            assert torch.equal(p, frozen_before[n]), n
            assert opt.state[p]["step"].item() == 0 and not opt.state[p]["exp_avg"].any(), n
        else:
            assert not torch.equal(p, frozen_before[n]), n
    opt.set_inputs(torch.tensor(1e-2), torch.tensor(0.5), torch.tensor(0.0), torch.tensor(0.0))
    opt.step()
    assert all(not torch.equal(student.get_parameter(n), frozen_before[n]) for n in last
               if student.get_parameter(n).requires_grad)


def test_state_dict_round_trip_keeps_the_built_multipliers():
    """A checkpointed optimizer resumes exactly; the group entries come from the build, not the
    checkpoint (a state dict from before multipliers existed has none); another group structure is
    refused."""
    a, b = dinov2_student(), dinov2_student()
    opt_a = _dino_run(a, DECAY, PATCH_MULT, steps=SCHEDULE[:1])
    b.load_state_dict(a.state_dict())
    opt_b = DINOAdamW(param_groups(b, DECAY, PATCH_MULT))
    saved = copy.deepcopy(opt_a.state_dict())
    for g in saved["param_groups"]:  # as written before lr_mult / wd_mult existed
        g.pop("lr_mult"), g.pop("wd_mult")
        g["regularized"] = not g["regularized"]  # and a stale flag: the build decides
    opt_b.load_state_dict(saved)
    assert [(g["lr_mult"], g["wd_mult"], g["regularized"]) for g in opt_b.param_groups] == \
        [(g["lr_mult"], g["wd_mult"], g["regularized"]) for g in opt_a.param_groups]
    for model, opt in ((a, opt_a), (b, opt_b)):
        _set_grads(model, _random_grads(model, 7))
        opt.set_inputs(torch.tensor(3e-3), torch.tensor(0.2), torch.tensor(0.0), torch.tensor(0.0))
        opt.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    dino = DINOAdamW(param_groups(dinov2_student()))
    with pytest.raises(ValueError, match=f"has {len(opt_a.param_groups)} param groups, this config makes 3"):
        dino.load_state_dict(opt_a.state_dict())


# ------------------------------------------------------------------------------------------------
# lr scaling
# ------------------------------------------------------------------------------------------------
def test_lr_scaling_rules():
    assert peak_lr(5e-4, 512) == 5e-4 * 512 / 256
    assert peak_lr(5e-4, 512, "linear_256") == 5e-4 * 2
    assert peak_lr(4e-3, 2048, "sqrt_1024") == pytest.approx(4e-3 * math.sqrt(2))
    assert peak_lr(4e-3, 1024, "sqrt_1024") == 4e-3
    with pytest.raises(ValueError, match="sqrt_wrt_1024"):
        peak_lr(1e-3, 256, "sqrt_wrt_1024")
    for rule, peak in (("linear_256", 4e-3 * 512 / 256), ("sqrt_1024", 4e-3 * math.sqrt(512 / 1024))):
        cfg = load_config(None, ["optim.lr=0.004", "optim.min_lr=1e-6", "optim.epochs=5", "optim.warmup_epochs=1",
                                 f"optim.lr_scaling={rule}"])
        sch = Schedules.from_config(cfg, global_batch=512, niter_per_ep=10)
        assert sch.lr.max() == pytest.approx(peak, rel=1e-12) and sch.lr[9] == pytest.approx(peak, rel=1e-12)
        # the whole schedule: warmup from 0, cosine from the scaled peak to min_lr itself (not scaled)
        assert np.array_equal(sch.lr, cosine_scheduler(peak_lr(4e-3, 512, rule), 1e-6, 5, 10, 1))


def test_dinov3_schedule_options():
    """DINOv3's schedules v2: lr peak scaled by 4*sqrt(B/1024) (sqrt_1024_x4), linear warmup then the
    peak to the end (lr_schedule=constant), constant weight decay and teacher momentum (end = start)."""
    assert peak_lr(5e-5, 4096, "sqrt_1024_x4") == pytest.approx(5e-5 * 4 * 2)
    cfg = load_config(None, ["optim.lr=5e-5", "optim.lr_scaling=sqrt_1024_x4", "optim.lr_schedule=constant",
                             "optim.epochs=5", "optim.warmup_epochs=2", "optim.weight_decay=0.04",
                             "optim.weight_decay_end=0.04", "optim.momentum_teacher=0.994",
                             "optim.momentum_teacher_end=0.994"])
    sch = Schedules.from_config(cfg, global_batch=256, niter_per_ep=10)
    peak = 5e-5 * 4 * math.sqrt(256 / 1024)
    np.testing.assert_allclose(sch.lr[:20], np.linspace(0, peak, 20), rtol=0, atol=1e-15)
    np.testing.assert_allclose(sch.lr[20:], peak, rtol=1e-12)
    np.testing.assert_allclose(sch.wd, 0.04, rtol=1e-12)
    np.testing.assert_allclose(sch.momentum, 0.994, rtol=1e-12)
    default = Schedules.from_config(load_config(None, ["optim.epochs=5", "optim.warmup_epochs=1"]), 256, 10)
    assert default.momentum[0] == 0.996 and default.momentum[-1] > 0.9999  # DINO: cosine to 1


def test_rise_schedule_is_the_high_resolution_adaptations_lr():
    """lr_schedule=rise: DINOv3's high-resolution adaptation lr (schedules.lr start 0, peak 0, end lr, no warmup,
    cosine_epochs = optim.warmup_epochs; start, peak and end scaled by 4*sqrt(B/1024)): a half cosine up from 0,
    written here as the official np.linspace(0, pi, n) form, then the scaled lr to the end."""
    cfg = load_config(None, ["optim.lr=1.25e-5", "optim.lr_scaling=sqrt_1024_x4", "optim.lr_schedule=rise",
                             "optim.epochs=5", "optim.warmup_epochs=2"])
    sch = Schedules.from_config(cfg, global_batch=64, niter_per_ep=10)
    end = 1.25e-5 * 4 * math.sqrt(64 / 1024)
    up = end + (0.0 - end) * (np.cos(np.linspace(0, np.pi, 20)) + 1) / 2
    np.testing.assert_allclose(sch.lr[:20], up, rtol=0, atol=1e-18)
    assert sch.lr[0] == 0.0 and sch.lr[19] == pytest.approx(end, rel=1e-12) and np.all(np.diff(sch.lr[:20]) > 0)
    np.testing.assert_allclose(sch.lr[20:], end, rtol=1e-12)
    flat = Schedules.from_config(load_config(None, ["optim.lr_schedule=rise", "optim.epochs=3", "optim.warmup_epochs=0"]),
                                 256, 4)
    np.testing.assert_allclose(flat.lr, 0.0005, rtol=1e-12)  # no rise: the peak from the first step


def test_adamw_beta2_matches_torch():
    """optim.adamw_beta2 (DINOv3's 7B recipe: 0.99): three steps equal torch's AdamW with betas (0.9, 0.99)."""
    ours, ref = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    ref.load_state_dict(ours.state_dict())
    opt = DINOAdamW([{"params": list(ours.parameters()), "regularized": True}], beta2=0.99)
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05, foreach=False)
    for it in range(3):
        g = torch.Generator().manual_seed(it)
        for a, b in zip(ours.parameters(), ref.parameters()):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt.set_inputs(torch.tensor(1e-2), torch.tensor(0.05), torch.tensor(0.0), torch.tensor(0.0))
        opt.step()
        torch_opt.step()
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="beta2"):
        DINOAdamW([{"params": [torch.nn.Parameter(torch.ones(2))]}], beta2=1.0)


# ------------------------------------------------------------------------------------------------
# the local backend: build from the config, eager and compiled steps
# ------------------------------------------------------------------------------------------------
def _v2_cfg(*extra):
    return load_config(None, [
        "model.arch=dinov2_vits14", "model.patch_size=14", "model.depth=2", "model.out_dim=64",
        "model.num_register_tokens=4",
        "model.drop_path_rate=0.0", "optim.batch_size_per_gpu=2", "optim.epochs=2", "optim.lr=0.05",
        "optim.lr_scaling=sqrt_1024", f"optim.layerwise_decay={DECAY}", f"optim.patch_embed_lr_mult={PATCH_MULT}",
        "optim.warmup_epochs=0", "optim.freeze_last_layer=1", "optim.clip_grad=0.3", "optim.momentum_teacher=0.9",
        "data.global_crop_size=28", "data.local_crop_size=14", "data.local_crops_number=2",
        "train.device=cpu", "train.precision=fp32", *extra])


def _crops(seed, B=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, 28, 28, generator=g) for _ in range(2)] + \
        [torch.randn(B, 3, 14, 14, generator=g) for _ in range(2)]


def _step(run, it):
    run.state.load_hyperparams(run.table, it)
    return run.step_fn(run.state, _crops(it))


def test_local_backend_builds_the_groups_from_the_config(caplog):
    from fastdino.distributed import DistContext
    from fastdino.train import build_run

    with caplog.at_level("INFO", logger="fastdino"):
        run = build_run(_v2_cfg(), DistContext(device=torch.device("cpu")), steps_per_epoch=2)
    student = run.backend.student_module
    built = run.backend.optimizer.param_groups
    expected = param_groups(student, DECAY, PATCH_MULT)
    assert [([id(p) for p in g["params"]], g["lr_mult"], g["wd_mult"], g["last_layer"]) for g in built] == \
        [([id(p) for p in g["params"]], g["lr_mult"], g["wd_mult"], g["last_layer"]) for g in expected]
    assert describe_param_groups(built) in caplog.text and f"{len(built)} param groups" in caplog.text
    assert run.schedules.lr.max() == pytest.approx(0.05 * math.sqrt(2 / 1024))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    for it in range(3):  # epoch 0 (last layer frozen), then epoch 1
        out = _step(run, it)
        assert torch.isfinite(out["loss"])
        if it == 1:
            for n, p in student.named_parameters():
                moved = not torch.equal(p, before[n])
                assert moved == (p.requires_grad and ".last_layer." not in n), n
    assert not torch.equal(student.head.last_layer.weight_v, before["head.last_layer.weight_v"])
    run.backend.student_flat.check()  # parameters and gradients still views of the flat buffers


# ------------------------------------------------------------------------------------------------
# DDP and DeepSpeed ZeRO 1-3 with many groups: one 2-process launch (as tests/test_deepspeed.py)
# ------------------------------------------------------------------------------------------------
STEPS, RESUME_AT, B = 4, 3, 2  # 8 images / global batch 4: 2 steps per epoch, the last layer frozen in epoch 0
DS_LR = 0.0125  # sqrt_1024 at global batch 4: 0.0125 / 16 = 7.8e-4 per step
STEP_LR = DS_LR * math.sqrt(2 * B / 1024)
TOL_SINGLE = 0.25 * STEP_LR  # 2 ranks vs one process: gradient sums in another order, through Adam
TOL_ZERO = 0.05 * STEP_LR  # ZeRO vs DDP on the same ranks


def ds_overrides(data: str, out: str, batch: int, stage: int | None, max_steps: int = STEPS, decay=DECAY,
                 patch_mult=PATCH_MULT) -> list[str]:
    o = ["model.arch=vit_tiny", "model.patch_size=16", "model.depth=3", "model.out_dim=128",
         "model.drop_path_rate=0", "model.attn=math", "loss.impl=reference", "loss.warmup_teacher_temp_epochs=0",
         "optim.epochs=2", f"optim.batch_size_per_gpu={batch}", f"optim.lr={DS_LR}", "optim.lr_scaling=sqrt_1024",
         f"optim.layerwise_decay={decay}", f"optim.patch_embed_lr_mult={patch_mult}", "optim.warmup_epochs=0",
         "optim.clip_grad=0.05", "optim.freeze_last_layer=1", "optim.momentum_teacher=0.9",
         "data.backend=torch", f"data.path={data}", "data.generate_demo=true", "data.demo_num_images=8",
         "data.demo_image_size=32", "data.global_crop_size=32", "data.local_crop_size=16",
         "data.local_crops_number=1", "data.num_workers=0", "data.dtype=fp32",
         "train.precision=fp32", "train.device=cpu", "train.log_every=2", "train.progress=false",
         f"train.max_steps={max_steps}", f"train.output_dir={out}"]
    if stage is not None:
        o += ["deepspeed.enabled=true", f"deepspeed.zero_stage={stage}"]
    return o


def _worker(spec_path: str) -> None:
    import logging

    from fastdino.distributed import cleanup, init_distributed
    from fastdino.train import _train

    logging.basicConfig(level=logging.WARNING)
    with open(spec_path) as f:
        spec = json.load(f)
    ctx = init_distributed("cpu")
    try:
        for run in spec["runs"]:  # one process group for all runs (DeepSpeed caches its groups)
            _train(load_config(None, run["overrides"]), argparse.Namespace(resume=run["resume"], local_rank=None,
                                                                           config=None), ctx)
    finally:
        cleanup()


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_ddp_and_deepspeed_with_many_groups(tmp_path):
    """Layer-wise decay, patch mult and sqrt scaling under DDP and ZeRO-1/2/3 on 2 ranks (across the
    release of the frozen last layer; ZeRO-1/2 step one group at a time) equal the single-process
    engine; a ZeRO-2 resume equals the uninterrupted run; the multipliers change the result by far
    more than the tolerances."""
    pytest.importorskip("deepspeed")
    from fastdino.train import train

    data = str(tmp_path / "demo")

    def single(name, **kw):
        out = str(tmp_path / name)
        train(load_config(None, ds_overrides(data, out, 2 * B, None, **kw)),
              argparse.Namespace(resume=None, local_rank=None, config=None))
        return torch.load(os.path.join(out, "checkpoint.pth"), map_location="cpu", weights_only=False)

    ref, ref_plain = single("single"), single("single_plain", decay=1.0, patch_mult=1.0)
    runs = [{"overrides": ds_overrides(data, str(tmp_path / "ddp"), B, None), "resume": None}]
    runs += [{"overrides": ds_overrides(data, str(tmp_path / f"zero{s}"), B, s), "resume": None} for s in (1, 2, 3)]
    resumed = str(tmp_path / "zero2_resumed")
    runs += [{"overrides": ds_overrides(data, resumed, B, 2, max_steps=RESUME_AT), "resume": None},
             {"overrides": ds_overrides(data, resumed, B, 2), "resume": "auto"}]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"runs": runs}))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.abspath(__file__), "--worker", str(spec)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"2-process run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")

    def load(name):
        return torch.load(str(tmp_path / name / "consolidated.pth"), map_location="cpu", weights_only=False)

    ddp = torch.load(str(tmp_path / "ddp" / "checkpoint.pth"), map_location="cpu", weights_only=False)
    assert len(ddp["optimizer"]["param_groups"]) == len(ref["optimizer"]["param_groups"]) > 8
    for which in ("student", "teacher"):
        assert _max_diff(ddp[which], ref[which]) < TOL_SINGLE, f"DDP {which}"
        for stage in (1, 2, 3):
            ds = load(f"zero{stage}")
            assert ds["step"] == STEPS
            err = _max_diff(ds[which], ref[which])
            assert err < TOL_SINGLE, f"ZeRO-{stage} {which} vs single process: {err:.2e}"
            err = _max_diff(ds[which], ddp[which])
            assert err < TOL_ZERO, f"ZeRO-{stage} {which} vs DDP: {err:.2e}"
        err = _max_diff(load("zero2_resumed")[which], load("zero2")[which])
        assert err < TOL_ZERO, f"ZeRO-2 resumed {which}: {err:.2e}"
    assert _max_diff(ref["student"], ref_plain["student"]) > 4 * TOL_SINGLE


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker(sys.argv[sys.argv.index("--worker") + 1])
