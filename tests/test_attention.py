"""Attention backends: each one available here equals the math backend / fp64 reference within the
dtype's own error (gradients included), packed (per-crop) attention equals per-sequence attention,
the fused kernels store no attention matrix, unavailable backends fail at build in one line."""
import pytest
import torch

from fastdino.models import DINOHead, MultiCropWrapper, VisionTransformer
from fastdino.models.attention import (BACKENDS, AttentionBackendError, attention_ref, backend_unavailable,
                                       cu_seqlens_for, packed_attention, packed_attention_ref, resolve_backend)
from fastdino.models.vision_transformer import Block, vit_forward_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
AVAILABLE = [b for b in BACKENDS if b != "auto" and backend_unavailable(b, DEV) is None]
FAST = [b for b in AVAILABLE if b != "math"]
DTYPES = [torch.float32, torch.bfloat16] + ([torch.float16] if DEV == "cuda" else [])
# absolute slack relative to the largest reference value (about one ulp of the dtype at that scale):
# the CPU flash kernel accumulates bf16 differently from the math kernel, which upcasts
ATOL = {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}


def runs(backend, dtype):
    """flash_attn and the CUDA sdpa_flash/cudnn kernels take fp16/bf16 only."""
    return not (dtype == torch.float32 and DEV == "cuda" and backend in ("flash_attn", "sdpa_flash", "sdpa_cudnn"))


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
@pytest.mark.parametrize("dtype", DTYPES)
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
    for name in ("sdpa_cudnn", "sdpa_efficient", "flash_attn"):
        with pytest.raises(AttentionBackendError, match=f"model.attn='{name}' is not available on cpu"):
            resolve_backend(name, "cpu")


@pytest.mark.parametrize("backend", ["sdpa_cudnn", "sdpa_efficient", "flash_attn"])
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
