"""MultiCropWrapper: backbone over a list of crops, head once over the concatenated [CLS] features.

    crops: list of (B, 3, H_c, W_c), crop-major (2 global, then N local)  ->  (len(crops)*B, K)

Consecutive crops of the same resolution form a group (official DINO): unpacked, the backbone runs
once per group on the concatenated crops; packed (model.packed_multicrop), all groups run through
each block together as one token matrix (VisionTransformer.forward_packed). Both give the same
outputs, drop path included (same RNG draws, see vision_transformer.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn


def resolution_groups(crops: list[torch.Tensor]) -> list[torch.Tensor]:
    """Concatenate consecutive crops of equal (H, W): [(n_g*B, 3, H_g, W_g), ...] in crop order."""
    if isinstance(crops, torch.Tensor):
        crops = [crops]
    if len(crops) == 0:
        raise ValueError("MultiCropWrapper: got an empty list of crops")
    groups, start = [], 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
            groups.append(crops[start] if i - start == 1 else torch.cat(crops[start:i]))
            start = i
    return groups


class MultiCropWrapper(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module, packed: bool = False, keep_features: bool = False):
        super().__init__()
        self.keep_features = keep_features  # also return the global crops' backbone [CLS] (KoLeo)
        if packed and not hasattr(backbone, "forward_packed"):
            raise ValueError(f"MultiCropWrapper: packed=True needs a backbone with forward_packed, "
                             f"got {type(backbone).__name__}")
        if hasattr(backbone, "fc"):  # official: a classification backbone loses its classifier
            backbone.fc = nn.Identity()
        self.backbone = backbone
        self.head = head
        self.packed = packed

    def forward_features(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """Backbone [CLS] features of all crops in crop order, (n_crops*B, embed_dim)."""
        groups = resolution_groups(crops)
        if self.packed:  # through __call__ (hooks: DeepSpeed ZeRO-3 parameter gathering)
            return self.backbone(groups)
        feats = [self.backbone(g) for g in groups]
        return feats[0] if len(feats) == 1 else torch.cat(feats)

    def forward(self, crops: list[torch.Tensor]):
        """Head output of all crops in crop order, (n_crops*B, K) (the head's bottleneck features
        when its last layer is fused into the loss). With keep_features: {"cls": that,
        "cls_features": the backbone [CLS] features of the first two (global) crops, (2B, D)}."""
        feats = self.forward_features(crops)
        out = self.head(feats)
        if not self.keep_features:
            return out
        return {"cls": out, "cls_features": feats[:2 * crops[0].shape[0]]}  # crops: a crop-major list
