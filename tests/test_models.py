"""ViT / DINOHead / MultiCropWrapper: checkpoint layout, reference equality, packed == unpacked,
drop path, activation checkpointing, the official evaluation API."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from fastdino.config import ModelConfig
from fastdino.models import (AttentionBackendError, DINOHead, MultiCropWrapper, VisionTransformer,
                             build_backbone, compile_blocks, vit_base, vit_small, vit_tiny)
from fastdino.models.vision_transformer import drop_path_scales, vit_forward_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def tiny(**kw):
    """A 4-block ViT (dim 96, 3 heads of 32) on 32 px (4x4 patches of 8): 17 tokens; 16 px crops
    interpolate the grid to 2x2. Small so the CPU tests stay fast; the layout tests use the real sizes."""
    torch.manual_seed(0)
    return VisionTransformer(patch_size=8, img_size=32, embed_dim=96, depth=4, num_heads=3, **kw).to(DEV)


def crops(B=3, n_global=2, n_local=3, g=32, l=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(B, 3, g, g, generator=gen) for _ in range(n_global)]
    out += [torch.randn(B, 3, l, l, generator=gen) for _ in range(n_local)]
    return [c.to(DEV) for c in out]


def official_vit_keys(dim, depth, patch, grid, num_classes=0):
    """Names and shapes of an official DINO / timm ViT state dict (the checkpoint layout)."""
    keys = {"cls_token": (1, 1, dim), "pos_embed": (1, grid * grid + 1, dim),
            "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,),
            "norm.weight": (dim,), "norm.bias": (dim,)}
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                     b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                     b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                     b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                     b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                     b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,)})
    if num_classes:
        keys.update({"head.weight": (num_classes, dim), "head.bias": (num_classes,)})
    return keys


# ---- checkpoint layout ---------------------------------------------------------------------------
@pytest.mark.parametrize("factory,dim,patch", [(vit_tiny, 192, 16), (vit_tiny, 192, 8), (vit_small, 384, 16),
                                               (vit_small, 384, 8), (vit_base, 768, 16), (vit_base, 768, 8)])
def test_official_dino_backbone_layout(factory, dim, patch):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = factory(patch_size=patch)
    keys = official_vit_keys(dim, 12, patch, 224 // patch)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys


def test_official_dino_backbone_loads_strict():
    model = vit_tiny(patch_size=16)
    sd = {k: torch.randn(s) for k, s in official_vit_keys(192, 12, 16, 14).items()}  # no head weights
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.blocks[3].attn.qkv.weight, sd["blocks.3.attn.qkv.weight"])


def test_timm_classifier_checkpoint_loads_strict():
    model = vit_tiny(patch_size=16, num_classes=1000)
    keys = official_vit_keys(192, 12, 16, 14, num_classes=1000)
    model.load_state_dict({k: torch.randn(s) for k, s in keys.items()}, strict=True)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_official_full_checkpoint_layout_loads_into_wrapper():
    student = MultiCropWrapper(vit_tiny(patch_size=16), DINOHead(192, 50), packed=True)
    head_keys = {"mlp.0.weight": (2048, 192), "mlp.0.bias": (2048,), "mlp.2.weight": (2048, 2048),
                 "mlp.2.bias": (2048,), "mlp.4.weight": (256, 2048), "mlp.4.bias": (256,),
                 "last_layer.weight_g": (50, 1), "last_layer.weight_v": (50, 256)}
    sd = {"backbone." + k: torch.randn(s) for k, s in official_vit_keys(192, 12, 16, 14).items()}
    sd.update({"head." + k: torch.randn(s) for k, s in head_keys.items()})
    student.load_state_dict(sd, strict=True)


def test_param_counts_and_init():
    with torch.device("meta"):
        assert sum(p.numel() for p in vit_small(16).parameters()) == 21_665_664  # official ViT-S/16 backbone
        assert sum(p.numel() for p in vit_base(8).parameters()) == 85_807_872
    m = vit_tiny(16)
    assert torch.all(m.norm.weight == 1) and torch.all(m.blocks[0].norm1.bias == 0)
    assert torch.all(m.blocks[0].attn.qkv.bias == 0)
    w = m.blocks[0].mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.001  # trunc_normal(std .02)
    assert abs(m.pos_embed.std().item() - 0.02) < 0.002


# ---- forward against the reference ---------------------------------------------------------------
@pytest.mark.parametrize("size", [(32, 32), (16, 16), (24, 40), (48, 48)])
def test_forward_matches_reference(size):
    model = tiny().eval()
    x = torch.randn(2, 3, *size, device=DEV)
    with torch.no_grad():
        ref = vit_forward_ref(model, x)
        assert torch.allclose(model(x), ref[:, 0], atol=1e-5, rtol=1e-5)
        assert torch.allclose(model.forward_features(x), ref, atol=1e-5, rtol=1e-5)
        out = model.get_intermediate_layers(x, n=3)
        assert len(out) == 3 and torch.allclose(out[-1], ref, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out[0], out[-1], atol=1e-3)


def test_interpolate_pos_encoding_matches_official_formula():
    model = tiny()
    x = torch.zeros(1, 1 + 3 * 5, 96, device=DEV)
    pe = model.interpolate_pos_encoding(x, 24, 40)  # 3 x 5 grid from the learned 4 x 4
    grid = model.pos_embed[:, 1:].reshape(1, 4, 4, 96).permute(0, 3, 1, 2)
    want = F.interpolate(grid, scale_factor=(3.1 / 4, 5.1 / 4), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 15, 96)
    assert torch.equal(pe[:, 1:], want) and torch.equal(pe[:, :1], model.pos_embed[:, :1])
    assert model.interpolate_pos_encoding(torch.zeros(1, 17, 96), 32, 32) is model.pos_embed


def test_last_selfattention_is_explicit_softmax():
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32, device=DEV)
    attn = model.get_last_selfattention(x)
    assert attn.shape == (2, 3, 17, 17)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 3, 17, device=DEV), atol=1e-5)
    with torch.no_grad():  # recompute from the last block's input
        h = model.prepare_tokens(x)
        for blk in model.blocks[:-1]:
            h = blk(h)
        blk = model.blocks[-1]
        q, k, _ = blk.attn.qkv(blk.norm1(h)).view(2, 17, 3, 3, 32).permute(2, 0, 3, 1, 4)
        want = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 32 ** 0.5, -1)
    assert torch.allclose(attn.double(), want, atol=1e-5)


def test_bad_inputs_raise():
    model = tiny()
    with pytest.raises(ValueError, match="not a multiple of patch"):
        model(torch.randn(1, 3, 30, 32, device=DEV))
    with pytest.raises(ValueError, match="expected images"):
        model(torch.randn(3, 32, 32, device=DEV))
    with pytest.raises(ValueError, match="empty list"):
        MultiCropWrapper(model, torch.nn.Identity())([])


# ---- packed multi-crop, drop path, checkpointing -------------------------------------------------
def run_step(wrapper, xs, seed):
    torch.manual_seed(seed)
    out = wrapper(xs)
    g = torch.randn_like(out, generator=None)
    (out * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in wrapper.named_parameters() if p.grad is not None}
    wrapper.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.3])
def test_packed_equals_unpacked_with_grads(drop_path_rate):
    model = tiny(drop_path_rate=drop_path_rate).train()
    head = DINOHead(96, 37, hidden_dim=64, bottleneck_dim=16).to(DEV)
    xs = crops()
    out_u, g_u = run_step(MultiCropWrapper(model, head, packed=False), xs, seed=5)
    out_p, g_p = run_step(MultiCropWrapper(model, head, packed=True), xs, seed=5)
    assert out_u.shape == (5 * 3, 37)
    assert torch.allclose(out_p, out_u, atol=1e-5, rtol=1e-5)
    assert g_u.keys() == g_p.keys() and len(g_u) > 0
    for n in g_u:
        assert torch.allclose(g_p[n], g_u[n], atol=1e-5, rtol=1e-4), n


@pytest.mark.parametrize("arch", ["vit", "dinov3"])
def test_fused_bias_gelu_equals_the_modules(arch):
    """model.fused_bias_gelu (set_bias_gelu): the MLPs' fc1 bias + GELU as one op after a bias-free matmul; in
    fp32 the packed multi-crop forward and every parameter's gradient (fc1's bias: the op's row sum) equal the
    unfused modules'; the state dict is unchanged; None restores the modules. The op runs as its Triton
    kernels (interpreted on CPU)."""
    from fastdino.models import set_bias_gelu
    from fastdino.models.dinov3 import DINOv3VisionTransformer
    from fastdino.models.vision_transformer import Mlp

    def build():
        if arch == "vit":
            return tiny(drop_path_rate=0.2).train()
        torch.manual_seed(0)
        return DINOv3VisionTransformer(attn="sdpa", embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32,
                                       n_storage_tokens=2, layerscale_init=0.5).to(DEV).train()

    plain, fused = build(), build()
    keys = fused.state_dict().keys()
    set_bias_gelu(fused, "triton")
    assert fused.state_dict().keys() == keys
    mlps = [m for m in fused.modules() if isinstance(m, Mlp)]
    assert len(mlps) == len(fused.blocks) and {m.bias_gelu_impl for m in mlps} == {"triton"}
    xs = crops(B=2, n_local=2)
    outs, grads = [], []
    for model in (plain, fused):
        torch.manual_seed(7)  # the same drop-path draws
        out = torch.cat([o.flatten() for o in model(xs)]) if arch == "dinov3" else model(xs).flatten()
        (out * torch.linspace(-1, 1, out.numel(), device=DEV)).sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and any("fc1.bias" in n for n in grads[1])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-5, msg=n)
    set_bias_gelu(fused, None)
    assert {m.bias_gelu_impl for m in mlps} == {None}


def test_drop_path_matches_reference_and_crop_order():
    """Packed forward with drop path == reference with the masks separate per-group calls draw."""
    model = tiny(drop_path_rate=0.5).train()
    xs = crops(B=4, n_global=2, n_local=2)
    torch.manual_seed(11)
    feats = MultiCropWrapper(model, torch.nn.Identity(), packed=True).forward_features(xs)
    torch.manual_seed(11)
    keep = 1 - torch.tensor(model.dpr, device=DEV)
    s_global = drop_path_scales(8, keep)  # the draws separate per-group calls make, in order
    s_local = drop_path_scales(8, keep)
    with torch.no_grad():
        ref = torch.cat([vit_forward_ref(model, torch.cat(xs[:2]), s_global)[:, 0],
                         vit_forward_ref(model, torch.cat(xs[2:]), s_local)[:, 0]])
    assert torch.allclose(feats.detach(), ref, atol=1e-5, rtol=1e-5)
    # without the masks the output differs: drop path really acted
    with torch.no_grad():
        no_drop = vit_forward_ref(model, torch.cat(xs[:2]))[:, 0]
    assert not torch.allclose(feats[:8].detach(), no_drop, atol=1e-3)


def test_drop_path_statistics():
    dpr = torch.linspace(0, 0.4, 12).tolist()
    torch.manual_seed(0)
    s = drop_path_scales(20000, 1 - torch.tensor(dpr))
    kept = (s > 0).float().mean(-1)  # (depth, 2)
    want = 1 - torch.tensor(dpr).view(-1, 1)
    assert torch.all((kept - want).abs() < 0.015)
    assert torch.allclose(s.mean(-1), torch.ones(12, 2), atol=0.03)  # unbiased: E[scale] = 1
    assert torch.all(s[0] == 1)  # first block never drops (rate 0)


def test_eval_mode_has_no_drop_path():
    model = tiny(drop_path_rate=0.5).eval()
    x = torch.randn(2, 3, 32, 32, device=DEV)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("packed", [False, True])
def test_activation_checkpointing_equal(packed):
    xs = crops(B=2, n_local=2)
    head = DINOHead(96, 11, hidden_dim=32, bottleneck_dim=8).to(DEV)
    ref = run_step(MultiCropWrapper(tiny(drop_path_rate=0.2).train(), head, packed), xs, seed=3)
    ck = run_step(MultiCropWrapper(tiny(drop_path_rate=0.2, activation_checkpointing=True).train(), head, packed),
                  xs, seed=3)
    assert torch.allclose(ck[0], ref[0], atol=1e-6)
    for n in ref[1]:
        assert torch.allclose(ck[1][n], ref[1][n], atol=1e-6, rtol=1e-5), n


def test_single_crop_tensor_and_teacher_globals():
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32, device=DEV)
    w = MultiCropWrapper(model, torch.nn.Identity(), packed=True)
    with torch.no_grad():
        assert torch.allclose(w(x), model(x), atol=1e-6)
        assert torch.allclose(w([x, x]), torch.cat([model(x), model(x)]), atol=1e-6)


# ---- head ----------------------------------------------------------------------------------------
def test_dino_head_math_and_layout():
    torch.manual_seed(0)
    head = DINOHead(48, 300, hidden_dim=64, bottleneck_dim=16)
    assert [k for k in head.state_dict()] == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
                                              "mlp.4.weight", "mlp.4.bias", "last_layer.weight_v", "last_layer.weight_g"]
    assert head.last_layer.weight_g.shape == (300, 1) and not head.last_layer.weight_g.requires_grad
    assert torch.all(head.last_layer.weight_g == 1)
    x = torch.randn(7, 48, dtype=torch.float64)
    head = head.double()
    z = head.mlp[4](F.gelu(head.mlp[2](F.gelu(head.mlp[0](x)))))
    z = z / z.norm(dim=1, keepdim=True)
    v = head.last_layer.weight_v
    want = z @ (v / v.norm(dim=1, keepdim=True)).T
    assert torch.allclose(head.forward_bottleneck(x), z)
    assert torch.allclose(head(x), want)
    assert torch.allclose(head.last_layer.weight().norm(dim=1), torch.ones(300, dtype=torch.float64))
    head.fused_last_layer = True  # the student's head when the DINO term applies the last layer
    assert torch.allclose(head(x), z)
    assert head(x).abs().max() <= 1 + 1e-12  # cosines


def test_dino_head_weight_g_trainable_and_bn_layout():
    head = DINOHead(48, 20, use_bn=True, norm_last_layer=False, hidden_dim=32, bottleneck_dim=8)
    assert head.last_layer.weight_g.requires_grad
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d",
                                                    "GELU", "Linear"]
    head.last_layer.weight_g.data.mul_(torch.rand(20, 1) + 0.5)
    x = torch.randn(5, 48)
    head(x).sum().backward()
    assert head.last_layer.weight_g.grad is not None and head.last_layer.weight_v.grad is not None
    w = head.last_layer.weight()
    assert torch.allclose(w.norm(dim=1, keepdim=True), head.last_layer.weight_g, atol=1e-5)
    assert isinstance(DINOHead(8, 4, nlayers=1).mlp, torch.nn.Linear)


def test_dino_head_plain_last_layer_and_fused_term():
    """DINOv3's head (last_layer="plain"): the official keys (last_layer.weight, no weight norm), logits
    z W^T; the DINO term with the last layer fused applies the same weight (loss and gradients equal
    to the unfused head's)."""
    from fastdino.losses.dino import DINOTerm

    torch.manual_seed(0)
    head = DINOHead(48, 30, hidden_dim=64, bottleneck_dim=16, last_layer="plain").double()
    assert list(head.state_dict())[-1] == "last_layer.weight" and head.last_layer.bias is None
    assert 0.015 < head.last_layer.weight.std().item() < 0.025  # trunc_normal(0.02)
    x = torch.randn(12, 48, dtype=torch.float64)
    z = head.forward_bottleneck(x)
    assert torch.allclose(head(x), z @ head.last_layer.weight.T)
    q = torch.softmax(torch.randn(4, 30, dtype=torch.float64), dim=1)  # 2 global crops of B = 2
    fused_head = copy.deepcopy(head)
    fused_head.fused_last_layer = True
    plain = DINOTerm(6, 0.1, "reference")
    fused = DINOTerm(6, 0.1, "reference", head=fused_head, matmul_dtype=torch.float64)
    a = plain({"cls": head(x)}, {"cls": q})
    b = fused({"cls": fused_head(x)}, {"cls": q})
    a.backward(), b.backward()
    assert torch.allclose(a, b)
    assert torch.allclose(head.last_layer.weight.grad, fused_head.last_layer.weight.grad)
    with pytest.raises(ValueError, match="last_layer"):
        DINOHead(8, 4, last_layer="cosine")


# ---- builders ------------------------------------------------------------------------------------
def test_build_backbone_from_config():
    cfg = ModelConfig(arch="vit_tiny", patch_size=8, drop_path_rate=0.2, attn="auto", activation_checkpointing=True)
    student, teacher = build_backbone(cfg, teacher=False), build_backbone(cfg, teacher=True)
    assert isinstance(student, VisionTransformer) and student.patch_size == 8 and student.embed_dim == 192
    assert len(student.blocks) == 12 and len(build_backbone(ModelConfig(arch="vit_tiny", depth=3), teacher=False).blocks) == 3
    assert student.drop_path_rate == 0.2 and teacher.drop_path_rate == 0.0
    assert student.attn_backend == teacher.attn_backend
    assert student.activation_checkpointing and not teacher.activation_checkpointing
    teacher.load_state_dict(student.state_dict(), strict=True)
    with pytest.raises(ValueError, match="model.arch"):
        build_backbone(ModelConfig(arch="vit_huge"), teacher=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only unavailability check")
@pytest.mark.parametrize("attn", ["sdpa_cudnn", "sdpa_efficient", "flash_attn"])
def test_unavailable_backend_fails_at_build(attn):
    with pytest.raises(AttentionBackendError, match=f"model.attn='{attn}'") as e:
        build_backbone(ModelConfig(arch="vit_tiny", attn=attn), teacher=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("packed", [False, True])
def test_compile_blocks_one_graph_per_layout(packed):
    """compile_blocks with the aot_eager backend (no C++ toolchain needed): same outputs and grads as
    eager, one static graph per token layout shared by all blocks, and no recompile over steps."""
    from torch._dynamo.utils import counters

    xs = crops(B=2, n_local=1)
    head = torch.nn.Identity()
    ref = [run_step(MultiCropWrapper(tiny(drop_path_rate=0.1).train(), head, packed), xs, seed=s) for s in (2, 3)]
    torch._dynamo.reset()
    counters.clear()
    model = compile_blocks(MultiCropWrapper(tiny(drop_path_rate=0.1).train(), head, packed), backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile raises
        got = [run_step(model, xs, seed=s) for s in (2, 3)]
    for g, r in zip(got, ref):
        assert torch.allclose(g[0], r[0], atol=1e-5)
        for n in r[1]:
            assert torch.allclose(g[1][n], r[1][n], atol=1e-5, rtol=1e-4), n
    assert not counters["graph_break"], counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == (1 if packed else 2)  # globals and locals: two layouts
    with pytest.raises(ValueError, match="no transformer block"):
        compile_blocks(torch.nn.Linear(2, 2))


def test_packed_goes_through_module_call():
    """Packed forward enters the backbone through __call__, so pre-forward hooks (ZeRO-3 gathering of
    cls_token / pos_embed) run."""
    model = tiny().eval()
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(type(args[0]).__name__))
    with torch.no_grad():
        MultiCropWrapper(model, torch.nn.Identity(), packed=True)(crops(B=1, n_local=1))
    assert calls == ["list"]


def _block_input_dtypes(model):
    """Record the dtype of the residual stream entering every block (forward pre-hooks)."""
    seen = []
    hooks = [blk.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype if isinstance(args[0], torch.Tensor)
                                                                    else args[0][0].dtype)) for blk in model.blocks]
    return seen, hooks


@pytest.mark.parametrize("variant", ["plain", "drop_path_packed", "fused_residual_norm", "dinov3"])
def test_bf16_residual_stream(variant):
    """model.residual_dtype=bf16: under bf16 autocast every block sees (and returns) a bf16 residual
    stream; the output differs from the fp32 stream's by bf16 rounding only (and does differ); the
    parameters' gradients stay fp32 and finite; without autocast the option changes nothing."""
    from fastdino.models import set_residual_norm

    if variant == "dinov3":
        from fastdino.models.dinov3 import DINOv3VisionTransformer

        torch.manual_seed(0)
        model = DINOv3VisionTransformer(attn="sdpa", embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32,
                                        n_storage_tokens=2, layerscale_init=0.5).to(DEV)
    else:
        model = tiny(drop_path_rate=0.3 if variant == "drop_path_packed" else 0.0)
        if variant == "fused_residual_norm":
            set_residual_norm(model, "auto")  # CPU: the op's torch reference; CUDA: the Triton kernels
    model.train()
    xs = crops(B=2, n_local=1)
    inputs = xs if variant in ("drop_path_packed", "dinov3") else xs[0]

    def run(dtype, autocast=True):
        model.residual_dtype = dtype
        seen, hooks = _block_input_dtypes(model)
        torch.manual_seed(3)
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=autocast):
            out = model(inputs)
        out = torch.cat([o.flatten() for o in out]) if isinstance(out, list) else out.flatten()
        (out.float() * torch.linspace(-1, 1, out.numel(), device=DEV)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        for h in hooks:
            h.remove()
        return out.detach().float(), grads, set(seen)

    out32, grads32, seen32 = run(None)
    out16, grads16, seen16 = run(torch.bfloat16)
    assert seen32 == {torch.float32} and seen16 == {torch.bfloat16}
    scale = out32.abs().max().item()
    # bf16 residual: ~2^-9 relative per add, 2-4 blocks; measured 0.7-1.3e-2 of the largest output on CPU
    assert 0 < (out16 - out32).abs().max().item() <= 0.05 * scale
    assert grads16.keys() == grads32.keys()
    for n, g in grads16.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), n
    plain, _, seen = run(None, autocast=False)
    same, _, seen_b = run(torch.bfloat16, autocast=False)
    assert seen == seen_b == {torch.float32} and torch.equal(plain, same)
