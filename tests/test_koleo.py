"""fastdino/losses/koleo.py: koleo_ref against an element-by-element float64 formula (value and
gradient); duplicates, a batch of one and an antipodal pair give finite values and gradients in
fp32/bf16/fp16; fp32 arithmetic under autocast; KoLeoTerm sums the two global crops."""
import math

import pytest
import torch

from fastdino.losses.koleo import EPS, KoLeoTerm, koleo_ref


def _formula(f: torch.Tensor) -> torch.Tensor:
    """The header's formula one scalar at a time, float64 (autograd through the scalars):
    x_i = f_i / max(|f_i|, eps), j(i) = argmax_{j != i} <x_i, x_j>, d_i = |x_i - x_j(i) + eps|,
    loss = -(1/N) sum_i ln(d_i + eps)."""
    N, D = f.shape
    rows = [[f[i, k] for k in range(D)] for i in range(N)]
    x = []
    for row in rows:
        norm = torch.sqrt(sum(v * v for v in row))
        x.append([v / torch.clamp(norm, min=EPS) for v in row])
    loss = 0.0
    for i in range(N):
        dots = [(sum(a * b for a, b in zip(x[i], x[j])).item(), j) for j in range(N) if j != i]
        j = max(dots)[1]
        d = torch.sqrt(sum((x[i][k] - x[j][k] + EPS) ** 2 for k in range(D)))
        loss = loss - torch.log(d + EPS)
    return loss / N


def _value_and_grad(fn, f):
    f = f.detach().clone().requires_grad_()
    loss = fn(f)
    loss.backward()
    return loss.detach(), f.grad


@pytest.mark.parametrize("N,D", [(7, 5), (2, 3), (12, 16)])
def test_matches_float64_formula(N, D):
    g = torch.Generator().manual_seed(N * 10 + D)
    f = torch.randn(N, D, generator=g, dtype=torch.float64) * 3
    want, want_grad = _value_and_grad(_formula, f)
    got64, grad64 = _value_and_grad(koleo_ref, f)
    torch.testing.assert_close(got64, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad64, want_grad, rtol=1e-10, atol=1e-12)
    got32, grad32 = _value_and_grad(koleo_ref, f.float())
    assert got32.dtype == torch.float32 and grad32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad32.double(), want_grad, rtol=1e-4, atol=1e-5 * want_grad.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_duplicates_single_row_antipodes_finite(dtype):
    """Duplicates: d = eps sqrt(D), a finite term (the official code in fp16: ln 0 = -inf). N = 1:
    0, zero gradient. An antipodal pair: each is the other's neighbour (d = 2), never itself.
    Gradients are finite too, except w.r.t. fp16 features of 3+ equal rows: there the gradient is
    ~1/(N eps) ~ 1e6, past fp16's range (an fp16 run's grad scaler takes it as an overflow)."""
    g = torch.Generator().manual_seed(1)
    D = 8
    f = torch.randn(5, D, generator=g)
    f[3] = f[1]  # one duplicate pair among distinct rows
    cases = {"duplicate": f, "all equal": f[:1].repeat(4, 1), "single": f[:1]}
    for name, x in cases.items():
        loss, grad = _value_and_grad(koleo_ref, x.to(dtype))
        assert loss.dtype == torch.float32 and torch.isfinite(loss), f"{name} ({dtype}): {loss}"
        if not (name == "all equal" and dtype == torch.float16):
            assert torch.isfinite(grad).all(), f"{name} ({dtype}): gradient"
    grad = _value_and_grad(koleo_ref, cases["all equal"])[1]
    assert torch.isfinite(grad).all() and grad.abs().max() > 65504  # fp32: finite, beyond fp16's max
    duplicate_term = -math.log(EPS * math.sqrt(D) + EPS)
    torch.testing.assert_close(koleo_ref(cases["all equal"].to(dtype)).double(),
                               torch.tensor(duplicate_term, dtype=torch.float64), rtol=1e-3, atol=0)
    loss, grad = _value_and_grad(koleo_ref, cases["single"].to(dtype))
    assert loss.item() == 0 and (grad == 0).all()
    pair = torch.stack([f[0], -f[0]]).to(dtype)
    torch.testing.assert_close(koleo_ref(pair).double(), torch.tensor(-math.log(2.0), dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)


def test_fp32_under_autocast():
    """Under a bf16 autocast the matmul and the distances still run in fp32 (as the official code)."""
    g = torch.Generator().manual_seed(2)
    f = torch.randn(9, 16, generator=g).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = koleo_ref(f)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, koleo_ref(f.float()), rtol=0, atol=0)


def test_term_sums_the_two_crops():
    g = torch.Generator().manual_seed(3)
    B, D = 6, 10
    crop1 = torch.randn(B, D, generator=g)
    crop2 = torch.randn(B, D, generator=g)
    features = torch.cat([crop1, crop2]).requires_grad_()  # crop-major (2B, D)
    term = KoLeoTerm()
    assert term.name == "koleo" and term.weight == 0.1 and KoLeoTerm(weight=0.5).weight == 0.5
    value = term({"cls_features": features}, {})
    torch.testing.assert_close(value, koleo_ref(crop1) + koleo_ref(crop2), rtol=0, atol=0)
    assert abs(value.item() - koleo_ref(features.detach()).item()) > 1e-3  # not one batch of 2B rows
    value.backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0
    assert list(term.state_dict()) == []
    with pytest.raises(ValueError, match="cls_features"):
        term({"cls_features": torch.randn(5, D)}, {})
    with pytest.raises(ValueError, match="2-D"):
        koleo_ref(torch.randn(4))
