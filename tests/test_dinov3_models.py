"""DINOv3 backbone (fastdino/models/dinov3.py): the official DINOv3 state-dict layout (key names and
shapes of the hub ViTs, a strict load), an independent fp64 reference forward written here from the
official definitions (RoPE as a complex rotation, explicit softmax, subset drop path), gradients,
RoPE properties and its training-only augmentations, the masked key bias, the multi-crop hook-up."""
import copy
import math
import re

import pytest
import torch
import torch.nn as nn

from fastdino.data.masking import MaskBatch
from fastdino.models import MultiCropWrapper
from fastdino.models.dinov3 import (DINOV3_ARCHS, DINOv3VisionTransformer, RopePositionEmbedding, dinov3_vitb16,
                                    dinov3_vitl16, dinov3_vits16, rope_apply)

# ------------------------------------------------------------------------------------------------
# The official layout, written from facebookresearch/dinov3: hub/backbones.py (dinov3_vits16 / vitb16 /
# vitl16 / vits16plus / vitl16plus / vith16plus / vit7b16: patch 16, n_storage_tokens=4, layerscale
# 1e-5, mask_k_bias=True, qkv_bias True except 7b, pos_embed_rope_dtype fp32) and models/
# vision_transformer.py (DinoVisionTransformer: cls_token, storage_tokens, mask_token, rope_embed,
# blocks, norm, cls_norm / local_cls_norm when untied, head = Identity), layers/attention.py
# (LinearKMaskedBias: buffer bias_mask, only with a bias), layers/rope_position_encoding.py
# (persistent buffer periods, D_head // 4), layers/ffn_layers.py (Mlp fc1/fc2; SwiGLUFFN w1/w2/w3,
# width int(int(D*ratio) * 2/3) rounded up to align_to), layers/layer_scale.py (gamma),
# layers/patch_embed.py (proj conv; norm Identity).
# name -> (embed_dim, depth, heads, ffn, ffn width, qkv_bias, untie_global_and_local_cls_norm)
# ------------------------------------------------------------------------------------------------
OFFICIAL = {
    "dinov3_vits16": (384, 12, 6, "mlp", 1536, True, False),
    "dinov3_vitb16": (768, 12, 12, "mlp", 3072, True, False),
    "dinov3_vitl16": (1024, 24, 16, "mlp", 4096, True, False),
    "dinov3_vits16plus": (384, 12, 6, "swiglu", 1536, True, False),  # int(2304 * 2/3) = 1536
    "dinov3_vitl16plus": (1024, 24, 16, "swiglu", 4096, True, False),  # int(6144 * 2/3) = 4096
    "dinov3_vith16plus": (1280, 32, 20, "swiglu", 5120, True, False),  # int(7680 * 2/3) = 5120
    "dinov3_vit7b16": (4096, 40, 32, "swiglu", 8192, False, True),  # int(12288 * 2/3) = 8192 (align 64)
}


def official_dinov3_keys(name, depth=None, untie_global_and_local_cls_norm=None):
    """Names and shapes of an official DINOv3 hub ViT state dict (see the comment above)."""
    dim, full_depth, heads, ffn, hidden, qkv_bias, untie_local = OFFICIAL[name]
    untie_local = untie_local if untie_global_and_local_cls_norm is None else untie_global_and_local_cls_norm
    keys = {"cls_token": (1, 1, dim), "storage_tokens": (1, 4, dim), "mask_token": (1, dim),
            "rope_embed.periods": (dim // heads // 4,),
            "patch_embed.proj.weight": (dim, 3, 16, 16), "patch_embed.proj.bias": (dim,),
            "norm.weight": (dim,), "norm.bias": (dim,)}
    if untie_local:
        keys.update({"local_cls_norm.weight": (dim,), "local_cls_norm.bias": (dim,)})
    for i in range(full_depth if depth is None else depth):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,), b + "attn.qkv.weight": (3 * dim, dim),
                     b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,), b + "ls1.gamma": (dim,),
                     b + "norm2.weight": (dim,), b + "norm2.bias": (dim,), b + "ls2.gamma": (dim,)})
        if qkv_bias:
            keys.update({b + "attn.qkv.bias": (3 * dim,), b + "attn.qkv.bias_mask": (3 * dim,)})
        if ffn == "mlp":
            keys.update({b + "mlp.fc1.weight": (hidden, dim), b + "mlp.fc1.bias": (hidden,),
                         b + "mlp.fc2.weight": (dim, hidden), b + "mlp.fc2.bias": (dim,)})
        else:
            keys.update({b + "mlp.w1.weight": (hidden, dim), b + "mlp.w1.bias": (hidden,),
                         b + "mlp.w2.weight": (hidden, dim), b + "mlp.w2.bias": (hidden,),
                         b + "mlp.w3.weight": (dim, hidden), b + "mlp.w3.bias": (dim,)})
    return keys


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Values with signal in every branch: gammas in [0.5, 1.5] (not the hub's 1e-5, which would hide
    the blocks), norm weights ~1, linear weights ~fan_in^-1/2, biases (the key bias too) and tokens
    nonzero. Buffers (periods, bias_mask) keep their values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if name.endswith("gamma"):
                v = 0.5 + torch.rand(p.shape, generator=gen)
            elif "norm" in name:
                v = 1 + 0.2 * r if name.endswith("weight") else 0.2 * r
            elif name.endswith("weight"):
                v = r * r[0].numel() ** -0.5
            elif name.endswith("bias"):
                v = 0.3 * r
            else:  # cls / storage / mask tokens
                v = r
            p.copy_(v)
    return model


# ------------------------------------------------------------------------------------------------
# Reference: the official DINOv3 forward written out from its definition, over a state dict, any dtype
# ------------------------------------------------------------------------------------------------
DEFAULTS = dict(patch_size=16, pos_embed_rope_base=100.0, pos_embed_rope_min_period=None,
                pos_embed_rope_max_period=None, pos_embed_rope_normalize_coords="separate", embed_dim=768, depth=12,
                num_heads=12, ffn_ratio=4.0, layerscale_init=None, norm_layer="layernorm", ffn_layer="mlp",
                n_storage_tokens=0, mask_k_bias=False, untie_cls_and_patch_norms=False,
                untie_global_and_local_cls_norm=False)


def grid_coords_ref(h, w, normalize):
    """(h*w, 2) coordinates (y, x) of the patch centres, row-major, fp64."""
    n_h, n_w = (h, w) if normalize == "separate" else ((max(h, w),) * 2 if normalize == "max" else (min(h, w),) * 2)
    return torch.tensor([[2 * (i + 0.5) / n_h - 1, 2 * (j + 0.5) / n_w - 1] for i in range(h) for j in range(w)],
                        dtype=torch.float64)


def periods_ref(cfg, d):
    n = d // 4
    if cfg["pos_embed_rope_base"] is not None:
        return torch.tensor([cfg["pos_embed_rope_base"] ** (4 * m / d) for m in range(n)], dtype=torch.float64)
    lo, hi = cfg["pos_embed_rope_min_period"], cfg["pos_embed_rope_max_period"]
    return torch.tensor([lo * (hi / lo) ** (m / (n - 1)) for m in range(n)], dtype=torch.float64)


def rotate_ref(t, coords, periods):
    """RoPE as a complex rotation: z_a = t_a + i t_(a+d/2) times exp(i theta_a), theta_a = 2 pi y / p_a
    for a < d/4, 2 pi x / p_(a-d/4) after. t (..., P, d), coords (P, 2)."""
    d = t.shape[-1]
    theta = 2 * math.pi * torch.cat((coords[:, :1] / periods, coords[:, 1:] / periods), dim=-1).to(t.dtype)
    z = torch.complex(t[..., :d // 2], t[..., d // 2:]) * torch.polar(torch.ones_like(theta), theta)
    return torch.cat((z.real, z.imag), dim=-1)


def norm_ref(x, sd, name, kind):
    w = sd[name + ".weight"]
    if kind == "rmsnorm":
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w
    eps = 1e-6 if kind == "layernorm" else 1e-5
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps) * w + sd[name + ".bias"]


def linear_ref(x, sd, name, bias_scale=None):
    y = x @ sd[name + ".weight"].T
    if name + ".bias" in sd:
        y = y + (sd[name + ".bias"] if bias_scale is None else sd[name + ".bias"] * bias_scale)
    return y


def dinov3_ref(sd, cfg, images, masks=None, coords=None, drops=None, training=False):
    """Official forward_features of a list of image groups: a list of dicts cls (B, D), reg (B, R, D),
    patch (B, P, D), prenorm (B, N, D), attn (B, heads, N, N) of the last block. coords[i][g]: the
    patch coordinates of group g in block i (default: the grid); drops[i][g]: (attention subset, FFN
    subset) of block i (default: none); training: list entry 1 uses local_cls_norm if untied."""
    cfg = {**DEFAULTS, **cfg}
    dim, heads, depth, p = cfg["embed_dim"], cfg["num_heads"], cfg["depth"], cfg["patch_size"]
    d, R = dim // heads, cfg["n_storage_tokens"]
    dt = sd["cls_token"].dtype
    periods = periods_ref(cfg, d).to(dt)
    kmask = torch.cat((torch.ones(dim), torch.zeros(dim), torch.ones(dim))).to(dt) if cfg["mask_k_bias"] else None
    masks = masks or [None] * len(images)
    xs, grids = [], []
    for img, m in zip(images, masks):  # patch embedding as a matmul over unfolded patches
        B, C, H, W = img.shape
        h, w = H // p, W // p
        patches = img.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p)
        x = patches @ sd["patch_embed.proj.weight"].reshape(dim, -1).T + sd["patch_embed.proj.bias"]
        if m is not None:
            x = torch.where(m[..., None], sd["mask_token"][0], x)
        prefix = [sd["cls_token"].expand(B, 1, dim)] + ([sd["storage_tokens"].expand(B, R, dim)] if R else [])
        xs.append(torch.cat(prefix + [x], dim=1))
        grids.append((h, w))

    def attention(x, c, last):
        B, N, _ = x.shape
        qkv = linear_ref(x, sd, f"blocks.{i}.attn.qkv", kmask).reshape(B, N, 3, heads, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, N, d)
        pre = N - c.shape[0]
        q = torch.cat((q[:, :, :pre], rotate_ref(q[:, :, pre:], c, periods)), dim=2)
        k = torch.cat((k[:, :, :pre], rotate_ref(k[:, :, pre:], c, periods)), dim=2)
        logits = torch.einsum("bhid,bhjd->bhij", q, k) * d ** -0.5
        a = torch.exp(logits - logits.amax(-1, keepdim=True))
        a = a / a.sum(-1, keepdim=True)
        if last:
            attn_last.append(a)
        y = torch.einsum("bhij,bhjd->bhid", a, v).permute(0, 2, 1, 3).reshape(B, N, dim)
        y = linear_ref(y, sd, f"blocks.{i}.attn.proj")
        return y * sd[f"blocks.{i}.ls1.gamma"] if cfg["layerscale_init"] else y

    def ffn(x):
        b = f"blocks.{i}.mlp."
        if cfg["ffn_layer"] == "mlp":
            h1 = linear_ref(x, sd, b + "fc1")
            y = linear_ref(0.5 * h1 * (1 + torch.erf(h1 / math.sqrt(2))), sd, b + "fc2")
        else:
            a1, a2 = linear_ref(x, sd, b + "w1"), linear_ref(x, sd, b + "w2")
            y = linear_ref(a1 * torch.sigmoid(a1) * a2, sd, b + "w3")
        return y * sd[f"blocks.{i}.ls2.gamma"] if cfg["layerscale_init"] else y

    attn_last = []
    for i in range(depth):
        for g in range(len(xs)):
            c = grid_coords_ref(*grids[g], cfg["pos_embed_rope_normalize_coords"]) if coords is None else coords[i][g]
            x, rows = xs[g], xs[g].shape[0]
            sub1, sub2 = (torch.arange(rows), torch.arange(rows)) if drops is None else drops[i][g]
            scale = rows / len(sub1)
            x = x.clone()
            x[sub1] = x[sub1] + scale * attention(norm_ref(x[sub1], sd, f"blocks.{i}.norm1", cfg["norm_layer"]), c,
                                                  i == depth - 1)
            x = x.clone()
            x[sub2] = x[sub2] + scale * ffn(norm_ref(x[sub2], sd, f"blocks.{i}.norm2", cfg["norm_layer"]))
            xs[g] = x
    out = []
    for g, x in enumerate(xs):
        if cfg["untie_global_and_local_cls_norm"] and training and g == 1:
            prefix_norm = "local_cls_norm"
        else:
            prefix_norm = "cls_norm" if cfg["untie_cls_and_patch_norms"] else "norm"
        pre = norm_ref(x[:, :1 + R], sd, prefix_norm, cfg["norm_layer"])
        out.append({"cls": pre[:, 0], "reg": pre[:, 1:], "patch": norm_ref(x[:, 1 + R:], sd, "norm", cfg["norm_layer"]),
                    "prenorm": x, "attn": attn_last[g] if drops is None else None})
    return out


def module_outputs(feats):
    return [{"cls": f["x_norm_clstoken"], "reg": f["x_norm_regtokens"], "patch": f["x_norm_patchtokens"],
             "prenorm": f["x_prenorm"]} for f in feats]


def state_dict_as(model, dtype, requires_grad=False):
    return {k: v.detach().to(dtype).requires_grad_(requires_grad and v.is_floating_point())
            for k, v in model.state_dict().items()}


def assert_close_ref(out, ref32, ref64, what, factor=4.0):
    """|out - ref64| <= factor * |ref32 - ref64| + 1e-6 * max|ref64| (max over the tensor)."""
    out, ref32, ref64 = out.double(), ref32.double(), ref64.double()
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    if out.numel() == 0:
        return
    err, budget = (out - ref64).abs().max().item(), (ref32 - ref64).abs().max().item()
    floor = 1e-6 * ref64.abs().max().item()
    assert err <= factor * budget + floor, \
        f"{what}: error {err:.3g} > {factor} x reference error {budget:.3g} + {floor:.3g}"


CFG_A = dict(embed_dim=32, depth=2, num_heads=2, patch_size=4, n_storage_tokens=3, layerscale_init=1e-5,
             norm_layer="layernormbf16", ffn_layer="mlp", mask_k_bias=True)
CFG_B = dict(embed_dim=32, depth=2, num_heads=2, patch_size=4, n_storage_tokens=0, norm_layer="rmsnorm",
             ffn_layer="swiglu32", mask_k_bias=False, untie_cls_and_patch_norms=True,
             untie_global_and_local_cls_norm=True, pos_embed_rope_base=None, pos_embed_rope_min_period=0.5,
             pos_embed_rope_max_period=20.0, pos_embed_rope_normalize_coords="max", ffn_ratio=3.0)
CFG_C = dict(embed_dim=48, depth=3, num_heads=3, patch_size=4, n_storage_tokens=1, layerscale_init=0.1,
             norm_layer="layernorm", ffn_layer="swiglu", mask_k_bias=True, qkv_bias=False, proj_bias=False,
             ffn_bias=False, untie_cls_and_patch_norms=True, pos_embed_rope_normalize_coords="min")


def build(cfg, seed=0, **kw):
    torch.manual_seed(seed)
    return randomize_(DINOv3VisionTransformer(attn="sdpa", **cfg, **kw), seed)


def images(seed=1):
    gen = torch.Generator().manual_seed(seed)
    glob = torch.randn(2, 3, 16, 12, generator=gen)  # a 4 x 3 grid (not square)
    loc = torch.randn(3, 3, 8, 8, generator=gen)  # 2 x 2
    masks = torch.rand(2, 12, generator=gen) < 0.4
    masks[0, 0] = True
    return glob, loc, masks


# ------------------------------------------------------------------------------------------------
# State dict: official names and shapes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(OFFICIAL))
def test_hub_state_dict_keys_and_shapes(name):
    with torch.device("meta"):  # full size, no memory
        model = DINOV3_ARCHS[name]()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_dinov3_keys(name)
    assert model.state_dict()["rope_embed.periods"].dtype == torch.float32  # hub: pos_embed_rope_dtype fp32


def test_vitl16_sat_weights_untie_local_cls_norm():
    """The ViT-L SAT493M weights are built with untie_global_and_local_cls_norm=True (hub)."""
    with torch.device("meta"):
        model = dinov3_vitl16(untie_global_and_local_cls_norm=True)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_dinov3_keys("dinov3_vitl16", untie_global_and_local_cls_norm=True)


def test_hub_settings():
    for build_fn, dim, heads in ((dinov3_vits16, 384, 6), (dinov3_vitb16, 768, 12), (dinov3_vitl16, 1024, 16)):
        with torch.device("meta"):
            m = build_fn()
        assert (m.embed_dim, m.num_heads, m.patch_size, m.n_storage_tokens) == (dim, heads, 16, 4)
        assert m.blocks[0].norm1.eps == 1e-5  # "layernormbf16"
        rope = m.rope_embed
        assert (rope.base, rope.normalize_coords, rope.rescale_coords, rope.shift_coords, rope.jitter_coords) == \
               (100.0, "separate", 2, None, None)
    m = dinov3_vits16(depth=1)
    assert len(m.blocks) == 1 and m.blocks[0].ls1.gamma.eq(1e-5).all()


def test_official_state_dict_loads_strict_and_matches_reference():
    """A state dict with the official ViT-S/16 names (depth cut to 2) loads with strict=True,
    buffers included, and the model then computes the reference forward of those weights."""
    keys = official_dinov3_keys("dinov3_vits16", depth=2)
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=gen) * (0.05 if len(shape) > 1 else 0.3) for k, shape in keys.items()}
    for i in range(2):
        sd[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat((torch.ones(384), torch.zeros(384), torch.ones(384)))
        sd[f"blocks.{i}.ls1.gamma"] = sd[f"blocks.{i}.ls2.gamma"] = torch.full((384,), 0.5)
        for n in ("norm1", "norm2"):
            sd[f"blocks.{i}.{n}.weight"] = 1 + sd[f"blocks.{i}.{n}.weight"]
    sd["norm.weight"] = 1 + sd["norm.weight"]
    sd["rope_embed.periods"] = periods_ref(dict(pos_embed_rope_base=100.0), 64).float()
    model = dinov3_vits16(depth=2, attn="sdpa").eval()
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.blocks[1].attn.qkv.bias_mask, sd["blocks.1.attn.qkv.bias_mask"])
    x = torch.randn(2, 3, 32, 48, generator=gen)
    with torch.no_grad():
        out = module_outputs([model.forward_features(x)])[0]
    cfg = dict(embed_dim=384, depth=2, num_heads=6, n_storage_tokens=4, layerscale_init=1e-5,
               norm_layer="layernormbf16", mask_k_bias=True)
    ref64 = dinov3_ref({k: v.double() for k, v in sd.items()}, cfg, [x.double()])[0]
    ref32 = dinov3_ref(sd, cfg, [x])[0]
    for k in ("cls", "reg", "patch", "prenorm"):
        assert_close_ref(out[k], ref32[k], ref64[k], k)


# ------------------------------------------------------------------------------------------------
# Forward and backward against the reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [CFG_A, CFG_B, CFG_C], ids=["mlp-ln-storage", "swiglu-rms-untied-periods", "nobias"])
def test_forward_matches_reference(cfg):
    model = build(cfg).eval()
    glob, loc, masks = images()
    with torch.no_grad():
        out = module_outputs(model.forward_features([glob, loc], [masks, None]))
        attn = model.get_last_selfattention(glob)
    ref64 = dinov3_ref(state_dict_as(model, torch.float64), cfg, [glob.double(), loc.double()], [masks, None])
    ref32 = dinov3_ref(state_dict_as(model, torch.float32), cfg, [glob, loc], [masks, None])
    for g in range(2):
        for k in ("cls", "reg", "patch", "prenorm"):
            assert_close_ref(out[g][k], ref32[g][k], ref64[g][k], f"group {g} {k}")
    ref_attn = dinov3_ref(state_dict_as(model, torch.float64), cfg, [glob.double()])[0]["attn"]
    ref_attn32 = dinov3_ref(state_dict_as(model, torch.float32), cfg, [glob])[0]["attn"]
    assert_close_ref(attn, ref_attn32, ref_attn, "last attention")


def test_single_group_and_list_agree():
    """One tensor = list entry 0; forward = x_norm_clstoken; a list forward = the groups' [CLS]
    concatenated; the packed matmuls change nothing beyond fp32 rounding (eval)."""
    model = build(CFG_A).eval()
    glob, loc, masks = images()
    with torch.no_grad():
        one = model.forward_features(glob, masks)
        both = model.forward_features([glob, loc], [masks, None])
        cls_list = model([glob, loc])
        cls_one, cls_loc = model(glob), model(loc)
        inter = model.get_intermediate_layers(loc, n=2)
        feats_loc = model.forward_features(loc)
    for k in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
        torch.testing.assert_close(one[k], both[0][k], rtol=1e-5, atol=1e-5)
    assert one["masks"] is masks and one["x_storage_tokens"] is one["x_norm_regtokens"]
    torch.testing.assert_close(cls_list, torch.cat([cls_one, cls_loc]), rtol=1e-5, atol=1e-5)
    assert len(inter) == 2
    torch.testing.assert_close(inter[1], torch.cat([feats_loc["x_norm_clstoken"][:, None],
                                                    feats_loc["x_norm_regtokens"], feats_loc["x_norm_patchtokens"]], 1))


def test_gradients_match_reference():
    """d(sum of weighted [CLS], storage and patch features) / d(every parameter and the images)."""
    cfg = dict(CFG_A, untie_cls_and_patch_norms=True)
    model = build(cfg).eval()
    glob, loc, masks = images()
    gen = torch.Generator().manual_seed(5)
    weights = None

    def scalar(outs):
        nonlocal weights
        if weights is None:
            weights = [{k: torch.randn(o[k].shape, generator=gen, dtype=torch.float64) for k in ("cls", "reg", "patch")}
                       for o in outs]
        return sum((o[k] * w[k].to(o[k].dtype)).sum() for o, w in zip(outs, weights) for k in w)

    x = [glob.clone().requires_grad_(), loc.clone().requires_grad_()]
    scalar(module_outputs(model.forward_features(x, [masks, None]))).backward()
    refs = {}
    for dt in (torch.float64, torch.float32):
        sd = state_dict_as(model, dt, requires_grad=True)
        xr = [glob.to(dt).requires_grad_(), loc.to(dt).requires_grad_()]
        params = [sd[n] for n, _ in model.named_parameters()]
        grads = torch.autograd.grad(scalar(dinov3_ref(sd, cfg, xr, [masks, None])), params + xr, allow_unused=True)
        refs[dt] = grads
    names = [n for n, _ in model.named_parameters()] + ["images.global", "images.local"]
    got = [p.grad for _, p in model.named_parameters()] + [t.grad for t in x]
    for name, g, r64, r32 in zip(names, got, refs[torch.float64], refs[torch.float32]):
        assert g is not None and r64 is not None, name
        assert_close_ref(g, r32, r64, f"grad {name}")
    assert model.blocks[0].attn.qkv.bias.grad[32:64].eq(0).all()  # the masked key bias learns nothing


def _draw_official(seed, cfg, grids, rows):
    """The training randomness in the official order, from a fresh seed: per block, the RoPE
    augmentation of each group (shift 2, jitter 2, rescale 1 uniforms), then the attention subset of
    each group, then the FFN subset of each group (torch.randperm(rows)[:k])."""
    cfg = {**DEFAULTS, **cfg}
    torch.manual_seed(seed)
    coords, drops = [], []
    for _ in range(cfg["depth"]):
        block = []
        for h, w in grids:
            c = grid_coords_ref(h, w, cfg["pos_embed_rope_normalize_coords"])
            if cfg.get("pos_embed_rope_shift_coords"):
                s = cfg["pos_embed_rope_shift_coords"]
                c = c + torch.empty(2).uniform_(-s, s).double()
            if cfg.get("pos_embed_rope_jitter_coords"):
                j = math.log(cfg["pos_embed_rope_jitter_coords"])
                c = c * torch.empty(2).uniform_(-j, j).double().exp()
            if cfg.get("pos_embed_rope_rescale_coords"):
                r = math.log(cfg["pos_embed_rope_rescale_coords"])
                c = c * torch.empty(1).uniform_(-r, r).double().exp()
            block.append(c)
        coords.append(block)
        ks = [max(int(n * (1 - cfg["drop_path_rate"])), 1) for n in rows]
        first = [torch.randperm(n)[:k] for n, k in zip(rows, ks)]
        second = [torch.randperm(n)[:k] for n, k in zip(rows, ks)]
        drops.append(list(zip(first, second)))
    return coords, drops


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_forward_matches_reference_with_official_draws(checkpointing):
    """Training: RoPE shift / jitter / rescale drawn per block per group, subset drop path, the local
    crops' [CLS] through local_cls_norm; with activation checkpointing the same outputs and gradients."""
    cfg = dict(CFG_B, drop_path_rate=0.4, pos_embed_rope_shift_coords=0.3, pos_embed_rope_jitter_coords=1.5,
               pos_embed_rope_rescale_coords=2.0)
    model = build(cfg, activation_checkpointing=checkpointing).train()
    glob, loc, masks = images()
    glob = torch.cat([glob, glob.flip(0)])  # 4 rows: subsets of 2 (attention) and 2 (FFN)
    masks = torch.cat([masks, masks])
    torch.manual_seed(123)
    feats = model.forward_features([glob, loc], [masks, None])
    out = module_outputs(feats)
    sum(o["cls"].sum() + o["patch"].pow(2).mean() for o in out).backward()
    coords, drops = _draw_official(123, cfg, [(4, 3), (2, 2)], [4, 3])
    assert any(len(d[0]) < 4 for d in drops[0])
    sd = state_dict_as(model, torch.float64)
    ref64 = dinov3_ref(sd, cfg, [glob.double(), loc.double()], [masks, None], coords, drops, training=True)
    ref32 = dinov3_ref(state_dict_as(model, torch.float32), cfg, [glob, loc], [masks, None],
                       [[c.float() for c in b] for b in coords], drops, training=True)
    for g in range(2):
        for k in ("cls", "patch", "prenorm"):
            assert_close_ref(out[g][k], ref32[g][k], ref64[g][k], f"group {g} {k}")
    # the local crops' [CLS] went through local_cls_norm, the global crops' through cls_norm
    assert model.local_cls_norm.weight.grad.abs().sum() > 0 and model.cls_norm.weight.grad.abs().sum() > 0
    if checkpointing:  # same draws, same gradients as without checkpointing
        plain = copy.deepcopy(model)
        plain.activation_checkpointing = False
        plain.zero_grad()
        torch.manual_seed(123)
        out2 = module_outputs(plain.forward_features([glob, loc], [masks, None]))
        sum(o["cls"].sum() + o["patch"].pow(2).mean() for o in out2).backward()
        for (n, p), q in zip(model.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


# ------------------------------------------------------------------------------------------------
# RoPE
# ------------------------------------------------------------------------------------------------
def test_rope_is_relative_and_identity_at_zero():
    rope = RopePositionEmbedding(64, 4, base=100.0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 16, generator=gen, dtype=torch.float64)
    c1, c2, shift = torch.randn(3, 2, generator=gen, dtype=torch.float64)

    def dot(a, b):
        return (rope_apply(q, *rope.sincos(a)) * rope_apply(k, *rope.sincos(b))).sum()

    torch.testing.assert_close(dot(c1, c2), dot(c1 + shift, c2 + shift), rtol=0, atol=1e-12)
    torch.testing.assert_close(dot(c1, c2), dot(c1 - c2, torch.zeros(2, dtype=torch.float64)), rtol=0, atol=1e-12)
    assert (dot(c1, c2) - dot(c1, c2 + shift)).abs() > 1e-3  # it does depend on the difference
    torch.testing.assert_close(rope_apply(q, *rope.sincos(torch.zeros(2, dtype=torch.float64))), q)
    # against the complex rotation of the reference, on the grid
    c = grid_coords_ref(3, 5, "separate")
    sin, cos = rope(H=3, W=5)
    t = torch.randn(15, 16, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(rope_apply(t, sin, cos), rotate_ref(t, c, periods_ref(DEFAULTS, 16)))


@pytest.mark.parametrize("normalize", ["separate", "max", "min"])
def test_rope_grid_coords_and_periods(normalize):
    rope = RopePositionEmbedding(32, 2, base=None, min_period=0.5, max_period=20.0, normalize_coords=normalize)
    torch.testing.assert_close(rope.coords(3, 5).double(), grid_coords_ref(3, 5, normalize))
    torch.testing.assert_close(rope.periods.double(), periods_ref(
        dict(pos_embed_rope_base=None, pos_embed_rope_min_period=0.5, pos_embed_rope_max_period=20.0), 16))
    # in [-1, 1] except along the longer side with "min" (official: 2 (j + 1/2) / min(H, W) - 1)
    assert (rope.coords(3, 5).abs().max() <= 1) == (normalize != "min")
    base = RopePositionEmbedding(32, 2, base=100.0)
    torch.testing.assert_close(base.periods.double(), periods_ref(dict(pos_embed_rope_base=100.0), 16))


def test_rope_augmentations_train_only():
    rope = RopePositionEmbedding(32, 2, shift_coords=0.5, jitter_coords=2.0, rescale_coords=3.0)
    grid = grid_coords_ref(4, 4, "separate").float()
    rope.eval()
    torch.testing.assert_close(rope.coords(4, 4), grid)  # eval: never augmented
    rope.train()
    a = rope.coords(4, 4, generator=torch.Generator().manual_seed(7))
    b = rope.coords(4, 4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b)  # reproducible from the generator
    assert not torch.allclose(a, grid)
    for kind, lo, hi in (("shift", -0.5, 0.5), ("jitter", 0.5, 2.0), ("rescale", 1 / 3, 3.0)):
        r = RopePositionEmbedding(32, 2, **{f"{kind}_coords": hi if kind != "shift" else 0.5}).train()
        for seed in range(20):
            c = r.coords(4, 4, generator=torch.Generator().manual_seed(seed))
            if kind == "shift":  # one offset per axis for every token
                off = c - grid
                assert torch.allclose(off, off[:1].expand_as(off)) and off.abs().max() <= 0.5
            else:
                f = c / grid  # one factor per axis (jitter) or one for both (rescale)
                assert torch.allclose(f, f[:1].expand_as(f), rtol=1e-5)
                assert lo * 0.999 <= f.min() and f.max() <= hi * 1.001
                if kind == "rescale":
                    assert torch.allclose(f[0, 0], f[0, 1])
    model = build(dict(CFG_A, pos_embed_rope_rescale_coords=2.0))
    glob, _, _ = images()
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(glob), model(glob), rtol=0, atol=0)
        model.train()
        torch.manual_seed(0)
        t1 = model(glob)
        t2 = model(glob)
        torch.manual_seed(0)
        t3 = model(glob)
    assert not torch.allclose(t1, t2) and torch.equal(t1, t3)


# ------------------------------------------------------------------------------------------------
# Masked key bias, mask token, init, multi-crop, errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_k_bias", [True, False])
def test_key_bias_masked(mask_k_bias):
    model = build(dict(CFG_A, mask_k_bias=mask_k_bias)).eval()
    glob, _, _ = images()
    with torch.no_grad():
        before = model.forward_features(glob)["x_norm_patchtokens"]
        for blk in model.blocks:
            blk.attn.qkv.bias[32:64] += 3.0
        after = model.forward_features(glob)["x_norm_patchtokens"]
    if mask_k_bias:  # the key bias never acts
        torch.testing.assert_close(before, after, rtol=0, atol=0)
        assert torch.equal(model.blocks[0].attn.qkv.bias_mask, torch.tensor([1.0] * 32 + [0.0] * 32 + [1.0] * 32))
    else:  # with RoPE a key bias does change the attention (this test can fail)
        assert not torch.allclose(before, after, atol=1e-4)
        assert "blocks.0.attn.qkv.bias_mask" not in model.state_dict()


def test_mask_token_and_init():
    torch.manual_seed(0)
    model = DINOv3VisionTransformer(attn="sdpa", **CFG_A)
    assert model.mask_token.eq(0).all() and model.blocks[0].ls2.gamma.eq(1e-5).all()
    assert model.blocks[0].attn.qkv.bias.eq(0).all() and model.norm.weight.eq(1).all()
    assert 0.01 < model.storage_tokens.std() < 0.04 and model.storage_tokens.shape == (1, 3, 32)
    glob, _, _ = images()
    model(glob).sum().backward()  # no masks: the mask token still gets a (zero) gradient, as official
    assert model.mask_token.grad is not None and model.mask_token.grad.eq(0).all()


@pytest.mark.parametrize("packed", [False, True])
def test_multicrop_wrapper(packed):
    """The backbone under fastdino's MultiCropWrapper: [CLS] of all crops and the iBOT masked-patch
    outputs, packed or one call per resolution group (eval: both equal the backbone's own features)."""
    model = build(CFG_A).eval()
    glob, loc, masks = images()
    crops = [glob[:1], glob[1:], loc[:1], loc[1:2], loc[2:]]  # crop-major, B = 1
    idx = masks.flatten().nonzero().flatten()
    mb = MaskBatch(masks, idx, torch.ones(idx.numel()), torch.tensor(idx.numel()))
    wrapper = MultiCropWrapper(model, nn.Identity(), packed=packed).eval()
    with torch.no_grad():
        out = wrapper(crops, mb)
        feats = model.forward_features([glob, loc], [masks, None])
    torch.testing.assert_close(out["cls"], torch.cat([f["x_norm_clstoken"] for f in feats]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["patch"], feats[0]["x_norm_patchtokens"].flatten(0, 1)[idx], rtol=1e-5, atol=1e-5)


def test_bad_inputs_one_line_errors():
    model = build(CFG_A).eval()
    cases = [
        (lambda: model(torch.randn(1, 3, 10, 12)), "not a multiple of patch 4"),
        (lambda: model(torch.randn(3, 16, 16)), "expected images"),
        (lambda: model(torch.randn(1, 3, 8, 8), torch.zeros(1, 3, dtype=torch.bool)), "masks must be bool"),
        (lambda: model.forward_features([torch.randn(1, 3, 8, 8)], [None, None]), "1 image groups but 2 masks"),
        (lambda: DINOv3VisionTransformer(embed_dim=30, num_heads=3), "multiple of 4 * num_heads"),
        (lambda: DINOv3VisionTransformer(embed_dim=32, num_heads=2, ffn_layer="geglu"), "ffn_layer"),
        (lambda: DINOv3VisionTransformer(embed_dim=32, num_heads=2, norm_layer="batchnorm"), "norm_layer"),
        (lambda: DINOv3VisionTransformer(embed_dim=32, num_heads=2, pos_embed_rope_normalize_coords="x"),
         "normalize_coords"),
        (lambda: DINOv3VisionTransformer(embed_dim=32, num_heads=2, pos_embed_rope_min_period=1.0,
                                         pos_embed_rope_max_period=10.0), "either base or both"),
        (lambda: DINOv3VisionTransformer(embed_dim=32, num_heads=2, pos_embed_type="learned"), "unsupported arguments"),
        (lambda: DINOv3VisionTransformer(embed_dim=32, num_heads=2, attn="nope"), "model.attn='nope'"),
    ]
    for fn, text in cases:
        with pytest.raises(ValueError, match=re.escape(text)) as e:
            fn()
        assert "\n" not in str(e.value)


def test_evaluation_loads_dinov3_checkpoints(tmp_path):
    """k-NN / linear / attention / PCA read a DINOv3 training checkpoint (heads dropped, RoPE: any input
    size) through load_backbone, with the same weights and features; --random_init --arch dinov3_*."""
    from fastdino.eval.common import load_backbone
    from fastdino.eval.pca import patch_features
    from fastdino.models.dinov3 import DINOv3VisionTransformer, dinov3_vitt16

    torch.manual_seed(0)
    model = dinov3_vitt16(depth=2).eval()
    with torch.no_grad():
        model.storage_tokens.normal_()
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    state["head.last_layer.weight"] = torch.randn(8, 4)
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": state, "student": state}, path)
    loaded = load_backbone(str(path))
    assert isinstance(loaded, DINOv3VisionTransformer) and loaded.arch == "dinov3_vitt16" and loaded.patch_size == 16
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    x = torch.randn(2, 3, 48, 80)  # not the 224 px pretraining size: RoPE needs no resize
    with torch.no_grad():
        assert torch.equal(patch_features(loaded, x), patch_features(model, x))
        assert torch.equal(loaded(x), model(x))
    random = load_backbone(None, arch="dinov3_vitt16", depth=2)
    assert isinstance(random, DINOv3VisionTransformer) and len(random.blocks) == 2 and not random.training


def test_rope_augmentation_config_keys():
    """model.rope_*_coords: the student's RoPE augmentations (0 = off); the teacher runs in eval mode."""
    from fastdino.config import ConfigError, load_config
    from fastdino.models import build_backbone

    base = ["model.arch=dinov3_vitt16", "model.depth=1"]
    rope = build_backbone(load_config(None, base).model, teacher=False).rope_embed
    assert (rope.rescale_coords, rope.jitter_coords, rope.shift_coords) == (2.0, None, None)  # the hub's
    cfg = load_config(None, base + ["model.rope_rescale_coords=0", "model.rope_jitter_coords=1.5",
                                    "model.rope_shift_coords=0.1"])
    rope = build_backbone(cfg.model, teacher=False).rope_embed
    assert (rope.rescale_coords, rope.jitter_coords, rope.shift_coords) == (None, 1.5, 0.1)
    assert not build_backbone(cfg.model, teacher=True).training
    with pytest.raises(ConfigError, match="model.rope_rescale_coords"):
        load_config(None, base + ["model.rope_rescale_coords=0.5"])
