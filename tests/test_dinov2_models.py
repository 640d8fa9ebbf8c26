"""DINOv2 backbones in fastdino's one VisionTransformer: the official DINOv2 state-dict layout, an
independent reference forward (plain functions over an official-layout state dict), registers through
the packed and checkpointed paths, DINOv2's efficient drop path, one-line errors for bad options."""
import pytest
import torch
import torch.nn.functional as F

from fastdino.models import (ARCH_DIMS, ARCHS, DINOV2_ARCHS, DINOHead, MultiCropWrapper, VisionTransformer,
                             compile_blocks, vit_small)
from fastdino.models.vision_transformer import drop_path_scales, drop_path_subsets, subset_size, vit_forward_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# name -> (embed_dim, depth, heads, ffn, ffn hidden width), from the official DINOv2 definitions
# (models/vision_transformer.py vit_small/base/large/giant2, hub/backbones.py: ViT-g uses
# "swiglufused", whose width is (int(4*1536 * 2/3) + 7) // 8 * 8 = 4096)
OFFICIAL = {"dinov2_vits14": (384, 12, 6, "mlp", 1536), "dinov2_vitb14": (768, 12, 12, "mlp", 3072),
            "dinov2_vitl14": (1024, 24, 16, "mlp", 4096), "dinov2_vitg14": (1536, 40, 24, "swiglu", 4096)}


def official_dinov2_keys(name, registers, depth=None):
    """Names and shapes of an official DINOv2 hub backbone state dict (img_size 518, patch 14:
    a 37 x 37 grid; block_chunks=0; LayerScale; mask token; registers for the reg4 models)."""
    dim, full_depth, _, ffn, hidden = OFFICIAL[name]
    keys = {"cls_token": (1, 1, dim), "pos_embed": (1, 37 * 37 + 1, dim), "mask_token": (1, dim),
            "patch_embed.proj.weight": (dim, 3, 14, 14), "patch_embed.proj.bias": (dim,),
            "norm.weight": (dim,), "norm.bias": (dim,)}
    if registers:
        keys["register_tokens"] = (1, registers, dim)
    for i in range(full_depth if depth is None else depth):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                     b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                     b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,), b + "ls1.gamma": (dim,),
                     b + "norm2.weight": (dim,), b + "norm2.bias": (dim,), b + "ls2.gamma": (dim,)})
        if ffn == "mlp":
            keys.update({b + "mlp.fc1.weight": (hidden, dim), b + "mlp.fc1.bias": (hidden,),
                         b + "mlp.fc2.weight": (dim, hidden), b + "mlp.fc2.bias": (dim,)})
        else:
            keys.update({b + "mlp.w12.weight": (2 * hidden, dim), b + "mlp.w12.bias": (2 * hidden,),
                         b + "mlp.w3.weight": (dim, hidden), b + "mlp.w3.bias": (dim,)})
    return keys


def random_state_dict(keys, seed=0):
    """Values with signal in every branch: LayerNorm weights ~1, linear weights ~fan_in^-1/2, gammas
    in [0.5, 1.5] (not DINOv2's 1e-5, which would hide the blocks), tokens and position embedding ~N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in keys.items():
        r = torch.randn(shape, generator=gen)
        if k.endswith("gamma"):
            v = 0.5 + torch.rand(shape, generator=gen)
        elif "norm" in k:
            v = 1 + 0.1 * r if k.endswith("weight") else 0.1 * r
        elif k.endswith("weight"):
            v = r * (r[0].numel()) ** -0.5  # fan_in of a linear or conv weight
        elif k.endswith("bias"):
            v = 0.1 * r
        else:
            v = r
        sd[k] = v
    return sd


# ---- the reference: official DINOv2 math as plain functions over a state dict -------------------
def ref_pos_embed(pos, H, W, patch, offset, antialias):
    """DinoVisionTransformer.interpolate_pos_encoding for an H x W image."""
    n, gh, gw = pos.shape[1] - 1, H // patch, W // patch
    if gh * gw == n and H == W:
        return pos
    m = int(round(n ** 0.5))
    grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    resize = {"scale_factor": ((gh + offset) / m, (gw + offset) / m)} if offset else {"size": (gh, gw)}
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **resize)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)


def ref_dinov2_features(sd, x, masks, heads, offset, antialias):
    """forward_features of the official DINOv2 backbone, from its definitions: patch conv, mask token,
    [CLS], position embedding, registers, pre-norm blocks (explicit-softmax attention, LayerScale,
    GELU MLP or fused SwiGLU), final LayerNorm (eps 1e-6)."""
    dim, patch = sd["cls_token"].shape[-1], sd["patch_embed.proj.weight"].shape[-1]
    ln = lambda t, p: F.layer_norm(t, (dim,), sd[p + ".weight"], sd[p + ".bias"], 1e-6)  # noqa: E731
    lin = lambda t, p: t @ sd[p + ".weight"].T + sd[p + ".bias"]  # noqa: E731
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    B = t.shape[0]
    t = t.flatten(2).transpose(1, 2)
    if masks is not None:
        t = torch.where(masks[..., None], sd["mask_token"][None], t)
    t = torch.cat([sd["cls_token"].expand(B, 1, dim), t], dim=1)
    t = t + ref_pos_embed(sd["pos_embed"], x.shape[2], x.shape[3], patch, offset, antialias)
    R = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    if R:
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(B, R, dim), t[:, 1:]], dim=1)
    N, hd = t.shape[1], dim // heads
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        b = f"blocks.{i}."
        q, k, v = lin(ln(t, b + "norm1"), b + "attn.qkv").view(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) * hd ** -0.5, dim=-1)
        t = t + sd[b + "ls1.gamma"] * lin((a @ v).transpose(1, 2).reshape(B, N, dim), b + "attn.proj")
        h = ln(t, b + "norm2")
        if b + "mlp.fc1.weight" in sd:
            y = lin(F.gelu(lin(h, b + "mlp.fc1")), b + "mlp.fc2")
        else:
            x1, x2 = lin(h, b + "mlp.w12").chunk(2, dim=-1)
            y = lin(F.silu(x1) * x2, b + "mlp.w3")
        t = t + sd[b + "ls2.gamma"] * y
        i += 1
    xn = ln(t, "norm")
    return {"x_norm_clstoken": xn[:, 0], "x_norm_regtokens": xn[:, 1:R + 1], "x_norm_patchtokens": xn[:, R + 1:],
            "x_prenorm": t, "masks": masks}


def err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# ---- layout --------------------------------------------------------------------------------------
@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_dinov2_layout(name, registers):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = DINOV2_ARCHS[name](num_register_tokens=registers)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_dinov2_keys(name, registers)
    assert model.layout == "dinov2" and model.num_register_tokens == registers
    assert model.interpolate_offset == (0.0 if registers else 0.1)  # hub: reg4 models use offset 0, antialias
    assert model.interpolate_antialias == bool(registers)


def test_builders_and_arch_table():
    assert ARCH_DIMS["vit_large"] == (1024, 16) and ARCH_DIMS["vit_giant2"] == (1536, 24)
    assert set(ARCH_DIMS) == set(ARCHS)
    with torch.device("meta"):
        g = DINOV2_ARCHS["dinov2_vitg14"]()
        v1 = vit_small(16)
    assert (g.patch_size, g.depth, g.embed_dim, g.num_heads) == (14, 40, 1536, 24)
    assert sum(p.numel() for p in g.parameters()) == sum(
        torch.Size(s).numel() for s in official_dinov2_keys("dinov2_vitg14", 0).values())
    assert v1.layout == "dino" and v1.mask_token is None and v1.register_tokens is None
    m = DINOV2_ARCHS["dinov2_vits14"](num_register_tokens=4, depth=2, img_size=28)
    assert torch.all(m.blocks[1].ls2.gamma == 1e-5) and torch.all(m.mask_token == 0)
    assert m.cls_token.abs().max() < 1e-4 and m.register_tokens.abs().max() < 1e-4  # N(0, 1e-6) as DINOv2
    assert DINOV2_ARCHS["dinov2_vits14"](depth=1, img_size=28, layerscale_init=0.1).blocks[0].ls1.gamma[0] == 0.1


# ---- forward against the reference -----------------------------------------------------------------
# (name, registers, image size): the native 518 px (no interpolation) on the small widths, a
# non-square 98 x 126 (7 x 9 patches: interpolation down from 37 x 37) on all four
CASES = [("dinov2_vits14", 0, (518, 518)), ("dinov2_vits14", 4, (518, 518)), ("dinov2_vitb14", 4, (518, 518))]
CASES += [(name, r, (98, 126)) for name in OFFICIAL for r in (0, 4)]


@pytest.mark.parametrize("name,registers,size", CASES, ids=str)
def test_forward_features_match_reference(name, registers, size):
    """An official-layout state dict loads with strict=True; forward_features equals the reference with
    fp32 error no larger than twice the reference's own (|out - ref64| <= 2 |ref32 - ref64| + atol),
    with and without masks. One block keeps the CPU time low (the layout test checks full depth)."""
    heads = OFFICIAL[name][2]
    depth = 2 if OFFICIAL[name][0] <= 384 else 1
    sd = random_state_dict(official_dinov2_keys(name, registers, depth))
    model = DINOV2_ARCHS[name](num_register_tokens=registers, depth=depth, attn="math").eval()
    model.load_state_dict(sd, strict=True)
    gen = torch.Generator().manual_seed(1)
    B = 1 if size[0] == 518 else 2
    x = torch.randn(B, 3, *size, generator=gen)
    masks = torch.rand(B, (size[0] // 14) * (size[1] // 14), generator=gen) < 0.4
    opts = dict(heads=heads, offset=model.interpolate_offset, antialias=model.interpolate_antialias)
    sd64 = {k: v.double() for k, v in sd.items()}
    for m in (None, masks):
        with torch.no_grad():
            out = model.forward_features(x, masks=m)
            ref32 = ref_dinov2_features(sd, x, m, **opts)
            ref64 = ref_dinov2_features(sd64, x.double(), m, **opts)
        assert out["masks"] is m
        P, D = (size[0] // 14) * (size[1] // 14), OFFICIAL[name][0]
        shapes = {"x_norm_clstoken": (B, D), "x_norm_regtokens": (B, registers, D),
                  "x_norm_patchtokens": (B, P, D), "x_prenorm": (B, 1 + registers + P, D)}
        for k, shape in shapes.items():
            assert out[k].shape == shape, k
            scale = ref64[k].abs().max().item() if ref64[k].numel() else 1.0
            assert err(out[k], ref64[k]) <= 2 * err(ref32[k], ref64[k]) + 1e-6 * scale, (k, m is None)
    with torch.no_grad():  # the other entry points read the same tokens
        assert torch.allclose(model(x, masks=masks), out["x_norm_clstoken"], atol=1e-6)
        last = model.get_intermediate_layers(x, n=1)[-1]
        feats = model.forward_features(x)
        assert torch.allclose(last[:, 1 + registers:], feats["x_norm_patchtokens"], atol=1e-6)
        assert torch.allclose(last[:, 1:1 + registers], feats["x_norm_regtokens"], atol=1e-6)
    if size[0] != 518:  # interpolation: the other interpolation variant would give other features
        wrong = dict(opts, offset=0.1 - opts["offset"], antialias=not opts["antialias"])
        assert err(ref_dinov2_features(sd, x, None, **wrong)["x_prenorm"], feats["x_prenorm"]) > 1e-3


def test_masks_replace_patch_embeddings_only():
    model = DINOV2_ARCHS["dinov2_vits14"](depth=1, img_size=56).eval()
    with torch.no_grad():
        model.mask_token.normal_()
        x = torch.randn(2, 3, 56, 56)
        masks = torch.zeros(2, 16, dtype=torch.bool)
        masks[0, 3] = masks[1, 15] = True
        t, t0 = model.prepare_tokens(x, masks), model.prepare_tokens(x)
    pe = model.pos_embed[:, 1:]
    assert torch.allclose(t[0, 1 + 3], model.mask_token[0] + pe[0, 3])
    assert torch.allclose(t[1, 1 + 15], model.mask_token[0] + pe[0, 15])
    keep = torch.cat([torch.ones(2, 1, dtype=torch.bool), ~masks], dim=1)
    assert torch.equal(t[keep], t0[keep])


def test_attention_maps_with_registers():
    model = VisionTransformer(patch_size=8, img_size=32, embed_dim=48, depth=2, num_heads=2,
                              num_register_tokens=3, layerscale_init=1.0).eval()
    a = model.get_last_selfattention(torch.randn(2, 3, 32, 32))
    assert a.shape == (2, 2, 1 + 3 + 16, 1 + 3 + 16)
    assert torch.allclose(a.sum(-1), torch.ones(2, 2, 20), atol=1e-5)


# ---- packed multi-crop, checkpointing, drop path with registers -----------------------------------
def tiny_v2(**kw):
    """A 3-block DINOv2-style ViT (dim 96, 3 heads) on 32 px (4x4 patches of 8), 2 registers, SwiGLU,
    LayerScale 0.5 (so the blocks matter), mask token; 16 px crops interpolate the grid to 2x2."""
    torch.manual_seed(0)
    opts = dict(patch_size=8, img_size=32, embed_dim=96, depth=3, num_heads=3, num_register_tokens=2,
                layerscale_init=0.5, ffn="swiglu", mask_token=True, interpolate_offset=0.0, interpolate_antialias=True)
    opts.update(kw)
    return VisionTransformer(**opts).to(DEV)


def crops(B=3, n_global=2, n_local=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(B, 3, 32, 32, generator=gen) for _ in range(n_global)]
    out += [torch.randn(B, 3, 16, 16, generator=gen) for _ in range(n_local)]
    return [c.to(DEV) for c in out]


def run_step(wrapper, xs, seed):
    torch.manual_seed(seed)
    out = wrapper(xs)
    (out * torch.randn_like(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in wrapper.named_parameters() if p.grad is not None}
    wrapper.zero_grad(set_to_none=True)
    return out.detach(), grads


def assert_steps_equal(a, b, atol=1e-5):
    assert torch.allclose(a[0], b[0], atol=atol, rtol=1e-5)
    assert a[1].keys() == b[1].keys() and len(a[1]) > 0
    for n in a[1]:
        assert torch.allclose(a[1][n], b[1][n], atol=atol, rtol=1e-4), n


@pytest.mark.parametrize("efficient", [False, True])
def test_packed_equals_unpacked_with_registers(efficient):
    model = tiny_v2(drop_path_rate=0.4, efficient_drop_path=efficient).train()
    head = DINOHead(96, 37, hidden_dim=64, bottleneck_dim=16).to(DEV)
    xs = crops(B=4)
    u = run_step(MultiCropWrapper(model, head, packed=False), xs, seed=5)
    p = run_step(MultiCropWrapper(model, head, packed=True), xs, seed=5)
    assert u[0].shape == (5 * 4, 37)
    assert_steps_equal(p, u)
    for name in ("register_tokens", "blocks.2.ls1.gamma", "blocks.2.mlp.w12.weight"):
        assert "backbone." + name in p[1], name  # registers, LayerScale and SwiGLU get gradients


@pytest.mark.parametrize("shared", [False, True])
def test_wrapper_with_ibot_masks_packed_equals_unpacked_and_reference(shared):
    """MultiCropWrapper(crops, masks): "cls" as without masks but for the masked global crops,
    "patch" = the iBOT head (or the shared DINO head) on the masked global patch tokens gathered at
    mask_indices, equal to the backbone's own dense forward; packed == unpacked, gradients included
    (the mask token gets one); the teacher (mask_input=False) sees its crops unmasked."""
    from fastdino.data.masking import IBOTMasks

    model = tiny_v2(drop_path_rate=0.0).train()
    head = DINOHead(96, 37, hidden_dim=64, bottleneck_dim=16).to(DEV)
    ibot_head = None if shared else DINOHead(96, 29, hidden_dim=64, bottleneck_dim=16).to(DEV)
    xs = crops(B=4)
    mb = IBOTMasks(4)(0, 0, [3, 1, 4, 5]).to(DEV)
    assert 0 < int(mb.n_masked) < mb.upper_bound
    results = []
    for packed in (False, True):
        w = MultiCropWrapper(model, head, packed=packed, ibot_head=ibot_head)
        out = w(xs, mb)
        assert out.keys() == {"cls", "patch"} and out["patch"].shape == (mb.upper_bound, 37 if shared else 29)
        torch.manual_seed(1)
        (out["cls"] * torch.randn_like(out["cls"])).sum().add((out["patch"] * torch.randn_like(out["patch"])).sum()).backward()
        grads = {n: p.grad.clone() for n, p in w.named_parameters() if p.grad is not None}
        w.zero_grad(set_to_none=True)
        results.append(({k: v.detach() for k, v in out.items()}, grads))
    (u, gu), (p, gp) = results
    for k in ("cls", "patch"):
        torch.testing.assert_close(p[k], u[k], atol=1e-5, rtol=1e-5)
    assert gu.keys() == gp.keys() and "backbone.mask_token" in gu
    for n in gu:  # sums over tokens (biases, weights): error relative to the largest entry
        assert err(gp[n], gu[n]) <= 1e-5 * gu[n].abs().max().item(), n
    with torch.no_grad():  # reference: the dense masked forward of the global crops, then the gather
        dense = model(torch.cat(xs[:2]), mb.masks, is_training=True)["x_norm_patchtokens"].flatten(0, 1)
        ref = (ibot_head or head)(dense[mb.mask_indices])
        torch.testing.assert_close(u["patch"], ref, atol=1e-5, rtol=1e-5)
        teacher = MultiCropWrapper(model, head, ibot_head=ibot_head)(xs[:2], mb, mask_input=False)
        plain = model(torch.cat(xs[:2]), is_training=True)["x_norm_patchtokens"].flatten(0, 1)
        torch.testing.assert_close(teacher["patch"], (ibot_head or head)(plain[mb.mask_indices]), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(teacher["patch"], u["patch"], atol=1e-3)


def test_forward_features_list_is_packed_and_equals_per_group():
    model = tiny_v2(drop_path_rate=0.3).train()
    xs = crops(B=2, n_local=1)
    g, loc = torch.cat(xs[:2]), xs[2]
    masks = torch.rand(4, 16, generator=torch.Generator().manual_seed(3)).to(DEV) < 0.5
    torch.manual_seed(7)
    packed = model.forward_features([g, loc], masks=[masks, None])
    torch.manual_seed(7)
    separate = [model.forward_features(g, masks), model.forward_features(loc)]
    torch.manual_seed(7)
    through_call = model([g, loc], masks=[masks, None], is_training=True)  # the official switch
    for a, b, c in zip(packed, separate, through_call):
        assert a.keys() == b.keys()
        for k in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-5), k
            assert torch.equal(a[k], c[k]), k
    assert packed[0]["masks"] is masks and packed[1]["masks"] is None
    assert packed[0]["x_norm_regtokens"].shape == (4, 2, 96) and packed[1]["x_norm_patchtokens"].shape == (2, 4, 96)


@pytest.mark.parametrize("efficient", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_activation_checkpointing_with_registers(packed, efficient):
    xs = crops(B=3, n_local=2)
    head = DINOHead(96, 11, hidden_dim=32, bottleneck_dim=8).to(DEV)
    kw = dict(drop_path_rate=0.3, efficient_drop_path=efficient)
    ref = run_step(MultiCropWrapper(tiny_v2(**kw).train(), head, packed), xs, seed=3)
    ck = run_step(MultiCropWrapper(tiny_v2(activation_checkpointing=True, **kw).train(), head, packed), xs, seed=3)
    assert_steps_equal(ck, ref, atol=1e-6)


def equivalent_scales(rows, subsets, depth):
    """Per-sequence scales (depth, 2, rows) equal to an efficient-drop-path draw: rows/k on the kept subset."""
    s = torch.zeros(depth, 2, rows)
    for i, idx in enumerate(subsets):
        if idx is None:
            s[i] = 1
            continue
        for b in range(2):
            s[i, b, idx[b].cpu()] = rows / idx.shape[1]
    return s.to(DEV)


def all_tokens(feats):
    return torch.cat([feats["x_norm_clstoken"][:, None], feats["x_norm_regtokens"], feats["x_norm_patchtokens"]], 1)


def test_efficient_drop_path_equals_masked_reference_with_grads():
    """One efficient draw == the reference block math (vit_forward_ref) with scales rows/k on the kept
    sequences and 0 elsewhere (branches act per sequence): outputs and gradients (parameters and input)."""
    model = tiny_v2(drop_path_rate=0.5, efficient_drop_path=True).train()
    x = torch.randn(6, 3, 32, 32, device=DEV)
    torch.manual_seed(4)
    subsets = drop_path_subsets(6, model.dpr, DEV)  # the draw the model makes under this seed
    assert [None if s is None else tuple(s.shape) for s in subsets] == [None, (2, subset_size(6, 0.25)), (2, 3)]
    scales = equivalent_scales(6, subsets, model.depth)
    outs, grads = [], []
    for f in (lambda x: all_tokens(model.forward_features(x)), lambda x: vit_forward_ref(model, x, scales)):
        xi = x.clone().requires_grad_()
        torch.manual_seed(4)
        out = f(xi)
        (out * torch.linspace(-1, 1, out.numel(), device=DEV).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append({"x": xi.grad, **{n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}})
        model.zero_grad(set_to_none=True)
    assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and "blocks.2.mlp.w3.weight" in grads[0]
    for n in grads[0]:  # sums over sequences (registers, weights): error relative to the largest entry
        assert err(grads[0][n], grads[1][n]) <= 1e-5 * grads[1][n].abs().max().item(), n
    with torch.no_grad():  # the draw really dropped something: without drop path the output differs
        assert err(vit_forward_ref(model, x), outs[0]) > 1e-3


@pytest.mark.parametrize("branch", ["attn", "mlp"])
def test_efficient_drop_path_expectation(branch):
    """E[output] = the no-drop-path output. One block, one branch (the other one zeroed), so the
    output is linear in the random scale: x + s * f(x), s = rows/k on a random k-subset, else 0."""
    torch.manual_seed(0)
    model = VisionTransformer(patch_size=8, img_size=16, embed_dim=32, depth=1, num_heads=2, layerscale_init=0.7,
                              drop_path_rate=0.5, drop_path_uniform=True, efficient_drop_path=True).to(DEV)
    with torch.no_grad():
        zero = model.blocks[0].mlp.fc2 if branch == "attn" else model.blocks[0].attn.proj
        zero.weight.zero_()
        zero.bias.zero_()
    x = torch.randn(4, 3, 16, 16, device=DEV)
    with torch.no_grad():
        tokens = model.prepare_tokens(x)
        want = model.eval().forward_features(x)["x_prenorm"]
        model.train()
        n, total, kept = 3000, torch.zeros_like(want, dtype=torch.float64), torch.zeros(4, device=DEV)
        for _ in range(n):
            out = model.forward_features(x)["x_prenorm"]
            changed = (out - tokens).flatten(1).abs().amax(1) > 0
            assert changed.sum().item() == subset_size(4, 0.5)  # exactly k sequences get the branch
            kept += changed
            total += out
    assert torch.allclose(kept / n, torch.full((4,), 0.5, device=DEV), atol=0.04)  # each row kept w.p. k/rows
    delta = want - tokens  # the branch's contribution; its mean over draws must come out unscaled
    assert ((total / n - tokens) - delta).abs().max() <= 0.1 * delta.abs().max()


def test_efficient_drop_path_off_in_eval_and_single_row():
    model = tiny_v2(drop_path_rate=0.5, efficient_drop_path=True)
    x = torch.randn(1, 3, 32, 32, device=DEV)
    with torch.no_grad():
        want = model.eval().forward_features(x)["x_prenorm"]
        assert torch.allclose(model.train().forward_features(x)["x_prenorm"], want, atol=1e-6)  # k = 1 = rows


def test_compile_blocks_with_registers_and_efficient_drop_path():
    """model.compile (aot_eager) on a DINOv2-style packed student with efficient drop path: same
    outputs and gradients as eager, no graph break, no recompile on the next step."""
    from torch._dynamo.utils import counters

    xs = crops(B=2, n_local=1)
    kw = dict(drop_path_rate=0.3, drop_path_uniform=True, efficient_drop_path=True)
    ref = [run_step(MultiCropWrapper(tiny_v2(**kw).train(), torch.nn.Identity(), True), xs, seed=s) for s in (2, 3)]
    torch._dynamo.reset()
    counters.clear()
    model = compile_blocks(MultiCropWrapper(tiny_v2(**kw).train(), torch.nn.Identity(), True), backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = [run_step(model, xs, seed=s) for s in (2, 3)]
    for g, r in zip(got, ref):
        assert_steps_equal(g, r)
    assert not counters["graph_break"], counters["graph_break"]


# ---- DINO v1 models keep their API ----------------------------------------------------------------
def test_dino_v1_forward_features_stays_a_tensor_and_drop_path_draws_unchanged():
    torch.manual_seed(0)
    model = VisionTransformer(patch_size=8, img_size=32, embed_dim=48, depth=2, num_heads=2, drop_path_rate=0.3)
    x = torch.randn(2, 3, 32, 32)
    assert model.layout == "dino" and isinstance(model.forward_features(x), torch.Tensor)
    torch.manual_seed(1)
    out = model.forward_features(x)
    torch.manual_seed(1)
    scales = drop_path_scales(2, 1 - torch.tensor(model.dpr))
    with torch.no_grad():
        assert torch.allclose(out, vit_forward_ref(model, x, scales), atol=1e-5)


# ---- bad options --------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,option", [
    (dict(layerscale_init=0.0), "layerscale_init"), (dict(layerscale_init=-1e-5), "layerscale_init"),
    (dict(layerscale_init="1e-5"), "layerscale_init"), (dict(layerscale_init=True), "layerscale_init"), (dict(num_register_tokens=-1), "num_register_tokens"),
    (dict(num_register_tokens=2.0), "num_register_tokens"), (dict(ffn="geglu"), "ffn"),
    (dict(interpolate_offset=-0.1), "interpolate_offset"), (dict(drop_path_rate=1.0), "drop_path_rate"),
    (dict(block_chunks=4), "block_chunks")])
def test_bad_options_are_one_line_errors(kw, option):
    with pytest.raises(ValueError, match=option) as e:
        VisionTransformer(patch_size=8, img_size=32, embed_dim=48, depth=1, num_heads=2, **kw)
    assert "\n" not in str(e.value)


def test_bad_masks_are_one_line_errors():
    x = torch.randn(2, 3, 32, 32)
    no_token = VisionTransformer(patch_size=8, img_size=32, embed_dim=48, depth=1, num_heads=2, num_register_tokens=1)
    with pytest.raises(ValueError, match="mask_token") as e:
        no_token.forward_features(x, masks=torch.zeros(2, 16, dtype=torch.bool))
    assert "\n" not in str(e.value)
    model = tiny_v2().cpu()
    for bad in (torch.zeros(2, 15, dtype=torch.bool), torch.zeros(2, 16)):
        with pytest.raises(ValueError, match="masks must be bool"):
            model.forward_features(x, masks=bad)
    with pytest.raises(ValueError, match="2 image groups but 1 masks"):
        model.forward_features([x, x[:, :, :16, :16]], masks=[None])


def test_model_ffn_config_key():
    """model.ffn: auto is the hub model's FFN (SwiGLU only for ViT-g), swiglu/mlp override it; SwiGLU
    on a DINO v1 arch is a one-line config error naming the key."""
    from fastdino.config import ConfigError, load_config
    from fastdino.models import build_backbone

    V2_CROPS = ("data.global_crop_size=56", "data.local_crop_size=28")

    def mlp_of(*overrides):
        cfg = load_config(None, ["model.arch=dinov2_vitt14", "model.patch_size=14", "model.depth=1", *V2_CROPS, *overrides])
        return type(build_backbone(cfg.model, teacher=False).blocks[0].mlp).__name__

    assert mlp_of() == "Mlp" and mlp_of("model.ffn=mlp") == "Mlp"
    assert mlp_of("model.ffn=swiglu") == "SwiGLUFFN"
    cfg = load_config(None, ["model.arch=dinov2_vitg14", "model.patch_size=14", "model.depth=1", *V2_CROPS])
    assert type(build_backbone(cfg.model, teacher=True).blocks[0].mlp).__name__ == "SwiGLUFFN"
    cfg = load_config(None, ["model.arch=dinov2_vitg14", "model.patch_size=14", "model.depth=1", "model.ffn=mlp", *V2_CROPS])
    assert type(build_backbone(cfg.model, teacher=True).blocks[0].mlp).__name__ == "Mlp"
    with pytest.raises(ConfigError, match="model.ffn") as e:
        load_config(None, ["model.arch=vit_small", "model.ffn=swiglu"])
    assert "\n" not in str(e.value)
