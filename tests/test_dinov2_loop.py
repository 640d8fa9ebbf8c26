"""The DINOv2 loop semantics, each a config key whose default is the DINO v1 behaviour, against the
official DINOv2 code written out here (dinov2/train/train.py do_train, build_schedulers,
apply_optim_scheduler; dinov2/utils/utils.py CosineScheduler):

    optim.clip_grad_mode=per_module      `for v in model.student.values(): v.clip_grad_norm_(clip)`:
                                         torch's clip_grad_norm_ on each student submodule
    loss.teacher_temp_schedule=per_iteration   CosineScheduler(teacher_temp, teacher_temp, W, W,
                                         warmup_teacher_temp) over W = warmup epochs x epoch length
    optim.freeze_last_layer_mode=zero_lr  AdamW with last_layer_lr_schedule (the lr schedule, 0 while
                                         frozen) on the last layers

through the engine's one step (fastdino/step.py) on a tiny DINOv2 run (iBOT, KoLeo, separate or
shared iBOT head); the defaults, the shipped DINOv2 configs and a compiled step."""
import copy
import math

import numpy as np
import pytest
import torch

from fastdino.config import Config, load_config
from fastdino.data.masking import IBOTMasks
from fastdino.distributed import DistContext
from fastdino.optim import param_multipliers
from fastdino.schedules import HYPERPARAMS, LAST_LAYER_FROZEN, LR, TEACHER_TEMP, WD, Schedules
from fastdino.train import build_run

B, N_LOCAL, GLOBAL, LOCAL, K, K_IBOT = 4, 2, 56, 28, 48, 40
DINOV2 = {"optim.clip_grad_mode": "per_module", "loss.teacher_temp_schedule": "per_iteration",
          "optim.freeze_last_layer_mode": "zero_lr"}
DINO = {"optim.clip_grad_mode": "per_tensor", "loss.teacher_temp_schedule": "per_epoch",
        "optim.freeze_last_layer_mode": "skip"}


def v2_cfg(*extra, ibot_head="separate"):
    """dinov2_vits14 of depth 2 on 56 / 28 px crops, DINO + iBOT + KoLeo (as tests/test_dinov2_step.py)."""
    return load_config(None, [
        "model.arch=dinov2_vits14", "model.patch_size=14", "model.depth=2", f"model.out_dim={K}",
        f"model.ibot_out_dim={K_IBOT}", f"model.ibot_head={ibot_head}", "model.drop_path_rate=0.0",
        "model.norm_last_layer=false", "loss.targets=sinkhorn_knopp", "loss.koleo_weight=0.1", "loss.ibot_weight=1.0",
        "loss.warmup_teacher_temp=0.04", "loss.teacher_temp=0.07", "loss.warmup_teacher_temp_epochs=1",
        f"optim.batch_size_per_gpu={B}", "optim.epochs=2", "optim.lr=0.02", "optim.lr_scaling=sqrt_1024",
        "optim.warmup_epochs=0", "optim.layerwise_decay=0.9", "optim.patch_embed_lr_mult=0.2",
        "optim.freeze_last_layer=0", "optim.momentum_teacher=0.9",
        f"data.global_crop_size={GLOBAL}", f"data.local_crop_size={LOCAL}", f"data.local_crops_number={N_LOCAL}",
        "train.device=cpu", "train.precision=fp32", *extra])


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    crops = [torch.randn(B, 3, GLOBAL, GLOBAL, generator=g) for _ in range(2)]
    crops += [torch.randn(B, 3, LOCAL, LOCAL, generator=g) for _ in range(N_LOCAL)]
    masks = IBOTMasks(GLOBAL // 14)(seed, 0, torch.randperm(64, generator=g)[:B].numpy())
    return crops, masks


def make_run(cfg, steps_per_epoch=4):
    return build_run(cfg, DistContext(device=torch.device("cpu")), steps_per_epoch=steps_per_epoch)


def step(run, it, seed=None):
    run.state.load_hyperparams(run.table, it)
    return run.step_fn(run.state, *batch(it + 3 if seed is None else seed))


def grads_of(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------
# the defaults are DINO v1's; the shipped DINOv2 configs set DINOv2's
# ------------------------------------------------------------------------------------------------
def test_defaults_are_dino_and_dinov2_configs_set_dinov2():
    default = Config()
    for key, value in DINO.items():
        assert default.get(key) == value, key
    for name in ("vits16", "vits8", "vitb16", "vitb8", "demo"):
        cfg = load_config(f"configs/{name}.json")
        assert {k: cfg.get(k) for k in DINO} == DINO, name
    for name in ("dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14"):
        cfg = load_config(f"configs/{name}.json")
        assert {k: cfg.get(k) for k in DINOV2} == DINOV2, name


# ------------------------------------------------------------------------------------------------
# per_module clipping: torch's clip_grad_norm_ on each student submodule
# ------------------------------------------------------------------------------------------------
_RAW: dict = {}


def raw_step(ibot_head):
    """The student before the step and its gradients of step 0 with no clipping (clip_grad 0)."""
    if ibot_head not in _RAW:
        run = make_run(v2_cfg("optim.clip_grad=0", ibot_head=ibot_head))
        before = copy.deepcopy(run.backend.student_module)
        step(run, 0)
        _RAW[ibot_head] = (before, grads_of(run.backend.student_module))
    return _RAW[ibot_head]


def official_clip(student, grads, clip, dtype=torch.float32):
    """The official loop on a copy: each submodule's gradients through torch.nn.utils.clip_grad_norm_
    (in `dtype`: torch's fp32 norms on the CPU are off by ~1e-4 on tensors of millions of elements;
    the flat Triton kernel's and the loop reference's are not, so those are held to the fp64 result)."""
    ref = copy.deepcopy(student).to(dtype)
    for n, p in ref.named_parameters():
        p.grad = grads[n].to(dtype, copy=True) if n in grads else None
    for module in ref.children():  # backbone, head, ibot_head (model.student.values())
        torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
    return grads_of(ref)


def module_norms(grads) -> dict[str, float]:
    """{submodule: the L2 norm of its gradients} (fp64)."""
    out = {}
    for prefix in sorted({n.split(".")[0] for n in grads}, key=["backbone", "head", "ibot_head"].index):
        out[prefix] = math.sqrt(sum(g.double().square().sum().item() for n, g in grads.items()
                                    if n.split(".")[0] == prefix))
    return out


def check_per_module_step(impl, ibot_head, regime):
    """One engine step with per_module clipping against the official loop on the unclipped gradients."""
    before, raw = raw_step(ibot_head)
    norms = module_norms(raw)
    assert list(norms) == ["backbone", "head", "ibot_head"][:3 if ibot_head == "separate" else 2]
    values = sorted(norms.values())
    clip = (values[0] + values[1]) / 2 if regime == "some_clip" else 2 * values[-1]
    clipped = {m for m, v in norms.items() if v > clip}
    assert (0 < len(clipped) < len(norms)) if regime == "some_clip" else not clipped

    run = make_run(v2_cfg(f"optim.clip_grad={clip}", "optim.clip_grad_mode=per_module",
                          f"optim.clip_impl={impl}", ibot_head=ibot_head))
    assert run.backend.clipper.modules == list(norms)
    step(run, 0)
    ours = grads_of(run.backend.student_module)
    exact = run.resolved.clip != "foreach"  # foreach: torch's own fp32 norms; loop, triton: accurate ones
    expected = official_clip(before, raw, clip, torch.float64 if exact else torch.float32)
    assert ours.keys() == expected.keys() == raw.keys()
    for n in ours:
        if n.split(".")[0] not in clipped:
            assert torch.equal(ours[n], raw[n]), n  # a factor of exactly 1: untouched
        torch.testing.assert_close(ours[n].to(expected[n].dtype), expected[n], rtol=1e-5 if exact else 1e-6,
                                   atol=0, msg=n)
    after = module_norms(ours)
    for m in clipped:  # a clipped module's norm is the clip (to torch's fp32 CPU norm's rounding)
        assert after[m] == pytest.approx(clip, rel=1e-5 if exact else 1e-3), m


@pytest.mark.parametrize("impl, ibot_head", [("auto", "separate"), ("auto", "shared"), ("loop", "separate"),
                                             ("loop", "shared"),
                                             pytest.param("triton", "separate", marks=pytest.mark.interpreted)])
def test_per_module_clipping_is_clip_grad_norm_per_submodule(impl, ibot_head):
    """Clip between the module norms: the larger modules are clipped, the smaller one is untouched."""
    check_per_module_step(impl, ibot_head, "some_clip")


def test_per_module_clipping_below_the_clip_changes_nothing():
    check_per_module_step("auto", "separate", "none_clip")


def test_per_module_differs_from_per_tensor_and_flags_nonfinite():
    """Same clip, other rule: other gradients. A non-finite gradient is still a skipped update."""
    before, raw = raw_step("separate")
    clip = 0.5 * min(module_norms(raw).values())
    runs = {mode: make_run(v2_cfg(f"optim.clip_grad={clip}", f"optim.clip_grad_mode={mode}"))
            for mode in ("per_tensor", "per_module")}
    for run in runs.values():
        step(run, 0)
    a, b = (grads_of(r.backend.student_module) for r in runs.values())
    assert max((a[n] - b[n]).abs().max().item() for n in a) > 1e-3 * max(g.abs().max().item() for g in b.values())

    run = runs["per_module"]  # a non-finite gradient: the whole update skipped, reported
    b_ = run.backend
    state_before = copy.deepcopy(b_.student_module.state_dict())
    b_.zero_grad()
    b_.student_module.backbone.blocks[0].ls1.gamma.grad.fill_(float("nan"))
    hp = run.state.hp
    assert bool(b_.step(hp[LR], hp[WD], torch.tensor(False), hp[LAST_LAYER_FROZEN]))
    for k, v in b_.student_module.state_dict().items():
        assert torch.equal(v, state_before[k]), k


# ------------------------------------------------------------------------------------------------
# the teacher temperature per iteration: the official CosineScheduler
# ------------------------------------------------------------------------------------------------
class OfficialCosineScheduler:
    """dinov2/utils/utils.py CosineScheduler, as written there."""

    def __init__(self, base_value, final_value, total_iters, warmup_iters=0, start_warmup_value=0, freeze_iters=0):
        self.final_value = final_value
        self.total_iters = total_iters
        freeze_schedule = np.zeros((freeze_iters))
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
        iters = np.arange(total_iters - warmup_iters - freeze_iters)
        with np.errstate(invalid="ignore", divide="ignore"):
            schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
        self.schedule = np.concatenate((freeze_schedule, warmup_schedule, schedule))
        assert len(self.schedule) == self.total_iters

    def __getitem__(self, it):
        return self.final_value if it >= self.total_iters else self.schedule[it]


def official_teacher_temp(warmup_teacher_temp, teacher_temp, warmup_epochs, epoch_length):
    """build_schedulers' teacher_temp schedule."""
    return OfficialCosineScheduler(base_value=teacher_temp, final_value=teacher_temp,
                                   total_iters=warmup_epochs * epoch_length, warmup_iters=warmup_epochs * epoch_length,
                                   start_warmup_value=warmup_teacher_temp)


@pytest.mark.parametrize("warmup, epochs, niter", [(3, 5, 4), (1, 2, 7), (2, 2, 3), (0, 3, 2)])
def test_teacher_temp_per_iteration_is_the_official_cosine_scheduler(warmup, epochs, niter):
    cfg = load_config(None, ["loss.warmup_teacher_temp=0.04", "loss.teacher_temp=0.07",
                             f"loss.warmup_teacher_temp_epochs={warmup}", f"optim.epochs={epochs}",
                             "optim.warmup_epochs=0", "loss.teacher_temp_schedule=per_iteration"])
    sch = Schedules.from_config(cfg, global_batch=256, niter_per_ep=niter)
    official = official_teacher_temp(0.04, 0.07, warmup, niter)
    expected = np.array([official[it] for it in range(epochs * niter)])
    table = sch.table("cpu")
    np.testing.assert_array_equal(np.array([sch.values(it)["teacher_temp"] for it in range(epochs * niter)]), expected)
    np.testing.assert_array_equal(table[TEACHER_TEMP].numpy(), expected.astype(np.float32))
    if warmup:
        assert expected[0] == 0.04 and expected[warmup * niter - 1] == 0.07  # the last warmup iteration is the base
        assert len(set(expected[:niter])) == niter  # a new value every iteration
    # the other rows do not depend on the rule
    per_epoch = Schedules.from_config(load_config(None, [f"loss.warmup_teacher_temp_epochs={warmup}",
                                                         "loss.warmup_teacher_temp=0.04", "loss.teacher_temp=0.07",
                                                         f"optim.epochs={epochs}", "optim.warmup_epochs=0"]),
                                      global_batch=256, niter_per_ep=niter).table("cpu")
    other = [i for i in range(len(HYPERPARAMS)) if i != TEACHER_TEMP]
    assert torch.equal(per_epoch[other], table[other])
    # DINO's per-epoch schedule is unchanged: np.linspace over the warmup epochs, constant in an epoch
    dino = np.concatenate((np.linspace(0.04, 0.07, warmup), np.ones(epochs - warmup) * 0.07))
    np.testing.assert_array_equal(per_epoch[TEACHER_TEMP].numpy(), dino[np.arange(epochs * niter) // niter].astype(np.float32))


def test_teacher_temp_per_iteration_reaches_the_step():
    """The step reads hp[TEACHER_TEMP]: the run's table holds the official per-iteration values."""
    run = make_run(v2_cfg("loss.teacher_temp_schedule=per_iteration", "loss.warmup_teacher_temp_epochs=1"),
                   steps_per_epoch=3)
    official = official_teacher_temp(0.04, 0.07, 1, 3)
    for it in range(6):
        run.state.load_hyperparams(run.table, it)
        assert run.state.hp[TEACHER_TEMP].item() == pytest.approx(official[it], rel=1e-7)


# ------------------------------------------------------------------------------------------------
# the frozen last layer with lr 0: torch's AdamW with the official last_layer_lr_schedule
# ------------------------------------------------------------------------------------------------
def official_replay(student, rules, schedules, grads_per_step, freeze_iters):
    """torch.optim.AdamW (single-tensor), one group per parameter, stepped with the engine's
    (clipped) gradients and the official apply_optim_scheduler(lr, wd, last_layer_lr):
    last_layer_lr_schedule = the lr schedule with its first freeze iterations set to 0."""
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p], "name": n} for n, p in named], foreach=False, fused=False)
    last_layer_lr = schedules.lr.copy()
    last_layer_lr[:freeze_iters] = 0
    states = []
    for it, grads in enumerate(grads_per_step):
        for n, p in named:
            p.grad = grads[n].clone()
        for group in opt.param_groups:
            rule = rules[group["name"]]
            group["weight_decay"] = schedules.wd[it] * rule.wd_mult
            group["lr"] = (last_layer_lr[it] if rule.last_layer else schedules.lr[it]) * rule.lr_mult
        opt.step()
        states.append({n: p.detach().clone() for n, p in named})
    return opt, states


def test_zero_lr_freeze_is_adamw_with_the_official_last_layer_lr():
    """2 steps per epoch, the last layers of both heads frozen in epoch 0 with lr 0: their weights do
    not move (bit for bit) but their Adam moments and step count do, equal to torch's AdamW with the
    official schedule; then they train as in torch. The skip rule leaves moments and count at 0."""
    cfg = v2_cfg("optim.freeze_last_layer=1", "optim.freeze_last_layer_mode=zero_lr", "optim.clip_grad=0.5",
                 "optim.clip_grad_mode=per_module", "loss.teacher_temp_schedule=per_iteration", "optim.weight_decay=0.1")
    run = make_run(cfg, steps_per_epoch=2)
    student = run.backend.student_module
    start = copy.deepcopy(student)
    last = [n for n, p in student.named_parameters() if p.requires_grad and ".last_layer." in n]
    assert {n.split(".")[0] for n in last} == {"head", "ibot_head"}
    grads, states = [], []
    for it in range(4):
        step(run, it)
        grads.append(grads_of(student))
        states.append({n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad})
        if it < 2:
            for n in last:
                assert torch.equal(states[-1][n], start.get_parameter(n)), n  # frozen: not a bit moved
    rules = param_multipliers(start, 0.9, 0.2)
    ref_opt, ref_states = official_replay(copy.deepcopy(start), rules, run.schedules, grads, freeze_iters=2)
    for it in range(4):
        for n in states[it]:
            torch.testing.assert_close(states[it][n], ref_states[it][n], rtol=1e-6, atol=1e-7, msg=f"step {it}: {n}")
    opt = run.backend.optimizer
    ref_by_name = {g["name"]: ref_opt.state[g["params"][0]] for g in ref_opt.param_groups}
    for n in last:
        ours, theirs = opt.state[student.get_parameter(n)], ref_by_name[n]
        assert ours["step"].item() == theirs["step"].item() == 4, n  # counted through the freeze
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-9, msg=f"{n} {key}")
        assert not torch.equal(states[3][n], start.get_parameter(n)), n  # released: it trains

    skip = make_run(v2_cfg("optim.freeze_last_layer=1", "optim.clip_grad=0.5", "optim.clip_grad_mode=per_module",
                           "optim.weight_decay=0.1"), steps_per_epoch=2)
    for it in range(2):
        step(skip, it)
    for n in last:
        state = skip.backend.optimizer.state[skip.backend.student_module.get_parameter(n)]
        assert state["step"].item() == 0 and not state["exp_avg"].any(), n


def test_zero_lr_moments_match_after_the_freeze_in_the_optimizer_alone():
    """DINOAdamW alone (static lists, and one group at a time as DeepSpeed ZeRO steps it): lr 0 on the
    last layers while frozen equals torch's AdamW with lr 0 there (weights, moments, step counts)."""
    from fastdino.optim import DINOAdamW, param_groups

    from test_optim import _random_grads, _set_grads, dinov2_student, official_rule, optimizer_step

    for one_group_at_a_time in (False, True):
        ours, ref = dinov2_student(), dinov2_student()
        start = {n: p.detach().clone() for n, p in ours.named_parameters()}
        opt = DINOAdamW(param_groups(ours, 0.9, 0.2), static_state=not one_group_at_a_time, freeze_mode="zero_lr")
        rules = official_rule(ref, 0.9, 0.2)
        named = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
        ref_opt = torch.optim.AdamW([{"params": [p], "name": n} for n, p in named], foreach=False, fused=False)
        for it, (lr, wd, frozen) in enumerate([(1e-2, 0.04, 1.0), (8e-3, 0.1, 1.0), (5e-3, 0.3, 0.0)]):
            _set_grads(ours, _random_grads(ours, it))
            _set_grads(ref, _random_grads(ref, it))
            optimizer_step(opt, lr, wd, frozen, one_group_at_a_time)
            for group in ref_opt.param_groups:
                last, lr_mult, wd_mult = rules[group["name"]]
                group["lr"], group["weight_decay"] = (0.0 if last and frozen else lr) * lr_mult, wd * wd_mult
            ref_opt.step()
            theirs = dict(ref.named_parameters())
            for n, p in ours.named_parameters():
                torch.testing.assert_close(p, theirs[n], rtol=1e-6, atol=1e-7, msg=n)
                if ".last_layer." in n and frozen:
                    assert torch.equal(p, start[n]), n
        ref_state = {g["name"]: ref_opt.state[g["params"][0]] for g in ref_opt.param_groups}
        for n, p in ours.named_parameters():
            if p.requires_grad:
                assert opt.state[p]["step"].item() == ref_state[n]["step"].item() == 3, n
                torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref_state[n]["exp_avg_sq"], rtol=1e-6,
                                           atol=1e-12, msg=n)


# ------------------------------------------------------------------------------------------------
# the three together in a compiled step
# ------------------------------------------------------------------------------------------------
def test_compiled_step_with_the_dinov2_loop_equals_eager():
    """train.compile_step with layer-wise decay (many parameter groups), per_module clipping, the
    zero_lr freeze and the per-iteration teacher temperature: one graph (fullgraph), no recompile
    across steps with new hyper-parameters and the release of the last layers, equal to eager."""
    from torch._dynamo.utils import counters

    from test_optim import _step, _v2_cfg

    torch._dynamo.reset()
    extra = [f"{k}={v}" for k, v in DINOV2.items()] + ["loss.warmup_teacher_temp_epochs=1",
                                                        "loss.warmup_teacher_temp=0.04", "loss.teacher_temp=0.07"]
    ctx = DistContext(device=torch.device("cpu"))
    eager = build_run(_v2_cfg(*extra), ctx, steps_per_epoch=2)
    compiled = build_run(_v2_cfg(*extra, "train.compile_step=true"), ctx, steps_per_epoch=2)
    assert compiled.resolved.compile == "step"
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for it in range(3):
            a, b = _step(eager, it), _step(compiled, it)
            torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-5, atol=1e-5)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1
    step_lr = 0.05 * math.sqrt(2 / 1024)
    ea, co = eager.backend.student_module.state_dict(), compiled.backend.student_module.state_dict()
    for k in ea:
        torch.testing.assert_close(co[k], ea[k], rtol=0, atol=0.5 * step_lr, msg=k)
    state = compiled.backend.optimizer.state[compiled.backend.student_module.head.last_layer.weight_v]
    assert state["step"].item() == 3  # zero_lr: the frozen steps counted
