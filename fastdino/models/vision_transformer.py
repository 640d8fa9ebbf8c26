"""Vision Transformer as in official DINO (pre-norm blocks, qkv bias, LayerNorm eps 1e-6, stochastic
depth, learnable [CLS] and position embeddings bicubically interpolated to other resolutions).

Parameter names follow the standard ViT state dict (cls_token, pos_embed, patch_embed.proj.*,
blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm.*; head.* only when
num_classes > 0), so official DINO backbones and timm ViT checkpoints load with strict=True.

Speed-ups over the official module, all exact:
- attention through fused kernels (fastdino.models.attention): no (seq x seq) matrix is stored;
  get_last_selfattention keeps an explicit-softmax path for visualization;
- forward_packed: crops of several resolutions run through each block together, as one (T, dim)
  token matrix (one LayerNorm / qkv / proj / MLP matmul per block), attention kept within each crop;
- per-block activation checkpointing; the drop-path masks are drawn before the blocks run, so
  packing and recomputation see the same masks.

Drop path (stochastic depth): each block has two residual branches (attention, MLP); for a backbone
call on a batch of `rows` sequences, one Bernoulli(1 - p_i) draw of shape (depth, 2, rows) decides
which sequences keep which branch (kept branches are scaled by 1 / (1 - p_i)). forward_packed makes
the same draw per resolution group, in group order, so it uses exactly the masks that separate
backbone calls per group (the official MultiCropWrapper) would use with the same RNG state.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fastdino.models.attention import (attention_weights_ref, cu_seqlens_for, packed_attention,
                                       resolve_backend)


def drop_path_scales(rows: int, keep: torch.Tensor, generator=None) -> torch.Tensor:
    """Per-sequence residual scales (depth, 2, rows), fp32: 0 (branch dropped) or 1/keep_i (kept).

    keep: (depth,) keep probability 1 - p_i of each block, on the device (no host copy per call: the
    draw is CUDA-graph capturable). One draw per backbone call per resolution group."""
    keep = keep.view(-1, 1, 1)
    u = torch.rand(keep.shape[0], 2, rows, device=keep.device, generator=generator)
    return (u < keep).float() / keep


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, H/p * W/p, dim) by a stride-p convolution."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention. x: (B, N, dim) dense, or (T, dim) packed with `groups`."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, groups=None, cu_seqlens=None, max_seqlen: int = 0) -> torch.Tensor:
        shape = x.shape
        if groups is None:  # dense (B, N, dim): one group of B sequences
            groups = ((shape[0], shape[1]),)
        qkv = self.qkv(x).reshape(-1, 3 * shape[-1])
        out = packed_attention(qkv, groups, self.num_heads, self.backend, cu_seqlens, max_seqlen)
        return self.proj(out.view(shape))

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Explicit softmax(q k^T * scale) for x (B, N, dim): (B, heads, N, N), fp32. Visualization only."""
        B, N, C = x.shape
        q, k, _ = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return attention_weights_ref(q, k, self.scale)


class Block(nn.Module):
    """Pre-norm transformer block: x + drop_path(attn(norm1 x)), then x + drop_path(mlp(norm2 x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 backend: str = "sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, backend)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, drop_scale: torch.Tensor | None = None, groups=None,
                cu_seqlens=None, max_seqlen: int = 0) -> torch.Tensor:
        """drop_scale: None (no drop path) or fp32 residual scales (2, ...) broadcastable to x per sequence."""
        y = self.attn(self.norm1(x), groups, cu_seqlens, max_seqlen)
        x = x + (y if drop_scale is None else y * drop_scale[0])
        y = self.mlp(self.norm2(x))
        return x + (y if drop_scale is None else y * drop_scale[1])


class VisionTransformer(nn.Module):
    """ViT backbone; forward(x) returns the [CLS] token after the final norm, (B, embed_dim)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 0,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path_rate: float = 0.0, attn: str = "auto",
                 activation_checkpointing: bool = False, **kwargs):
        super().__init__()
        if isinstance(img_size, (list, tuple)):  # official DINO passes img_size=[224]
            img_size = img_size[0]
        if kwargs:
            raise ValueError(f"VisionTransformer: unsupported arguments {sorted(kwargs)}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"VisionTransformer: drop_path_rate must be in [0, 1), got {drop_path_rate}")
        # global-crop attention shape: what `auto` times on CUDA
        self._attn_shape = ((img_size // patch_size) ** 2 + 1, num_heads, embed_dim // num_heads)
        self.attn_backend = resolve_backend(attn, shape=self._attn_shape)  # one-line error if unavailable
        self.num_features = self.embed_dim = embed_dim
        self.depth, self.num_heads, self.patch_size = depth, num_heads, patch_size
        self.activation_checkpointing = activation_checkpointing
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        # stochastic depth rule as official: linear from 0 (first block) to drop_path_rate (last)
        self.dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # as official
        self.drop_path_rate = drop_path_rate
        # made once per device, not per call (no host-to-device copy in the step; not a buffer, so a
        # bf16 cast of the module, as DeepSpeed does, cannot round the probabilities)
        self._drop_keep: dict = {}  # device -> (depth,) fp32 keep probabilities 1 - p_i
        self._cu_seqlens: dict = {}  # packed flash-attn: cu_seqlens per token layout
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias, self.attn_backend) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:  # as official DINO; the patch conv keeps torch's default
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- tokens ---------------------------------------------------------------------------------
    def interpolate_pos_encoding(self, x: torch.Tensor, w: int, h: int) -> torch.Tensor:
        """Position embedding for an image of height w and width h (official naming) with x the
        (B, 1 + npatch, dim) tokens: bicubic resize of the learned grid, as official DINO (including
        its +0.1 on the target size and scale_factor-based sampling, so outputs match it)."""
        npatch, n = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if npatch == n and w == h:
            return self.pos_embed
        side = int(math.sqrt(n))
        dim = x.shape[-1]
        w0, h0 = w // self.patch_size + 0.1, h // self.patch_size + 0.1
        grid = self.pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=(w0 / side, h0 / side), mode="bicubic")
        if grid.shape[-2] != int(w0) or grid.shape[-1] != int(h0):
            raise ValueError(f"interpolate_pos_encoding: got a {tuple(grid.shape[-2:])} grid for a {w}x{h} image")
        return torch.cat((self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + H/p * W/p, dim): [CLS] + patch tokens + position embedding."""
        if x.dim() != 4:
            raise ValueError(f"VisionTransformer: expected images (B, C, H, W), got shape {tuple(x.shape)}")
        B, _, w, h = x.shape
        if w % self.patch_size or h % self.patch_size:
            raise ValueError(f"VisionTransformer: image size {w}x{h} is not a multiple of patch {self.patch_size}")
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        return x + self.interpolate_pos_encoding(x, w, h)

    # ---- blocks ---------------------------------------------------------------------------------
    def _drop_scales(self, rows: int, device) -> torch.Tensor | None:
        if not self.training or self.drop_path_rate == 0.0:
            return None
        if device not in self._drop_keep:
            self._drop_keep[device] = torch.tensor([1.0 - p for p in self.dpr], dtype=torch.float32).to(device)
        return drop_path_scales(rows, self._drop_keep[device])

    def _run_blocks(self, x, scales, groups=None, cu_seqlens=None, max_seqlen: int = 0):
        ckpt = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, blk in enumerate(self.blocks):
            s = None if scales is None else scales[i]
            if ckpt:
                # no RNG inside a block (drop-path masks are inputs): skip saving/restoring RNG state
                x = checkpoint(blk, x, s, groups, cu_seqlens, max_seqlen, use_reentrant=False,
                               preserve_rng_state=False)
            else:
                x = blk(x, s, groups, cu_seqlens, max_seqlen)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the last block and the final norm, (B, 1 + npatch, dim)."""
        tokens = self.prepare_tokens(x)
        scales = self._drop_scales(tokens.shape[0], tokens.device)
        if scales is not None:
            scales = scales[..., None, None]  # (depth, 2, B, 1, 1) against (B, N, dim)
        return self.norm(self._run_blocks(tokens, scales))

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """x: images (B, C, H, W) -> [CLS] features (B, dim); or a list of resolution groups -> the
        packed pass (forward_packed). Going through __call__ keeps module hooks working (ZeRO-3
        gathers cls_token / pos_embed in this module's pre-forward hook)."""
        if isinstance(x, (list, tuple)):
            return self.forward_packed(x)
        tokens = self.prepare_tokens(x)
        scales = self._drop_scales(tokens.shape[0], tokens.device)
        if scales is not None:
            scales = scales[..., None, None]
        x = self._run_blocks(tokens, scales)
        return self.head(self.norm(x[:, 0]))  # LayerNorm is per token: norm the [CLS] rows only

    def forward_packed(self, images: list[torch.Tensor]) -> torch.Tensor:
        """[CLS] features of several resolution groups in one pass: images[g] is (rows_g, C, H_g, W_g);
        returns (sum rows_g, dim) in group order, equal to torch.cat([self(x) for x in images]).

        All tokens are concatenated to one (T, dim) matrix, so LayerNorm, qkv, proj and the MLP run
        as single matmuls; attention runs per sequence (varlen flash-attn, or one SDPA call per group).
        """
        tokens, groups, scales = [], [], []
        for x in images:
            t = self.prepare_tokens(x)
            rows, seq, dim = t.shape
            tokens.append(t.reshape(rows * seq, dim))
            groups.append((rows, seq))
            s = self._drop_scales(rows, t.device)  # same draw, same order as separate backbone calls
            if s is not None:
                scales.append(s[..., None].expand(-1, -1, rows, seq).reshape(self.depth, 2, rows * seq, 1))
        groups = tuple(groups)
        x = tokens[0] if len(tokens) == 1 else torch.cat(tokens)
        scales = (scales[0] if len(scales) == 1 else torch.cat(scales, dim=2)) if scales else None
        cu_seqlens, max_seqlen = None, 0
        if self.attn_backend == "flash_attn" and len(groups) > 1:
            key = (groups, x.device)
            if key not in self._cu_seqlens:  # once per layout: no host-to-device copy in the step
                self._cu_seqlens[key] = cu_seqlens_for(groups, x.device)
            cu_seqlens, max_seqlen = self._cu_seqlens[key]
        x = self._run_blocks(x, scales, groups, cu_seqlens, max_seqlen)
        cls, start = [], 0
        for rows, seq in groups:  # [CLS] is the first token of every sequence
            cls.append(x[start:start + rows * seq].view(rows, seq, -1)[:, 0])
            start += rows * seq
        return self.head(self.norm(torch.cat(cls) if len(cls) > 1 else cls[0]))

    # ---- evaluation / visualization (official API) --------------------------------------------
    @torch.no_grad()
    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights of the last block, (B, heads, N+1, N+1), by an explicit fp32 softmax."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1].attn.attention_weights(self.blocks[-1].norm1(x))

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Outputs of the last n blocks, each after the final norm, (B, N+1, dim) each (official)."""
        x = self.prepare_tokens(x)
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if len(self.blocks) - i <= n:
                out.append(self.norm(x))
        return out


# width (embed_dim) and heads of each architecture; depth 12 and mlp_ratio 4 for all three
ARCH_DIMS = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}


def _vit(arch: str, patch_size: int, depth: int, **kwargs) -> VisionTransformer:
    dim, heads = ARCH_DIMS[arch]
    return VisionTransformer(patch_size=patch_size, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=4, **kwargs)


def vit_tiny(patch_size: int = 16, depth: int = 12, **kwargs) -> VisionTransformer:
    return _vit("vit_tiny", patch_size, depth, **kwargs)


def vit_small(patch_size: int = 16, depth: int = 12, **kwargs) -> VisionTransformer:
    return _vit("vit_small", patch_size, depth, **kwargs)


def vit_base(patch_size: int = 16, depth: int = 12, **kwargs) -> VisionTransformer:
    return _vit("vit_base", patch_size, depth, **kwargs)


# ------------------------------------------------------------------------------------------------
# Reference: the official block math written out with an explicit fp32 softmax (tests, benchmarks)
# ------------------------------------------------------------------------------------------------
def vit_forward_ref(model: VisionTransformer, x: torch.Tensor, drop_scales: torch.Tensor | None = None) -> torch.Tensor:
    """All tokens after the final norm, (B, N+1, dim), computed block by block from model's weights:
    x += s_attn * proj(softmax(q k^T / sqrt(hd)) v),  x += s_mlp * fc2(gelu(fc1(norm2 x))).
    drop_scales: optional (depth, 2, B) residual scales (see drop_path_scales)."""
    x = model.prepare_tokens(x)
    B, N, C = x.shape
    H = model.num_heads
    for i, blk in enumerate(model.blocks):
        h = F.layer_norm(x, (C,), blk.norm1.weight, blk.norm1.bias, 1e-6)
        q, k, v = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias).view(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        a = torch.softmax((q.float() @ k.float().transpose(-2, -1)) * (C // H) ** -0.5, dim=-1)
        y = F.linear((a @ v.float()).to(x.dtype).transpose(1, 2).reshape(B, N, C), blk.attn.proj.weight, blk.attn.proj.bias)
        x = x + (y if drop_scales is None else y * drop_scales[i, 0].view(B, 1, 1))
        h = F.layer_norm(x, (C,), blk.norm2.weight, blk.norm2.bias, 1e-6)
        y = F.linear(F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
        x = x + (y if drop_scales is None else y * drop_scales[i, 1].view(B, 1, 1))
    return F.layer_norm(x, (C,), model.norm.weight, model.norm.bias, 1e-6)
