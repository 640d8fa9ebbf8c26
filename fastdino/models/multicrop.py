"""MultiCropWrapper: backbone over a list of crops, head once over the concatenated [CLS] features.

    crops: list of (B, 3, H_c, W_c), crop-major (2 global, then N local)  ->  (len(crops)*B, K)

Consecutive crops of the same resolution form a group (official DINO): unpacked, the backbone runs
once per group on the concatenated crops; packed (model.packed_multicrop), all groups run through
each block together as one token matrix (VisionTransformer.forward_packed). Both give the same
outputs, drop path included (same RNG draws, see vision_transformer.py).

iBOT (DINOv2 recipe): forward(crops, masks) also returns the head outputs of the global crops'
masked patch tokens, static-shaped: masks.mask_indices (U,) pick rows of the global crops' patch
tokens (2B*H*W, D) (padding rows pick token 0 and carry weight 0 in the loss), the iBOT head (its own,
or the DINO head when shared) maps them to (U, K_ibot). The student replaces the masked patch
embeddings by the mask token first (mask_input=True, masks.masks (2B, H*W) bool); the teacher sees
its crops unmasked and only gathers (mask_input=False), as the official SSLMetaArch.
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
    def __init__(self, backbone: nn.Module, head: nn.Module, packed: bool = False, keep_features: bool = False,
                 ibot_head: nn.Module | None = None, keep_patch_tokens: bool = False):
        super().__init__()
        self.keep_features = keep_features  # also return the global crops' backbone [CLS] (KoLeo)
        self.keep_patch_tokens = keep_patch_tokens  # also return the global crops' normed patch tokens (Gram)
        if packed and not hasattr(backbone, "forward_packed"):
            raise ValueError(f"MultiCropWrapper: packed=True needs a backbone with forward_packed, "
                             f"got {type(backbone).__name__}")
        if hasattr(backbone, "fc"):  # official: a classification backbone loses its classifier
            backbone.fc = nn.Identity()
        self.backbone = backbone
        self.head = head
        if ibot_head is not None:  # a separate iBOT head (official name); None: iBOT shares `head`
            self.ibot_head = ibot_head
        self.packed = packed

    def forward_features(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """Backbone [CLS] features of all crops in crop order, (n_crops*B, embed_dim)."""
        groups = resolution_groups(crops)
        if self.packed:  # through __call__ (hooks: DeepSpeed ZeRO-3 parameter gathering)
            return self.backbone(groups)
        feats = [self.backbone(g) for g in groups]
        return feats[0] if len(feats) == 1 else torch.cat(feats)

    def _tokens(self, crops: list[torch.Tensor], masks, mask_input: bool):
        """([CLS] features of all crops (n_crops*B, D), the first resolution group's patch tokens
        (2B, H*W, D)): the backbone's dict outputs (is_training=True, through __call__), the global
        group masked when masks are given and mask_input."""
        groups = resolution_groups(crops)
        if masks is not None and groups[0].shape[0] != masks.masks.shape[0]:
            raise ValueError(f"MultiCropWrapper: the first resolution group has {groups[0].shape[0]} rows but the "
                             f"masks are for {masks.masks.shape[0]} global crops (are the 2 global crops first?)")
        group_masks = [masks.masks if masks is not None and mask_input else None] + [None] * (len(groups) - 1)
        if self.packed:
            outs = self.backbone(groups, group_masks, is_training=True)
        else:
            outs = [self.backbone(g, m, is_training=True) for g, m in zip(groups, group_masks)]
        cls = [o["x_norm_clstoken"] for o in outs]
        return (cls[0] if len(cls) == 1 else torch.cat(cls)), outs[0]["x_norm_patchtokens"]

    def forward(self, crops: list[torch.Tensor], masks=None, mask_input: bool = True):
        """Head output of all crops in crop order, (n_crops*B, K) (the head's bottleneck features
        when its last layer is fused into the loss). With keep_features or masks, a dict: "cls" that,
        "cls_features" the backbone [CLS] features of the first two (global) crops (2B, D) (with
        keep_features), "patch_tokens" their normed patch tokens (2B, P, D) (with keep_patch_tokens;
        masked as the student sees them), "patch" the iBOT head outputs of the masked global patch tokens (U, K_ibot)
        (with masks: a fastdino.data.masking.MaskBatch; see the module docstring)."""
        if masks is None and not self.keep_patch_tokens:
            feats, patches = self.forward_features(crops), None
        else:
            feats, patches = self._tokens(crops, masks, mask_input)
        out = self.head(feats)
        if not self.keep_features and not self.keep_patch_tokens and masks is None:
            return out
        result = {"cls": out}
        if self.keep_features:
            result["cls_features"] = feats[:2 * crops[0].shape[0]]  # crops: a crop-major list
        if self.keep_patch_tokens:
            result["patch_tokens"] = patches[:2 * crops[0].shape[0]]
        if masks is not None:
            selected = patches.flatten(0, 1).index_select(0, masks.mask_indices)
            result["patch"] = getattr(self, "ibot_head", self.head)(selected)
        return result
