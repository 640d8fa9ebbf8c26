"""DINOv3's local-crop reweighting of the DINO term (loss.reweight_local): the schedule against the
official linear_warmup_cosine_decay written out, the config keys and their one-line errors, the DINO
term against the official DINOv3 loss (reference and fused, gradients included), a weight of 1 and
reweighting off equal to today's loss bit for bit, and the weight read from the step's hyper-parameter
tensor: no recompile when it changes (the term alone, and the whole compiled step)."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastdino.config import ConfigError, load_config
from fastdino.kernels.soft_cross_entropy import soft_cross_entropy
from fastdino.losses import DINOTerm
from fastdino.schedules import DINO_LOCAL_WEIGHT, HYPERPARAMS, Schedules, linear_warmup_cosine_decay

TAU = 0.1
FUSED_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------
# The schedule
# ---------------------------------------------------------------------------------------------
def official_linear_warmup_cosine_decay(start, peak, end, warmup_iterations, total_iterations,
                                        cosine_iterations=None):
    """facebookresearch/dinov3 dinov3/train/cosine_lr_scheduler.py linear_warmup_cosine_decay."""
    linear = np.linspace(start, peak, warmup_iterations, endpoint=False)
    if cosine_iterations is None:
        cosine_iterations = total_iterations - warmup_iterations
    cosine = np.cos(np.linspace(0, np.pi, cosine_iterations))
    cosine = (cosine + 1) / 2
    cosine = (peak - end) * cosine + end
    remaining_iterations = total_iterations - cosine_iterations - warmup_iterations
    assert remaining_iterations >= 0
    constant = np.full((remaining_iterations,), fill_value=end)
    return np.concatenate([linear, cosine, constant])


@pytest.mark.parametrize("start,peak,end,warmup,total,cosine", [
    (0.5, 0.5, 0.5, 0, 30, None),  # the official default: 0.5 throughout
    (0.5, 0.5, 0.5, 0, 30, 0),  # the 7B high-resolution adaptation: cosine_epochs 0
    (0.2, 1.0, 0.3, 7, 40, None),  # warmup, then a cosine over the rest
    (0.0, 1.0, 0.25, 5, 40, 11),  # warmup, cosine, constant tail
    (1.0, 0.1, 0.7, 0, 13, 1),  # a one-iteration cosine: the peak
    (0.3, 0.9, 0.0, 9, 9, None),  # all warmup
])
def test_schedule_is_the_official_linear_warmup_cosine_decay(start, peak, end, warmup, total, cosine):
    ours = linear_warmup_cosine_decay(start, peak, end, warmup, total, cosine)
    official = official_linear_warmup_cosine_decay(start, peak, end, warmup, total, cosine)
    assert ours.shape == official.shape == (total,)
    np.testing.assert_allclose(ours, official, rtol=1e-14, atol=1e-15)


def _cfg(*extra):
    return load_config(None, ["optim.epochs=5", "optim.warmup_epochs=0", *extra])


@pytest.mark.parametrize("warmup_epochs,cosine_epochs", [(0, -1), (2, -1), (1, 2), (0, 0)])
def test_schedules_row_and_log(warmup_epochs, cosine_epochs):
    """Schedules.from_config: the table's dino_local_weight row is the official schedule over epochs x
    iterations per epoch (its OFFICIAL_EPOCH_LENGTH), logged as dino_local_weight; cosine_epochs -1
    is the official schedule without the key (the cosine over the rest)."""
    niter = 6
    cfg = _cfg("loss.reweight_local=true", "loss.local_weight_start=0.1", "loss.local_weight_peak=0.9",
               "loss.local_weight_end=0.3", f"loss.local_weight_warmup_epochs={warmup_epochs}",
               f"loss.local_weight_cosine_epochs={cosine_epochs}")
    sch = Schedules.from_config(cfg, global_batch=256, niter_per_ep=niter)
    official = official_linear_warmup_cosine_decay(0.1, 0.9, 0.3, warmup_epochs * niter, 5 * niter,
                                                   None if cosine_epochs < 0 else cosine_epochs * niter)
    np.testing.assert_allclose(sch.dino_local_weight, official, rtol=1e-14, atol=1e-15)
    table = sch.table("cpu")
    assert table.shape == (len(HYPERPARAMS), 5 * niter)
    np.testing.assert_array_equal(table[DINO_LOCAL_WEIGHT].numpy(), sch.dino_local_weight.astype(np.float32))
    assert [sch.values(it)["dino_local_weight"] for it in range(5 * niter)] == sch.dino_local_weight.tolist()


def test_schedules_off_has_no_weight():
    sch = Schedules.from_config(_cfg(), global_batch=256, niter_per_ep=4)
    assert sch.dino_local_weight is None and "dino_local_weight" not in sch.values(3)
    assert not sch.table("cpu")[DINO_LOCAL_WEIGHT].any()  # a row nobody reads


# ---------------------------------------------------------------------------------------------
# Config keys
# ---------------------------------------------------------------------------------------------
def _one_line_error(match, *overrides):
    with pytest.raises(ConfigError, match=match) as e:
        _cfg(*overrides)
    assert "\n" not in str(e.value)


def test_config_keys_and_errors():
    cfg = _cfg()
    assert cfg.loss.reweight_local is False  # default off
    assert (cfg.loss.local_weight_start, cfg.loss.local_weight_peak, cfg.loss.local_weight_end) == (0.5, 0.5, 0.5)
    assert (cfg.loss.local_weight_warmup_epochs, cfg.loss.local_weight_cosine_epochs) == (0, -1)
    _cfg("loss.reweight_local=true", "loss.local_weight_warmup_epochs=2", "loss.local_weight_cosine_epochs=3")
    _one_line_error("'loss.local_weight_peak': sets the local-crop weight, which is off", "loss.local_weight_peak=0.7")
    _one_line_error("'model.fused_head': the fused head is not built for the local-crop reweighting",
                    "loss.reweight_local=true", "model.fused_head=true")
    _one_line_error("'loss.reweight_local'.*local_crops_number", "loss.reweight_local=true",
                    "data.local_crops_number=0")
    _one_line_error("'loss.local_weight_end': must be >= 0", "loss.reweight_local=true", "loss.local_weight_end=-0.1")
    _one_line_error("'loss.local_weight_cosine_epochs': must be >= 0, or -1", "loss.reweight_local=true",
                    "loss.local_weight_cosine_epochs=-2")
    _one_line_error("'loss.local_weight_cosine_epochs': the warmup and cosine epochs must fit in optim.epochs=5",
                    "loss.reweight_local=true", "loss.local_weight_warmup_epochs=2",
                    "loss.local_weight_cosine_epochs=4")
    _one_line_error("'loss.local_weight_warmup_epochs': the warmup and cosine epochs must fit",
                    "loss.reweight_local=true", "loss.local_weight_warmup_epochs=6")


# ---------------------------------------------------------------------------------------------
# The DINO term
# ---------------------------------------------------------------------------------------------
def _official_dinov3_dino(student, teacher_probs, n_local, B, local_weight):
    """dinov3 compute_losses' DINO part (dino.loss_weight 1, global_ignore_diagonal) with its
    DINOLoss.forward: global_scale * global loss + local_scale * local_weight * local loss."""
    def dino_loss(student_logits, teacher_probs, ignore_diagonal=False):
        s_crops, b, _ = student_logits.shape
        t_crops = teacher_probs.shape[0]
        lsm = F.log_softmax(student_logits.double() / TAU, dim=-1)
        if not ignore_diagonal:
            return -torch.einsum("s b k, t b k -> ", lsm, teacher_probs) / (b * s_crops * t_crops)
        loss = -torch.einsum("s b k, t b k -> s t", lsm, teacher_probs)
        loss = torch.diagonal_scatter(loss, loss.new_zeros(min(s_crops, t_crops)))
        return loss.sum() / (b * s_crops * t_crops - b * min(s_crops, t_crops))

    views, q = student.unflatten(0, (2 + n_local, B)), teacher_probs.double().unflatten(0, (2, B))
    global_terms, local_terms = 2 * 1, 2 * n_local
    local_loss = dino_loss(views[2:], q)
    global_loss = dino_loss(views[:2], q, ignore_diagonal=True)
    return (local_terms / (global_terms + local_terms) * local_weight * local_loss
            + global_terms / (global_terms + local_terms) * global_loss)


def _term_inputs(B, K, n_views, seed):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n_views * B, K, generator=g) * 3).to(DEV)
    q = torch.softmax(torch.randn(2 * B, K, generator=g) * 2, dim=-1).to(DEV)
    return s, q


def _hp(local_weight):
    hp = torch.zeros(len(HYPERPARAMS), device=DEV)
    hp[DINO_LOCAL_WEIGHT] = local_weight
    return hp


def _loss_and_grad(term, s, q, hp=None):
    x = s.clone().requires_grad_()
    loss = term({"cls": x}, {"cls": q} if hp is None else {"cls": q, "hp": hp})
    loss.backward()
    return loss.detach(), x.grad


IMPLS = ["reference",
         pytest.param("fused", marks=pytest.mark.skipif(not FUSED_OK, reason="Triton: CUDA or interpreter"))]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,K,n_local,local_weight", [(3, 37, 2, 0.5), (2, 70, 5, 0.2), (5, 19, 1, 1.7)])
def test_term_is_the_official_dinov3_reweighted_loss(impl, B, K, n_local, local_weight):
    s, q = _term_inputs(B, K, 2 + n_local, seed=B * 100 + K)
    term = DINOTerm(2 + n_local, TAU, impl, reweight_local=True)
    loss, grad = _loss_and_grad(term, s, q, _hp(local_weight))
    x = s.double().requires_grad_()
    official = _official_dinov3_dino(x, q, n_local, B, local_weight)
    official.backward()
    torch.testing.assert_close(loss.double(), official.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), x.grad, rtol=1e-4, atol=1e-5 * x.grad.abs().max().item())


@pytest.mark.parametrize("impl", IMPLS)
def test_weight_one_and_off_are_todays_loss_bit_for_bit(impl):
    """Off: the term passes no view weights (today's call); on with w = 1: the same loss and gradient."""
    s, q = _term_inputs(3, 45, 5, seed=21)
    kernel_impl = {"fused": "triton", "reference": "torch"}[impl]
    x = s.clone().requires_grad_()
    today = soft_cross_entropy(x, q, 5, TAU, impl=kernel_impl)
    today.backward()
    off = _loss_and_grad(DINOTerm(5, TAU, impl), s, q)
    on = _loss_and_grad(DINOTerm(5, TAU, impl, reweight_local=True), s, q, _hp(1.0))
    for loss, grad in (off, on):
        assert torch.equal(loss, today.detach()) and torch.equal(grad, x.grad)


def test_term_refusals():
    with pytest.raises(RuntimeError, match=r"targets\['hp'\]"):
        DINOTerm(4, TAU, reweight_local=True).view_weights({})
    with pytest.raises(ValueError, match="fused head") as e:
        DINOTerm(4, TAU, reweight_local=True, head=torch.nn.Linear(2, 2))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("impl", IMPLS)
def test_compiled_term_reads_a_new_weight_without_recompiling(impl):
    """The weight is read from the step's hyper-parameter tensor (updated in place, as the training
    loop's load_hyperparams): one graph, equal to eager, a new value reaches the loss."""
    torch._dynamo.reset()
    s, q = _term_inputs(2, 33, 4, seed=5)
    hp = _hp(0.5)
    term = DINOTerm(4, TAU, impl, reweight_local=True)
    compiled = torch.compile(lambda x, q: term({"cls": x}, {"cls": q, "hp": hp}), fullgraph=True, backend="aot_eager")
    losses = []
    for w in (0.5, 0.25, 0.9):
        hp[DINO_LOCAL_WEIGHT] = w
        with torch._dynamo.config.patch(error_on_recompile=len(losses) > 0):
            x = s.clone().requires_grad_()
            loss = compiled(x, q)
            loss.backward()
        ref = _loss_and_grad(term, s, q, hp)
        torch.testing.assert_close(loss.detach(), ref[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(x.grad, ref[1], rtol=1e-6, atol=1e-7)
        losses.append(loss.item())
    assert len(set(losses)) == 3


# ---------------------------------------------------------------------------------------------
# Through the engine: the step's hp reaches the term; the whole compiled step
# ---------------------------------------------------------------------------------------------
def test_run_reads_the_step_hyperparameters():
    from fastdino.distributed import DistContext
    from fastdino.train import build_run

    cfg = load_config(None, ["model.arch=vit_tiny", "model.depth=1", "model.out_dim=32", "optim.batch_size_per_gpu=2",
                             "optim.epochs=2", "optim.warmup_epochs=0", "data.global_crop_size=32",
                             "data.local_crop_size=16", "data.local_crops_number=2", "train.device=cpu",
                             "train.precision=fp32",
                             "loss.reweight_local=true", "loss.local_weight_start=0.0", "loss.local_weight_peak=1.0",
                             "loss.local_weight_end=0.5", "loss.local_weight_warmup_epochs=1"])
    run = build_run(cfg, DistContext(device=torch.device("cpu")), steps_per_epoch=4)
    term = run.state.terms[0]
    assert term.reweight_local
    for it in (0, 3, 6):
        run.state.load_hyperparams(run.table, it)
        expected = official_linear_warmup_cosine_decay(0.0, 1.0, 0.5, 4, 8)[it]
        weights = term.view_weights({"hp": run.state.hp})
        assert weights.tolist() == pytest.approx([1.0, 1.0, expected, expected], rel=1e-6, abs=1e-7)


def test_compiled_whole_step_with_reweighting_equals_eager_without_recompiles():
    """train.compile_step with loss.reweight_local and a weight that changes every step (a warmup
    from 0.1 over the first epoch): 3 steps equal to eager, no graph break, no recompile."""
    from test_step import _compare_runs, make_run, tiny_cfg

    torch._dynamo.reset()
    extra = ["loss.reweight_local=true", "loss.local_weight_start=0.1", "loss.local_weight_peak=1.0",
             "loss.local_weight_end=0.5", "loss.local_weight_warmup_epochs=1"]
    eager, compiled = make_run(tiny_cfg(*extra)), make_run(tiny_cfg(*extra, "train.compile_step=true"))
    assert compiled.resolved.compile == "step"
    assert len({float(eager.table[DINO_LOCAL_WEIGHT, it]) for it in range(3)}) == 3
    counters = _compare_runs(eager, compiled)
    assert counters["stats"]["unique_graphs"] == 1
