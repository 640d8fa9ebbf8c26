"""Models: ViT backbones (official DINO parameter names), the DINO head, the multi-crop wrapper.

    student = MultiCropWrapper(build_backbone(cfg.model, attn, teacher=False), DINOHead(...), packed=...)
"""
from __future__ import annotations

import torch.nn as nn

from fastdino.models.attention import BACKENDS, AttentionBackendError, resolve_backend
from fastdino.models.compile import compile_modules
from fastdino.models.head import DINOHead, WeightNormLinear
from fastdino.models.multicrop import MultiCropWrapper
from fastdino.models.vision_transformer import ARCH_DIMS, Block, VisionTransformer, vit_base, vit_small, vit_tiny

ARCHS = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base}


def build_backbone(model_cfg, teacher: bool, attn: str | None = None) -> VisionTransformer:
    """ViT from a fastdino.config.ModelConfig with the resolved attention backend `attn` (default:
    model_cfg.attn, resolved by the ViT). The teacher has no drop path; activation checkpointing only
    acts while gradients are recorded (never for the teacher)."""
    if model_cfg.arch not in ARCHS:
        raise ValueError(f"model.arch={model_cfg.arch!r}: unknown architecture (choose one of {list(ARCHS)})")
    return ARCHS[model_cfg.arch](
        patch_size=model_cfg.patch_size,
        depth=model_cfg.depth,
        drop_path_rate=0.0 if teacher else model_cfg.drop_path_rate,
        attn=attn or model_cfg.attn,
        activation_checkpointing=model_cfg.activation_checkpointing and not teacher,
    )


def compile_blocks(model: nn.Module, **options) -> nn.Module:
    """model.compile: every transformer block and DINO head inside `model` (a ViT, a MultiCropWrapper
    or anything holding them) gets a torch.compile'd forward, one static graph per token layout
    (fastdino/models/compile.py). Returns model."""
    if not compile_modules(model, (Block, DINOHead), **options):
        raise ValueError(f"compile_blocks: no transformer block or DINO head inside {type(model).__name__}")
    return model


__all__ = ["vit_tiny", "vit_small", "vit_base", "VisionTransformer", "DINOHead", "WeightNormLinear",
           "MultiCropWrapper", "build_backbone", "compile_blocks", "resolve_backend", "BACKENDS",
           "AttentionBackendError", "ARCHS", "ARCH_DIMS"]
