"""Models: ViT backbones (official DINO parameter names), the DINO head, the multi-crop wrapper.

    student = MultiCropWrapper(build_backbone(cfg.model, teacher=False), DINOHead(...), packed=cfg.model.packed_multicrop)
"""
from __future__ import annotations

import torch.nn as nn

from fastdino.models.attention import BACKENDS, AttentionBackendError, resolve_backend
from fastdino.models.head import DINOHead, WeightNormLinear
from fastdino.models.multicrop import MultiCropWrapper
from fastdino.models.vision_transformer import VisionTransformer, vit_base, vit_small, vit_tiny

ARCHS = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base}


def build_backbone(model_cfg, teacher: bool) -> VisionTransformer:
    """ViT from a fastdino.config.ModelConfig. The teacher has no drop path and the same attention
    backend; activation checkpointing only acts while gradients are recorded (never for the teacher)."""
    if model_cfg.arch not in ARCHS:
        raise ValueError(f"model.arch={model_cfg.arch!r}: unknown architecture (choose one of {list(ARCHS)})")
    return ARCHS[model_cfg.arch](
        patch_size=model_cfg.patch_size,
        depth=model_cfg.depth,
        drop_path_rate=0.0 if teacher else model_cfg.drop_path_rate,
        attn=model_cfg.attn,
        activation_checkpointing=model_cfg.activation_checkpointing and not teacher,
    )


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """torch.compile each transformer block in place (model.compile). Works on a VisionTransformer
    or anything holding one (MultiCropWrapper): the block is the unit that repeats, so one graph is
    compiled per token layout and reused by all 12 blocks. Returns model."""
    blocks = [m for m in model.modules() if isinstance(m, VisionTransformer)]
    if not blocks:
        raise ValueError(f"compile_blocks: no VisionTransformer inside {type(model).__name__}")
    for vit in blocks:
        for blk in vit.blocks:
            blk.compile(**compile_kwargs)
    return model


__all__ = ["vit_tiny", "vit_small", "vit_base", "VisionTransformer", "DINOHead", "WeightNormLinear",
           "MultiCropWrapper", "build_backbone", "compile_blocks", "resolve_backend", "BACKENDS",
           "AttentionBackendError", "ARCHS"]
