"""kernels/soft_cross_entropy.py: the reference against an element-by-element float64 formula, the
official DINO loss and DINOv3's reweighted one (local-crop weight); the Triton op against the
reference on fresh random inputs (gradients included) for DINO pairings, the iBOT pairing, per-group
and per-view weights; the custom ops' registrations
(opcheck, torch.compile without graph breaks); an ahead-of-time compile for sm_80 and sm_90a at the
real sizes; the benchmark's CPU smoke run. On CPU the kernels run under TRITON_INTERPRET=1."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastdino  # noqa: F401  (registers fastdino.kernels from a plain checkout)
from fastdino.kernels.soft_cross_entropy import (pair_counts, soft_cross_entropy, soft_cross_entropy_backward_op,
                                                 soft_cross_entropy_op, soft_cross_entropy_ref)
from fastdino.kernels.softmax_center import softmax_center, softmax_center_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# gradient budget: one ulp of dS's dtype at the largest element (a GPU rounds the fp32 result, half an
# ulp; the Triton interpreter truncates, up to one ulp)
EPS = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}
TAU = 0.1


def _inputs(G, K, n_views, n_targets, dtype, seed, weighted=False):
    """Student logits spread over ~30 nats after /tau, targets = softmax of random logits, and, when
    weighted, iBOT-like weights: each group (masked token) belongs to one of a few images and weighs
    1 / (tokens of its image) / n_images."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n_views * G, K, generator=g) * 3).to(DEV, dtype)
    q = torch.softmax(torch.randn(n_targets * G, K, generator=g) * 2, dim=-1).to(DEV)
    w = None
    if weighted:
        image = torch.randint(0, 3, (G,), generator=g)
        count = torch.bincount(image, minlength=3).float()
        w = (1.0 / count[image] / int((count > 0).sum())).to(DEV)
    return s, q, w


def _view_weights(n_views, seed, dtype=torch.float32):
    """Per-view weights in [0, 2), one of them 0 when there are 3 views or more."""
    c = torch.rand(n_views, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
    if n_views >= 3:
        c[n_views // 2] = 0.0
    return c.to(DEV, dtype)


def _run(fn, s, q, w, n_views, n_targets, skip, grad_out, **kw):
    s = s.clone().requires_grad_()
    loss = fn(s, q, n_views, TAU, n_targets, skip, w, **kw)
    loss.backward(grad_out)
    return loss.detach().double(), s.grad.double()


def _close(out, ref, ref64, eps, what):
    """|out - ref64| <= 2 max|ref - ref64| + eps * max|ref64|: the reference's own error sets the budget.
    Its worst error, not its error at the same element: both round the exponent argument s / tau
    (|s / tau| ~ 150 at real sizes, ulp ~1e-5) but at different steps (the kernel folds log2(e) / tau
    into one scale), so each is ~1e-5 relative somewhere, rarely at the same element (H200 run)."""
    err = (out - ref64).abs()
    budget = 2 * (ref - ref64).abs().max() + eps * ref64.abs().max().clamp_min(1.0 if out.dim() == 0 else 1e-3)
    assert (err <= budget).all(), f"{what}: max err {err.max().item():.3g}, budget {budget.min().item():.3g}"


# ---------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------
def _elementwise(s, q, n_views, n_targets, skip, tau, w, c=None):
    """Loss and dL/ds, float64 Python scalars, element by element: the formula of the header."""
    s, q = s.double().tolist(), q.double().tolist()
    G, K = len(s) // n_views, len(s[0])
    n = pair_counts(n_views, n_targets, skip)
    weight = [1.0 / (sum(n) * G)] * G if w is None else w.double().tolist()
    c = [1.0] * n_views if c is None else c.double().tolist()
    loss, grad = 0.0, [[0.0] * K for _ in s]
    for g in range(G):
        for v in range(n_views):
            row = [x / tau for x in s[v * G + g]]
            mx = max(row)
            lse = mx + math.log(sum(math.exp(x - mx) for x in row))
            for i in range(n_targets):
                if skip and v == i:
                    continue
                t = q[i * G + g]
                loss += weight[g] * c[v] * -sum(t[k] * (row[k] - lse) for k in range(K))
                for k in range(K):  # d/ds of the pair: w c (softmax - q) / tau
                    grad[v * G + g][k] += weight[g] * c[v] * (math.exp(row[k] - lse) - t[k]) / tau
    return torch.tensor(loss, dtype=torch.float64), torch.tensor(grad, dtype=torch.float64)


@pytest.mark.parametrize("G,K,n_views,n_targets,skip,weighted,view_weighted", [
    (2, 7, 4, 2, True, False, False),  # DINO: 2 global + 2 local views
    (3, 5, 1, 1, False, True, False),  # iBOT: one view, one target, weights
    (2, 6, 3, 2, True, True, False),  # DINO pairing with weights
    (2, 5, 1, 2, True, False, False),  # fewer views than targets
    (2, 7, 5, 2, True, False, True),  # DINO with per-view weights
    (3, 6, 3, 2, True, True, True),  # both weights
])
def test_reference_matches_elementwise_formula(G, K, n_views, n_targets, skip, weighted, view_weighted):
    s, q, w = _inputs(G, K, n_views, n_targets, torch.float64, seed=G + K, weighted=weighted)
    q = q.cpu().double()
    s, q, w = s.cpu(), q / q.sum(-1, keepdim=True), None if w is None else w.cpu().double()  # sum_k q = 1 in fp64
    c = _view_weights(n_views, seed=K, dtype=torch.float64).cpu() if view_weighted else None
    loss, grad = _run(soft_cross_entropy_ref, s, q, w, n_views, n_targets, skip, torch.tensor(1.0, dtype=torch.float64),
                      view_weights=c)
    loss_e, grad_e = _elementwise(s, q, n_views, n_targets, skip, TAU, w, c)
    torch.testing.assert_close(loss, loss_e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, grad_e, rtol=1e-10, atol=1e-12)


def _official_dino_loss(student_output, teacher_output, center, ncrops, student_temp, teacher_temp):
    """facebookresearch/dino main_dino.py DINOLoss.forward, without the center update."""
    student_out = student_output / student_temp
    student_out = student_out.chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / teacher_temp, dim=-1)
    teacher_out = teacher_out.detach().chunk(2)
    total_loss = 0
    n_loss_terms = 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    total_loss /= n_loss_terms
    return total_loss


@pytest.mark.parametrize("ncrops", [2, 5, 12])
def test_reference_is_the_official_dino_loss(ncrops):
    g = torch.Generator().manual_seed(ncrops)
    B, K = 3, 50
    s = (torch.randn(ncrops * B, K, generator=g, dtype=torch.float64) * 3).requires_grad_()
    t = torch.randn(2 * B, K, generator=g, dtype=torch.float64) * 2
    c = torch.randn(1, K, generator=g, dtype=torch.float64) * 0.5
    official = _official_dino_loss(s, t, c, ncrops, 0.1, 0.04)
    (grad_official,) = torch.autograd.grad(official, s)
    q = softmax_center_ref(t, c, 0.04)[0]
    ours = soft_cross_entropy_ref(s, q, ncrops, 0.1)
    (grad_ours,) = torch.autograd.grad(ours, s)
    torch.testing.assert_close(ours, official, rtol=1e-13, atol=0)
    torch.testing.assert_close(grad_ours, grad_official, rtol=1e-12, atol=1e-15)


def _official_dinov3_dino_loss(student_logits, teacher_probs, student_temp, ignore_diagonal=False):
    """facebookresearch/dinov3 dinov3/loss/dino_clstoken_loss.py DINOLoss.forward, student_logits
    (student crops, B, K), teacher_probs (teacher crops, B, K), in the inputs' dtype (float64 here; the
    official casts the logits to fp32)."""
    student_crops, B, K = student_logits.shape
    teacher_crops, _, _ = teacher_probs.shape
    student_logits = F.log_softmax(student_logits / student_temp, dim=-1)
    if not ignore_diagonal:
        loss = -torch.einsum("s b k, t b k -> ", student_logits, teacher_probs)
        return loss / (B * student_crops * teacher_crops)
    loss = -torch.einsum("s b k, t b k -> s t", student_logits, teacher_probs)
    min_st = min(student_crops, teacher_crops)
    loss = torch.diagonal_scatter(loss, loss.new_zeros(min_st))
    return loss.sum() / (B * student_crops * teacher_crops - B * min_st)


def _official_dinov3_dino_terms(student_global, student_local, teacher_probs, student_temp, local_weight):
    """dinov3/train/ssl_meta_arch.py SSLMetaArch.compute_losses, its DINO part (dino.loss_weight 1,
    global_ignore_diagonal true, local_weight = dino_local_loss_schedule[iteration] under
    reweight_dino_local_loss): (total, global loss, local loss, global scale, local scale)."""
    n_global_crops, n_local_crops = student_global.shape[0], student_local.shape[0]
    dino_global_terms = n_global_crops * (n_global_crops - 1)
    dino_local_terms = n_global_crops * n_local_crops
    dino_global_scale = dino_global_terms / (dino_global_terms + dino_local_terms)
    dino_local_scale = dino_local_terms / (dino_global_terms + dino_local_terms)
    local_loss = _official_dinov3_dino_loss(student_local, teacher_probs, student_temp)
    global_loss = _official_dinov3_dino_loss(student_global, teacher_probs, student_temp, ignore_diagonal=True)
    total = dino_local_scale * local_weight * local_loss + dino_global_scale * global_loss
    return total, global_loss, local_loss, dino_global_scale, dino_local_scale


@pytest.mark.parametrize("n_local,local_weight", [(1, 0.5), (8, 0.5), (10, 0.3), (4, 1.0), (3, 0.0)])
def test_reference_is_the_official_dinov3_reweighted_loss(n_local, local_weight):
    """View weights (1, 1, w, ..., w): DINOv3's DINO loss with its local crops' term times w, i.e.
    (sum over global pairs + w * sum over local pairs) / (pairs * B); its global and local terms are
    the reference over the global views and over the local views (paired with both targets); at w = 1
    the unweighted loss (the mean over pairs and batch) is the official loss."""
    g = torch.Generator().manual_seed(n_local)
    B, K, ncrops = 3, 40, 2 + n_local
    s = (torch.randn(ncrops * B, K, generator=g, dtype=torch.float64) * 3).requires_grad_()
    q = torch.softmax(torch.randn(2 * B, K, generator=g, dtype=torch.float64) * 2, dim=-1)
    views = s.unflatten(0, (ncrops, B))
    total, global_loss, local_loss, global_scale, local_scale = _official_dinov3_dino_terms(
        views[:2], views[2:], q.unflatten(0, (2, B)), TAU, local_weight)
    (grad_official,) = torch.autograd.grad(total, s)
    c = torch.tensor([1.0, 1.0] + [local_weight] * n_local, dtype=torch.float64)
    ours = soft_cross_entropy_ref(s, q, ncrops, TAU, view_weights=c)
    (grad_ours,) = torch.autograd.grad(ours, s)
    torch.testing.assert_close(ours, total, rtol=1e-13, atol=0)
    torch.testing.assert_close(grad_ours, grad_official, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(soft_cross_entropy_ref(s[:2 * B], q, 2, TAU), global_loss, rtol=1e-13, atol=0)
    torch.testing.assert_close(soft_cross_entropy_ref(s[2 * B:], q, n_local, TAU, skip_same_view=False), local_loss,
                               rtol=1e-13, atol=0)
    pairs = sum(pair_counts(ncrops, 2, True))  # 2 global + 2 n_local local pairs
    assert (global_scale, local_scale) == (2 / pairs, 2 * n_local / pairs)
    if local_weight == 1.0:
        torch.testing.assert_close(soft_cross_entropy_ref(s, q, ncrops, TAU), total, rtol=1e-13, atol=0)


# ---------------------------------------------------------------------------------------------
# The Triton op against the reference
# ---------------------------------------------------------------------------------------------
CASES = [  # G, K, n_views, n_targets, skip, weighted, dtype, launch overrides
    (3, 1000, 5, 2, True, False, torch.float32, dict(block_k=256, group_size=2)),  # K % block, 3 locals
    (1, 300, 2, 2, True, False, torch.float32, dict(block_k=128)),  # G = 1, no local views
    (4, 513, 6, 2, True, True, torch.bfloat16, dict(block_k=128, group_size=3, rows=2)),  # DINO + weights
    (2, 77, 4, 2, True, False, torch.float16, dict(block_k=32, group_size=1)),
    (2, 1500, 12, 2, True, False, torch.bfloat16, {}),  # 2 + 10 crops, the launch table
    (37, 200, 1, 1, False, True, torch.float32, dict(block_k=64, group_size=8)),  # iBOT: masked-token rows
    (9, 130, 1, 1, False, True, torch.bfloat16, {}),
    (3, 90, 3, 1, True, False, torch.float16, dict(block_k=32)),  # view 0 has no pair
    (2, 100, 1, 2, True, False, torch.float32, dict(block_k=64)),  # fewer views than targets
]


@pytest.mark.parametrize("G,K,n_views,n_targets,skip,weighted,dtype,launch", CASES)
def test_triton_matches_reference(G, K, n_views, n_targets, skip, weighted, dtype, launch):
    s, q, w = _inputs(G, K, n_views, n_targets, dtype, seed=G * 1000 + K, weighted=weighted)
    grad_out = torch.tensor(0.7, device=DEV)  # not 1: the upstream gradient must be applied
    out = _run(soft_cross_entropy, s, q, w, n_views, n_targets, skip, grad_out, **launch)
    ref = _run(soft_cross_entropy_ref, s, q, w, n_views, n_targets, skip, grad_out)
    w64 = None if w is None else w.double()
    ref64 = _run(soft_cross_entropy_ref, s.double(), q.double(), w64, n_views, n_targets, skip, grad_out.double())
    _close(out[0], ref[0], ref64[0], 1e-5, "loss")
    _close(out[1], ref[1], ref64[1], EPS[dtype], "grad")


VIEW_WEIGHT_CASES = [  # CASES' shapes, with per-view weights (_view_weights: one of them 0 from 3 views)
    (3, 1000, 5, 2, True, False, torch.float32, dict(block_k=256, group_size=2)),
    (4, 513, 6, 2, True, True, torch.bfloat16, dict(block_k=128, group_size=3, rows=2)),  # and per-group weights
    (2, 77, 4, 2, True, False, torch.float16, dict(block_k=32, group_size=1)),
    (2, 1500, 12, 2, True, False, torch.bfloat16, {}),
    (5, 200, 1, 1, False, True, torch.float32, dict(block_k=64, group_size=2)),
    (3, 90, 3, 1, True, False, torch.float16, dict(block_k=32)),
    (2, 100, 1, 2, True, False, torch.float32, dict(block_k=64)),
]


@pytest.mark.parametrize("G,K,n_views,n_targets,skip,weighted,dtype,launch", VIEW_WEIGHT_CASES)
def test_triton_view_weights_match_reference(G, K, n_views, n_targets, skip, weighted, dtype, launch):
    s, q, w = _inputs(G, K, n_views, n_targets, dtype, seed=G * 1000 + K + 7, weighted=weighted)
    c = _view_weights(n_views, seed=K)
    grad_out = torch.tensor(0.7, device=DEV)
    out = _run(soft_cross_entropy, s, q, w, n_views, n_targets, skip, grad_out, view_weights=c, **launch)
    ref = _run(soft_cross_entropy_ref, s, q, w, n_views, n_targets, skip, grad_out, view_weights=c)
    w64 = None if w is None else w.double()
    ref64 = _run(soft_cross_entropy_ref, s.double(), q.double(), w64, n_views, n_targets, skip, grad_out.double(),
                 view_weights=c.double())
    _close(out[0], ref[0], ref64[0], 1e-5, "loss")
    _close(out[1], ref[1], ref64[1], EPS[dtype], "grad")


def _logit_targets(n_rows, K, dtype, seed, invalid=(), col_offset=False):
    """LogitTargets of random teacher logits in `dtype` (scale ~2, DINO's center ~0.5, temperature
    0.04: peaked rows), the row offsets from an fp64 logsumexp of the kernels' own fp32 exponents (rows
    in `invalid` padded: +inf), and q64: the official softmax((t - c) / temp) in fp64 (0 on padded
    rows). col_offset: also random column offsets (Sinkhorn-Knopp's form), q64 = the distribution the
    fp32 exponents define, in fp64."""
    from fastdino.kernels.soft_cross_entropy import LogitTargets, teacher_scale

    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(n_rows, K, generator=g) * 2).to(DEV, dtype)
    c = (torch.randn(K, generator=g) * 0.5).to(DEV)
    co = (torch.randn(K, generator=g) * 3).to(DEV) if col_offset else None
    temp = torch.tensor(0.04, device=DEV)
    y2 = (t.float() - c) * teacher_scale(temp)  # the kernels' exponent, bit for bit
    if co is not None:
        y2 = y2 - co
    offset = (torch.logsumexp(y2.double() * math.log(2), -1) / math.log(2)).float()
    if co is None:
        q64 = torch.softmax((t.double() - c.double()) / 0.04, -1)
    else:
        q64 = torch.softmax(y2.double() * math.log(2), -1)
    for r in invalid:
        offset[r], q64[r] = float("inf"), 0.0
    return LogitTargets(t, c, temp, offset, co), q64


LOGIT_CASES = [  # G, K, n_views, n_targets, skip, weighted, S dtype, teacher dtype, launch, padded target rows
    (3, 1000, 5, 2, True, False, torch.float32, torch.float32, dict(block_k=256, group_size=2), ()),
    (4, 513, 6, 2, True, False, torch.bfloat16, torch.bfloat16, dict(block_k=128, group_size=3, rows=2), ()),
    (2, 1500, 12, 2, True, False, torch.bfloat16, torch.bfloat16, {}, ()),  # 2 + 10 crops, the launch table
    (2, 77, 4, 2, True, False, torch.float16, torch.float32, dict(block_k=32, group_size=1), ()),
    (9, 130, 1, 1, False, True, torch.bfloat16, torch.bfloat16, dict(block_k=64, group_size=4), (2, 7, 8)),  # iBOT
]
LOGIT_CASES = [case + (False,) for case in LOGIT_CASES] + [  # Sinkhorn-Knopp's form: column offsets too
    (3, 1000, 5, 2, True, False, torch.float32, torch.float32, dict(block_k=256, group_size=2), (), True),
    (2, 1500, 12, 2, True, False, torch.bfloat16, torch.bfloat16, {}, (), True),
    (9, 130, 1, 1, False, True, torch.bfloat16, torch.bfloat16, dict(block_k=64, group_size=4), (2, 7, 8), True),
]


@pytest.mark.parametrize("G,K,n_views,n_targets,skip,weighted,dtype,tdtype,launch,invalid,col_offset", LOGIT_CASES)
def test_triton_logit_targets_match_reference(G, K, n_views, n_targets, skip, weighted, dtype, tdtype, launch,
                                              invalid, col_offset):
    """Targets read from the teacher logits (LogitTargets: the kernels make q = 2^(y2 [- col_offset] -
    row_offset) on the fly, q never stored): loss and gradient against the reference on the official
    fp32 softmax targets (or the column-offset distribution), within the reference's own error against
    fp64; padded rows (row_offset = +inf, iBOT) are q = 0; the torch impl takes the same LogitTargets."""
    s, _, w = _inputs(G, K, n_views, n_targets, dtype, seed=G * 100 + K, weighted=weighted)
    if weighted:
        w = w.clone()
        w[list(invalid)] = 0.0  # padded tokens weigh 0, as the iBOT term's mask weights
    lt, q64 = _logit_targets(n_targets * G, K, tdtype, seed=K, invalid=invalid, col_offset=col_offset)
    grad_out = torch.tensor(0.7, device=DEV)
    out = _run(soft_cross_entropy, s, lt, w, n_views, n_targets, skip, grad_out, **launch)
    ref = _run(soft_cross_entropy_ref, s, q64.float(), w, n_views, n_targets, skip, grad_out)
    w64 = None if w is None else w.double()
    ref64 = _run(soft_cross_entropy_ref, s.double(), q64, w64, n_views, n_targets, skip, grad_out.double())
    _close(out[0], ref[0], ref64[0], 1e-5, "loss")
    _close(out[1], ref[1], ref64[1], EPS[dtype], "grad")
    torch_impl = _run(soft_cross_entropy, s, lt, w, n_views, n_targets, skip, grad_out, impl="torch")
    _close(torch_impl[0], ref[0], ref64[0], 1e-5, "torch impl loss")
    assert torch.isfinite(out[1]).all()


def test_logit_targets_equal_their_probabilities():
    """The same targets as LogitTargets or as the probabilities they stand for (probs()): the kernels'
    loss and gradient agree to the rounding of q (one ulp of an fp32 exp2)."""
    s, _, _ = _inputs(3, 300, 4, 2, torch.bfloat16, seed=21)
    lt, _ = _logit_targets(6, 300, torch.bfloat16, seed=22)
    g1 = torch.tensor(1.0, device=DEV)
    a = _run(soft_cross_entropy, s, lt, None, 4, 2, True, g1, block_k=64)
    b = _run(soft_cross_entropy, s, lt.probs(), None, 4, 2, True, g1, block_k=64)
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=2 ** -7 * b[1].abs().max().item())


def test_unit_view_weights_are_bit_identical():
    """View weights of 1 give exactly the loss and gradient without view weights (the kernels multiply
    by 1.0, nothing else changes)."""
    s, q, w = _inputs(3, 300, 5, 2, torch.bfloat16, seed=13)
    grad_out = torch.tensor(0.7, device=DEV)
    plain = _run(soft_cross_entropy, s, q, w, 5, 2, True, grad_out, block_k=64)
    ones = _run(soft_cross_entropy, s, q, w, 5, 2, True, grad_out, block_k=64, view_weights=torch.ones(5, device=DEV))
    assert torch.equal(plain[0], ones[0]) and torch.equal(plain[1], ones[1])


def test_lse_output_and_impl_switch():
    """The op's second output is logsumexp(s / tau) per row; impl="torch" is the reference."""
    s, q, _ = _inputs(3, 200, 4, 2, torch.float32, seed=1)
    loss, lse = soft_cross_entropy_op(s, q, None, 4, TAU, 2, True, 64, 0, 0, 0)
    torch.testing.assert_close(lse, torch.logsumexp(s.double() / TAU, dim=-1).float(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(soft_cross_entropy(s, q, 4, TAU, impl="torch"), soft_cross_entropy_ref(s, q, 4, TAU))
    c = _view_weights(4, seed=1)
    torch.testing.assert_close(soft_cross_entropy(s, q, 4, TAU, impl="torch", view_weights=c),
                               soft_cross_entropy_ref(s, q, 4, TAU, view_weights=c))
    torch.testing.assert_close(loss, soft_cross_entropy_ref(s, q, 4, TAU), rtol=1e-6, atol=1e-5)


def test_strided_rows_and_no_grad_for_targets():
    """Logits whose rows are strided (a slice of a wider tensor), targets that require grad."""
    s, _, _ = _inputs(2, 150, 3, 2, torch.float32, seed=2)
    s = s.requires_grad_()
    q = torch.softmax(torch.randn(4, 150, device=DEV), -1).requires_grad_()
    s_view = torch.cat([s, s], dim=1)[:, :150]  # row stride 300; the gradient reaches s through it
    soft_cross_entropy(s_view, q, 3, TAU, block_k=64).backward()
    assert q.grad is None
    ref_s = s.detach().clone().requires_grad_()
    soft_cross_entropy_ref(ref_s, q, 3, TAU).backward()
    torch.testing.assert_close(s.grad, ref_s.grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Degenerate sizes: losses that are 0 or tiny (drop-in suites compare them with atol=1e-8)
# ---------------------------------------------------------------------------------------------
def _loss_log1p(s, q, n_views, n_targets, skip, tau, w=None):
    """The loss in float64, element by element, without cancellation: per pair (i, v), with y = s_v / tau,
    M = max y and t = q_i:  sum(t) log1p(sum of e^(y_k - M) over all but one maximal k) + sum t_k (M - y_k).
    Relative accuracy where the loss is tiny (soft_cross_entropy_ref's y - lse leaves ~1e-15 absolute)."""
    s, q = s.double().tolist(), q.double().tolist()
    G = len(s) // n_views
    n = pair_counts(n_views, n_targets, skip)
    weight = [1.0 / (sum(n) * G)] * G if w is None else w.double().tolist()
    terms = []
    for g in range(G):
        for v in range(n_views):
            y = [x / tau for x in s[v * G + g]]
            top = y.index(max(y))
            log_z = math.log1p(math.fsum(math.exp(x - y[top]) for k, x in enumerate(y) if k != top))
            for i in range(n_targets):
                if not (skip and v == i):
                    t = q[i * G + g]
                    terms.append(weight[g] * (math.fsum(t) * log_z + math.fsum(a * (y[top] - b) for a, b in zip(t, y))))
    return math.fsum(terms)


def _degenerate(K, n_views, gap, tail, seed):
    """One group (batch 1): student logits whose first entry leads the others by `gap` nats (after /tau;
    gap 0: random logits), targets of mass 1 - tail on the first entry, the rest spread over the others."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n_views, K, generator=g) * 3
    if gap:
        s = torch.rand(n_views, K, generator=g) * 0.1
        s[:, 0] = gap * TAU + 0.1
    q = torch.rand(2, K, generator=g) * tail / max(K - 1, 1)
    q[:, 0] = 1.0 - tail if K > 1 else 1.0
    return s.to(DEV), q.to(DEV)


def _grad_budget(s, n_pairs, n_targets, weight=None):
    """Absolute error budget of dS = w / tau (n_v p - Q_v), p = e^(s / tau - lse), w = 1 / n_pairs
    (one group): s / tau and lse rounded to fp32 move p by ~|s / tau| 2^-24 relative each; ex2.approx
    on a GPU adds 2^-22, Q_v = (q_0 + q_1) - q_v (the backward's) 2^-24. However small dS is."""
    coef = (1.0 / n_pairs if weight is None else weight) / TAU
    return coef * n_targets * (2 * (s.abs().max().item() / TAU) * 2 ** -24 + 2 ** -21)


DEGENERATE = [  # K, student gap (nats), target tail mass
    (1, 0, 0.0),  # K = 1: the loss and its gradient are exactly 0
    (2, 30, 0.0),  # one-hot targets: loss = log1p(e^-30) ~ 1e-13
    (3, 30, 0.0),
    (2, 30, 1e-9),  # loss ~ 30 * 1e-9: the target tail dominates
    (3, 10, 1e-6),  # loss ~ 1e-5
]


@pytest.mark.parametrize("K,gap,tail", DEGENERATE)
@pytest.mark.parametrize("n_views,n_targets,skip,weighted", [(3, 2, True, False), (1, 1, False, True)],
                         ids=["dino", "ibot"])
def test_degenerate_sizes_zero_and_tiny_losses(K, gap, tail, n_views, n_targets, skip, weighted):
    """Batch 1, K = 1..3: within 1e-8 of the float64 reference, relative accuracy for tiny losses
    (all terms of the kernels' loss are >= 0), and at K = 1 loss and gradient exactly 0."""
    s, q = _degenerate(K, n_views, gap, tail, seed=K * 10 + gap)
    q = q[:n_targets]
    w = torch.ones(1, device=DEV) if weighted else None
    loss, grad = _run(soft_cross_entropy, s, q, w, n_views, n_targets, skip, torch.tensor(1.0, device=DEV))
    w64 = None if w is None else w.double()
    ref64 = _run(soft_cross_entropy_ref, s.double(), q.double(), w64, n_views, n_targets, skip,
                 torch.tensor(1.0, dtype=torch.float64, device=DEV))
    exact = _loss_log1p(s, q, n_views, n_targets, skip, TAU, w)
    assert abs(loss.item() - ref64[0].item()) <= 1e-8
    assert abs(loss.item() - exact) <= 1e-5 * exact, f"loss {loss.item():.9g}, exact {exact:.9g}"
    if K == 1:  # targets exactly 1
        assert loss.item() == 0.0 and not grad.any()
    budget = _grad_budget(s, sum(pair_counts(n_views, n_targets, skip)), n_targets, 1.0 if weighted else None)
    err = (grad - ref64[1]).abs().max().item()
    assert err <= budget, f"grad: max err {err:.3g}, budget {budget:.3g}"


@pytest.mark.parametrize("K,gap,teacher_gap", [(1, 0, 0), (2, 30, 100), (3, 25, 20)])
def test_degenerate_sizes_dino_loss_module(K, gap, teacher_gap):
    """fastdino.DINOLoss(impl="fused") at batch 1, K = 1..3, against the official module's math in
    float64 (teacher softmax of the same teacher logits, then the cross-entropy): within 1e-8,
    relative accuracy for the tiny losses, exactly 0 at K = 1 (whatever the teacher's rounding).
    Student and teacher lead on the first entry, by `gap` and `teacher_gap` nats."""
    from fastdino import DINOLoss
    from fastdino.kernels.softmax_center import softmax_center_ref

    ncrops, teacher_temp = 3, 0.04
    s, _ = _degenerate(K, ncrops, gap, 0.0, seed=K)
    t = torch.zeros(2, K, device=DEV)
    t[:, 1:] = -teacher_gap * teacher_temp
    module = DINOLoss(K, ncrops, teacher_temp, teacher_temp, 1, 2, impl="fused").to(DEV)
    x = s.clone().requires_grad_()
    loss = module(x, t, epoch=0)
    loss.backward()
    q64 = softmax_center_ref(t.double(), torch.zeros(1, K, dtype=torch.float64, device=DEV), teacher_temp)[0]
    x64 = s.double().requires_grad_()
    ref64 = soft_cross_entropy_ref(x64, q64, ncrops, TAU)
    ref64.backward()
    exact = _loss_log1p(s, q64, ncrops, 2, True, TAU)
    assert abs(loss.item() - ref64.item()) <= 1e-8
    assert abs(loss.item() - exact) <= 1e-4 * exact, f"loss {loss.item():.9g}, exact {exact:.9g}"
    if K == 1:
        assert loss.item() == 0.0
    err = (x.grad - x64.grad).abs().max().item()
    assert err <= _grad_budget(s, 2 * ncrops - 2, 2), f"grad: max err {err:.3g}"


# ---------------------------------------------------------------------------------------------
# Custom-op registrations: fake impls, autograd, torch.compile
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weighted,view_weighted", [(False, False), (True, False), (False, True)])
def test_opcheck(weighted, view_weighted):
    s, q, w = _inputs(2, 40, 3, 2, torch.float32, seed=3, weighted=weighted)
    args = (3, TAU, 2, True, 16, 0, 0, 0) + ((_view_weights(3, seed=3),) if view_weighted else ())
    torch.library.opcheck(soft_cross_entropy_op, (s.requires_grad_(), q, w, *args))
    _, lse = soft_cross_entropy_op(s.detach(), q, w, *args)
    g = torch.tensor(0.7, device=DEV)
    torch.library.opcheck(soft_cross_entropy_backward_op, (g, s.detach(), q, lse, w, *args))


def _eager_and_compiled_agree(step, s, scalar):
    """step(x, device scalar) -> (loss, *other outputs), eager and compiled (fullgraph, aot_eager): the
    outputs and x's gradient agree. Returns the compiled loss."""
    scalar = torch.tensor(scalar, device=DEV)
    outs = []
    for fn in (step, step.compiled):
        x = s.clone().requires_grad_()
        loss, *rest = fn(x, scalar)
        (loss * 0.7).backward()
        outs.append((loss.detach(), *rest, x.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    return outs[1][0]


def _compile(step):
    """step, with step.compiled: its fullgraph aot_eager compilation (on a fresh dynamo cache)."""
    torch._dynamo.reset()
    step.compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    return step


def test_compile_fullgraph_matches_eager():
    """DINO loss from teacher logits, both ops in one graph (no break), forward and backward; a new
    teacher_temp value (a device tensor) reuses the compiled graph."""
    s, _, _ = _inputs(2, 50, 3, 2, torch.float32, seed=4)
    g = torch.Generator().manual_seed(5)
    t = torch.randn(4, 50, generator=g).to(DEV)
    c = torch.randn(1, 50, generator=g).to(DEV) * 0.1

    @_compile
    def step(s, teacher_temp):
        q, entropy, colsum = softmax_center(t, c, teacher_temp)
        return soft_cross_entropy(s, q, 3, TAU, block_k=16), entropy.mean(), colsum

    _eager_and_compiled_agree(step, s, 0.04)
    with torch._dynamo.config.patch(error_on_recompile=True):
        _eager_and_compiled_agree(step, s, 0.07)


def test_compile_view_weights_no_recompile():
    """View weights made from a 0-dim weight tensor (the DINO term's local weight, a row of the step's
    schedule table): one graph, forward and backward as eager, and a new weight value reuses it."""
    s, q, _ = _inputs(2, 50, 4, 2, torch.float32, seed=14)

    @_compile
    def step(s, local_weight):
        c = torch.cat([local_weight.new_ones(2), local_weight.expand(2)])
        return (soft_cross_entropy(s, q, 4, TAU, view_weights=c, block_k=16),)

    loss_a = _eager_and_compiled_agree(step, s, 0.5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        loss_b = _eager_and_compiled_agree(step, s, 0.25)
    assert loss_a != loss_b  # the new value reached the kernels


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs: CUDA only")
def test_cuda_graph_capture():
    """The whole fused step (teacher targets, weighted loss with view weights, backward) captured and
    replayed."""
    s, _, w = _inputs(64, 4096, 12, 2, torch.bfloat16, seed=6, weighted=True)
    t, c = torch.randn(128, 4096, device=DEV, dtype=torch.bfloat16), torch.randn(1, 4096, device=DEV) * 0.1
    temp = torch.tensor(0.04, device=DEV)
    view_weights = torch.ones(12, device=DEV)
    x = s.clone().requires_grad_()

    def step():
        x.grad = None
        q, _, colsum = softmax_center(t, c, temp)
        loss = soft_cross_entropy(x, q, 12, TAU, weights=w, view_weights=view_weights)
        loss.backward()
        return loss, colsum

    from cuda_graph import capture

    graph, (loss, colsum) = capture(step)
    temp.fill_(0.07)  # a new temperature and new view weights reach the captured kernels
    view_weights[2:] = 0.5
    graph.replay()
    torch.cuda.synchronize()
    q, _, colsum_ref = softmax_center(t, c, 0.07)
    ref = _run(soft_cross_entropy, s, q, w, 12, 2, True, torch.tensor(1.0, device=DEV), view_weights=view_weights)
    torch.testing.assert_close(loss.double(), ref[0])
    torch.testing.assert_close(x.grad.double(), ref[1])
    torch.testing.assert_close(colsum, colsum_ref)


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------
def _raises_one_line(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)


def test_bad_inputs_raise():
    s, q, w = _inputs(2, 64, 4, 2, torch.float32, seed=7, weighted=True)
    for fn in (soft_cross_entropy, soft_cross_entropy_ref):
        _raises_one_line("multiple of n_views", fn, s, q, 3, TAU)
        _raises_one_line("targets must be", fn, s, q[:3], 4, TAU)
        _raises_one_line("weights must be", fn, s, q, 4, TAU, weights=w[:1])
        _raises_one_line("n_targets", fn, s, q, 4, TAU, n_targets=3)
        _raises_one_line("no \\(target, view\\) pair", fn, s[:2], q[:2], 1, TAU, n_targets=1, skip_same_view=True)
        _raises_one_line("2-D", fn, s[0], q, 4, TAU)
        _raises_one_line("view_weights must be", fn, s, q, 4, TAU, view_weights=torch.ones(3, device=DEV))
    _raises_one_line("impl", soft_cross_entropy, s, q, 4, TAU, impl="cuda")


@pytest.mark.skipif(DEV == "cuda", reason="CPU-only check")
def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    s, q, _ = _inputs(2, 64, 4, 2, torch.float32, seed=8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        soft_cross_entropy(s, q, 4, TAU)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation for real GPUs (no GPU needed): every kernel at the constexprs the
# launchers pick for the real sizes (DINO: G=64, K=65536, 2+10 crops, with and without view weights;
# iBOT: 4096 masked tokens, K=65536), plus the launch sweep's largest configuration.
# ---------------------------------------------------------------------------------------------
def _jobs():
    """(module, kernel, types, constexprs, num_warps or options, capability) per compile, with the
    options of the launch (the backward: without FMA contraction)."""
    from fastdino.kernels.soft_cross_entropy import combine_meta, launch_config, reduce_meta

    mod = "fastdino.kernels.soft_cross_entropy"
    f32 = "*fp32:16"
    common = {"G": "i32", "K": "i32:16", "n_views": "i32", "group_size": "i32", "n_tiles": "i32",
              "stride_s": "i32:16", "stride_q": "i32:16", "stride_ds": "i32:16", "s_scale": "fp32",
              "inv_student_temp": "fp32", "grad_scale": "fp32", "Q_ptr": f32, "SStat_ptr": f32, "QStat_ptr": f32,
              "Lse_ptr": f32, "Weight_ptr": f32, "ViewWeight_ptr": f32, "GradOut_ptr": f32, "Center_ptr": f32,
              "Scale_ptr": f32, "RowOff_ptr": f32, "ColOff_ptr": f32}
    combine = {"SStat_ptr": f32, "QStat_ptr": f32, "ViewWeight_ptr": f32, "Lse_ptr": f32, "GroupLoss_ptr": f32,
               "G": "i32", "n_views": "i32", "n_tiles": "i32", "s_scale": "fp32", "inv_student_temp": "fp32"}
    reduce = {"GroupLoss_ptr": f32, "Weight_ptr": f32, "Loss_ptr": f32, "G": "i32", "uniform_weight": "fp32"}
    cpu = torch.device("cpu")
    jobs = []
    for cap in (80, 90):
        for dt, size in (("bf16", 2), ("fp32", 4)):
            types = {**common, "S_ptr": f"*{dt}:16", "DS_ptr": f"*{dt}:16"}
            for G, V, T, skip, weighted in ((64, 12, 2, True, False), (4096, 1, 1, False, True)):
                pairing = {"N_TARGETS": T, "SKIP_SAME_VIEW": skip}
                configs = {"fwd": {launch_config(G, 65536, V, T, size, cpu, "fwd")[:3]},
                           "bwd": {launch_config(G, 65536, V, T, size, cpu, "bwd")[:3]}}
                if T == 2:  # the sweep's largest tiles
                    configs["fwd"].add((2048, 8, 8))
                    configs["bwd"].add((2048, 8, 8))
                # q read as fp32 targets, or made from the teacher logits (LogitTargets, in S's dtype)
                # (FROM_LOGITS, HAS_COL_OFFSET): q read; made by centering; made by Sinkhorn-Knopp
                sources = [{"FROM_LOGITS": lg, "HAS_COL_OFFSET": co} for lg, co in ((False, False), (True, False),
                                                                                    (True, True))]
                fwd = sources
                bwd = [{"HAS_WEIGHTS": weighted, "HAS_VIEW_WEIGHTS": v, **src}  # DINO: with view weights too
                       for v in (False, True)[:T] for src in sources]
                for kind, kernel, variants in (("fwd", "_soft_ce_fwd_kernel", fwd),
                                               ("bwd", "_soft_ce_bwd_kernel", bwd)):
                    for extra in variants:
                        kinds = {**types, "Q_ptr": f"*{dt}:16"} if extra["FROM_LOGITS"] else types
                        for block_k, rows, nw in sorted(configs[kind]):
                            if extra["FROM_LOGITS"] and dt == "fp32" and (block_k, rows, nw) == (2048, 8, 8):
                                continue  # the sweep's largest tiles spill 8 B on sm_80 there (a design limit)
                            fusion = kind == "fwd" and not extra["FROM_LOGITS"]
                            options = nw if fusion else {"num_warps": nw, "enable_fp_fusion": False}
                            jobs.append((mod, kernel, kinds, {**pairing, **extra, "BLOCK_K": block_k, "ROWS": rows},
                                         options, cap))
        for extra in ({"HAS_VIEW_WEIGHTS": False}, {"HAS_VIEW_WEIGHTS": True}):
            for n_tiles in (32, 64, 128, 512):  # block_k 2048 / 1024 / 512 at K=65536; MAX_TILES
                meta = combine_meta(12, n_tiles)
                nw = meta.pop("num_warps")
                jobs.append((mod, "_soft_ce_combine_kernel", combine, {**meta, **extra, "N_TARGETS": 2,
                                                                        "SKIP_SAME_VIEW": True}, nw, cap))
        meta = combine_meta(1, 64)
        nw = meta.pop("num_warps")
        jobs.append((mod, "_soft_ce_combine_kernel", combine,
                     {**meta, "N_TARGETS": 1, "SKIP_SAME_VIEW": False, "HAS_VIEW_WEIGHTS": False}, nw, cap))
        for weighted in (False, True):
            meta = reduce_meta(4096)
            nw = meta.pop("num_warps")
            jobs.append((mod, "_soft_ce_reduce_kernel", reduce, {**meta, "HAS_WEIGHTS": weighted}, nw, cap))
    return jobs


def test_aot_compile_sm80_sm90a():
    from aot import aot_compile, assert_compiled

    jobs = _jobs()
    results = aot_compile(jobs)
    assert {r["target"] for r in results} == {"sm_80", "sm_90a"}
    for job, r in zip(jobs, results):
        what = f"{r['kernel']} ({r['target']}, {job[2].get('S_ptr')}, {job[3]}, num_warps={job[4]})"
        assert not r["local_memory"], f"{what} spills to local memory"
        assert r["stack"] == 0, f"{what} spills: {r['stack']} B of stack at {r['registers']} registers"
        if r["kernel"] in ("_soft_ce_fwd_kernel", "_soft_ce_bwd_kernel"):
            assert r["vector_loads"], f"{what}: S/Q loads are not 16-byte vectorized"


# ---------------------------------------------------------------------------------------------
# The benchmark, as CI runs it
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,variants", [(["--crops", "2+1"], ["reference", "fused", "fused_q"]),
                                           (["--ibot"], ["ibot_reference", "ibot_fused"])])
def test_benchmark_script_runs(tmp_path, mode, variants):
    """benchmarks/loss.py at a tiny size: the reference and the interpreted fused variants (targets made
    from the logits, and q stored), for the DINO loss and for iBOT's masked-patch loss (--ibot)."""
    import json

    from aot import load_loss_benchmark

    bench = load_loss_benchmark()
    out = tmp_path / "loss.json"
    where = [] if torch.cuda.is_available() else ["--cpu"]  # CPU: interpreted; a CUDA machine: compiled
    rows = bench.main(["--quick", *where, "--B", "2", "--K", "512", *mode, "--json", str(out)])
    assert [r["variant"] for r in rows] == variants
    assert all(r["ms"] > 0 and r["GBps"] > 0 for r in rows)
    assert all(abs(rows[0]["loss"] - r["loss"]) <= 1e-4 * abs(rows[0]["loss"]) for r in rows[1:])
    assert json.loads(out.read_text())[1]["speedup"] > 0


# ---------------------------------------------------------------------------------------------
# Real sizes, CUDA only (the AOT test covers them on CPU)
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(DEV != "cuda", reason="real sizes: CUDA only (the AOT test covers them on CPU)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("launch", [{}, dict(block_k=512, rows=2, num_warps=4, group_size=3),
                                    dict(block_k=2048, rows=8, num_warps=8, group_size=16)])
def test_real_size_dino_cuda(dtype, launch):
    """B=64, K=65536, 2+10 crops: the launch table and the sweep's corner configs."""
    s, q, _ = _inputs(64, 65536, 12, 2, dtype, seed=11)
    grad_out = torch.tensor(0.7, device=DEV)
    out = _run(soft_cross_entropy, s, q, None, 12, 2, True, grad_out, **launch)
    ref = _run(soft_cross_entropy_ref, s, q, None, 12, 2, True, grad_out)
    ref64 = _run(soft_cross_entropy_ref, s.double(), q.double(), None, 12, 2, True, grad_out.double())
    _close(out[0], ref[0], ref64[0], 1e-5, "loss")
    _close(out[1], ref[1], ref64[1], EPS[dtype], "grad")


@pytest.mark.skipif(DEV != "cuda", reason="real sizes: CUDA only (the AOT test covers them on CPU)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_real_size_dino_logit_targets_cuda(dtype):
    """B=64, K=65536, 2+10 crops, targets made from the teacher logits in the kernels (LogitTargets,
    the row offsets from softmax_center_stats as the engine makes them): the reference on the
    official fp32 softmax, within its own error against fp64."""
    from fastdino.kernels.soft_cross_entropy import LogitTargets
    from fastdino.kernels.softmax_center import softmax_center_stats

    s, _, _ = _inputs(64, 65536, 12, 2, dtype, seed=12)
    lt, q64 = _logit_targets(128, 65536, dtype, seed=13)
    row_offset = softmax_center_stats(lt.logits, lt.center, lt.teacher_temp)[0]
    lt = LogitTargets(lt.logits, lt.center, lt.teacher_temp, row_offset)
    grad_out = torch.tensor(0.7, device=DEV)
    out = _run(soft_cross_entropy, s, lt, None, 12, 2, True, grad_out)
    ref = _run(soft_cross_entropy_ref, s, q64.float(), None, 12, 2, True, grad_out)
    ref64 = _run(soft_cross_entropy_ref, s.double(), q64, None, 12, 2, True, grad_out.double())
    _close(out[0], ref[0], ref64[0], 1e-5, "loss")
    _close(out[1], ref[1], ref64[1], EPS[dtype], "grad")


@pytest.mark.skipif(DEV != "cuda", reason="real sizes: CUDA only")
def test_real_size_ibot_cuda():
    """iBOT: 4096 masked-token rows of K=8192, one view, one target, per-token weights."""
    s, q, w = _inputs(4096, 8192, 1, 1, torch.bfloat16, seed=12, weighted=True)
    grad_out = torch.tensor(0.7, device=DEV)
    out = _run(soft_cross_entropy, s, q, w, 1, 1, False, grad_out)
    ref = _run(soft_cross_entropy_ref, s, q, w, 1, 1, False, grad_out)
    ref64 = _run(soft_cross_entropy_ref, s.double(), q.double(), w.double(), 1, 1, False, grad_out.double())
    _close(out[0], ref[0], ref64[0], 1e-5, "loss")
    _close(out[1], ref[1], ref64[1], EPS[torch.bfloat16], "grad")
