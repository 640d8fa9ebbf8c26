"""Models: ViT backbones (official DINO / DINOv2 parameter names), the DINO head, the multi-crop wrapper.

    student = MultiCropWrapper(build_backbone(cfg.model, attn, teacher=False), DINOHead(...), packed=...)

ARCHS: DINO v1 builders (width and heads from ARCH_DIMS, depth from model.depth).
DINOV2_ARCHS: the official DINOv2 backbones (patch 14, img_size 518, official depths, LayerScale,
mask token; ViT-g with SwiGLU), each with `num_register_tokens` (0, or 4 for the "reg" models);
dinov2_vitt14 is a ViT-Ti width with the same options (no official weights: demos and tests).
DINOV3_ARCHS: the official DINOv3 backbones (patch 16, RoPE, 4 storage tokens, masked key bias;
fastdino/models/dinov3.py); dinov3_vitt16 a ViT-Ti width for demos and tests.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fastdino.models.attention import BACKENDS, AttentionBackendError, resolve_backend
from fastdino.models.compile import compile_modules
from fastdino.models.dinov3 import DINOV3_ARCHS, DINOV3_HUB, DINOv3VisionTransformer, SelfAttentionBlock
from fastdino.models.head import DINOHead, WeightNormLinear
from fastdino.models.multicrop import MultiCropWrapper
from fastdino.models.vision_transformer import (ARCH_DIMS, DINOV2_DEPTH, Block, Mlp, VisionTransformer, dinov2_vitb14,
                                               dinov2_vitg14, dinov2_vitl14, dinov2_vits14, dinov2_vitt14, vit_base,
                                               vit_giant2, vit_large, vit_small, vit_tiny)

ARCHS = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base, "vit_large": vit_large,
         "vit_giant2": vit_giant2}
DINOV2_ARCHS = {"dinov2_vitt14": dinov2_vitt14, "dinov2_vits14": dinov2_vits14, "dinov2_vitb14": dinov2_vitb14,
                "dinov2_vitl14": dinov2_vitl14, "dinov2_vitg14": dinov2_vitg14}
DINOV2_BASE = {"dinov2_vitt14": "vit_tiny", "dinov2_vits14": "vit_small", "dinov2_vitb14": "vit_base",
               "dinov2_vitl14": "vit_large", "dinov2_vitg14": "vit_giant2"}  # the width / heads of each (ARCH_DIMS)


def arch_spec(arch: str, depth: int = 0) -> dict:
    """embed_dim, num_heads, depth (model.depth, or the architecture's own when 0: 12 for vit_*,
    the official depth for dinov2_* / dinov3_*) and patch size (None: any of 8 / 16) of an architecture name."""
    if arch in DINOV3_ARCHS:
        dim, full_depth, heads = DINOV3_HUB[arch][:3]
        return {"embed_dim": dim, "num_heads": heads, "depth": depth or full_depth, "patch_size": 16}
    if arch in DINOV2_ARCHS:
        base = DINOV2_BASE[arch]
        return {"embed_dim": ARCH_DIMS[base][0], "num_heads": ARCH_DIMS[base][1],
                "depth": depth or DINOV2_DEPTH[base], "patch_size": 14}
    if arch in ARCHS:
        return {"embed_dim": ARCH_DIMS[arch][0], "num_heads": ARCH_DIMS[arch][1], "depth": depth or 12,
                "patch_size": None}
    raise ValueError(f"model.arch={arch!r}: unknown architecture (choose one of "
                     f"{list(ARCHS) + list(DINOV2_ARCHS) + list(DINOV3_ARCHS)})")


def extra_tokens(model_cfg) -> int:
    """Tokens besides [CLS] and the patches: DINOv3's storage tokens (its builders' n_storage_tokens),
    or model.num_register_tokens."""
    if model_cfg.arch in DINOV3_ARCHS:
        from fastdino.models.dinov3 import HUB_COMMON

        return HUB_COMMON["n_storage_tokens"]
    return model_cfg.num_register_tokens


# model.residual_dtype -> the backbone's residual_dtype (fastdino.models.vision_transformer.residual_stream)
RESIDUAL_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def build_backbone(model_cfg, teacher: bool, attn: str | None = None) -> VisionTransformer:
    """ViT from a fastdino.config.ModelConfig with the resolved attention backend `attn` (default:
    model_cfg.attn, resolved by the ViT). The teacher has no drop path; activation checkpointing only
    acts while gradients are recorded (never for the teacher). dinov2_* are the DINOv2 backbones
    (official names: LayerScale, mask token, model.num_register_tokens registers)."""
    spec = arch_spec(model_cfg.arch, model_cfg.depth)
    kwargs = dict(depth=spec["depth"], drop_path_rate=0.0 if teacher else model_cfg.drop_path_rate,
                  drop_path_uniform=model_cfg.drop_path_uniform, efficient_drop_path=model_cfg.efficient_drop_path,
                  attn=attn or model_cfg.attn, activation_checkpointing=model_cfg.activation_checkpointing and not teacher)
    if model_cfg.arch in DINOV3_ARCHS:  # RoPE, 4 storage tokens, masked key bias (fastdino/models/dinov3.py)
        rope = {f"pos_embed_rope_{k}_coords": (getattr(model_cfg, f"rope_{k}_coords", default) or None)
                for k, default in (("rescale", 2.0), ("jitter", 0.0), ("shift", 0.0))}  # 0: off (None)
        backbone = DINOV3_ARCHS[model_cfg.arch](
            depth=spec["depth"], drop_path_rate=kwargs["drop_path_rate"], attn=kwargs["attn"],
            activation_checkpointing=kwargs["activation_checkpointing"], **rope)
        if teacher:
            backbone.eval()  # official SSLMetaArch: teacher.eval(), no RoPE augmentation
    else:
        if model_cfg.arch in DINOV2_ARCHS:
            ffn = getattr(model_cfg, "ffn", "auto")
            if ffn != "auto":
                kwargs["ffn"] = ffn
            backbone = DINOV2_ARCHS[model_cfg.arch](num_register_tokens=model_cfg.num_register_tokens, **kwargs)
        else:
            backbone = ARCHS[model_cfg.arch](patch_size=model_cfg.patch_size, **kwargs)
        if getattr(model_cfg, "fused_residual_norm", False):  # the ViT blocks' chain (not the DINOv3 blocks)
            set_residual_norm(backbone, "auto")
    if getattr(model_cfg, "fused_bias_gelu", False):
        set_bias_gelu(backbone, "auto")
    backbone.residual_dtype = RESIDUAL_DTYPES[getattr(model_cfg, "residual_dtype", "fp32")]
    return backbone


def set_residual_norm(backbone: nn.Module, impl: str | None) -> nn.Module:
    """model.fused_residual_norm: every residual add (drop path, LayerScale) and the LayerNorm that
    follows it as one op (kernels/residual_layer_norm.py): each block's attention residual + norm2, and
    its MLP residual + the next block's norm1 (the last block's output goes to the final norm as
    before); impl "auto" (Triton on CUDA, the torch reference elsewhere), "triton" or "torch"; None:
    the unfused modules. Efficient drop path keeps the unfused path (the op needs every row)."""
    for blk in backbone.blocks:
        blk.residual_norm_impl = impl
    return backbone


def set_bias_gelu(backbone: nn.Module, impl: str | None) -> nn.Module:
    """model.fused_bias_gelu: every MLP's fc1 bias and GELU as one op (kernels/bias_gelu.py) after a bias-free
    matmul; impl "auto" (Triton on CUDA, the torch reference elsewhere), "triton" or "torch"; None: the
    unfused modules. SwiGLU FFNs have no GELU: they stay as they are."""
    for module in backbone.modules():
        if isinstance(module, Mlp):
            module.bias_gelu_impl = impl
    return backbone


def compile_blocks(model: nn.Module, **options) -> nn.Module:
    """model.compile: every transformer block and DINO head inside `model` (a ViT, a MultiCropWrapper
    or anything holding them) gets a torch.compile'd forward, one static graph per token layout
    (fastdino/models/compile.py). Returns model."""
    if not compile_modules(model, (Block, SelfAttentionBlock, DINOHead), **options):
        raise ValueError(f"compile_blocks: no transformer block or DINO head inside {type(model).__name__}")
    return model


__all__ = ["arch_spec", "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2", "dinov2_vitt14", "dinov2_vits14", "dinov2_vitb14",
           "dinov2_vitl14", "dinov2_vitg14", "DINOV2_ARCHS", "VisionTransformer", "DINOHead", "WeightNormLinear",
           "MultiCropWrapper", "build_backbone", "extra_tokens", "compile_blocks", "set_residual_norm", "set_bias_gelu", "resolve_backend", "BACKENDS",
           "AttentionBackendError", "ARCHS", "ARCH_DIMS", "DINOV3_ARCHS", "DINOv3VisionTransformer"]
