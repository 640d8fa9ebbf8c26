"""Export (fastdino.export): the transformers folders give fastdino's features (ViTModel for DINO v1,
Dinov2Model / Dinov2WithRegistersModel, MLP and SwiGLU, DINOv3ViTModel with its RoPE), from every
checkpoint layout load_backbone reads, and DINOv3 options transformers cannot compute are refused;
the timm weights have the names and shapes timm's VisionTransformer builds from the exported config,
compute the same features under timm's forward written out, and map back to fastdino's names; the
safetensors folder reads back equal (DINOv3: rebuilt from fastdino.json); bad input ends with one
line and exit status 2."""
import argparse
import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastdino import export
from fastdino.eval.common import load_backbone
from fastdino.models import (DINOHead, MultiCropWrapper, dinov2_vitb14, dinov2_vitg14, dinov2_vitl14, dinov2_vits14,
                             dinov2_vitt14, vit_base, vit_small, vit_tiny)
from fastdino.models.dinov3 import DINOv3VisionTransformer, dinov3_vits16plus, dinov3_vitt16
from fastdino.models.vision_transformer import vit_forward_ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every format writes model.safetensors (the export extra); transformers is needed only by the hf tests
needs_safetensors = pytest.mark.skipif(importlib.util.find_spec("safetensors") is None,
                                       reason="safetensors is not installed (pip install -e \".[export]\")")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _randomize(model, seed):
    """Every parameter drawn at a scale where each one matters (a fresh init has LayerScale 1e-5, zero
    biases and near-uniform attention, under which a wrong mapping can go unnoticed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2 and "token" not in name and name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)  # weights: unit-variance outputs
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def _tokens(model, x):
    """fastdino's features of every token after the final norm ([CLS], registers, patches)."""
    return model.get_intermediate_layers(x, 1)[0]


def _assert_same_features(got, model, x):
    """got vs fastdino's tokens, within twice fastdino's own fp32 error (its fast path against the
    explicit-softmax reference) + 1e-5. Returns the max abs difference."""
    fast = _tokens(model, x)
    noise = (fast - vit_forward_ref(model, x)).abs().max().item()
    assert got.shape == fast.shape
    err = (got - fast).abs().max().item()
    assert err <= 2 * noise + 1e-5, (err, noise)
    return err


def _fastdino_checkpoint(path, arch, make):
    """A fastdino training checkpoint: MultiCropWrapper student and teacher (different weights), config."""
    student, teacher = (MultiCropWrapper(_randomize(make(), seed), DINOHead(make().embed_dim, 32, hidden_dim=16,
                                                                            bottleneck_dim=8)) for seed in (1, 2))
    torch.save({"student": {f"module.{k}": v for k, v in student.state_dict().items()},  # saved from DDP
                "teacher": teacher.state_dict(), "optimizer": {}, "epoch": 1, "step": 3,
                "config": {"model": {"arch": arch, "patch_size": make().patch_size}}}, path)
    return str(path)


def _load_hf(folder, cls_name):
    transformers = pytest.importorskip("transformers")
    kwargs = {"add_pooling_layer": False} if cls_name == "ViTModel" else {}
    hf, info = getattr(transformers, cls_name).from_pretrained(str(folder), output_loading_info=True, **kwargs)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    return hf.eval()


def _run(argv, capsys):
    """export.cli(argv) -> (exit status, stdout, stderr)."""
    try:
        export.cli(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@needs_safetensors
# ------------------------------------------------------------------------------------------------
# Hugging Face transformers
# ------------------------------------------------------------------------------------------------
def test_hf_dino_v1_from_a_fastdino_checkpoint(tmp_path, capsys):
    """ViTModel from a fastdino checkpoint's teacher: same tokens at 224 px; at 160 x 96 (interpolated
    position grid) the same once fastdino resizes the grid to the target size as transformers does
    (offset 0; fastdino's and DINO's rule is (H/p + 0.1) / side). A swapped query / key fails."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    ckpt = _fastdino_checkpoint(tmp_path / "checkpoint.pth", "vit_tiny", lambda: vit_tiny(patch_size=16, depth=2))
    out = tmp_path / "hf"
    code, printed, err = _run(["--checkpoint", ckpt, "--format", "hf", "--out", str(out)], capsys)
    assert code == 0, err
    assert "checked: transformers" in printed and "ViTModel" in printed
    assert sorted(os.listdir(out)) == ["config.json", "fastdino.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["image_size"], cfg["patch_size"], cfg["layer_norm_eps"], cfg["hidden_act"],
            cfg["intermediate_size"], cfg["num_hidden_layers"]) == ("vit", 224, 16, 1e-6, "gelu", 768, 2)

    teacher = load_backbone(ckpt, "teacher")
    hf = _load_hf(out, "ViTModel")
    x, y = torch.randn(2, 3, 224, 224), torch.randn(2, 3, 160, 96)
    with torch.no_grad():
        _assert_same_features(hf(pixel_values=x).last_hidden_state, teacher, x)
        teacher.interpolate_offset = 0.0
        _assert_same_features(hf(pixel_values=y, interpolate_pos_encoding=True).last_hidden_state, teacher, y)
        teacher.interpolate_offset = 0.1

        broken = tmp_path / "broken"  # the test can fail: query and key of block 0 swapped
        broken.mkdir()
        (broken / "config.json").write_text((out / "config.json").read_text())
        sd = load_file(str(out / "model.safetensors"))
        q, k = "encoder.layer.0.attention.attention.query.weight", "encoder.layer.0.attention.attention.key.weight"
        sd[q], sd[k] = sd[k], sd[q]
        save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})
        got = _load_hf(broken, "ViTModel")(pixel_values=x).last_hidden_state
        assert (got - _tokens(teacher, x)).abs().max() > 1e-2


@needs_safetensors
@pytest.mark.parametrize("registers,ffn,layout", [
    (0, "mlp", "fastdino"),  # Dinov2Model
    (4, "mlp", "state_dict"),  # Dinov2WithRegistersModel
    (0, "swiglu", "official"),  # use_swiglu_ffn (ViT-g's FFN)
    (4, "swiglu", "consolidated"),
])
def test_hf_dinov2(tmp_path, capsys, registers, ffn, layout):
    """Dinov2Model / Dinov2WithRegistersModel from each checkpoint layout: same tokens at 518 px, and at
    98 x 154 px: equal as they are with registers (both resize the grid to the target size, bicubic with
    antialias); without registers, equal to fastdino with offset 0 (fastdino and DINOv2 use offset 0.1)."""
    pytest.importorskip("transformers")

    def make():
        return dinov2_vitt14(num_register_tokens=registers, ffn=ffn, depth=2)

    path = tmp_path / "ckpt.pth"
    if layout == "fastdino":
        _fastdino_checkpoint(path, "dinov2_vitt14", make)
    elif layout == "state_dict":
        torch.save(_randomize(make(), 2).state_dict(), path)
    elif layout == "official":  # DINO's training checkpoint layout: DDP prefixes, head, args
        bb = _randomize(make(), 2).state_dict()
        torch.save({"student": {f"module.backbone.{k}": v for k, v in bb.items()} | {"module.head.w": torch.ones(1)},
                    "teacher": {f"backbone.{k}": v for k, v in bb.items()} | {"head.w": torch.ones(1)},
                    "args": argparse.Namespace(arch="vit_tiny", patch_size=14), "epoch": 3}, path)
    else:  # DeepSpeed's consolidated.pth: the engine layout, fp32, no DDP prefix
        bb = {f"backbone.{k}": v for k, v in _randomize(make(), 2).state_dict().items()}
        torch.save({"student": bb, "teacher": bb, "config": {"model": {"arch": "dinov2_vitt14", "patch_size": 14}},
                    "epoch": 0, "step": 1}, path)
    out = tmp_path / "hf"
    # --no_check: the export's own check (the first test) is what this test does, at two sizes
    code, printed, err = _run(["--checkpoint", str(path), "--format", "hf", "--out", str(out), "--no_check"], capsys)
    assert code == 0 and "checked" not in printed, err
    name = "Dinov2WithRegistersModel" if registers else "Dinov2Model"
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["architectures"], cfg["image_size"], cfg["patch_size"], cfg["use_swiglu_ffn"]) == (
        [name], 518, 14, ffn == "swiglu")
    assert cfg.get("num_register_tokens", 0) == registers

    model = load_backbone(str(path))
    hf = _load_hf(out, name)
    x, y = torch.randn(1, 3, 518, 518), torch.randn(2, 3, 98, 154)
    with torch.no_grad():
        _assert_same_features(hf(pixel_values=x).last_hidden_state, model, x)
        if not registers:
            model.interpolate_offset = 0.0
        _assert_same_features(hf(pixel_values=y).last_hidden_state, model, y)


@needs_safetensors
def test_hf_official_dino_checkpoint_patch_8(tmp_path, capsys):
    """An official DINO training checkpoint (module.backbone. / backbone. prefixes, heads, args), /8:
    the teacher and the student export to the ViTModels of each."""
    pytest.importorskip("transformers")
    student, teacher = (_randomize(vit_tiny(patch_size=8, depth=1), s) for s in (3, 4))
    path = tmp_path / "dino_checkpoint.pth"
    torch.save({"student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                "teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()}
                | {"head.last_layer.w": torch.ones(1)},
                "args": argparse.Namespace(arch="vit_tiny", patch_size=8), "epoch": 3}, path)
    x = torch.randn(1, 3, 224, 224)
    for which, ref in (("teacher", teacher), ("student", student)):
        out = tmp_path / which
        code, _, err = _run(["--checkpoint", str(path), "--format", "hf", "--out", str(out), "--which", which,
                             "--no_check"], capsys)
        assert code == 0, err
        assert json.loads((out / "config.json").read_text())["patch_size"] == 8
        with torch.no_grad():
            _assert_same_features(_load_hf(out, "ViTModel")(pixel_values=x).last_hidden_state, ref, x)


# ------------------------------------------------------------------------------------------------
# DINOv3: transformers DINOv3ViTModel, safetensors with the constructor arguments, refusals
# ------------------------------------------------------------------------------------------------
# tiny backbones (patch 4, 32 px: an 8 x 8 grid) over the options DINOv3ViTModel can hold
V3_HF = {
    "plain": dict(n_storage_tokens=0, norm_layer="layernorm", mask_k_bias=False),  # key bias exported
    "storage-ls-masked-swiglu": dict(n_storage_tokens=3, layerscale_init=1e-5, mask_k_bias=True, ffn_layer="swiglu",
                                     norm_layer="layernormbf16", untie_global_and_local_cls_norm=True,
                                     pos_embed_rope_rescale_coords=2, pos_embed_rope_shift_coords=0.1),
    "nobias-swiglu64-periods": dict(embed_dim=48, num_heads=3, n_storage_tokens=1, layerscale_init=0.1,
                                    ffn_layer="swiglu64", ffn_ratio=3.0, qkv_bias=False, proj_bias=False,
                                    ffn_bias=False, mask_k_bias=True, pos_embed_rope_base=None,
                                    pos_embed_rope_min_period=1.0, pos_embed_rope_max_period=30.0),
}
# options DINOv3ViTModel cannot compute: (options, the refusal's words)
V3_NO_HF = {
    "rmsnorm": (dict(norm_layer="rmsnorm"), "RMSNorm"),
    "untied": (dict(untie_cls_and_patch_norms=True), "untie_cls_and_patch_norms"),
    "normalize-max": (dict(pos_embed_rope_normalize_coords="max"), "pos_embed_rope_normalize_coords"),
    "rope-bf16": (dict(pos_embed_rope_dtype="bf16"), "RoPE rotates in bf16"),
    "periods": (dict(pos_embed_rope_base=None, pos_embed_rope_min_period=0.5, pos_embed_rope_max_period=20.0),
                "min_period / max_period"),
}


def _v3(seed=0, **options):
    cfg = dict(embed_dim=32, depth=2, num_heads=2, patch_size=4, img_size=32) | options
    return _randomize(DINOv3VisionTransformer(attn="sdpa", **cfg), seed)


def _assert_same_v3_features(got, model, x):
    """got vs fastdino's DINOv3 tokens, within twice fastdino's own fp32 error (against the same
    backbone in fp64, RoPE included) + 1e-5. Returns the max abs difference."""
    fast = _tokens(model, x)
    ref = copy.deepcopy(model).double()
    ref.rope_embed.dtype = torch.float64
    noise = (fast.double() - _tokens(ref, x.double())).abs().max().item()
    assert got.shape == fast.shape
    err = (got - fast).abs().max().item()
    assert err <= 2 * noise + 1e-5, (err, noise)
    return err


def _assert_same_rope(hf, model, sizes):
    """transformers' RoPE (cos, sin) of each image size equals fastdino's (sin, cos), eval mode."""
    for h, w in sizes:
        cos, sin = hf.rope_embeddings(torch.zeros(1, 3, h, w))
        ours_sin, ours_cos = model.rope_embed(H=h // model.patch_embed.proj.kernel_size[0],
                                              W=w // model.patch_embed.proj.kernel_size[0])
        assert cos.shape == ours_cos.shape
        assert (cos - ours_cos).abs().max() < 1e-5 and (sin - ours_sin).abs().max() < 1e-5, (h, w)


@needs_safetensors
def test_hf_dinov3_from_a_fastdino_checkpoint(tmp_path, capsys):
    """DINOv3ViTModel from a fastdino checkpoint's teacher (dinov3_vitt16: 4 storage tokens, masked key
    bias, LayerScale): the export checks itself at 224 px; the same RoPE and tokens at 224, 160 x 96
    and 64 px. With the masked key bias exported as an acting key bias the features differ."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    ckpt = _fastdino_checkpoint(tmp_path / "checkpoint.pth", "dinov3_vitt16", lambda: dinov3_vitt16(depth=1))
    out = tmp_path / "hf"
    code, printed, err = _run(["--checkpoint", ckpt, "--format", "hf", "--out", str(out)], capsys)
    assert code == 0, err
    assert "checked: transformers" in printed and "DINOv3ViTModel" in printed and "4 registers" in printed
    assert sorted(os.listdir(out)) == ["config.json", "fastdino.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["architectures"], cfg["patch_size"], cfg["layer_norm_eps"], cfg["hidden_act"],
            cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_register_tokens"], cfg["rope_theta"],
            cfg["query_bias"], cfg["key_bias"], cfg["value_bias"], cfg["pos_embed_rescale"]) == (
        "dinov3_vit", ["DINOv3ViTModel"], 16, 1e-5, "gelu", 768, 1, 4, 100.0, True, False, True, 2.0)
    assert json.loads((out / "fastdino.json").read_text())["hf_class"] == "DINOv3ViTModel"

    teacher = load_backbone(ckpt, "teacher")
    hf = _load_hf(out, "DINOv3ViTModel")
    sizes = [(224, 224), (160, 96), (64, 64)]
    _assert_same_rope(hf, teacher, sizes)
    xs = [torch.randn(2, 3, h, w) for h, w in sizes]
    with torch.no_grad():
        for x in xs:
            _assert_same_v3_features(hf(pixel_values=x).last_hidden_state, teacher, x)

        broken = tmp_path / "broken"  # the test can fail: the masked key bias made to act
        broken.mkdir()
        (broken / "config.json").write_text(json.dumps(cfg | {"key_bias": True}))
        sd = load_file(str(out / "model.safetensors"))
        key_bias = load_backbone(ckpt, "teacher").state_dict()["blocks.0.attn.qkv.bias"].chunk(3)[1]
        assert key_bias.abs().max() > 0.1
        sd["layer.0.attention.k_proj.bias"] = key_bias.contiguous()
        save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})
        got = _load_hf(broken, "DINOv3ViTModel")(pixel_values=xs[0]).last_hidden_state
        assert (got - _tokens(teacher, xs[0])).abs().max() > 1e-2


@needs_safetensors
@pytest.mark.parametrize("name", list(V3_HF))
def test_hf_dinov3_options(tmp_path, name):
    """Each option set DINOv3ViTModel can hold: the export checks itself, loads strictly, and gives
    fastdino's tokens and RoPE at 32 px, 24 x 40 px and 48 px; the config says what the backbone does
    (no storage tokens: an empty register_tokens; no LayerScale: lambda 1; the RoPE base read off the
    periods; the training-only coordinate augmentations the backbone's)."""
    pytest.importorskip("transformers")
    options = V3_HF[name]
    model = _v3(seed=7, **options).eval()
    out = tmp_path / "hf"
    rep = export.export_backbone(model, "hf", str(out))
    assert rep["checked"].startswith("checked: transformers") and "DINOv3ViTModel" in rep["checked"]
    cfg = json.loads((out / "config.json").read_text())
    qkv_bias = options.get("qkv_bias", True)
    swiglu = options.get("ffn_layer", "mlp") != "mlp"
    width = model.blocks[0].mlp.w3.in_features if swiglu else model.blocks[0].mlp.fc1.out_features
    assert (cfg["num_register_tokens"], cfg["use_gated_mlp"], cfg["hidden_act"], cfg["intermediate_size"],
            cfg["query_bias"], cfg["key_bias"], cfg["proj_bias"], cfg["mlp_bias"], cfg["layer_norm_eps"]) == (
        options["n_storage_tokens"], swiglu, "silu" if swiglu else "gelu", width, qkv_bias,
        qkv_bias and not options["mask_k_bias"], options.get("proj_bias", True), options.get("ffn_bias", True),
        1e-6 if options.get("norm_layer", "layernorm") == "layernorm" else 1e-5)
    assert (cfg["pos_embed_shift"], cfg["pos_embed_jitter"], cfg["pos_embed_rescale"]) == (
        options.get("pos_embed_rope_shift_coords"), None, options.get("pos_embed_rope_rescale_coords"))
    if options.get("pos_embed_rope_base", 100.0) is None:  # min_period 1, D_head 16, n = 4 periods:
        assert cfg["rope_theta"] == pytest.approx(30.0 ** (16 / 12), rel=1e-5)  # 30^(m/3) = theta^(4m/16)
    else:
        assert cfg["rope_theta"] == 100.0

    hf = _load_hf(out, "DINOv3ViTModel")
    sizes = [(32, 32), (24, 40), (48, 48)]
    _assert_same_rope(hf, model, sizes)
    with torch.no_grad():
        for h, w in sizes:
            x = torch.randn(2, 3, h, w)
            _assert_same_v3_features(hf(pixel_values=x).last_hidden_state, model, x)


@pytest.mark.parametrize("name", list(V3_NO_HF))
def test_hf_dinov3_refuses_what_transformers_cannot_compute(tmp_path, name):
    """Options DINOv3ViTModel has no equivalent for end the hf export with one line naming the option
    and --format safetensors, before anything is written."""
    options, words = V3_NO_HF[name]
    model = _v3(**options).eval()
    with pytest.raises(export.EvalError) as e:
        export.export_backbone(model, "hf", str(tmp_path / "hf"))
    msg = str(e.value)
    assert words in msg and "--format safetensors" in msg and "\n" not in msg
    assert not (tmp_path / "hf").exists() and not os.listdir(tmp_path)


@needs_safetensors
@pytest.mark.parametrize("name", list(V3_HF) + list(V3_NO_HF))
def test_safetensors_dinov3_rebuilds_an_equal_backbone(tmp_path, name):
    """The safetensors folder of a DINOv3 backbone (any options, those hf refuses too): the state dict
    with the official names, buffers included, and fastdino.json's model_args, from which
    DINOv3VisionTransformer builds the same names and shapes, loads the weights strictly and gives
    bit-identical features."""
    from safetensors.torch import load_file

    options = V3_HF[name] if name in V3_HF else V3_NO_HF[name][0]
    model = _v3(seed=3, **options).eval()
    out = tmp_path / "st"
    rep = export.export_backbone(model, "safetensors", str(out))
    assert rep["checked"] is None and sorted(os.listdir(out)) == ["fastdino.json", "model.safetensors"]
    sd, ref = load_file(str(out / "model.safetensors")), model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert "rope_embed.periods" in sd and ("blocks.0.attn.qkv.bias_mask" in sd) == bool(
        options.get("mask_k_bias") and options.get("qkv_bias", True))
    meta = json.loads((out / "fastdino.json").read_text())
    assert (meta["layout"], meta["format"]) == ("dinov3", "safetensors")
    args = meta["model_args"]
    for k, v in options.items():  # the constructor's own values (the FFN: a pair that builds the same width)
        if k not in ("ffn_layer", "ffn_ratio"):
            assert args[k] == v, k
    torch.manual_seed(0)
    rebuilt = DINOv3VisionTransformer(**args)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in ref.items()}
    rebuilt.load_state_dict(sd, strict=True)
    rebuilt.eval()
    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        assert torch.equal(_tokens(rebuilt, x), _tokens(model, x))
        assert torch.equal(rebuilt(x), model(x))


@needs_safetensors
def test_safetensors_dinov3_from_a_checkpoint_reads_back(tmp_path, capsys):
    """A DINOv3 backbone state dict (dinov3_vits16plus: SwiGLU, ffn_ratio 6) through the command line:
    fastdino.json gives the hub builder's arguments, and load_backbone reads the folder back equal."""
    src = _randomize(dinov3_vits16plus(depth=1, drop_path_rate=0.0), 4).eval()
    torch.save(src.state_dict(), tmp_path / "b.pth")
    out = tmp_path / "st"
    code, printed, err = _run(["--checkpoint", str(tmp_path / "b.pth"), "--format", "safetensors", "--out", str(out)],
                              capsys)
    assert code == 0, err
    assert "(dinov3_vits16plus/16, 1 blocks, 4 registers, swiglu)" in printed
    args = json.loads((out / "fastdino.json").read_text())["model_args"]
    assert {k: args[k] for k in ("embed_dim", "num_heads", "ffn_layer", "ffn_ratio", "norm_layer", "n_storage_tokens",
                                 "mask_k_bias", "pos_embed_rope_base", "layerscale_init", "pos_embed_rope_dtype")} == {
        "embed_dim": 384, "num_heads": 6, "ffn_layer": "swiglu", "ffn_ratio": 6.0, "norm_layer": "layernormbf16",
        "n_storage_tokens": 4, "mask_k_bias": True, "pos_embed_rope_base": 100.0, "layerscale_init": 1e-5,
        "pos_embed_rope_dtype": "fp32"}
    back = load_backbone(str(out))
    assert isinstance(back, DINOv3VisionTransformer)
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in back.state_dict().items())


@needs_safetensors
def test_dinov3_refusals_from_the_command_line(tmp_path, capsys):
    """timm: DINOv3 is refused with one line naming the formats that take it; hf: an untied-norm
    DINOv3 checkpoint is refused with one line. Nothing is written."""
    path = tmp_path / "b.pth"
    torch.save(_randomize(dinov3_vitt16(depth=1), 0).state_dict(), path)
    untied = tmp_path / "untied.pth"
    torch.save(_randomize(dinov3_vitt16(depth=1, untie_cls_and_patch_norms=True), 0).state_dict(), untied)
    for ckpt, fmt, words in ((path, "timm", "--format timm takes DINO / DINOv2 backbones, not DINOv3: export it "
                                            "with --format hf (transformers DINOv3ViTModel) or --format safetensors"),
                             (untied, "hf", "untie_cls_and_patch_norms")):
        code, printed, err = _run(["--checkpoint", str(ckpt), "--format", fmt, "--out", str(tmp_path / "o")], capsys)
        assert code == 2 and words in err and err.count("\n") == 1 and not printed, err
    assert not (tmp_path / "o").exists() and not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


# ------------------------------------------------------------------------------------------------
# timm (not installed here: its layout is written out from its source)
# ------------------------------------------------------------------------------------------------
# huggingface/pytorch-image-models timm/models/vision_transformer.py: VisionTransformer.__init__ defaults
# (global_pool 'token', final norm, timm LayerNorm eps 1e-6) and, below, the model_args of the
# @register_model functions the export names; create_model(name, **kw) builds
# VisionTransformer(**dict(model_args, **kw)). mlp_layer / act_layer are classes there (Mlp + GELU, or
# SwiGLUPacked = partial(GluMlp, act_layer=SiLU, gate_last=False) from timm/layers/mlp.py).
TIMM_VIT_DEFAULTS = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                         qkv_bias=True, init_values=None, no_embed_class=False, reg_tokens=0, dynamic_img_size=False,
                         mlp_layer="Mlp", act_layer="GELU")
_G = dict(patch_size=14, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5, mlp_ratio=2.66667 * 2,
          mlp_layer="SwiGLUPacked", act_layer="SiLU")
TIMM_ARCHS = {
    "vit_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_small_patch8_224": dict(patch_size=8, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch8_224": dict(patch_size=8, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_small_patch14_dinov2": dict(patch_size=14, embed_dim=384, depth=12, num_heads=6, init_values=1e-5, img_size=518),
    "vit_base_patch14_dinov2": dict(patch_size=14, embed_dim=768, depth=12, num_heads=12, init_values=1e-5, img_size=518),
    "vit_large_patch14_dinov2": dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5,
                                     img_size=518),
    "vit_giant_patch14_dinov2": dict(_G, img_size=518),
    "vit_small_patch14_reg4_dinov2": dict(patch_size=14, embed_dim=384, depth=12, num_heads=6, init_values=1e-5,
                                          reg_tokens=4, no_embed_class=True),
    "vit_base_patch14_reg4_dinov2": dict(patch_size=14, embed_dim=768, depth=12, num_heads=12, init_values=1e-5,
                                         reg_tokens=4, no_embed_class=True),
    "vit_large_patch14_reg4_dinov2": dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5,
                                          reg_tokens=4, no_embed_class=True),
    "vit_giant_patch14_reg4_dinov2": dict(_G, reg_tokens=4, no_embed_class=True),
}


def timm_args(architecture, model_args):
    return {**TIMM_VIT_DEFAULTS, **TIMM_ARCHS[architecture], **model_args}


def timm_shapes(a):
    """Parameter names and shapes of timm's VisionTransformer(num_classes=0, **a) (same source: __init__,
    Block, Attention (qkv, proj), LayerScale (gamma), Mlp / GluMlp (fc2 takes half of fc1's width))."""
    d, p, r = a["embed_dim"], a["patch_size"], a["reg_tokens"]
    grid = (a["img_size"] // p) ** 2
    hidden = int(d * a["mlp_ratio"])
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, grid if a["no_embed_class"] else grid + 1 + r, d),
              "patch_embed.proj.weight": (d, 3, p, p), "patch_embed.proj.bias": (d,),
              "norm.weight": (d,), "norm.bias": (d,)}
    if r:
        shapes["reg_token"] = (1, r, d)
    for i in range(a["depth"]):
        b = f"blocks.{i}."
        shapes |= {b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                   b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                   b + "norm2.weight": (d,), b + "norm2.bias": (d,), b + "mlp.fc1.weight": (hidden, d),
                   b + "mlp.fc1.bias": (hidden,), b + "mlp.fc2.bias": (d,),
                   b + "mlp.fc2.weight": (d, hidden // 2 if a["mlp_layer"] == "SwiGLUPacked" else hidden)}
        if a["init_values"]:
            shapes |= {b + "ls1.gamma": (d,), b + "ls2.gamma": (d,)}
    return shapes


def timm_forward_features_ref(sd, a, x):
    """timm's VisionTransformer.forward_features at its img_size written out (same source: patch_embed,
    _pos_embed: with no_embed_class the position embedding is added to the patches only, then [CLS] and
    the registers are prepended; Block.forward; GluMlp with gate_last=False: act(x1) * x2; final norm)."""
    d, heads = a["embed_dim"], a["num_heads"]
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=a["patch_size"])
    x = x.flatten(2).transpose(1, 2)
    n = x.shape[0]
    prefix = [sd["cls_token"].expand(n, -1, -1)] + ([sd["reg_token"].expand(n, -1, -1)] if a["reg_tokens"] else [])
    if a["no_embed_class"]:
        x = torch.cat(prefix + [x + sd["pos_embed"]], 1)
    else:
        x = torch.cat(prefix + [x], 1) + sd["pos_embed"]
    for i in range(a["depth"]):
        b = f"blocks.{i}."
        h = F.layer_norm(x, (d,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], 1e-6)
        qkv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        q, k, v = qkv.view(n, -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, -1, d)
        y = F.linear(y, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        x = x + (y * sd[b + "ls1.gamma"] if a["init_values"] else y)
        h = F.linear(F.layer_norm(x, (d,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], 1e-6),
                     sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])
        if a["mlp_layer"] == "SwiGLUPacked":
            x1, x2 = h.chunk(2, dim=-1)
            h = F.silu(x1) * x2
        else:
            h = F.gelu(h)
        y = F.linear(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        x = x + (y * sd[b + "ls2.gamma"] if a["init_values"] else y)
    return F.layer_norm(x, (d,), sd["norm.weight"], sd["norm.bias"], 1e-6)


@pytest.mark.parametrize("make,architecture", [
    (lambda: vit_small(patch_size=16), "vit_small_patch16_224"),
    (lambda: vit_small(patch_size=8), "vit_small_patch8_224"),
    (lambda: vit_base(patch_size=16), "vit_base_patch16_224"),
    (lambda: vit_base(patch_size=8), "vit_base_patch8_224"),
    (dinov2_vits14, "vit_small_patch14_dinov2"),
    (dinov2_vitb14, "vit_base_patch14_dinov2"),
    (dinov2_vitl14, "vit_large_patch14_dinov2"),
    (dinov2_vitg14, "vit_giant_patch14_dinov2"),
    (lambda: dinov2_vits14(num_register_tokens=4), "vit_small_patch14_reg4_dinov2"),
    (lambda: dinov2_vitb14(num_register_tokens=4), "vit_base_patch14_reg4_dinov2"),
    (lambda: dinov2_vitl14(num_register_tokens=4), "vit_large_patch14_reg4_dinov2"),
    (lambda: dinov2_vitg14(num_register_tokens=4), "vit_giant_patch14_reg4_dinov2"),
])
def test_timm_names_and_shapes_of_the_official_backbones(make, architecture):
    """The official DINO / DINOv2 backbones (full size, on the meta device: shapes only) get timm's own
    model name, and the exported state dict has exactly the names and shapes of the timm model built
    from config.json, which are those of timm's registered model at its pretraining size."""
    with torch.device("meta"):
        model = make()
    cfg = export.timm_config(export.backbone_info(model))
    assert cfg["architecture"] == architecture and cfg["num_classes"] == 0
    sd = export.timm_state_dict(model.state_dict())
    shapes = timm_shapes(timm_args(architecture, cfg["model_args"]))
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
    assert timm_shapes(timm_args(architecture, {"img_size": 518 if "dinov2" in architecture else 224})) == shapes


@needs_safetensors
@pytest.mark.parametrize("make", [
    lambda: vit_tiny(patch_size=16, depth=2),
    lambda: dinov2_vitt14(depth=2),
    lambda: dinov2_vitt14(num_register_tokens=4, depth=2),
    lambda: dinov2_vitt14(ffn="swiglu", depth=2),
    lambda: dinov2_vitt14(num_register_tokens=4, ffn="swiglu", depth=2),
])
def test_timm_export_features_and_round_trip(tmp_path, capsys, make):
    """The timm folder: names and shapes as above; timm's forward on the exported weights gives
    fastdino's tokens at the model's size; timm -> fastdino names gives the state dict back (less the
    mask token; with registers [CLS]'s position embedding comes back folded into cls_token), and a
    backbone loaded from that has bit-identical features."""
    from safetensors.torch import load_file

    src = _randomize(make(), 5)
    path = tmp_path / "backbone.pth"
    torch.save(src.state_dict(), path)
    out = tmp_path / "timm"
    code, _, err = _run(["--checkpoint", str(path), "--format", "timm", "--out", str(out)], capsys)
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    a = timm_args(cfg["architecture"], cfg["model_args"])
    assert a["dynamic_img_size"] is True
    sd = load_file(str(out / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in sd.items()} == timm_shapes(a)

    size = a["img_size"]
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        _assert_same_features(timm_forward_features_ref(sd, a, x), src, x)

    ffn = "swiglu" if a["mlp_layer"] == "SwiGLUPacked" else "mlp"
    back = export.fastdino_state_dict_from_timm(sd, ffn)
    orig = {k: v for k, v in src.state_dict().items() if k != "mask_token"}
    assert back.keys() == orig.keys()
    folded = {"cls_token", "pos_embed"} if a["reg_tokens"] else set()
    assert all(torch.equal(back[k], orig[k]) for k in orig if k not in folded)
    if folded:
        assert torch.equal(back["pos_embed"][:, 1:], orig["pos_embed"][:, 1:])
        assert not back["pos_embed"][:, 0].any()
        assert torch.equal(back["cls_token"], orig["cls_token"] + orig["pos_embed"][:, :1])
    torch.save(back, tmp_path / "back.pth")
    with torch.no_grad():
        assert torch.equal(_tokens(load_backbone(str(tmp_path / "back.pth")), x), _tokens(src, x))


@needs_safetensors
# ------------------------------------------------------------------------------------------------
# safetensors (fastdino names)
# ------------------------------------------------------------------------------------------------
def test_safetensors_reads_back_equal(tmp_path, capsys):
    from safetensors.torch import load_file

    make = lambda: dinov2_vitt14(num_register_tokens=4, ffn="swiglu", depth=2)  # noqa: E731
    ckpt = _fastdino_checkpoint(tmp_path / "checkpoint.pth", "dinov2_vitt14", make)
    for which in ("teacher", "student"):
        out = tmp_path / which
        code, _, err = _run(["--checkpoint", ckpt, "--format", "safetensors", "--out", str(out), "--which", which],
                            capsys)
        assert code == 0, err
        assert sorted(os.listdir(out)) == ["fastdino.json", "model.safetensors"]
        ref = load_backbone(ckpt, which).state_dict()
        sd = load_file(str(out / "model.safetensors"))
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
        meta = json.loads((out / "fastdino.json").read_text())
        assert {k: meta[k] for k in ("format", "which", "arch", "patch_size", "depth", "num_register_tokens", "ffn")} == {
            "format": "safetensors", "which": which, "arch": "dinov2_vitt14", "patch_size": 14, "depth": 2,
            "num_register_tokens": 4, "ffn": "swiglu"}
    assert not torch.equal(load_file(str(tmp_path / "teacher" / "model.safetensors"))["norm.weight"],
                           load_file(str(tmp_path / "student" / "model.safetensors"))["norm.weight"])


@needs_safetensors
def test_load_backbone_reads_the_safetensors_export(tmp_path, capsys):
    src = _randomize(dinov2_vitt14(num_register_tokens=4, depth=2), 6)
    torch.save(src.state_dict(), tmp_path / "b.pth")
    out = tmp_path / "st"
    assert _run(["--checkpoint", str(tmp_path / "b.pth"), "--format", "safetensors", "--out", str(out)], capsys)[0] == 0
    for path in (out, out / "model.safetensors"):  # the folder or the file
        model = load_backbone(str(path))
        assert (model.arch, model.patch_size, model.num_register_tokens) == ("dinov2_vitt14", 14, 4)
        assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------
# bad input, output folder rules
# ------------------------------------------------------------------------------------------------
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, capsys):
    torch.save(_randomize(vit_tiny(patch_size=16, depth=1), 0).state_dict(), tmp_path / "b.pth")
    ok = ["--checkpoint", str(tmp_path / "b.pth"), "--format", "safetensors"]
    cases = [
        (["--checkpoint", str(tmp_path / "missing.pth"), "--format", "hf", "--out", str(tmp_path / "o")],
         "error: checkpoint '" + str(tmp_path / "missing.pth") + "' does not exist"),
        (["--checkpoint", str(tmp_path / "b.pth"), "--format", "onnx", "--out", str(tmp_path / "o")],
         "error: argument --format: invalid choice: 'onnx'"),
        (ok + ["--out", str(tmp_path / "b.pth")], "is a file, not a folder"),
    ]
    torch.save({"weight": torch.ones(3)}, tmp_path / "notvit.pth")
    cases.append((["--checkpoint", str(tmp_path / "notvit.pth"), "--format", "timm", "--out", str(tmp_path / "o")],
                  "not a ViT backbone"))
    for argv, expect in cases:
        code, printed, err = _run(argv, capsys)
        assert code == 2 and expect in err and err.count("\n") == 1 and not printed, (argv, err)
    assert not (tmp_path / "o").exists()

    # the module's entry point, as users run it
    proc = subprocess.run([sys.executable, "-m", "fastdino.export", *cases[0][0]], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("fastdino: " + cases[0][1]) and proc.stderr.count("\n") == 1


@needs_safetensors
def test_output_folder_is_never_overwritten_by_surprise(tmp_path, capsys, monkeypatch):
    torch.save(_randomize(vit_tiny(patch_size=16, depth=1), 0).state_dict(), tmp_path / "b.pth")
    args = ["--checkpoint", str(tmp_path / "b.pth"), "--format", "timm", "--out"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    code, _, err = _run(args + [str(foreign)], capsys)
    assert code == 2 and "is not empty and is not a fastdino export (holds notes.txt)" in err
    assert os.listdir(foreign) == ["notes.txt"]
    code, _, err = _run(args + [str(foreign), "--force"], capsys)
    assert code == 0 and sorted(os.listdir(foreign)) == ["config.json", "fastdino.json", "model.safetensors", "notes.txt"]
    assert (foreign / "notes.txt").read_text() == "keep"

    out = tmp_path / "exp"
    assert _run(args + [str(out)], capsys)[0] == 0
    assert _run(args[:3] + ["safetensors", "--out", str(out)], capsys)[0] == 0  # an earlier export is replaced
    assert json.loads((out / "fastdino.json").read_text())["format"] == "safetensors"
    assert sorted(os.listdir(out)) == ["fastdino.json", "model.safetensors"]  # timm's config.json went with it
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "_write_json", disk_full)  # a failure half way through writing
    for target in (out, tmp_path / "new"):
        code, _, err = _run(args + [str(target)], capsys)
        assert code == 2 and "No space left on device" in err and err.count("\n") == 1
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before  # the earlier export is intact
    assert not (tmp_path / "new").exists()
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # no temporary folder left behind


@needs_safetensors
@pytest.mark.parametrize("name", ["rmsnorm", "untied", "periods"])
def test_safetensors_dinov3_non_hub_options_evaluate_as_exported(tmp_path, name):
    """A safetensors export with options the weights alone do not tell (RMSNorm, untied norms, RoPE
    periods, patch 4): load_backbone (every evaluation) rebuilds it from fastdino.json's model_args, so
    the features it evaluates are the exported backbone's, bit for bit."""
    from fastdino.export import export_backbone

    model = _v3(3, **V3_NO_HF[name][0]).eval()
    export_backbone(model, "safetensors", str(tmp_path / "st"))
    back = load_backbone(str(tmp_path / "st"))
    assert isinstance(back, DINOv3VisionTransformer) and back.patch_size == 4
    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        assert torch.equal(_tokens(back, x), _tokens(model, x))
