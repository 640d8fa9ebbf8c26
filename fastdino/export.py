"""Export a trained backbone for use outside fastdino: Hugging Face transformers, timm, or plain safetensors.

    python -m fastdino.export --checkpoint runs/demo/checkpoint.pth --format hf --out export/hf
    python -m fastdino.export --checkpoint CKPT --format timm --out export/timm [--which student]
    python -m fastdino.export --checkpoint CKPT --format safetensors --out export/st

The checkpoint is read by fastdino.eval.common.load_backbone (fastdino and DeepSpeed checkpoints,
official DINO checkpoints, plain DINO / DINOv2 / DINOv3 backbone state dicts; `--which` picks the teacher or
the student), so the exported weights are those of the backbone the evaluations use, in fp32.
Every format writes a folder: model.safetensors, a config, and fastdino.json (what was exported,
from where). The folder is built next to --out and moved into place when complete, so a crash leaves
no half-written file; a non-empty --out that is not an earlier export is refused unless --force.

Formats (D width, H heads, hd = D/H, p patch, R registers, depth blocks i = 0..depth-1):

  hf           config.json + model.safetensors that `from_pretrained` loads, with the key names of the
               Hub checkpoints (facebook/dino-vits16, facebook/dinov2-small, ...-with-registers,
               facebook/dinov3-vits16-pretrain-lvd1689m), which every transformers version that has
               the class reads (5.x renames them on load):
                 DINO v1 backbones  -> ViTModel (load with add_pooling_layer=False), image_size = the
                                       model's position-embedding grid * p, layer_norm_eps 1e-6, gelu
                 DINOv2, R = 0      -> Dinov2Model (LayerScale, use_swiglu_ffn, use_mask_token)
                 DINOv2, R > 0      -> Dinov2WithRegistersModel
                 DINOv3             -> DINOv3ViTModel (below)
               qkv (3D, D) is split into query / key / value rows [0, D), [D, 2D), [2D, 3D); SwiGLU's
               w12 (2h, D) is Hub `mlp.weights_in` (first half the SiLU gate, as fastdino), w3 is
               `mlp.weights_out`; a backbone without LayerScale gets lambda1 = 1.
               last_hidden_state equals fastdino's get_intermediate_layers(x, 1)[0] (every token after
               the final norm: [CLS], registers, patches) at the model's own size, and at every size
               for DINOv2 with registers. At other sizes ViTModel (interpolate_pos_encoding=True) and
               Dinov2Model resize the position grid to the target size (size=(H/p, W/p)), while
               fastdino and the official DINO / DINOv2 code resize by the scale factor
               (H/p + 0.1) / side: the patch position embeddings, hence the features, differ slightly.
               DINOv3 (R storage tokens): embeddings.{cls_token, mask_token (1, 1, D), register_tokens
               (1, R, D), empty for R = 0, patch_embeddings}, layer.i.{norm1, norm2, layer_scale1/2
               .lambda1}, layer.i.attention.{q, k, v, o}_proj (qkv rows as above, proj), layer.i.mlp
               .{up, down}_proj (MLP fc1 / fc2, gelu) or .{gate, up, down}_proj (SwiGLU w1 / w2 / w3,
               silu), norm. intermediate_size is the FFN width, layer_norm_eps the norms' (1e-6
               layernorm, 1e-5 layernormbf16), rope_theta the base of the periods buffer (p_m =
               theta^(4m/hd)), pos_embed_shift / jitter / rescale the backbone's training-only
               coordinate augmentations. The masked key bias never acts: key_bias is off and the k
               third of the qkv bias is not written (without mask_k_bias it is). local_cls_norm
               (training, local crops only) is not written. last_hidden_state equals
               get_intermediate_layers(x, 1)[0] at every size (both normalize each axis of the RoPE
               coordinates by its own patch count). Refused with one line (use safetensors), as
               DINOv3ViTModel cannot compute them: RMSNorm, untie_cls_and_patch_norms,
               pos_embed_rope_normalize_coords min / max, a RoPE dtype other than fp32, periods not
               of the form theta^(4m/hd) (min_period / max_period with min_period != 1).
  timm         config.json in timm's Hub layout ({"architecture", "num_classes": 0, "model_args",
               "pretrained_cfg"}) + model.safetensors with timm's VisionTransformer names (DINO v1:
               fastdino's own; DINOv2 as timm's _convert_dinov2: mask_token dropped, SwiGLU w12 / w3
               -> mlp.fc1 / mlp.fc2 of SwiGLUPacked; registers -> reg_token with no_embed_class=True,
               so cls_token := cls_token + pos_embed[:, 0] and pos_embed := pos_embed[:, 1:]).
               model_args set every shape (img_size, patch_size, embed_dim, depth, num_heads,
               mlp_ratio, init_values, reg_tokens, no_embed_class) and dynamic_img_size=True; the
               architecture supplies the MLP (Mlp + GELU, or SwiGLUPacked + SiLU for the giant
               DINOv2 names). timm resizes the position grid like Dinov2WithRegistersModel.
               DINOv3 backbones are refused with one line (use hf or safetensors).
  safetensors  the backbone's state dict with fastdino's names (model.safetensors) and fastdino.json
               (arch, patch_size, depth, registers, ffn, ...). DINOv3: the official names, buffers
               included (rope_embed.periods, attn.qkv.bias_mask), and fastdino.json's model_args, the
               DINOv3VisionTransformer arguments read off the modules (norm, FFN, biases, storage
               tokens, LayerScale, mask_k_bias, untied norms, RoPE settings and dtype; ffn_layer /
               ffn_ratio: a pair that builds the FFN width, as the module keeps neither):
               DINOv3VisionTransformer(**model_args) builds every name and shape (checked at export)
               and load_state_dict gives the same backbone.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile

import torch

from fastdino.data.augment import IMAGENET_MEAN, IMAGENET_STD
from fastdino.eval.common import EvalError, load_backbone, run_cli

FORMATS = ("hf", "timm", "safetensors")
META_NAME = "fastdino.json"  # written by every format: marks a folder as a fastdino export
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


# ------------------------------------------------------------------------------------------------
# what the backbone is
# ------------------------------------------------------------------------------------------------
def backbone_info(model) -> dict:
    """The architecture of a fastdino VisionTransformer or DINOv3VisionTransformer, read from its
    modules and shapes."""
    from fastdino.models.dinov3 import DINOv3VisionTransformer
    from fastdino.models.vision_transformer import LayerScale, SwiGLUFFN, VisionTransformer

    if isinstance(model, DINOv3VisionTransformer):
        return dinov3_info(model)
    if not isinstance(model, VisionTransformer):
        raise EvalError(f"export takes DINO / DINOv2 / DINOv3 ViT backbones (fastdino VisionTransformer or "
                        f"DINOv3VisionTransformer), not {type(model).__name__}")
    blk = model.blocks[0]
    swiglu = isinstance(blk.mlp, SwiGLUFFN)
    n_pos = model.pos_embed.shape[1] - 1
    side = math.isqrt(n_pos)
    if side * side != n_pos:
        raise EvalError(f"pos_embed holds {n_pos} patch positions, not a square grid")
    return {"arch": getattr(model, "arch", None), "layout": model.layout, "patch_size": model.patch_size,
            "depth": len(model.blocks), "embed_dim": model.embed_dim, "num_heads": model.num_heads,
            "num_register_tokens": model.num_register_tokens, "ffn": "swiglu" if swiglu else "mlp",
            # MLP width (fc1 rows), or SwiGLU width h (w3 columns; w12 has 2h rows)
            "mlp_hidden": int(blk.mlp.w3.in_features if swiglu else blk.mlp.fc1.out_features),
            "layerscale": isinstance(blk.ls1, LayerScale), "mask_token": model.mask_token is not None,
            "img_size": side * model.patch_size, "grid": side,
            "interpolate_offset": model.interpolate_offset, "interpolate_antialias": model.interpolate_antialias}


def _ffn_width(layer: str, dim: int, ratio: float) -> int:
    """The FFN width DINOv3VisionTransformer builds: int(D * ffn_ratio), for SwiGLU 2/3 of it rounded
    up to the layer's alignment (fastdino/models/dinov3.py)."""
    from fastdino.models.dinov3 import FFN_ALIGN

    hidden = int(dim * ratio)
    if layer == "mlp":
        return hidden
    swiglu = int(hidden * 2 / 3)
    return swiglu + (-swiglu % FFN_ALIGN[layer])


def _dinov3_ffn(dim: int, width: int, swiglu: bool) -> tuple[str, float]:
    """An (ffn_layer, ffn_ratio) that builds an FFN of `width` (the module keeps neither): the hub
    backbones' pair for this embed_dim and kind first, then the hub ratios, then one derived from width."""
    from fastdino.models.dinov3 import DINOV3_HUB, FFN_ALIGN

    layers = [n for n in FFN_ALIGN if (n != "mlp") == swiglu]
    ratios = sorted({hub[3] for hub in DINOV3_HUB.values()})
    hidden = width if not swiglu else -(-3 * width // 2)  # int(hidden * 2/3) == width
    derived = hidden / dim
    if int(dim * derived) != hidden:  # the quotient rounded down: the next float up gives hidden back
        derived = math.nextafter(derived, math.inf)
    candidates = [(ffn, r) for d, _, _, r, ffn, _ in DINOV3_HUB.values() if d == dim and ffn in layers]
    candidates += [(ffn, r) for ffn in layers for r in ratios + [derived]]
    for ffn, r in candidates:
        if _ffn_width(ffn, dim, r) == width:
            return ffn, r
    raise EvalError(f"no DINOv3 ffn_layer / ffn_ratio builds an FFN of width {width} at embed_dim {dim}")


def _rope_theta(rope) -> float | None:
    """The base theta with RoPE periods == theta ** (4m / D_head), m = 0..D_head/4 - 1 (transformers'
    rope_theta), read off the periods buffer (a checkpoint's periods replace the constructor's);
    None when the periods have another form (min_period / max_period with min_period != 1)."""
    p = rope.periods.detach().to("cpu", torch.float64)
    m = torch.arange(p.numel(), dtype=torch.float64)
    candidates = ([float(rope.base)] if rope.base is not None else []) + ([float(p[1]) ** (rope.D_head / 4)]
                                                                          if p.numel() > 1 else [100.0])
    for theta in candidates:  # the module's base when it fits; the periods are stored in the RoPE dtype
        if torch.allclose(p, theta ** (4 * m / rope.D_head), rtol=1e-5, atol=0.0):
            return theta
    return None


def dinov3_model_args(model) -> dict:
    """The DINOv3VisionTransformer keyword arguments that rebuild `model` (every parameter and buffer
    shape, norm, FFN, RoPE setting), read off its modules: DINOv3VisionTransformer(**args) then
    load_state_dict(model.state_dict()) gives the same backbone. Training-only settings come along
    as the module holds them (RoPE coordinate augmentation, drop path rate)."""
    from fastdino.models.dinov3 import ROPE_DTYPES, LinearKMaskedBias, Mlp, RMSNorm
    from fastdino.models.vision_transformer import LayerScale

    blk, rope, conv = model.blocks[0], model.rope_embed, model.patch_embed.proj
    if conv.kernel_size[0] != conv.kernel_size[1] or tuple(conv.stride) != tuple(conv.kernel_size):
        raise EvalError(f"patch embedding {tuple(conv.kernel_size)} / stride {tuple(conv.stride)} is not a square "
                        f"patch")
    if isinstance(model.norm, RMSNorm):
        norm = "rmsnorm"
    elif isinstance(model.norm, torch.nn.LayerNorm) and model.norm.eps in (1e-6, 1e-5):
        norm = "layernorm" if model.norm.eps == 1e-6 else "layernormbf16"
    else:
        raise EvalError(f"final norm {model.norm} is none of DINOv3's (layernorm, layernormbf16, rmsnorm)")
    mlp = isinstance(blk.mlp, Mlp)
    width = blk.mlp.fc1.out_features if mlp else blk.mlp.w3.in_features
    ffn_layer, ffn_ratio = _dinov3_ffn(model.embed_dim, width, not mlp)
    ffn_in = blk.mlp.fc1 if mlp else blk.mlp.w1
    return {"img_size": model.patch_embed.img_size, "patch_size": conv.kernel_size[0], "in_chans": conv.in_channels,
            "pos_embed_rope_base": rope.base, "pos_embed_rope_min_period": rope.min_period,
            "pos_embed_rope_max_period": rope.max_period, "pos_embed_rope_normalize_coords": rope.normalize_coords,
            "pos_embed_rope_shift_coords": rope.shift_coords, "pos_embed_rope_jitter_coords": rope.jitter_coords,
            "pos_embed_rope_rescale_coords": rope.rescale_coords,
            "pos_embed_rope_dtype": {v: k for k, v in ROPE_DTYPES.items()}[rope.dtype],
            "embed_dim": model.embed_dim, "depth": len(model.blocks), "num_heads": blk.attn.num_heads,
            "ffn_ratio": ffn_ratio, "qkv_bias": blk.attn.qkv.bias is not None,
            "drop_path_rate": model.drop_path_rate,
            "layerscale_init": model.layerscale_init if isinstance(blk.ls1, LayerScale) else None,
            "norm_layer": norm, "ffn_layer": ffn_layer, "ffn_bias": ffn_in.bias is not None,
            "proj_bias": blk.attn.proj.bias is not None, "n_storage_tokens": model.n_storage_tokens,
            "mask_k_bias": isinstance(blk.attn.qkv, LinearKMaskedBias),
            "untie_cls_and_patch_norms": model.cls_norm is not None,
            "untie_global_and_local_cls_norm": model.local_cls_norm is not None}


def dinov3_info(model) -> dict:
    """backbone_info of a DINOv3VisionTransformer: the fields of the ViT description that apply, the
    constructor arguments (model_args, checked: they rebuild every name and shape of the state dict)
    and the RoPE base its periods have (rope_theta, None when they have no such base)."""
    from fastdino.models.dinov3 import DINOv3VisionTransformer

    args = dinov3_model_args(model)
    with torch.device("meta"):
        rebuilt = DINOv3VisionTransformer(**args, attn="sdpa")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} != shapes:
        raise EvalError(f"the DINOv3 arguments read off the backbone do not rebuild it ({args}): please report it")
    return {"arch": getattr(model, "arch", None), "layout": "dinov3", "patch_size": args["patch_size"],
            "depth": args["depth"], "embed_dim": args["embed_dim"], "num_heads": args["num_heads"],
            "num_register_tokens": args["n_storage_tokens"], "ffn": "mlp" if args["ffn_layer"] == "mlp" else "swiglu",
            "mlp_hidden": _ffn_width(args["ffn_layer"], args["embed_dim"], args["ffn_ratio"]),
            "layerscale": args["layerscale_init"] is not None, "mask_k_bias": args["mask_k_bias"],
            "img_size": args["img_size"], "norm_eps": getattr(model.norm, "eps", None),
            "rope_theta": _rope_theta(model.rope_embed), "model_args": args}


def _own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor with its own storage (safetensors refuses views of shared storage)."""
    return t.detach().contiguous().clone()


# ------------------------------------------------------------------------------------------------
# Hugging Face transformers
# ------------------------------------------------------------------------------------------------
def hf_class(info: dict) -> str:
    if info["layout"] == "dinov3":
        return "DINOv3ViTModel"
    if info["layout"] == "dino":
        return "ViTModel"
    return "Dinov2WithRegistersModel" if info["num_register_tokens"] else "Dinov2Model"


def dinov3_hf_refusal(info: dict) -> str | None:
    """Why transformers' DINOv3ViTModel cannot compute this DINOv3 backbone's features, or None."""
    args = info["model_args"]
    if args["norm_layer"] == "rmsnorm":
        return "it uses RMSNorm (DINOv3ViTModel has LayerNorm only)"
    if args["untie_cls_and_patch_norms"]:
        return ("its [CLS] and storage tokens have a final norm of their own (untie_cls_and_patch_norms; "
                "DINOv3ViTModel has one final norm)")
    if args["pos_embed_rope_normalize_coords"] != "separate":
        return (f"its RoPE normalizes the coordinates by the {args['pos_embed_rope_normalize_coords']} side "
                f"(pos_embed_rope_normalize_coords; DINOv3ViTModel normalizes each axis by its own length, "
                f"'separate')")
    if args["pos_embed_rope_dtype"] != "fp32":
        return f"its RoPE rotates in {args['pos_embed_rope_dtype']} (DINOv3ViTModel: fp32)"
    if info["rope_theta"] is None:
        return ("its RoPE periods are not base ** (4m / D_head) (min_period / max_period; DINOv3ViTModel has "
                "rope_theta only)")
    return None


def dinov3_hf_config(info: dict) -> dict:
    """config.json of the DINOv3ViTModel that computes this DINOv3 backbone's features; EvalError when
    none does (dinov3_hf_refusal). The masked key bias never acts: key_bias is off and the k bias is
    not exported; the RoPE coordinate augmentations (training only) are the backbone's."""
    why = dinov3_hf_refusal(info)
    if why is not None:
        raise EvalError(f"--format hf: transformers' DINOv3ViTModel cannot hold this DINOv3 backbone: {why}; "
                        "export it with --format safetensors")
    args = info["model_args"]

    def num(v):  # the config is a strict dataclass: float fields take floats
        return None if v is None else float(v)

    return {"architectures": ["DINOv3ViTModel"], "model_type": "dinov3_vit", "hidden_size": args["embed_dim"],
            "intermediate_size": info["mlp_hidden"], "num_hidden_layers": args["depth"],
            "num_attention_heads": args["num_heads"], "hidden_act": "gelu" if info["ffn"] == "mlp" else "silu",
            "use_gated_mlp": info["ffn"] == "swiglu", "attention_dropout": 0.0, "initializer_range": 0.02,
            "layer_norm_eps": float(info["norm_eps"]), "rope_theta": float(info["rope_theta"]),
            "image_size": args["img_size"], "patch_size": args["patch_size"], "num_channels": args["in_chans"],
            "query_bias": args["qkv_bias"], "key_bias": args["qkv_bias"] and not args["mask_k_bias"],
            "value_bias": args["qkv_bias"], "proj_bias": args["proj_bias"], "mlp_bias": args["ffn_bias"],
            "layerscale_value": float(args["layerscale_init"] or 1.0), "drop_path_rate": 0.0,
            "num_register_tokens": args["n_storage_tokens"],
            "pos_embed_shift": num(args["pos_embed_rope_shift_coords"]),
            "pos_embed_jitter": num(args["pos_embed_rope_jitter_coords"]),
            "pos_embed_rescale": num(args["pos_embed_rope_rescale_coords"])}


def dinov3_hf_state_dict(sd: dict, info: dict) -> dict:
    """fastdino (= official DINOv3) names -> the Hub key names of DINOv3ViTModel (module docstring)."""
    d, args = info["embed_dim"], info["model_args"]
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.mask_token": sd["mask_token"].reshape(1, 1, d),
           "embeddings.register_tokens": sd["storage_tokens"] if args["n_storage_tokens"] else torch.zeros(1, 0, d),
           "embeddings.patch_embeddings.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.bias": sd["patch_embed.proj.bias"],
           "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"]}
    ffn = {"fc1": "up_proj", "fc2": "down_proj"} if info["ffn"] == "mlp" else {
        "w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"}
    for i in range(args["depth"]):
        b, h = f"blocks.{i}.", f"layer.{i}."
        q, k, v = sd[f"{b}attn.qkv.weight"].chunk(3, dim=0)
        out |= {f"{h}attention.q_proj.weight": q, f"{h}attention.k_proj.weight": k,
                f"{h}attention.v_proj.weight": v, f"{h}attention.o_proj.weight": sd[f"{b}attn.proj.weight"]}
        if args["qkv_bias"]:
            q, k, v = sd[f"{b}attn.qkv.bias"].chunk(3, dim=0)
            out |= {f"{h}attention.q_proj.bias": q, f"{h}attention.v_proj.bias": v}
            if not args["mask_k_bias"]:  # masked: b * bias_mask is 0 on the k third
                out[f"{h}attention.k_proj.bias"] = k
        if args["proj_bias"]:
            out[f"{h}attention.o_proj.bias"] = sd[f"{b}attn.proj.bias"]
        for part in ("weight", "bias"):
            out |= {f"{h}norm1.{part}": sd[f"{b}norm1.{part}"], f"{h}norm2.{part}": sd[f"{b}norm2.{part}"]}
        for ours, theirs in ffn.items():
            out[f"{h}mlp.{theirs}.weight"] = sd[f"{b}mlp.{ours}.weight"]
            if args["ffn_bias"]:
                out[f"{h}mlp.{theirs}.bias"] = sd[f"{b}mlp.{ours}.bias"]
        for n in (1, 2):
            gamma = sd.get(f"{b}ls{n}.gamma")
            out[f"{h}layer_scale{n}.lambda1"] = torch.ones(d) if gamma is None else gamma
    return {k: _own(v) for k, v in out.items()}


def hf_config(info: dict) -> dict:
    """config.json of the transformers model that holds this backbone."""
    if info["layout"] == "dinov3":
        return dinov3_hf_config(info)
    d = info["embed_dim"]
    common = {"hidden_size": d, "num_hidden_layers": info["depth"], "num_attention_heads": info["num_heads"],
              "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
              "initializer_range": 0.02, "layer_norm_eps": 1e-6, "image_size": info["img_size"],
              "patch_size": info["patch_size"], "num_channels": 3, "qkv_bias": True}
    cls = hf_class(info)
    if cls == "ViTModel":
        return {"architectures": [cls], "model_type": "vit", **common, "intermediate_size": info["mlp_hidden"],
                "encoder_stride": info["patch_size"]}
    # HF builds the FFN from mlp_ratio: MLP int(D * r); SwiGLU (int(int(D * r) * 2/3) + 7) // 8 * 8 (fastdino's rule)
    ratio = 4
    width = int(d * ratio)
    expect = (int(width * 2 / 3) + 7) // 8 * 8 if info["ffn"] == "swiglu" else width
    if expect != info["mlp_hidden"]:
        raise EvalError(f"FFN width {info['mlp_hidden']} is not the one transformers builds from mlp_ratio 4 "
                        f"({expect})")
    cfg = {**common, "mlp_ratio": ratio, "layerscale_value": 1.0, "drop_path_rate": 0.0,
           "use_swiglu_ffn": info["ffn"] == "swiglu"}
    if cls == "Dinov2Model":
        return {"architectures": [cls], "model_type": "dinov2", **cfg, "use_mask_token": info["mask_token"]}
    return {"architectures": [cls], "model_type": "dinov2_with_registers", **cfg,
            "num_register_tokens": info["num_register_tokens"]}


def hf_state_dict(sd: dict, info: dict) -> dict:
    """fastdino backbone state dict -> the Hub key names of ViTModel / Dinov2Model /
    Dinov2WithRegistersModel / DINOv3ViTModel (see the module docstring)."""
    if info["layout"] == "dinov3":
        return dinov3_hf_state_dict(sd, info)
    d, v1 = info["embed_dim"], info["layout"] == "dino"
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    if not v1:
        if "mask_token" in sd:
            out["embeddings.mask_token"] = sd["mask_token"]
        elif info["num_register_tokens"]:  # Dinov2WithRegistersModel always has one: fastdino's init, zeros
            out["embeddings.mask_token"] = torch.zeros(1, d)
        if info["num_register_tokens"]:
            out["embeddings.register_tokens"] = sd["register_tokens"]
    for i in range(info["depth"]):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for part in ("weight", "bias"):
            q, k, v = sd[f"{b}attn.qkv.{part}"].chunk(3, dim=0)
            out |= {f"{h}attention.attention.query.{part}": q, f"{h}attention.attention.key.{part}": k,
                    f"{h}attention.attention.value.{part}": v,
                    f"{h}attention.output.dense.{part}": sd[f"{b}attn.proj.{part}"]}
            if v1:
                out |= {f"{h}layernorm_before.{part}": sd[f"{b}norm1.{part}"],
                        f"{h}layernorm_after.{part}": sd[f"{b}norm2.{part}"],
                        f"{h}intermediate.dense.{part}": sd[f"{b}mlp.fc1.{part}"],
                        f"{h}output.dense.{part}": sd[f"{b}mlp.fc2.{part}"]}
                continue
            out |= {f"{h}norm1.{part}": sd[f"{b}norm1.{part}"], f"{h}norm2.{part}": sd[f"{b}norm2.{part}"]}
            if info["ffn"] == "swiglu":
                out |= {f"{h}mlp.weights_in.{part}": sd[f"{b}mlp.w12.{part}"],
                        f"{h}mlp.weights_out.{part}": sd[f"{b}mlp.w3.{part}"]}
            else:
                out |= {f"{h}mlp.fc1.{part}": sd[f"{b}mlp.fc1.{part}"], f"{h}mlp.fc2.{part}": sd[f"{b}mlp.fc2.{part}"]}
        if not v1:
            for n in (1, 2):
                gamma = sd.get(f"{b}ls{n}.gamma")
                out[f"{h}layer_scale{n}.lambda1"] = torch.ones(d) if gamma is None else gamma
    return {k: _own(v) for k, v in out.items()}


def check_hf(folder: str, model, info: dict) -> str:
    """Load the written folder with transformers and compare every token's features with fastdino's
    (get_intermediate_layers(x, 1)[0]) on a random image at the model's own size. Returns a line."""
    import transformers
    from transformers.utils import logging as hf_logging

    cls = getattr(transformers, hf_class(info))
    kwargs = {"add_pooling_layer": False} if cls.__name__ == "ViTModel" else {}
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the export's output
    try:
        hf, loading = cls.from_pretrained(folder, output_loading_info=True, **kwargs)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    bad = {k: v for k, v in loading.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise EvalError(f"transformers {transformers.__version__} {cls.__name__} does not take the exported "
                        f"weights: {', '.join(f'{k} {sorted(v)[:4]}' for k, v in bad.items())}")
    hf.eval()
    size = info["img_size"]
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    training = model.training
    try:
        with torch.no_grad():
            ref = model.eval().get_intermediate_layers(x, 1)[0]  # eval: no RoPE coordinate augmentation
            got = hf(pixel_values=x).last_hidden_state
    finally:
        model.train(training)
    err = (got - ref).abs().max().item() if got.shape == ref.shape else math.inf
    tol = 1e-3 * max(1.0, ref.abs().max().item())  # fp32 noise is ~1e-6 relative; a wrong mapping is O(1)
    if not err <= tol:
        raise EvalError(f"transformers {cls.__name__} gives other features than fastdino (max abs diff {err:.3g}, "
                        f"shapes {tuple(got.shape)} / {tuple(ref.shape)}): the export is wrong, please report it")
    return f"checked: transformers {transformers.__version__} {cls.__name__} gives the same features at {size} px " \
           f"(max abs diff {err:.2g})"


# ------------------------------------------------------------------------------------------------
# timm
# ------------------------------------------------------------------------------------------------
_TIMM_V1 = {("vit_small", 8): "vit_small_patch8_224", ("vit_base", 8): "vit_base_patch8_224"}
_TIMM_WIDTH = {"vit_tiny": "tiny", "vit_small": "small", "vit_base": "base", "vit_large": "large"}


def _base(info: dict) -> str:
    from fastdino.models.vision_transformer import ARCH_DIMS

    return {dim: a for a, (dim, _) in ARCH_DIMS.items()}[info["embed_dim"]]


def timm_architecture(info: dict) -> str:
    """The timm model name whose MLP (Mlp + GELU, or SwiGLUPacked + SiLU) and defaults fit; the shapes
    come from model_args. timm has no ViT-Ti DINOv2 nor DINO ViT-g: the nearest names are used."""
    base = _base(info)
    if info["layout"] == "dino":
        if (base, info["patch_size"]) in _TIMM_V1:
            return _TIMM_V1[base, info["patch_size"]]
        return f"vit_{_TIMM_WIDTH.get(base, 'large')}_patch16_224"
    reg = "_reg4" if info["num_register_tokens"] else ""
    if info["ffn"] == "swiglu":
        return f"vit_giant_patch14{reg}_dinov2"  # the only timm DINOv2 names with SwiGLUPacked
    size = {"vit_tiny": "small", "vit_giant2": "large"}.get(base, _TIMM_WIDTH.get(base))
    return f"vit_{size}_patch14{reg}_dinov2"


def timm_model_args(info: dict) -> dict:
    """Keyword arguments of timm.create_model that give exactly this backbone's shapes."""
    d = info["embed_dim"]
    if info["ffn"] == "swiglu":  # timm GluMlp: fc1 (int(D * mlp_ratio), D), fc2 (D, int(D * mlp_ratio) / 2)
        width = 2 * info["mlp_hidden"]
        ratio = round(width / d + 1e-5, 6)  # int(D * ratio) == width, clear of the rounding edge (timm: 2.66667 * 2)
    else:
        width = info["mlp_hidden"]
        ratio = width / d
    if int(d * ratio) != width:
        raise EvalError(f"no timm mlp_ratio gives an FFN width of {width} for width {d}")
    args = {"img_size": info["img_size"], "patch_size": info["patch_size"], "embed_dim": d, "depth": info["depth"],
            "num_heads": info["num_heads"], "mlp_ratio": ratio, "qkv_bias": True}
    if info["layerscale"]:
        args["init_values"] = 1e-5  # creates ls1 / ls2 (the weights overwrite the value)
    if info["num_register_tokens"]:
        args |= {"reg_tokens": info["num_register_tokens"], "no_embed_class": True}
    args["dynamic_img_size"] = True
    return args


def timm_config(info: dict) -> dict:
    """timm's Hub config.json: create_model(architecture, num_classes=0, **model_args)."""
    if info["layout"] == "dinov3":
        raise EvalError("--format timm takes DINO / DINOv2 backbones, not DINOv3: export it with --format hf "
                        "(transformers DINOv3ViTModel) or --format safetensors")
    return {"architecture": timm_architecture(info), "num_classes": 0, "num_features": info["embed_dim"],
            "global_pool": "token", "model_args": timm_model_args(info),
            "pretrained_cfg": {"input_size": [3, info["img_size"], info["img_size"]], "interpolation": "bicubic",
                               "crop_pct": 0.875, "crop_mode": "center", "mean": list(IMAGENET_MEAN),
                               "std": list(IMAGENET_STD), "num_classes": 0, "fixed_input_size": False,
                               "first_conv": "patch_embed.proj", "classifier": "head"}}


def timm_state_dict(sd: dict) -> dict:
    """fastdino backbone names -> timm VisionTransformer names (timm's _convert_dinov2 rule)."""
    out = {}
    for k, v in sd.items():
        if k == "mask_token":
            continue  # timm's ViT has no mask token (iBOT training only)
        parts = k.split(".")
        if len(parts) == 5 and parts[0] == "blocks" and parts[2] == "mlp" and parts[3] in ("w12", "w3"):
            k = ".".join(parts[:3] + ["fc1" if parts[3] == "w12" else "fc2", parts[4]])
        out[k] = v
    if "register_tokens" in sd:  # no_embed_class: [CLS] and registers get no position embedding of their own
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
        out["pos_embed"] = sd["pos_embed"][:, 1:]
    return {k: _own(v) for k, v in out.items()}


def fastdino_state_dict_from_timm(sd: dict, ffn: str = "mlp") -> dict:
    """The inverse of timm_state_dict for a timm ViT of this layout (ffn: "swiglu" when fc1 / fc2 are
    SwiGLUPacked). With registers, [CLS]'s position embedding is folded into cls_token: it comes back
    as pos_embed[:, 0] = 0 and cls_token = cls + pos (the same sum, so the same features)."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if ffn == "swiglu" and len(parts) == 5 and parts[2] == "mlp" and parts[3] in ("fc1", "fc2"):
            k = ".".join(parts[:3] + ["w12" if parts[3] == "fc1" else "w3", parts[4]])
        out[k] = v
    if "reg_token" in sd:
        out["register_tokens"] = out.pop("reg_token")
        out["pos_embed"] = torch.cat([torch.zeros_like(sd["pos_embed"][:, :1]), sd["pos_embed"]], dim=1)
    return out


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def _save_safetensors(tensors: dict, path: str, meta: dict) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise EvalError("writing model.safetensors needs the safetensors package: pip install safetensors "
                        "(or the export extra: pip install -e \".[export]\")") from None
    save_file(tensors, path, metadata={"format": "pt", **{k: str(v) for k, v in meta.items()}})


def _check_read_back(path: str, tensors: dict) -> None:
    from safetensors.torch import load_file

    back = load_file(path)
    if back.keys() != tensors.keys() or any(not torch.equal(back[k], v) for k, v in tensors.items()):
        raise EvalError(f"'{path}' does not read back as written")


def _write_json(obj: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def check_out_dir(out: str, force: bool) -> None:
    """--out may be missing, empty, an earlier export (it holds fastdino.json), or anything with --force."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise EvalError(f"--out '{out}' is a file, not a folder")
    if not os.path.isdir(out) or force:
        return
    entries = sorted(os.listdir(out))
    if entries and META_NAME not in entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise EvalError(f"--out '{out}' is not empty and is not a fastdino export (holds {shown}): "
                        "choose another folder, or pass --force to write into it")


def _move_into_place(tmp: str, out: str) -> None:
    """Publish the finished folder: one rename when --out is new, else each file replaced by a rename
    (every file is either the old or the new one, never half-written), fastdino.json last; then the
    files of an earlier export that this one does not write (hf's config.json after a safetensors
    export) are removed. Nothing else in the folder is touched."""
    if not os.path.exists(out):
        os.rename(tmp, out)
        return
    earlier = os.path.isfile(os.path.join(out, META_NAME))
    names = sorted(os.listdir(tmp), key=lambda n: n == META_NAME)
    for name in names:
        os.replace(os.path.join(tmp, name), os.path.join(out, name))
    os.rmdir(tmp)
    if earlier:
        for name in {WEIGHTS_NAME, CONFIG_NAME} - set(names):
            if os.path.isfile(os.path.join(out, name)):
                os.remove(os.path.join(out, name))


def export(checkpoint: str, fmt: str, out: str, which: str = "teacher", force: bool = False,
           check: bool = True) -> dict:
    """Write the backbone of `checkpoint` to the folder `out` in format `fmt` (hf | timm | safetensors).
    Returns a report: the files written, the backbone description, the check line (hf)."""
    if fmt not in FORMATS:
        raise EvalError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    check_out_dir(out, force)
    model = load_backbone(checkpoint, which, device="cpu")
    return export_backbone(model, fmt, out, force, check,
                           source={"checkpoint": os.path.abspath(checkpoint), "which": which})


def export_backbone(model, fmt: str, out: str, force: bool = False, check: bool = True,
                    source: dict | None = None) -> dict:
    """Write a backbone (a fastdino VisionTransformer or DINOv3VisionTransformer, on the CPU, eval
    mode: what load_backbone returns) to the folder `out` in format `fmt`; `source` goes into
    fastdino.json. Returns export()'s report."""
    if fmt not in FORMATS:
        raise EvalError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    check_out_dir(out, force)
    info = backbone_info(model)
    sd = model.state_dict()
    meta = {"format": fmt, **(source or {}), **info}
    if fmt == "hf":
        config = hf_config(info)
        tensors = hf_state_dict(sd, info)
        meta["hf_class"] = hf_class(info)
    elif fmt == "timm":
        config = timm_config(info)
        tensors = timm_state_dict(sd)
        meta["timm_architecture"] = config["architecture"]
    else:
        tensors, config = {k: _own(v) for k, v in sd.items()}, None

    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.tmp-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private: give the folder the usual permissions
    except OSError as e:
        raise EvalError(f"cannot write to '{parent}': {e.strerror or e}") from None
    try:
        weights = os.path.join(tmp, WEIGHTS_NAME)
        _save_safetensors(tensors, weights, {"fastdino_format": fmt, "arch": info["arch"]})
        _check_read_back(weights, tensors)
        if config is not None:
            _write_json(config, os.path.join(tmp, CONFIG_NAME))
        _write_json(meta, os.path.join(tmp, META_NAME))
        checked = None
        if fmt == "hf" and check:
            if importlib.util.find_spec("transformers") is None:
                checked = "not checked: transformers is not installed (pip install transformers)"
            else:
                checked = check_hf(tmp, model, info)
        files = sorted(os.listdir(tmp))
        for name in files:
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        _move_into_place(tmp, out)
    except OSError as e:
        raise EvalError(f"cannot write the export to '{out}': {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful move; leftovers after a failure
    return {"out": out, "format": fmt, "files": files, "checked": checked, **meta}


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2 (argparse prints the usage too)
        self.exit(2, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m fastdino.export", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="fastdino / DeepSpeed consolidated / official DINO checkpoint, or a backbone state dict")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="hf: transformers ViTModel / Dinov2Model / Dinov2WithRegistersModel / DINOv3ViTModel folder; "
                        "timm: timm VisionTransformer weights + config (DINO / DINOv2); safetensors: fastdino names")
    p.add_argument("--out", required=True, help="output folder (created; an earlier export there is replaced)")
    p.add_argument("--which", default="teacher", choices=("teacher", "student"),
                   help="network of a training checkpoint (the teacher is the one DINO evaluates)")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder that is not an earlier export")
    p.add_argument("--no_check", action="store_true",
                   help="hf: skip loading the export with transformers and comparing its features")
    return p


def main(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    rep = export(a.checkpoint, a.format, a.out, a.which, a.force, check=not a.no_check)
    print(f"exported the {a.which} backbone of '{a.checkpoint}' ({rep['arch']}/{rep['patch_size']}, "
          f"{rep['depth']} blocks, {rep['num_register_tokens']} registers, {rep['ffn']}) as {a.format} "
          f"to {a.out}: {', '.join(rep['files'])}")
    if rep["checked"]:
        print(rep["checked"])
    return rep


def cli(argv=None) -> None:
    """Entry point: bad input ends with one line (`fastdino: error: ...`) and exit status 2."""
    code = run_cli(main, argv)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    cli()
