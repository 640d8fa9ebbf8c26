"""fastdino/losses/ibot.py: ibot_loss_ref against the official forward_masked written literally
(boolean masks over the dense patch logits, the masked rows gathered, then sliced to n_masked); the
fused term (soft-target cross-entropy kernel, V = T = 1, row weights) against the reference on
padded, static-shaped buffers, gradients included; padding takes no part; bad shapes are errors."""
import pytest
import torch
import torch.nn.functional as F

import fastdino  # noqa: F401  (registers fastdino.kernels from a plain checkout)
from fastdino.data.masking import IBOTMasks
from fastdino.losses.ibot import IBOTTerm, ibot_loss_ref

TAU = 0.1


def _official_forward_masked(s_dense, q_dense, masks, tau):
    """The official iBOT patch loss on dense (S, N, K) logits / targets and (S, N) bool masks:
    per masked token -sum q log_softmax(s / tau), weighted 1 / (masked tokens of its crop), summed,
    divided by S (ssl_meta_arch: forward_masked x 2 x 1/2)."""
    s = s_dense.double()[masks]
    q = q_dense.double()[masks]
    loss = torch.sum(q * F.log_softmax(s / tau, dim=-1), dim=-1)
    weights = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks].double()
    return -(loss * weights).sum() / masks.shape[0]


def _batch(B, grid, K, seed, dtype=torch.float32):
    """Dense student logits / teacher targets of 2B crops on a grid x grid patch grid and this
    batch's MaskBatch; the static buffers gathered at mask_indices (padding rows: index 0)."""
    g = torch.Generator().manual_seed(seed)
    mb = IBOTMasks(grid)(seed, 0, torch.randperm(100, generator=g)[:B].numpy())
    S, N = 2 * B, grid * grid
    s_dense = (torch.randn(S, N, K, generator=g) * 3).to(dtype)
    q_dense = torch.softmax(torch.randn(S, N, K, generator=g) * 2, dim=-1)
    s = s_dense.flatten(0, 1)[mb.mask_indices]
    valid = torch.arange(mb.upper_bound) < mb.n_masked
    q = torch.where(valid[:, None], q_dense.flatten(0, 1)[mb.mask_indices], 0.0)
    return s_dense, q_dense, s, q, mb


@pytest.mark.parametrize("B,grid,K", [(3, 4, 11), (4, 5, 7)])
def test_reference_is_the_official_forward_masked(B, grid, K):
    s_dense, q_dense, s, q, mb = _batch(B, grid, K, seed=B * grid)
    assert mb.n_masked > 0
    expected = _official_forward_masked(s_dense, q_dense, mb.masks, TAU)
    got = ibot_loss_ref(s.double(), q, mb.mask_weights, 2 * B, TAU)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_padding_takes_no_part():
    """Changing the padded rows of the student and the targets changes neither the loss nor the
    gradient of the real rows; the padded rows get a zero gradient."""
    s_dense, q_dense, s, q, mb = _batch(4, 5, 9, seed=1)
    n = int(mb.n_masked)
    assert n < mb.upper_bound
    s2, q2 = s.clone(), q.clone()
    s2[n:] = torch.randn_like(s2[n:]) * 10
    q2[n:] = torch.softmax(torch.randn_like(q2[n:]), -1)
    outs = []
    for ss, qq in ((s, q), (s2, q2)):
        ss = ss.clone().requires_grad_()
        loss = ibot_loss_ref(ss, qq, mb.mask_weights, 8, TAU)
        loss.backward()
        outs.append((loss.detach(), ss.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1][:n], outs[1][1][:n])
    assert torch.all(outs[1][1][n:] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_reference(dtype):
    """Forward and gradient of the fused term against the reference in fp64 on the same buffers:
    the error stays within twice the fp32 reference's own error plus a dtype-sized budget."""
    B, grid, K = 3, 4, 37
    _, _, s, q, mb = _batch(B, grid, K, seed=7, dtype=dtype)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU the kernel is interpreted
    s, q, mb = s.to(dev), q.to(dev), mb.to(dev)
    targets = {"patch": q, "patch_weights": mb.mask_weights}
    results = {}
    for impl, cast in (("fused", dtype), ("reference", dtype), ("ref64", torch.float64)):
        x = s.to(cast).clone().requires_grad_()
        term = IBOTTerm(2 * B, TAU, impl="fused" if impl == "fused" else "reference", weight=1.0)
        loss = term({"patch": x}, targets)
        loss.backward(torch.tensor(1.7, dtype=loss.dtype, device=dev))
        results[impl] = (loss.detach().double(), x.grad.double())
    eps = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7}[dtype]
    for i, what in enumerate(("loss", "grad")):
        out, ref, ref64 = results["fused"][i], results["reference"][i], results["ref64"][i]
        budget = 2 * (ref - ref64).abs().max() + eps * ref64.abs().max().clamp_min(1e-3)  # as test_soft_cross_entropy
        assert ((out - ref64).abs() <= budget).all(), f"{what}: max err {(out - ref64).abs().max():.3g}"
    assert torch.all(results["fused"][1][int(mb.n_masked):] == 0)


def test_bad_shapes_raise():
    s, q, w = torch.randn(5, 4), torch.full((5, 4), 0.25), torch.ones(5)
    with pytest.raises(ValueError, match="weights"):
        ibot_loss_ref(s, q, torch.ones(4), 2, TAU)
    with pytest.raises(ValueError, match=r"\(U, K\)"):
        ibot_loss_ref(s, q[:, :3], w, 2, TAU)
    with pytest.raises(ValueError, match="n_samples"):
        ibot_loss_ref(s, q, w, 0, TAU)
    with pytest.raises(ValueError, match="impl"):
        IBOTTerm(2, TAU, impl="triton")
