"""The DINOv2 objective through the engine's one step (fastdino/step.py) against the official
SSLMetaArch.forward_backward written out literally here (DINO local + global terms with the teacher
views swapped, KoLeo on each global crop's pre-head [CLS], the iBOT patch loss over the masked tokens
with the separate iBOT head; centering with its own iBOT center, or Sinkhorn-Knopp over the real
masked rows), and with DINOv3's local-crop reweighting of the DINO term (loss.reweight_local): the
loss, each term, every student gradient, and the centers after the step."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdino.config import load_config
from fastdino.data.masking import IBOTMasks
from fastdino.distributed import DistContext
from fastdino.train import build_run

B, N_LOCAL, GLOBAL, LOCAL, K, K_IBOT = 4, 2, 56, 28, 48, 40
TEMP = 0.04


def dinov2_cfg(targets, *extra):
    return load_config(None, [
        "model.arch=dinov2_vits14", "model.patch_size=14", "model.depth=2", f"model.out_dim={K}",
        f"model.ibot_out_dim={K_IBOT}", "model.drop_path_rate=0.0", "model.norm_last_layer=false",
        f"loss.targets={targets}", "loss.koleo_weight=0.1", "loss.ibot_weight=1.0",
        f"loss.warmup_teacher_temp={TEMP}", f"loss.teacher_temp={TEMP}",
        f"optim.batch_size_per_gpu={B}", "optim.epochs=2", "optim.warmup_epochs=0", "optim.clip_grad=0",
        "optim.freeze_last_layer=0", f"data.global_crop_size={GLOBAL}", f"data.local_crop_size={LOCAL}",
        f"data.local_crops_number={N_LOCAL}", "train.device=cpu", "train.precision=fp32", *extra])


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    crops = [torch.randn(B, 3, GLOBAL, GLOBAL, generator=g) for _ in range(2)]
    crops += [torch.randn(B, 3, LOCAL, LOCAL, generator=g) for _ in range(N_LOCAL)]
    masks = IBOTMasks(GLOBAL // 14)(seed, 0, torch.randperm(64, generator=g)[:B].numpy())
    assert 0 < int(masks.n_masked) < masks.upper_bound  # real rows and padding
    return crops, masks


# ---------------------------------------------------------------------------- the official objective
def official_sinkhorn_knopp(teacher_output, teacher_temp, n_rows, n_iterations=3):
    """dinov2/loss: sinkhorn_knopp_teacher in one process (B = n_rows)."""
    Q = torch.exp(teacher_output.float() / teacher_temp).t()
    Q /= torch.sum(Q)
    for _ in range(n_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= Q.shape[0]
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= n_rows
    Q *= n_rows
    return Q.t()


def official_koleo(x, eps=1e-8):
    """dinov2/loss/koleo_loss.py: normalize, nearest neighbour by inner product (diagonal -1),
    pairwise distance with eps, -mean log."""
    x = F.normalize(x, eps=eps, p=2, dim=-1)
    dots = x @ x.t()
    dots.view(-1)[:: (x.shape[0] + 1)].fill_(-1)
    _, nn_index = torch.max(dots, dim=1)
    d = nn.PairwiseDistance(2, eps=eps)(x, x[nn_index])
    return -torch.log(d + eps).mean()


def official_objective(student, teacher, crops, masks, targets, dino_center, ibot_center, local_weight=1.0):
    """ssl_meta_arch.forward_backward (separate iBOT head, student_temp 0.1), returning the
    accumulated loss, its parts, and the teacher outputs the centers are updated from. local_weight:
    DINOv3's compute_losses under dino.reweight_dino_local_loss, the local term (its scale times its
    loss, the same as DINOv2's local term here) times dino_local_loss_schedule[iteration]."""
    n_masked = int(masks.n_masked)
    mask_indices = masks.mask_indices[:n_masked]
    global_crops, local_crops = torch.cat(crops[:2]), torch.cat(crops[2:])
    with torch.no_grad():
        t = teacher.backbone(global_crops, is_training=True)
        t_cls = t["x_norm_clstoken"].chunk(2)
        t_cls = torch.cat((t_cls[1], t_cls[0]))  # swapped: view A is matched to view B
        t_patch = t["x_norm_patchtokens"].flatten(0, 1)[mask_indices]
        t_cls_h, t_patch_h = teacher.head(t_cls), teacher.ibot_head(t_patch)
        if targets == "centering":
            q_cls = F.softmax((t_cls_h - dino_center) / TEMP, dim=-1)
            q_patch = F.softmax((t_patch_h - ibot_center) / TEMP, dim=-1)
        else:
            q_cls = official_sinkhorn_knopp(t_cls_h, TEMP, t_cls_h.shape[0])
            q_patch = official_sinkhorn_knopp(t_patch_h, TEMP, n_masked)
        q_cls = q_cls.view(2, B, -1)
    s_g = student.backbone(global_crops, masks=masks.masks, is_training=True)
    s_l = student.backbone(local_crops, is_training=True)
    s_l_h = student.head(s_l["x_norm_clstoken"])
    s_g_h = student.head(s_g["x_norm_clstoken"])
    s_patch_h = student.ibot_head(s_g["x_norm_patchtokens"].flatten(0, 1)[mask_indices])

    def dino_loss(students, teachers):
        total = 0
        for s in students:
            lsm = F.log_softmax(s / 0.1, dim=-1)
            for q in teachers:
                total = total - torch.sum(q * lsm, dim=-1).mean()
        return total

    n_terms = (2 - 1) * 2 + max(N_LOCAL * 2, 1)
    dino_local = dino_loss(s_l_h.chunk(N_LOCAL), q_cls) / n_terms * local_weight
    dino_global = dino_loss([s_g_h], [q_cls.flatten(0, 1)]) * 2 / n_terms
    koleo = 0.1 * sum(official_koleo(p) for p in s_g["x_norm_clstoken"].chunk(2))
    per_token = torch.sum(q_patch * F.log_softmax(s_patch_h / 0.1, dim=-1), dim=-1)
    ibot = -(per_token * masks.mask_weights[:n_masked]).sum() / masks.masks.shape[0] * 2 * 0.5
    parts = {"dino": dino_local + dino_global, "koleo": koleo, "ibot": ibot}
    return dino_local + dino_global + koleo + ibot, parts, (t_cls_h, t_patch_h)


# ---------------------------------------------------------------------------- the test
# DINOv3's reweighting with a warmup from 0.2 to 0.8 over the first epoch (4 iterations), then a cosine to
# 0.4: the step at iteration 2 weighs the local pairs 0.2 + 0.6 * 2 / 4 = 0.5
REWEIGHT = ["loss.reweight_local=true", "loss.local_weight_start=0.2", "loss.local_weight_peak=0.8",
            "loss.local_weight_end=0.4", "loss.local_weight_warmup_epochs=1"]


@pytest.mark.parametrize("targets,reweight", [("centering", False), ("sinkhorn_knopp", False),
                                              ("sinkhorn_knopp", True)])
def test_step_is_the_official_dinov2_objective(targets, reweight):
    from fastdino.schedules import DINO_LOCAL_WEIGHT

    run = build_run(dinov2_cfg(targets, *(REWEIGHT if reweight else [])), DistContext(device=torch.device("cpu")),
                    steps_per_epoch=4)
    b, state = run.backend, run.state
    student, teacher = b.student_module, b.teacher_module
    assert hasattr(student, "ibot_head") and student.backbone.mask_token.requires_grad
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    with torch.no_grad():  # a non-zero center makes the centering checks meaningful
        if targets == "centering":
            state.targets.center.normal_(0, 0.1)
            state.patch_targets.center.normal_(0, 0.1)
    dino_center = state.targets.center.clone() if targets == "centering" else None
    ibot_center = state.patch_targets.center.clone() if targets == "centering" else None

    crops, masks = batch(3)
    it = 2 if reweight else 0
    state.load_hyperparams(run.table, it)
    out = run.step_fn(state, crops, masks)
    local_weight = float(run.table[DINO_LOCAL_WEIGHT, it]) if reweight else 1.0
    assert local_weight == pytest.approx(0.5 if reweight else 1.0, rel=1e-7)

    ref_loss, parts, (t_cls_h, t_patch_h) = official_objective(ref_student, ref_teacher, crops, masks, targets,
                                                               dino_center, ibot_center, local_weight)
    ref_loss.backward()
    torch.testing.assert_close(out["loss"], ref_loss.detach(), rtol=1e-5, atol=1e-5)
    for name, value in parts.items():
        weight = {"dino": 1.0, "koleo": 0.1, "ibot": 1.0}[name]
        torch.testing.assert_close(out[name] * weight, value.detach(), rtol=1e-5, atol=1e-5, msg=name)
    grads = dict(student.named_parameters())
    for name, p in ref_student.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            err = (grads[name].grad - p.grad).abs().max()  # fp32 rounding, relative to the tensor's scale
            assert err <= 1e-4 * p.grad.abs().max() + 1e-9, f"{name}: {err.item():.3g}"
    if targets == "centering":  # m = 0.9: the DINO center over all teacher rows, iBOT's over the real masked rows
        torch.testing.assert_close(state.targets.center, 0.9 * dino_center + 0.1 * t_cls_h.mean(0, keepdim=True))
        torch.testing.assert_close(state.patch_targets.center,
                                   0.9 * ibot_center + 0.1 * t_patch_h.mean(0, keepdim=True))


def test_batch_gradient_is_the_mean_of_its_halves_gradients():
    """What DDP averages: one step on 16 images (DINO + iBOT with block masks keyed per image,
    data.mask_group_size=4, centering whose centers start at 0) gives the mean of the gradients of
    its two 8-image halves, each with the masks its rank's loader would draw, to float rounding.
    (Per-rank terms - KoLeo - are off; Sinkhorn-Knopp needs the ranks' all-reduce: the 2-process
    tests cover it.)"""
    import numpy as np

    from fastdino.config import load_config
    from fastdino.data.masking import IBOTMasks
    from fastdino.distributed import DistContext
    from fastdino.train import build_run

    n, size = 16, 28

    def cfg(batch):
        return load_config(None, [
            "model.arch=dinov2_vitt14", "model.patch_size=14", "model.depth=2", "model.out_dim=64",
            "model.ibot_out_dim=64", "model.drop_path_rate=0.0", "model.norm_last_layer=false",
            "loss.targets=centering", "loss.ibot_weight=1.0", f"optim.batch_size_per_gpu={batch}", "optim.epochs=2",
            "optim.warmup_epochs=1", "optim.freeze_last_layer=0", "optim.clip_grad=0",
            f"data.global_crop_size={size}", "data.local_crop_size=14", "data.local_crops_number=2",
            "train.device=cpu", "train.precision=fp32"])

    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(n, 3, size, size, generator=g) for _ in range(2)]
    crops += [torch.randn(n, 3, 14, 14, generator=g) for _ in range(2)]
    index = np.arange(100, 100 + n)
    masker = IBOTMasks(size // 14, group_size=4)

    def grads(rows):
        run = build_run(cfg(len(range(*rows.indices(n)))), DistContext(device=torch.device("cpu")), steps_per_epoch=4)
        run.state.load_hyperparams(run.table, 0)
        out = run.step_fn(run.state, [c[rows] for c in crops], masker(0, 0, index[rows]))
        return {k: p.grad.clone() for k, p in run.backend.student_module.named_parameters() if p.grad is not None}, out

    full, out = grads(slice(0, n))
    first, out1 = grads(slice(0, n // 2))
    second, out2 = grads(slice(n // 2, n))
    assert out["ibot"].item() == pytest.approx((out1["ibot"].item() + out2["ibot"].item()) / 2, rel=1e-6)
    for k, v in full.items():
        torch.testing.assert_close((first[k] + second[k]) / 2, v, rtol=0, atol=1e-5 * v.abs().max().item() + 1e-12,
                                   msg=k)
    assert any(not torch.allclose(first[k], second[k]) for k in full if k.startswith("ibot_head"))
