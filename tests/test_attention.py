"""Attention backends: each one available here equals the math backend / fp64 reference within the
dtype's own error (gradients included), packed (per-crop) attention equals per-sequence attention,
the fused kernels store no attention matrix, unavailable backends fail at build in one line."""
import pytest
import torch

from fastdino.models import DINOHead, MultiCropWrapper, VisionTransformer
from fastdino.models.attention import (_HALF_ONLY, BACKENDS, AttentionBackendError, attention_ref,
                                       backend_unavailable, cu_seqlens_for, flash_attn_4_packed, packed_attention,
                                       packed_attention_ref, resolve_backend, varlen_args)
from fastdino.models.vision_transformer import Block, vit_forward_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
AVAILABLE = [b for b in BACKENDS if b != "auto" and backend_unavailable(b, DEV) is None]
FAST = [b for b in AVAILABLE if b != "math"]
DTYPES = [torch.float32, torch.bfloat16] + ([torch.float16] if DEV == "cuda" else [])
# absolute slack relative to the largest reference value (about one ulp of the dtype at that scale):
# the CPU flash kernel accumulates bf16 differently from the math kernel, which upcasts
ATOL = {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}


def runs(backend, dtype):
    """flash_attn, flash_attn_4 and the CUDA sdpa_flash/cudnn kernels take fp16/bf16 only."""
    return not (dtype == torch.float32 and DEV == "cuda" and backend in _HALF_ONLY)


def qkv_packed(groups, heads, head_dim, dtype, seed=0):
    T = sum(r * s for r, s in groups)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(T, 3 * heads * head_dim, generator=gen).to(DEV, dtype).requires_grad_()


def fwd_bwd(qkv, groups, heads, backend, grad):
    qkv = qkv.detach().requires_grad_()
    cu, mx = cu_seqlens_for(groups, qkv.device)
    if backend == "ref":
        out = packed_attention_ref(qkv, groups, heads)
    else:
        out = packed_attention(qkv, groups, heads, backend, cu, mx)
    out.backward(grad.to(out.dtype))
    return out.detach().double(), qkv.grad.double()


def err(a, b):
    return (a - b).abs().max().item()


GROUPS = [((3, 17),), ((1, 1),), ((2, 50),), ((2, 17), (3, 5), (1, 1))]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("groups", GROUPS, ids=str)
@pytest.mark.parametrize("heads,head_dim", [(3, 64), (2, 32)])
def test_backend_matches_math_and_fp64(backend, dtype, groups, heads, head_dim):
    """|out - ref64| <= 2 |math - ref64| + atol on outputs and on d qkv (math: torch's math kernel in dtype)."""
    if not runs(backend, dtype):
        pytest.skip(f"{backend} takes fp16/bf16 on CUDA")
    qkv = qkv_packed(groups, heads, head_dim, dtype)
    grad = torch.randn(qkv.shape[0], heads * head_dim, generator=torch.Generator().manual_seed(1)).to(DEV)
    out64, g64 = fwd_bwd(qkv.double(), groups, heads, "ref", grad.double())
    out_m, g_m = fwd_bwd(qkv, groups, heads, "math", grad)
    out, g = fwd_bwd(qkv, groups, heads, backend, grad)
    atol = ATOL[dtype]
    assert err(out, out64) <= 2 * err(out_m, out64) + atol * out64.abs().max().item(), (err(out, out64), err(out_m, out64))
    assert err(g, g64) <= 2 * err(g_m, g64) + atol * g64.abs().max().item(), (err(g, g64), err(g_m, g64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_math_backend_matches_reference(dtype):
    groups = ((2, 17), (3, 5))
    qkv = qkv_packed(groups, 3, 16, dtype)
    grad = torch.randn(qkv.shape[0], 48, device=DEV, dtype=dtype)
    out_r, g_r = fwd_bwd(qkv, groups, 3, "ref", grad)
    out_m, g_m = fwd_bwd(qkv, groups, 3, "math", grad)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert err(out_m, out_r) < tol and err(g_m, g_r) < tol


def test_packed_attention_never_crosses_sequences():
    """Changing one sequence's tokens changes only that sequence's outputs."""
    groups = ((2, 9), (3, 4))
    qkv = qkv_packed(groups, 2, 16, torch.float32).detach()
    out = packed_attention(qkv, groups, 2, AVAILABLE[0] if AVAILABLE[0] != "flash_attn" else "sdpa")
    qkv2 = qkv.clone()
    qkv2[9:18] += 1.0  # second sequence of the first group
    out2 = packed_attention(qkv2, groups, 2, "sdpa")
    changed = (out2 - out).abs().amax(-1) > 1e-6
    assert changed[9:18].all() and not changed[:9].any() and not changed[18:].any()


def test_dense_reference_is_softmax():
    q, k, v = torch.randn(3, 2, 2, 5, 8, dtype=torch.float64).unbind(0)
    a = torch.exp(q @ k.transpose(-1, -2) / 8 ** 0.5)
    assert torch.allclose(attention_ref(q, k, v), (a / a.sum(-1, keepdim=True)) @ v)


def saved_shapes(block, x, **kw):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, **kw).sum().backward()
    return shapes


@pytest.mark.parametrize("backend", AVAILABLE)
def test_no_attention_matrix_saved_for_backward(backend):
    """Fused backends keep no (seq x seq) tensor for backward; the math backend does (check can fail)."""
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    seq = 37
    blk = Block(64, 2, backend=backend).to(DEV, dtype)
    x = torch.randn(2, seq, 64, device=DEV, dtype=dtype, requires_grad=True)
    has_matrix = any(len(s) >= 2 and s[-2:] == (seq, seq) for s in saved_shapes(blk, x))
    assert has_matrix == (backend == "math")


def test_resolve_backend():
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("math", "cpu") == "math"
    with pytest.raises(AttentionBackendError, match="unknown attention backend"):
        resolve_backend("xformers")
    for name in ("sdpa_cudnn", "sdpa_efficient", "flash_attn", "flash_attn_4"):
        with pytest.raises(AttentionBackendError, match=f"model.attn='{name}' is not available on cpu"):
            resolve_backend(name, "cpu")


@pytest.mark.parametrize("backend", ["sdpa_cudnn", "sdpa_efficient", "flash_attn", "flash_attn_4"])
def test_cuda_only_backend_runs_cpu_tensors_through_sdpa(backend):
    """A model built on a CUDA machine (auto: a CUDA-only kernel) and evaluated on CPU: the CPU call
    runs torch's dispatch and equals the reference, instead of failing in the kernel."""
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(2 * 7, 3 * 16, generator=g)
    out = packed_attention(qkv, ((2, 7),), 2, backend)
    torch.testing.assert_close(out, packed_attention_ref(qkv, ((2, 7),), 2), atol=1e-5, rtol=1e-5)


def test_cu_seqlens():
    cu, mx = cu_seqlens_for(((2, 5), (3, 2)), "cpu")
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 5, 10, 12, 14, 16] and mx == 5
    cache = {}
    for backend in ("flash_attn", "flash_attn_4"):  # the varlen backends get them, made once per layout
        cu2, mx2 = varlen_args(cache, backend, ((2, 5), (3, 2)), "cpu")
        assert cu2.tolist() == cu.tolist() and mx2 == 5
        assert varlen_args(cache, backend, ((2, 5), (3, 2)), "cpu")[0] is cu2  # made once
        assert varlen_args(cache, backend, ((4, 5),), "cpu") == (None, 0)  # one group: a dense call
    assert varlen_args(cache, "sdpa", ((2, 5), (3, 2)), "cpu") == (None, 0)


def _fake_flash_attn_4(calls):
    """Stand-ins with flash_attn.cute's signatures and (out, lse) returns, computing attention_ref, that record
    what they were given: flash_attn_4_packed's layout and calls are checked on any machine (the package's
    kernels are compared with the reference by the tests above on a GPU that has it)."""
    def dense(q, k, v, softmax_scale=None, causal=False, **kw):
        assert softmax_scale is None and not causal and not kw
        calls.append(("dense", q, k, v))
        out = attention_ref(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)  # (B, S, H, D)
        return out, None

    def varlen(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, **kw):
        assert not kw and cu_seqlens_q is cu_seqlens_k and max_seqlen_q == max_seqlen_k
        calls.append(("varlen", q, k, v, cu_seqlens_q.tolist(), max_seqlen_q))
        cu = cu_seqlens_q.tolist()
        outs = [attention_ref(*(x[a:b].transpose(0, 1)[None] for x in (q, k, v)))[0].transpose(0, 1)
                for a, b in zip(cu[:-1], cu[1:])]  # each sequence alone: (seq, H, D)
        return torch.cat(outs), None

    return dense, varlen


@pytest.mark.parametrize("groups", GROUPS, ids=str)
def test_flash_attn_4_wiring_takes_views_of_qkv(groups):
    """flash_attn_4: q, k and v are strided views of the fused qkv rows (same storage, token stride 3*dim, no
    copy), one group is one dense call, several one varlen call over cu_seqlens; output and d qkv equal the
    per-sequence reference."""
    heads, head_dim = 3, 16
    qkv = qkv_packed(groups, heads, head_dim, torch.float32).cpu().detach().requires_grad_()
    grad = torch.randn(qkv.shape[0], heads * head_dim, generator=torch.Generator().manual_seed(1))
    cu, mx = cu_seqlens_for(groups, "cpu")
    calls = []
    out = flash_attn_4_packed(qkv, groups, heads, cu, mx, module=_fake_flash_attn_4(calls))
    out.backward(grad)
    assert len(calls) == 1 and calls[0][0] == ("dense" if len(groups) == 1 else "varlen")
    for x in calls[0][1:4]:
        assert x.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr() and x.stride()[-1] == 1
        assert x.stride()[-3] == 3 * heads * head_dim  # the token stride of the packed qkv rows
    if len(groups) > 1:
        assert calls[0][4] == cu.tolist() and calls[0][5] == mx
    ref = qkv.detach().clone().requires_grad_()
    want = packed_attention_ref(ref, groups, heads)
    want.backward(grad)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(qkv.grad, ref.grad, atol=1e-6, rtol=1e-5)
    if len(groups) > 1:
        with pytest.raises(ValueError, match="flash_attn_4 over several groups needs cu_seqlens"):
            flash_attn_4_packed(qkv, groups, heads, None, 0, module=_fake_flash_attn_4([]))


@pytest.mark.parametrize("backend", AVAILABLE)
def test_vit_backends_packed_and_unpacked(backend):
    """Whole tiny ViT + head: packed and unpacked outputs and grads under each backend equal the
    math backend (fp32; bf16 autocast on CUDA)."""
    def vit(attn):
        torch.manual_seed(0)  # the same weights for every backend
        return VisionTransformer(patch_size=8, img_size=32, embed_dim=128, depth=3, num_heads=2,
                                 drop_path_rate=0.2, attn=attn).to(DEV)

    models = {"math": vit("math"), backend: vit(backend)}
    head = DINOHead(128, 13, hidden_dim=32, bottleneck_dim=8).to(DEV)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 3, s, s, generator=gen).to(DEV) for s in (32, 32, 16, 16, 16)]
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32

    def step(attn, packed):
        model = models[attn]
        torch.manual_seed(7)
        with torch.autocast(DEV, dtype=dtype, enabled=DEV == "cuda"):
            out = MultiCropWrapper(model, head, packed)(xs).float()
        out.backward(torch.ones_like(out))
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        model.zero_grad(set_to_none=True), head.zero_grad(set_to_none=True)
        return out.detach(), grads

    ref_out, ref_g = step("math", False)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for packed in (False, True):
        out, g = step(backend, packed)
        assert err(out, ref_out) <= tol * ref_out.abs().max().item(), (packed, err(out, ref_out))
        assert err(g, ref_g) <= tol * ref_g.abs().max().item(), (packed, err(g, ref_g))
    model = models[backend].eval()
    with torch.no_grad():
        x = xs[0]
        assert torch.allclose(model(x), vit_forward_ref(model, x)[:, 0], atol=1e-4 if DEV == "cpu" else 3e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real DINO shapes on the GPU kernels")
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("groups", [((4, 785),), ((8, 197),), ((4, 785), (20, 145)), ((4, 197), (20, 37))], ids=str)
def test_backend_real_shapes_cuda(backend, groups):
    heads, head_dim = 12, 64
    qkv = qkv_packed(groups, heads, head_dim, torch.bfloat16)
    grad = torch.randn(qkv.shape[0], heads * head_dim, generator=torch.Generator().manual_seed(1)).to(DEV)
    out64, g64 = fwd_bwd(qkv.double(), groups, heads, "ref", grad.double())
    out_m, g_m = fwd_bwd(qkv, groups, heads, "math", grad)
    out, g = fwd_bwd(qkv, groups, heads, backend, grad)
    atol = ATOL[torch.bfloat16]
    assert err(out, out64) <= 2 * err(out_m, out64) + atol * out64.abs().max().item()
    assert err(g, g64) <= 2 * err(g_m, g64) + atol * g64.abs().max().item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="auto times the CUDA kernels")
def test_auto_picks_an_available_fused_backend_cuda():
    name = resolve_backend("auto", "cuda", shape=(785, 12, 64))
    assert name in FAST and name != "math"
    assert resolve_backend("auto", "cuda", shape=(785, 12, 64)) == name  # cached: one timing per shape


def test_flash_attn_4_availability_reasons(monkeypatch):
    """model.attn=flash_attn_4 is refused in one line that says why: no CUDA, a GPU older than Hopper (the
    pinned version's backward needs 9.0+), or the package missing (naming the fa4 extra and its version)."""
    import fastdino.models.attention as attention

    assert "CUDA only" in backend_unavailable("flash_attn_4", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert "compute capability 9.0" in backend_unavailable("flash_attn_4", "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(attention, "_flash_attn_4_module", lambda: None)
    why = backend_unavailable("flash_attn_4", "cuda")
    assert "not installed" in why and "[fa4]" in why and attention.FLASH_ATTN_4_VERSION in why
    monkeypatch.setattr(attention, "_flash_attn_4_module", lambda: _fake_flash_attn_4([]))
    assert backend_unavailable("flash_attn_4", "cuda") is None
    import os

    setup = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")).read()
    assert f'"fa4": ["flash-attn-4[cu13]=={attention.FLASH_ATTN_4_VERSION}"]' in setup  # one pinned version


def test_config_choices_are_the_backends():
    """model.attn's config choices (fastdino/config.py stays torch-free, so it spells them) are BACKENDS."""
    import dataclasses

    from fastdino.config import ModelConfig

    attn = {f.name: f for f in dataclasses.fields(ModelConfig)}["attn"]
    assert tuple(attn.metadata["choices"]) == BACKENDS
