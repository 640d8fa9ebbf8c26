"""kernels/dino_head_loss.py and fastdino.loss.DINOHeadLoss: the fused last layer + loss against
the unfused head (F.linear logits) + reference loss: loss, entropy, center, gradients for the
features and the last-layer weight (weight_v, weight_g), the frozen last layer included.
Interpreted on CPU: fp32 and fp16 (the interpreter's bf16 tl.dot is wrong; bf16 runs on CUDA)."""
import pytest
import torch
import torch.nn.functional as F

import fastdino  # noqa: F401
from fastdino.kernels.dino_head_loss import dino_head_loss, dino_head_loss_ref
from fastdino.loss import DINOHeadLoss, DINOLoss
from fastdino.models.head import DINOHead

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
EPS = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def _inputs(B, K, D, ncrops, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(ncrops * B, D, generator=g), dim=-1).to(DEV, dtype)
    w = F.normalize(torch.randn(K, D, generator=g), dim=-1).to(DEV, dtype)
    t = (torch.randn(2 * B, K, generator=g) * 0.5).to(DEV, dtype)
    c = (torch.randn(1, K, generator=g) * 0.1).to(DEV)
    return x, w, t, c


def _run(fn, x, w, t, c, ncrops, **kw):
    x, w, c = x.clone().requires_grad_(), w.clone().requires_grad_(), c.clone()
    loss, ent, tsum = fn(x, w, t, c, ncrops, 0.1, 0.04, 0.9, **kw)
    loss.backward(torch.tensor(0.7, device=DEV))
    return [a.detach().double() for a in (loss, ent, tsum, c, x.grad, w.grad)]


CASES = [  # B, K, D, ncrops, block_k
    (3, 200, 32, 5, 32),  # K % block != 0, odd number of locals
    (1, 100, 24, 2, None),  # B = 1, no locals, D not a power of two
    (20, 150, 32, 4, 64),  # image block partly masked (B < BLOCK_B)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,K,D,ncrops,block_k", CASES)
def test_fused_head_matches_unfused(B, K, D, ncrops, block_k, dtype):
    x, w, t, c = _inputs(B, K, D, ncrops, dtype, seed=B + K + D)
    out = _run(dino_head_loss, x, w, t, c, ncrops, block_k=block_k)
    ref = _run(dino_head_loss_ref, x, w, t, c, ncrops)
    ref64 = _run(dino_head_loss_ref, x.double(), w.double(), t.double(), c, ncrops)
    for name, o, r, r64 in zip(("loss", "entropy", "teacher_sum", "center", "dfeats", "dweight"), out, ref, ref64):
        eps = EPS[dtype] if name in ("loss", "dfeats", "dweight") else 1e-5
        err = (o - r64).abs()
        budget = 2 * (r - r64).abs() + eps * r64.abs().max().clamp_min(1e-3 if name.startswith("d") else 1.0)
        assert (err <= budget).all(), f"{name}: max err {err.max().item():.3g}"


def _heads(norm_last_layer, K=160, D=32, seed=0):
    torch.manual_seed(seed)
    student = DINOHead(16, K, norm_last_layer=norm_last_layer, hidden_dim=32, bottleneck_dim=D).to(DEV)
    teacher = DINOHead(16, K, norm_last_layer=norm_last_layer, hidden_dim=32, bottleneck_dim=D).to(DEV)
    with torch.no_grad():  # a teacher that differs from the student, as after EMA steps
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return student, teacher


@pytest.mark.parametrize("norm_last_layer,freeze", [(True, False), (False, False), (False, True)])
def test_module_matches_head_plus_reference_loss(norm_last_layer, freeze):
    B, ncrops, K = 3, 4, 160
    args = (K, ncrops, 0.04, 0.07, 2, 5)
    g = torch.Generator().manual_seed(1)
    crops = torch.randn(ncrops * B, 16, generator=g).to(DEV)
    results = []
    for fused in (True, False):
        student, teacher = _heads(norm_last_layer)
        if freeze:  # frozen last layer: no gradient for it, the features still get theirs
            for p in student.last_layer.parameters():
                p.requires_grad_(False)
        loss_fn = (DINOHeadLoss(*args, impl="fused") if fused else DINOLoss(*args, impl="reference")).to(DEV)
        loss_fn.center.normal_(generator=torch.Generator(device=DEV).manual_seed(2)).mul_(0.1)
        for epoch in range(2):  # two steps: the second uses the updated center
            student.zero_grad()
            if fused:
                loss, ent = loss_fn(student.forward_bottleneck(crops), teacher.forward_bottleneck(crops[:2 * B]),
                                    student.last_layer.weight_g, student.last_layer.weight_v,
                                    teacher.last_layer.weight_g, teacher.last_layer.weight_v, epoch,
                                    return_entropy=True)
            else:
                with torch.no_grad():
                    teacher_output = teacher(crops[:2 * B])
                loss, ent = loss_fn(student(crops), teacher_output, epoch, return_entropy=True)
            loss.backward()
        grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in student.named_parameters()}
        results.append((loss.detach(), ent, loss_fn.center.clone(), grads))
    (lf, ef, cf, gf), (lr, er, cr, gr) = results
    torch.testing.assert_close(lf, lr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ef, er, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cf, cr, rtol=1e-5, atol=1e-6)
    for n in gr:
        if gr[n] is None:
            assert gf[n] is None, n
            continue
        torch.testing.assert_close(gf[n], gr[n], rtol=1e-4, atol=1e-6, msg=n)
    assert (gf["last_layer.weight_v"] is None) == freeze
    assert (gf["last_layer.weight_g"] is None) == (norm_last_layer or freeze)


def test_bad_inputs_raise():
    x, w, t, c = _inputs(2, 64, 16, 4, torch.float32, seed=0)
    with pytest.raises(ValueError, match="disagree"):
        dino_head_loss(x, w[:, :8], t, c, 4, 0.1, 0.04)
    with pytest.raises(ValueError, match="dtype"):
        dino_head_loss(x, w.half(), t, c, 4, 0.1, 0.04)
    with pytest.raises(ValueError, match="teacher_output"):
        dino_head_loss(x, w, t[:2], c, 4, 0.1, 0.04)


# the largest dynamic shared memory a block may opt into: A100 (sm_80) 163 KB, H100 (sm_90) 227 KB
SMEM_LIMIT = {"sm_80": 166912, "sm_90a": 232448}
KERNELS = {"fwd": "_dino_head_loss_fwd_kernel", "dw": "_dino_head_loss_bwd_dw_kernel",
           "dx": "_dino_head_loss_bwd_dx_kernel"}


def _launcher_configs(itemsize, D=256):
    """Every (kind, BLOCK_B, BLOCK_K, BLOCK_D, num_warps, num_stages) head_launch_config picks at D for
    any batch size, reduced to the largest BLOCK_B per kind: the others differ only by a smaller
    BLOCK_B, i.e. smaller X/T/dS tiles (asserted here), so they need no more shared memory."""
    from fastdino.kernels.dino_head_loss import head_launch_config

    seen = {}
    for B in (1, 3, 16, 17, 32, 48, 64, 65, 128, 1024):
        for kind, cfg in head_launch_config(B, D, itemsize).items():
            seen.setdefault(kind, set()).add(cfg)
    out = {}
    for kind, cfgs in seen.items():
        top = max(cfgs)
        assert all(c[1:] == top[1:] and c[0] <= top[0] for c in cfgs), f"{kind}: {sorted(cfgs)}"
        out[kind] = top
    return out


def test_aot_compile_sm80_sm90a():
    """Every head kernel at D=256 with the launcher's own configs, for each input dtype (fp32 with
    IEEE and TF32 dots, bf16, fp16) and sm_80/sm_90a: compiles, no spills, and its shared memory
    fits the target. (The former check compiled bf16 only; fp32 tiles take twice the shared memory
    and the fp32 forward asked for 262400 B on an H100.) Two compiler processes run side by side."""
    from concurrent.futures import ThreadPoolExecutor

    from test_dino_loss import aot_compile

    mod = "fastdino.kernels.dino_head_loss"
    f32 = "*fp32:16"
    common = {"B": "i32", "K": "i32:16", "D": "i32:16", "n_views": "i32", "n_tiles": "i32", "n_bblocks": "i32",
              "tiles_per_chunk": "i32", "stride_x": "i32:16", "stride_w": "i32:16", "stride_t": "i32:16",
              "stride_dw": "i32:16", "s_scale": "fp32", "t_scale": "fp32", "grad_scale": "fp32",
              "C_ptr": f32, "SStat_ptr": f32, "TStat_ptr": f32, "TSumPart_ptr": f32, "LseS_ptr": f32,
              "LseT_ptr": f32, "GradOut_ptr": f32, "DXPart_ptr": f32}
    jobs = []
    for cap in (80, 90):
        for dt, itemsize, prec in (("fp32", 4, "ieee"), ("fp32", 4, "tf32"), ("bf16", 2, "ieee"), ("fp16", 2, "ieee")):
            p = f"*{dt}:16"
            types = {**common, "X_ptr": p, "W_ptr": p, "T_ptr": p, "DW_ptr": p}
            for kind, (bb, bk, bd, nw, ns) in _launcher_configs(itemsize).items():
                jobs.append((mod, KERNELS[kind], types,
                             {"BLOCK_B": bb, "BLOCK_K": bk, "BLOCK_D": bd, "DOT_PRECISION": prec},
                             {"num_warps": nw, "num_stages": ns}, cap))
    assert len(jobs) == 2 * 4 * 3
    with ThreadPoolExecutor(2) as pool:
        results = [r for part in pool.map(aot_compile, (jobs[0::2], jobs[1::2])) for r in part]
    jobs = jobs[0::2] + jobs[1::2]
    assert len(results) == len(jobs)
    assert {r["target"] for r in results} == {"sm_80", "sm_90a"}
    for job, r in zip(jobs, results):
        what = f"{r['kernel']} ({r['target']}, X {job[2]['X_ptr']}, {job[3]['DOT_PRECISION']}, {job[3]}, {job[4]})"
        assert r["shared"] <= SMEM_LIMIT[r["target"]], f"{what}: {r['shared']} B of shared memory"
        assert not r["local_memory"], f"{what} spills to local memory"
