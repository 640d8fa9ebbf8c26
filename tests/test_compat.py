"""fastdino/compat: the drop-in loss modules for lightly and DINOv2 code against each library's formula,
re-derived plainly here from its definition (loops over the view pairs as the library pairs them, in
float64), on fresh random inputs including degenerate sizes (K = 1 and 2, batch 1, one local crop,
more teacher than student views, three teacher views): loss values and gradients with both
implementations (the Triton kernels, interpreted on CPU, and the references; the references also in
float64, where they must agree with the formula to rounding); the center updates (lightly's immediate
and accumulated ones, DINOv2's deferred one), the state_dict layouts, lightly's teacher temperature
(override and epoch schedule), the one-line errors; under torch.distributed (gloo, 2 processes) the
centers and the Sinkhorn-Knopp targets equal the one-process computation on the concatenated batch
(reference impl: the process-group plumbing is the modules'; the fused Sinkhorn-Knopp's all-reduces
are tested over simulated ranks in tests/kernels/test_sinkhorn_knopp.py).

Tolerances: out (fp32) against ref64 (the formula in fp64), budget 2 |ref32 - ref64| + atol in the
max norm, ref32 being the same formula in fp32 (its own error). atol, per quantity:
  loss      2 ulp (fp32) of L = max|s| / student_temp + ln K. The kernel forms each pair term as
            lse(s / tau) - <q, s> / tau: two terms of size ~L that cancel, so its error is ~ulp(L)
            (measured up to 1.1 ulp: three teacher views, three kernel calls summed), also where the
            loss itself is 0 (K = 1, batch 1: 2.4e-7 for lightly's loss), while the plain formula,
            log_softmax element by element, is exactly 0 there (its own error 0).
  gradient  1 ulp of L times its scale w (n_max + 1) / tau (w the row's weight, n_max the most pairs
            of a view): each element is w (n p - Q) / tau, and the kernel takes p = exp(s / tau - lse),
            an exponent that is a difference of two terms of size ~L, so p carries a relative error
            ~ulp(L) (the plain log_softmax backward subtracts the row max first: smaller error).
  targets   1 ulp of max |y| (y = the logits over teacher_temp, up to ~100 here): the softmax's
            relative error grows with the exponent's size; q <= 1.
  center    1 ulp of its largest entry (a mean of fp32 values).
  KoLeo     1 ulp of the loss's scale (~1) and of the largest gradient entry: plain PyTorch in both,
            same operations (the float64 module must equal the formula to rounding).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fastdino  # noqa: F401  (registers fastdino.kernels from a plain checkout)
from fastdino.compat import dinov2 as v2
from fastdino.compat.lightly import DINOLoss as LightlyDINOLoss

EPS32 = torch.finfo(torch.float32).eps
TAU = 0.1  # student temperature
IMPLS = ["reference", pytest.param("fused", marks=pytest.mark.interpreted)]


def _within(out, ref64, ref32, atol, what):
    err = (out.double() - ref64).abs().max().item()
    budget = 2 * (ref32.double() - ref64).abs().max().item() + atol
    assert err <= budget, f"{what}: error {err:.3g} > budget {budget:.3g}"


def _leaves(tensors, dtype):
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


def _grads(leaves):
    """The leaves' gradients, concatenated; zeros for a leaf no pair uses (lightly, one teacher view:
    student view 0)."""
    return torch.cat([torch.zeros_like(x) if x.grad is None else x.grad for x in leaves])


def _cancelled(student, K):
    """L = max|s| / tau + ln K: the size of the terms the kernels subtract (see the header)."""
    return max(s.abs().max().item() for s in student) / TAU + math.log(K)


def _loss_atol(student, K):
    return 2 * EPS32 * _cancelled(student, K)


def _grad_atol(student, K, scale):
    return EPS32 * _cancelled(student, K) * scale


# ----------------------------------------------------------------------------------------------
# lightly
# ----------------------------------------------------------------------------------------------
def _lightly_formula(teacher, student, center, teacher_temp, dtype):
    """lightly's DINO loss: q_i = softmax((t_i - c) / teacher_temp); the mean over the (teacher view
    i, student view v != i) pairs and over the batch of -<q_i, log_softmax(s_v / tau)>."""
    c = center.to(dtype).reshape(1, -1)
    q = [torch.softmax((t.to(dtype) - c) / teacher_temp, dim=-1) for t in teacher]
    total, n_terms = 0.0, 0
    for i, q_i in enumerate(q):
        for v, s_v in enumerate(student):
            if v == i:
                continue
            total = total + torch.sum(-q_i * torch.log_softmax(s_v / TAU, dim=-1))
            n_terms += 1
    return total / (n_terms * teacher[0].shape[0])


def _lightly_inputs(T, S, B, K, seed):
    g = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(B, K, generator=g) * 2 for _ in range(T)]
    student = [torch.randn(B, K, generator=g) * 3 for _ in range(S)]
    return teacher, student, torch.randn(1, 1, K, generator=g) * 0.5


LIGHTLY_CASES = [  # (T teacher views, S student views, B, K)
    (2, 4, 3, 37),  # 2 global + 2 local crops, K not a power of 2
    (2, 3, 1, 2),  # batch 1, one local crop, K = 2
    (2, 3, 1, 1),  # K = 1: the loss is exactly 0
    (1, 3, 2, 5),  # one teacher view
    (2, 1, 2, 6),  # more teacher than student views
    (3, 5, 2, 9),  # three teacher views: the kernel once per pair of them
    (3, 2, 1, 4),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T,S,B,K", LIGHTLY_CASES)
def test_lightly_loss_gradient_and_center(T, S, B, K, impl):
    teacher, student, center0 = _lightly_inputs(T, S, B, K, seed=T * 1000 + S * 100 + B * 10 + K)
    m = LightlyDINOLoss(K, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=5, impl=impl)
    m.center.copy_(center0)
    temp = m.teacher_temperature(epoch=2)
    s = _leaves(student, torch.float32)
    loss = m(teacher, s, epoch=2)
    loss.backward()
    assert m.impl == impl

    refs = {}
    for dtype in (torch.float64, torch.float32):
        leaves = _leaves(student, dtype)
        value = _lightly_formula(teacher, leaves, center0, temp, dtype)
        value.backward()
        refs[dtype] = (value.detach(), _grads(leaves))
    (l64, g64), (l32, g32) = refs[torch.float64], refs[torch.float32]
    if K == 1:
        assert l64.item() == 0.0 and l32.item() == 0.0
    assert loss.dtype == torch.float32 and loss.dim() == 0
    _within(loss.detach(), l64, l32, _loss_atol(student, K), "loss")
    n_terms = T * S - min(T, S)
    n_max = T if S > T else T - 1  # the most teacher views paired with one student view
    _within(_grads(s), g64, g32, _grad_atol(student, K, (n_max + 1) / (TAU * n_terms * B)), "student gradient")

    # the center moved once, after the loss, to m c + (1 - m) mean of the teacher rows
    rows = torch.cat(teacher)
    c64 = 0.9 * center0.double() + 0.1 * rows.double().mean(0).view(1, 1, K)
    c32 = 0.9 * center0 + 0.1 * rows.mean(0).view(1, 1, K)
    _within(m.center, c64, c32, EPS32 * c64.abs().max().item(), "center")

    if impl == "reference":  # in float64 the reference path is the formula, to rounding
        m64 = LightlyDINOLoss(K, 0.04, 0.07, 5, impl="reference")
        m64.center.copy_(center0)
        got = m64([t.double() for t in teacher], [x.double() for x in student], epoch=2)
        torch.testing.assert_close(got, l64, rtol=1e-12, atol=1e-12)


def test_lightly_teacher_temperature():
    """Override first; else the linear warmup over warmup_teacher_temp_epochs (epoch e of n: warm +
    (final - warm) e / (n - 1)), then teacher_temp; else teacher_temp; values rounded to fp32, as
    lightly's tensors. The loss uses that temperature."""
    warm, final, n = 0.04, 0.07, 5
    m = LightlyDINOLoss(9, warm, final, n, impl="reference")

    def fp32(x):
        return float(torch.tensor(x, dtype=torch.float32))

    for e in range(n + 3):
        want = warm + (final - warm) * e / (n - 1) if e < n else final
        assert abs(m.teacher_temperature(epoch=e) - want) <= 2 * EPS32 * want, e
    assert m.teacher_temperature() == fp32(final)
    assert m.teacher_temperature(teacher_temp=0.09, epoch=1) == fp32(0.09)  # the override wins
    assert LightlyDINOLoss(9, 0.04, 0.05, 1).teacher_temperature(epoch=0) == fp32(0.04)  # linspace of one step

    teacher, student, _ = _lightly_inputs(2, 3, 2, 9, seed=5)
    t64, s64 = [t.double() for t in teacher], [s.double() for s in student]
    zero = torch.zeros(1, 1, 9)
    for kwargs, temp in (({"epoch": 1}, m.teacher_temperature(epoch=1)), ({"epoch": 7}, fp32(final)),
                         ({"teacher_temp": 0.09, "epoch": 1}, fp32(0.09)), ({}, fp32(final))):
        m.center.zero_()
        got = m(t64, s64, **kwargs)
        torch.testing.assert_close(got, _lightly_formula(t64, s64, zero, temp, torch.float64), rtol=1e-12,
                                   atol=1e-12, msg=str(kwargs))


def test_lightly_center_training_eval_and_accumulation():
    """Eval mode: no center change, nothing accumulated. update_center=False: the micro-batches'
    means accumulate weighted by their rows; update_center() applies c <- m c + (1 - m) mean of all
    accumulated rows once, then has nothing left to apply. update_center(views) accumulates first;
    a (T, B, K) tensor is the same as its list of views."""
    K = 11
    g = torch.Generator().manual_seed(3)
    c0 = torch.randn(1, 1, K, generator=g)
    batches = [[torch.randn(B, K, generator=g) for _ in range(2)] for B in (2, 3)]
    student = [torch.randn(3, K, generator=g) for _ in range(3)]
    m = LightlyDINOLoss(K, center_momentum=0.8, impl="reference")
    m.center.copy_(c0)
    m.eval()
    m(batches[1], student)
    assert torch.equal(m.center, c0) and m._num_accumulated == 0
    m.train()
    for views in batches:
        m(views, [torch.randn(len(views[0]), K, generator=g) for _ in range(3)], update_center=False)
    assert torch.equal(m.center, c0)
    m.update_center()
    rows = torch.cat([torch.cat(views) for views in batches]).double()
    want = 0.8 * c0.double() + 0.2 * rows.mean(0).view(1, 1, K)
    torch.testing.assert_close(m.center.double(), want, rtol=2e-6, atol=2e-7)
    after = m.center.clone()
    m.update_center()
    assert torch.equal(m.center, after)

    a, b = LightlyDINOLoss(K, impl="reference"), LightlyDINOLoss(K, impl="reference")
    a.update_center(batches[0])
    b.update_center(torch.stack(batches[0]))
    torch.testing.assert_close(a.center, b.center, rtol=0, atol=0)
    torch.testing.assert_close(a.center.double(), 0.1 * torch.cat(batches[0]).double().mean(0).view(1, 1, K),
                               rtol=2e-6, atol=2e-7)


def test_lightly_state_dict_layout():
    m = LightlyDINOLoss(13)
    assert list(m.state_dict()) == ["center"] and m.state_dict()["center"].shape == (1, 1, 13)
    saved = {"center": torch.randn(1, 1, 13)}  # what lightly's DINOLoss(13).state_dict() holds
    m.load_state_dict(saved)
    assert torch.equal(m.center, saved["center"])


def test_lightly_no_gradient_to_the_teacher():
    """A teacher output that requires grad: the student's gradient is the one of a detached teacher
    output, and the teacher output gets none (see the module's header)."""
    teacher, student, _ = _lightly_inputs(2, 3, 2, 7, seed=9)
    grads = []
    for requires_grad in (False, True):
        t = [x.clone().requires_grad_(requires_grad) for x in teacher]
        s = _leaves(student, torch.float32)
        LightlyDINOLoss(7, impl="reference")(t, s).backward()
        grads.append(_grads(s))
        assert all(x.grad is None for x in t)
    assert torch.equal(grads[0], grads[1])


def test_lightly_errors_are_one_line():
    with pytest.raises(ValueError, match="center_mode='median'") as e:
        LightlyDINOLoss(8, center_mode="median")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="impl"):
        LightlyDINOLoss(8, impl="triton")
    m = LightlyDINOLoss(8, impl="reference")
    x = torch.randn(2, 8)
    for teacher, student, match in (([x], [x], "no .* pair"), ([x, x], [x, torch.randn(3, 8)], "one shape"),
                                    ([x], [x, x[:, :4]], "one shape"), ([x[:, :4]], [x[:, :4]] * 2, "output_dim")):
        with pytest.raises(ValueError, match=match) as e:
            m(teacher, student)
        assert "\n" not in str(e.value)
    assert torch.equal(m.center, torch.zeros(1, 1, 8))  # a refused call leaves the center alone


# ----------------------------------------------------------------------------------------------
# DINOv2: teacher targets
# ----------------------------------------------------------------------------------------------
def _centered_softmax_formula(t, center, temp, dtype):
    return torch.softmax((t.to(dtype) - center.to(dtype).reshape(-1)) / temp, dim=-1)


def _sinkhorn_formula(t, temp, n_iterations, dtype):
    """DINOv2's sinkhorn_knopp_teacher steps on P = exp(t / temp)^T (K, R): the total to 1, then each
    time the prototype rows to 1/K and the sample columns to 1/R; finally R P. Each prototype's max
    logit is subtracted first (a per-prototype factor cancels in the first prototype normalization)
    so that fp32 does not overflow."""
    t = t.to(dtype)
    P = torch.exp((t - t.amax(dim=0, keepdim=True)) / temp).T
    K, R = P.shape
    P = P / P.sum()
    for _ in range(n_iterations):
        P = P / P.sum(dim=1, keepdim=True) / K
        P = P / P.sum(dim=0, keepdim=True) / R
    return (P * R).T


def test_sinkhorn_formula_shift_is_exact():
    t = torch.randn(6, 9, dtype=torch.float64) * 2
    P = torch.exp(t / 0.05).T
    P = P / P.sum()
    for _ in range(3):
        P = P / P.sum(dim=1, keepdim=True) / 9
        P = P / P.sum(dim=0, keepdim=True) / 6
    torch.testing.assert_close(_sinkhorn_formula(t, 0.05, 3, torch.float64), (P * 6).T, rtol=1e-12, atol=1e-15)


def _targets_atol(t, center, temp):
    return EPS32 * ((t.double() - center.double().reshape(-1)).abs().max().item() / temp)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("R,K", [(6, 37), (1, 2), (4, 1)])
def test_dinov2_teacher_targets(R, K, impl):
    """softmax_center_teacher (DINOLoss on (R, K), iBOTPatchLoss on (1, R, K)) and
    sinkhorn_knopp_teacher (both) against the formulas; every row of the targets sums to 1."""
    g = torch.Generator().manual_seed(R * 100 + K)
    t = torch.randn(R, K, generator=g) * 2
    temp = 0.04
    for module, x in ((v2.DINOLoss(K, impl=impl), t), (v2.iBOTPatchLoss(K, impl=impl), t.unsqueeze(0))):
        module.center.normal_(generator=g)
        q = module.softmax_center_teacher(x, temp)
        assert q.shape == x.shape and q.dtype == torch.float32 and module.impl == impl
        ref64, ref32 = (_centered_softmax_formula(x, module.center, temp, dt) for dt in (torch.float64, torch.float32))
        _within(q, ref64, ref32, _targets_atol(t, module.center, temp), f"{type(module).__name__} softmax")

    sk = {"DINOLoss": v2.DINOLoss(K, impl=impl).sinkhorn_knopp_teacher(t, 0.05),
          "iBOTPatchLoss": v2.iBOTPatchLoss(K, impl=impl).sinkhorn_knopp_teacher(t, 0.05, torch.tensor([R]))}
    ref64, ref32 = (_sinkhorn_formula(t, 0.05, 3, dt) for dt in (torch.float64, torch.float32))
    for name, q in sk.items():
        assert q.shape == (R, K)
        _within(q, ref64, ref32, _targets_atol(t, torch.zeros(K), 0.05), f"{name} sinkhorn")
        torch.testing.assert_close(q.sum(-1), torch.ones(R), rtol=0, atol=1e-5)
    q1 = v2.DINOLoss(K, impl=impl).sinkhorn_knopp_teacher(t, 0.05, n_iterations=1)
    _within(q1, _sinkhorn_formula(t, 0.05, 1, torch.float64), _sinkhorn_formula(t, 0.05, 1, torch.float32),
            _targets_atol(t, torch.zeros(K), 0.05), "sinkhorn n_iterations=1")


def test_dinov2_deferred_center_update():
    """update_center records the batch; the center moves only at the next softmax_center_teacher,
    before its softmax: c <- m c + (1 - m) mean of the rows (DINOLoss), of the per-crop token means
    (iBOTPatchLoss, (A, N, K)); of two update_center calls before it, the last one counts."""
    K, temp = 7, 0.05
    g = torch.Generator().manual_seed(4)
    dino = v2.DINOLoss(K, center_momentum=0.7, impl="reference")
    c0 = torch.randn(1, K, generator=g)
    dino.center.copy_(c0)
    first, second, nxt = (torch.randn(5, K, generator=g) for _ in range(3))
    dino.update_center(first)
    dino.update_center(second)
    assert torch.equal(dino.center, c0)
    q = dino.softmax_center_teacher(nxt, temp)
    c1 = 0.7 * c0.double() + 0.3 * second.double().mean(0, keepdim=True)
    torch.testing.assert_close(dino.center.double(), c1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(q.double(), _centered_softmax_formula(nxt, c1, temp, torch.float64), rtol=1e-4,
                               atol=1e-6)
    dino.softmax_center_teacher(nxt, temp)  # applied once only
    torch.testing.assert_close(dino.center.double(), c1, rtol=1e-6, atol=1e-7)

    ibot = v2.iBOTPatchLoss(K, center_momentum=0.7, impl="reference")
    ibot.center.copy_(c0.view(1, 1, K))
    tokens = torch.randn(2, 6, K, generator=g)
    ibot.update_center(tokens)
    assert torch.equal(ibot.center, c0.view(1, 1, K))
    ibot.softmax_center_teacher(nxt.unsqueeze(0), temp)
    want = 0.7 * c0.double() + 0.3 * tokens.double().mean(1).mean(0, keepdim=True)
    torch.testing.assert_close(ibot.center.double(), want.view(1, 1, K), rtol=1e-6, atol=1e-7)


def test_dinov2_state_dict_layouts_and_errors():
    dino, ibot = v2.DINOLoss(9), v2.iBOTPatchLoss(9)
    assert list(dino.state_dict()) == ["center"] and dino.center.shape == (1, 9)
    assert list(ibot.state_dict()) == ["center"] and ibot.center.shape == (1, 1, 9)
    for module, shape in ((dino, (1, 9)), (ibot, (1, 1, 9))):
        saved = {"center": torch.randn(shape)}  # what DINOv2's module saves
        module.load_state_dict(saved)
        assert torch.equal(module.center, saved["center"])
    for call, match in ((lambda: dino.update_center(torch.randn(2, 4, 9)), "update_center"),
                        (lambda: ibot.update_center(torch.randn(4, 9)), "update_center"),
                        (lambda: dino(torch.randn(4, 9).chunk(2), [torch.randn(3, 9)]), "alike"),
                        (lambda: ibot(torch.randn(2, 3, 9), torch.randn(2, 3, 9), torch.ones(2, 4)), "masks"),
                        (lambda: ibot.forward_masked(torch.randn(3, 9), torch.randn(3, 9), torch.ones(2, 4)), "bool"),
                        (lambda: v2.DINOLoss(9, impl="triton"), "impl")):
        with pytest.raises(ValueError, match=match) as e:
            call()
        assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# DINOv2: the losses
# ----------------------------------------------------------------------------------------------
def _dinov2_dino_formula(students, targets, dtype):
    """DINOv2's DINOLoss.forward: the sum over every (student view, target) pair of the batch mean
    of -<t, log_softmax(s / tau)>."""
    total = 0.0
    for s in students:
        for t in targets:
            total = total - torch.sum(t.to(dtype) * torch.log_softmax(s / TAU, dim=-1), dim=-1).mean()
    return total


DINO_CASES = [  # (S student views, T targets, B, K)
    (3, 2, 2, 37),  # local crops against the two global targets
    (1, 1, 4, 5),  # the global crops' call: one (2B, K) student against the swapped targets
    (1, 2, 1, 1),  # one local crop, batch 1, K = 1
    (2, 3, 1, 2),  # three targets: the kernel once per pair of them
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("S,T,B,K", DINO_CASES)
def test_dinov2_dino_forward(S, T, B, K, impl):
    g = torch.Generator().manual_seed(S * 1000 + T * 100 + B * 10 + K)
    students = [torch.randn(B, K, generator=g) * 3 for _ in range(S)]
    targets = torch.softmax(torch.randn(T, B, K, generator=g) * 2, dim=-1)  # as DINOv2 passes it: (T, B, K)
    module = v2.DINOLoss(K, impl=impl)
    s = _leaves(students, torch.float32)
    loss = module(tuple(s), targets)
    loss.backward()
    refs = {}
    for dtype in (torch.float64, torch.float32):
        leaves = _leaves(students, dtype)
        value = _dinov2_dino_formula(leaves, list(targets), dtype)
        value.backward()
        refs[dtype] = (value.detach(), _grads(leaves))
    (l64, g64), (l32, g32) = refs[torch.float64], refs[torch.float32]
    _within(loss.detach(), l64, l32, S * T * _loss_atol(students, K), "loss")  # a sum of S*T pair means
    _within(_grads(s), g64, g32, _grad_atol(students, K, (T + 1) / (TAU * B)), "gradient")
    if impl == "reference":
        got = v2.DINOLoss(K, impl="reference")([x.double() for x in students], targets.double())
        torch.testing.assert_close(got, l64, rtol=1e-12, atol=1e-12)


def _ibot_dense_formula(s, t, masks, dtype):
    """DINOv2's iBOTPatchLoss.forward: per image the masked tokens' -<t, log_softmax(s / tau)>
    weighted by the mask over max(masked tokens, 1), averaged over the images."""
    per_token = torch.sum(t.to(dtype) * torch.log_softmax(s / TAU, dim=-1), dim=-1)
    m = masks.to(dtype)
    return -(torch.sum(per_token * m, dim=-1) / m.sum(dim=-1).clamp(min=1.0)).mean()


def _ibot_masked_formula(s, t, masks, n, weights, dtype):
    """DINOv2's forward_masked: the first n rows' sum_k t log_softmax(s / tau), times the weights
    (default: 1 / masked tokens of the row's image, for the masks' True entries in order), summed,
    over -(images)."""
    per_token = torch.sum(t.to(dtype) * torch.log_softmax(s / TAU, dim=-1), dim=-1)[:n]
    if weights is None:
        counts = masks.sum(-1)
        weights = torch.cat([torch.full((int(c),), 1.0 / max(int(c), 1)) for c in counts])
    return -(per_token * weights.to(dtype)).sum() / masks.shape[0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,N,K", [(3, 5, 7), (1, 4, 1), (2, 3, 2)])
def test_dinov2_ibot_losses(B, N, K, impl):
    """forward on dense (B, N, K) tokens with bool masks (one image with no masked token) and with
    float masks (DINOv2 takes masks.float(): weights m / max(sum m, 1)); forward_masked on a static
    buffer whose rows past n_masked_patches are padding (zero gradient), with the default and with
    explicit masks_weight."""
    g = torch.Generator().manual_seed(B * 100 + N * 10 + K)
    s_dense = torch.randn(B, N, K, generator=g) * 3
    t_dense = torch.softmax(torch.randn(B, N, K, generator=g) * 2, dim=-1)
    masks = torch.rand(B, N, generator=g) < 0.5
    masks[0] = False
    masks[-1, 0] = True
    module = v2.iBOTPatchLoss(K, impl=impl)
    loss_atol, grad_atol = _loss_atol([s_dense], K), _grad_atol([s_dense], K, 2 / (TAU * B))
    for mask in (masks, masks * torch.rand(B, N, generator=g)):  # bool, and soft weights in [0, 1)
        x = s_dense.clone().requires_grad_()
        loss = module(x, t_dense, mask)
        loss.backward()
        refs = {}
        for dtype in (torch.float64, torch.float32):
            leaf = s_dense.detach().to(dtype).requires_grad_()
            value = _ibot_dense_formula(leaf, t_dense, mask, dtype)
            value.backward()
            refs[dtype] = (value.detach(), leaf.grad)
        _within(loss.detach(), refs[torch.float64][0], refs[torch.float32][0], loss_atol, "forward loss")
        _within(x.grad, refs[torch.float64][1], refs[torch.float32][1], grad_atol, "forward gradient")

    n = int(masks.sum())
    U = n + 3  # the static buffer: n masked tokens, then padding
    s_buf = torch.cat([s_dense[masks], torch.randn(3, K, generator=g) * 3])
    t_buf = torch.cat([t_dense[masks], torch.softmax(torch.randn(3, K, generator=g), dim=-1)])
    explicit = torch.rand(n, generator=g)
    for weights in (None, explicit):
        x = s_buf.clone().requires_grad_()
        loss = module.forward_masked(x, t_buf, masks, n_masked_patches=n, masks_weight=weights)
        loss.backward()
        assert torch.all(x.grad[n:] == 0)
        refs = {}
        for dtype in (torch.float64, torch.float32):
            leaf = s_buf.detach().to(dtype).requires_grad_()
            value = _ibot_masked_formula(leaf, t_buf, masks, n, weights, dtype)
            value.backward()
            refs[dtype] = (value.detach(), leaf.grad)
        _within(loss.detach(), refs[torch.float64][0], refs[torch.float32][0], loss_atol, "forward_masked loss")
        _within(x.grad, refs[torch.float64][1], refs[torch.float32][1], grad_atol, "forward_masked gradient")
    assert U == s_buf.shape[0]
    if impl == "reference":
        got = v2.iBOTPatchLoss(K, impl="reference").forward_masked(s_buf.double()[:n], t_buf.double()[:n], masks)
        torch.testing.assert_close(got, _ibot_masked_formula(s_buf.double(), t_buf, masks, n, None, torch.float64),
                                   rtol=1e-12, atol=1e-12)


def _koleo_formula(x, eps=1e-8):
    """DINOv2's KoLeoLoss: L2-normalize, nearest neighbour by the largest dot product with the
    diagonal set to -1, -mean ln(||x_i - x_nn + eps|| + eps)."""
    x = F.normalize(x, p=2, dim=-1, eps=eps)
    dots = x @ x.T
    dots.fill_diagonal_(-1)
    nn_index = dots.argmax(dim=1)
    distance = torch.norm(x - x[nn_index] + eps, p=2, dim=-1)
    return -torch.log(distance + eps).mean()


@pytest.mark.parametrize("N,D", [(5, 8), (2, 3)])
def test_dinov2_koleo(N, D):
    g = torch.Generator().manual_seed(N * 10 + D)
    feats = torch.randn(N, D, generator=g)
    module = v2.KoLeoLoss()
    out = {}
    for dtype in (torch.float64, torch.float32):
        for name, fn in (("module", module), ("formula", _koleo_formula)):
            leaf = feats.detach().to(dtype).requires_grad_()
            value = fn(leaf)
            value.backward()
            out[name, dtype] = (value.detach(), leaf.grad)
    for i, what in ((0, "loss"), (1, "gradient")):
        ref64 = out["formula", torch.float64][i]
        torch.testing.assert_close(out["module", torch.float64][i], ref64, rtol=1e-12, atol=1e-12, msg=what)
        atol = EPS32 * (1.0 if i == 0 else ref64.abs().max().item())
        _within(out["module", torch.float32][i], ref64, out["formula", torch.float32][i], atol, what)


def test_dinov2_koleo_single_row_is_zero():
    """A batch of one has no neighbour: 0 with a zero gradient (DINOv2 returns the constant
    -ln(eps (sqrt(D) + 1)) there, also with a zero gradient; fastdino/losses/koleo.py)."""
    x = torch.randn(1, 6, requires_grad=True)
    value = v2.KoLeoLoss()(x)
    value.backward()
    assert value.item() == 0.0 and torch.all(x.grad == 0)


# ----------------------------------------------------------------------------------------------
# torch.distributed: 2 processes (gloo) against one process on the concatenated batch
# ----------------------------------------------------------------------------------------------
DIST_IMPLS = ["reference"]


def _dist_data(world):
    g = torch.Generator().manual_seed(11)
    return {"teacher": torch.randn(world, 2, 3, 10, generator=g) * 2,  # (rank, view, B, K)
            "student": torch.randn(world, 3, 3, 10, generator=g),
            "patches": torch.randn(world, 1, 4, 10, generator=g)}  # (rank, 1, n_masked, K)


def _dist_worker(rank, world, path, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    data = _dist_data(world)
    result = {}
    for impl in DIST_IMPLS:
        lightly = LightlyDINOLoss(10, impl=impl)
        lightly(list(data["teacher"][rank]), list(data["student"][rank]))
        dino, ibot = v2.DINOLoss(10, impl=impl), v2.iBOTPatchLoss(10, impl=impl)
        t = data["teacher"][rank].flatten(0, 1)
        dino.update_center(t)
        ibot.update_center(data["patches"][rank])
        dino.softmax_center_teacher(t, 0.04)  # waits for the all-reduce, applies the update
        ibot.softmax_center_teacher(data["patches"][rank], 0.04)
        result[impl] = {"lightly": lightly.center, "dino": dino.center, "ibot": ibot.center,
                        "sk": dino.sinkhorn_knopp_teacher(t, 0.05),
                        "sk_ibot": ibot.sinkhorn_knopp_teacher(data["patches"][rank][0], 0.05, torch.tensor([4]))}
    torch.save(result, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_distributed_centers_and_sinkhorn(tmp_path):
    from spawn_workers import spawn

    world, out = 2, str(tmp_path / "result")
    spawn(_dist_worker, args=(world, str(tmp_path / "store"), out), nprocs=world)
    got = [torch.load(f"{out}.{r}") for r in range(world)]
    data = _dist_data(world)
    rows = data["teacher"].flatten(0, 2)  # every teacher row of every rank, rank-major
    patches = data["patches"].flatten(0, 2)
    center = 0.1 * rows.double().mean(0)  # momentum 0.9 from a zero center
    center_ibot = 0.1 * patches.double().mean(0)  # equal token counts: the mean of the ranks' means
    for impl in DIST_IMPLS:  # one process on every rank's rows: the same module, the same numbers
        want_sk = v2.DINOLoss(10, impl=impl).sinkhorn_knopp_teacher(rows, 0.05)
        want_sk_ibot = v2.iBOTPatchLoss(10, impl=impl).sinkhorn_knopp_teacher(patches, 0.05, torch.tensor([8]))
        for r in range(world):
            res = got[r][impl]
            for name, want in (("lightly", center), ("dino", center), ("ibot", center_ibot)):
                torch.testing.assert_close(res[name].double().view(-1), want, rtol=1e-6, atol=1e-7, msg=name)
            torch.testing.assert_close(res["sk"], want_sk[r * 6:(r + 1) * 6], rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(res["sk_ibot"], want_sk_ibot[r * 4:(r + 1) * 4], rtol=1e-5, atol=1e-8)
