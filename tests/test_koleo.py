"""fastdino/losses/koleo.py: koleo_ref against an element-by-element float64 formula (value and
gradient), also averaged over a slice of the rows (a rank's own rows in its group, DINOv3's
KoLeoLossDistributed); duplicates, a batch of one and an antipodal pair give finite values and
gradients in fp32/bf16/fp16; fp32 arithmetic under autocast; KoLeoTerm sums the two global crops;
under torch.distributed (gloo, 4 processes) KoLeoTerm(group_ranks=G) equals one process's KoLeoTerm on
each group's concatenated batch, gradients included, and G = 1 the per-rank term; the config keys'
one-line errors."""
import math

import pytest
import torch

from fastdino.losses.koleo import EPS, KoLeoTerm, koleo_ref


def _formula(f: torch.Tensor, own: range | None = None) -> torch.Tensor:
    """The header's formula one scalar at a time, float64 (autograd through the scalars):
    x_i = f_i / max(|f_i|, eps), j(i) = argmax_{j != i} <x_i, x_j> over all M rows,
    d_i = |x_i - x_j(i) + eps|, loss = -(1/|own|) sum_{i in own} ln(d_i + eps); own: all rows, or a
    rank's rows in its group (KoLeoLossDistributed: the rank's batch against the group's gathered batch)."""
    M, D = f.shape
    own = range(M) if own is None else own
    rows = [[f[i, k] for k in range(D)] for i in range(M)]
    x = []
    for row in rows:
        norm = torch.sqrt(sum(v * v for v in row))
        x.append([v / torch.clamp(norm, min=EPS) for v in row])
    loss = 0.0
    for i in own:
        dots = [(sum(a * b for a, b in zip(x[i], x[j])).item(), j) for j in range(M) if j != i]
        j = max(dots)[1]
        d = torch.sqrt(sum((x[i][k] - x[j][k] + EPS) ** 2 for k in range(D)))
        loss = loss - torch.log(d + EPS)
    return loss / len(own)


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


@pytest.mark.parametrize("M,n,start", [(8, 2, 4), (6, 3, 0), (9, 3, 6)])
def test_rows_match_float64_formula(M, n, start):
    """koleo_ref(x, rows=(s, s + n)): the mean of the terms of x[s:s+n], their neighbours searched
    among all M rows (DINOv3's distributed KoLeo on one rank: its rows against its group's rows)."""
    g = torch.Generator().manual_seed(M * 100 + n * 10 + start)
    f = torch.randn(M, 5, generator=g, dtype=torch.float64)
    own = range(start, start + n)
    want, want_grad = _value_and_grad(lambda t: _formula(t, own), f)
    got, grad = _value_and_grad(lambda t: koleo_ref(t, rows=(start, start + n)), f)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
    assert abs(got.item() - koleo_ref(f[start:start + n]).item()) > 1e-3  # not the slice on its own
    if M % n == 0:  # equal slices: the mean of their terms is the KoLeo of all rows
        parts = torch.stack([koleo_ref(f, rows=(s, s + n)) for s in range(0, M, n)])
        torch.testing.assert_close(parts.mean(), koleo_ref(f), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="rows"):
        koleo_ref(f, rows=(2, 2))


# ----------------------------------------------------------------------------------------------
# torch.distributed: 4 processes (gloo), groups of 1, 2 and 4 ranks against one process
# ----------------------------------------------------------------------------------------------
WORLD, B, D = 4, 3, 6
GROUPS = (1, 2, 4)  # 1: per rank (DINOv2); 2: two process groups of 2; 4: the whole world


def _dist_features():
    g = torch.Generator().manual_seed(5)
    return torch.randn(WORLD, 2, B, D, generator=g, dtype=torch.float64)  # (rank, crop, image, D)


def _dist_worker(rank, path, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    result = {}
    for group_ranks in GROUPS:  # every rank builds every term, in the same order (it makes process groups)
        term = KoLeoTerm(group_ranks=group_ranks)
        features = _dist_features()[rank].flatten(0, 1).requires_grad_()  # crop-major (2B, D)
        value = term({"cls_features": features})
        value.backward()
        result[group_ranks] = (value.detach(), features.grad)
    torch.save(result, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_distributed_groups_equal_one_process_on_the_group_batch(tmp_path):
    """Each group's mean of its ranks' terms is one process's KoLeoTerm on the group's images (per crop,
    the ranks' batches concatenated); each rank's gradient w.r.t. its features (what DDP then averages
    over ranks) is G times that term's gradient w.r.t. its rows; each rank's value is its own rows'
    mean; G = 1 is the per-rank term."""
    from spawn_workers import spawn

    out = str(tmp_path / "result")
    spawn(_dist_worker, args=(str(tmp_path / "store"), out), nprocs=WORLD)
    got = [torch.load(f"{out}.{r}") for r in range(WORLD)]
    features = _dist_features()
    for G in GROUPS:
        for first in range(0, WORLD, G):
            cat = features[first:first + G].transpose(0, 1).reshape(2 * G * B, D).requires_grad_()  # crop-major
            want = KoLeoTerm()({"cls_features": cat})
            want.backward()
            want_grad = cat.grad.view(2, G, B, D).transpose(0, 1)  # (rank in group, crop, image, D)
            values = torch.stack([got[r][G][0] for r in range(first, first + G)])
            torch.testing.assert_close(values.mean(), want.detach(), rtol=1e-12, atol=0, msg=f"G={G}")
            for k in range(G):
                value, grad = got[first + k][G]
                own = (k * B, (k + 1) * B)
                want_value = sum(koleo_ref(c.detach(), rows=own) for c in cat.view(2, G * B, D))
                torch.testing.assert_close(value, want_value, rtol=1e-12, atol=0, msg=f"G={G} rank {first + k}")
                torch.testing.assert_close(grad, G * want_grad[k].reshape(2 * B, D), rtol=1e-10, atol=1e-12,
                                           msg=f"G={G} rank {first + k} gradient")
    for r in range(WORLD):
        per_rank = KoLeoTerm()({"cls_features": features[r].flatten(0, 1)})
        torch.testing.assert_close(got[r][1][0], per_rank, rtol=0, atol=0)
    for G in GROUPS[1:]:  # a larger group finds other ranks' rows as neighbours
        assert max(abs(got[r][G][0] - got[r][1][0]).item() for r in range(WORLD)) > 1e-3, f"G={G}"


def test_config_keys_and_errors():
    """loss.koleo_distributed / loss.koleo_group_size: defaults off, one-line errors naming the key;
    the group must divide the global batch, known once the world size is (build_recipe)."""
    import torch.nn as nn

    from fastdino.config import ConfigError, load_config
    from fastdino.resolve import resolve
    from fastdino.train import build_recipe

    base = ["loss.koleo_weight=0.1", "optim.batch_size_per_gpu=8"]
    cfg = load_config("configs/demo.json", base)
    assert cfg.loss.koleo_distributed is False and cfg.loss.koleo_group_size == 0
    bad = [("loss.koleo_distributed", ["loss.koleo_distributed=true"]),  # demo.json: koleo_weight 0
           ("loss.koleo_group_size", base + ["loss.koleo_distributed=true", "loss.koleo_group_size=12"]),
           ("loss.koleo_group_size", base + ["loss.koleo_distributed=true", "loss.koleo_group_size=-8"]),
           ("loss.koleo_group_size", base + ["loss.koleo_group_size=16"]),
           ("loss.koleo_distributed", base + ["loss.koleo_distributed=1"])]
    for key, overrides in bad:
        with pytest.raises(ConfigError, match=f"config key '{key}'") as e:
            load_config("configs/demo.json", overrides)
        assert "\n" not in str(e.value), str(e.value)
    cfg = load_config("configs/demo.json", base + ["loss.koleo_distributed=true", "loss.koleo_group_size=16"])
    for world in (1, 3):  # 16 images do not divide 8 or 24
        with pytest.raises(ConfigError, match=f"'loss.koleo_group_size': must divide the global batch {8 * world}"):
            build_recipe(cfg, resolve(cfg, torch.device("cpu"), world), nn.Module(), "cpu")
    cfg = load_config("configs/demo.json", base + ["loss.koleo_distributed=true"])  # one process: per rank
    student = nn.Module()
    terms = build_recipe(cfg, resolve(cfg, torch.device("cpu"), 1), student, "cpu")[2]
    koleo = [t for t in terms if t.name == "koleo"]
    assert len(koleo) == 1 and koleo[0].group_ranks == 1 and koleo[0].weight == 0.1 and student.keep_features
