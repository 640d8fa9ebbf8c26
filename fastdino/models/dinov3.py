"""The DINOv3 ViT backbone: axial 2D RoPE instead of a position embedding, storage tokens, a masked key bias.

Module, parameter and buffer names follow the official DinoVisionTransformer (dinov3/models/
vision_transformer.py, dinov3/layers/*), so the official hub backbones (dinov3_vits16, vitb16, vitl16,
the "plus" models, vit7b16) load with strict=True:

    cls_token (1, 1, D)   storage_tokens (1, R, D)   mask_token (1, D)   rope_embed.periods (D_head/4,)
    patch_embed.proj.{weight, bias}                   a stride-p conv, (D, 3, p, p)
    blocks.i.norm1, blocks.i.attn.qkv.{weight, bias, bias_mask}, blocks.i.attn.proj, blocks.i.ls1.gamma,
    blocks.i.norm2, blocks.i.mlp.{fc1, fc2} (MLP) or blocks.i.mlp.{w1, w2, w3} (SwiGLU), blocks.i.ls2.gamma
    norm; cls_norm (untie_cls_and_patch_norms); local_cls_norm (untie_global_and_local_cls_norm)

Token layout of every sequence: [CLS] at 0, the R storage (register) tokens at 1..R, the H*W patch
tokens (row-major grid) from 1 + R on. No position embedding is added to any token.

RoPE (RopePositionEmbedding). Patch (i, j) of an H x W grid has coordinates
    y = 2 (i + 1/2) / n_h - 1,   x = 2 (j + 1/2) / n_w - 1
with (n_h, n_w) = (H, W) for normalize_coords="separate" (the hub's: both in [-1, 1]), (max(H, W),) * 2
for "max" (the shorter side spans less than [-1, 1]), (min(H, W),) * 2 for "min" (the longer side
spans more). In training only, the coordinates are augmented, in this order:
    shift_coords s      (y, x) += (u_y, u_x),            u ~ U[-s, s] per axis
    jitter_coords j     (y, x) *= (exp(v_y), exp(v_x)),  v ~ U[-log j, log j] per axis
    rescale_coords r    (y, x) *= exp(w),                w ~ U[-log r, log r], one for both axes
one draw per call (shared by all images of the call) from the default generator of the periods'
device (or `generator`); the backbone calls it once per block per resolution group, as official, so
every block sees its own augmentation. Periods: p_m = base^(4m / D_head), m = 0..D_head/4 - 1, or
with min_period/max_period p_m = min_period * (max_period/min_period)^(m / (D_head/4 - 1)).
For head dim D_head = d, angle a (0 <= a < d/2) is
    theta_a = 2 pi y / p_a  (a < d/4),     theta_a = 2 pi x / p_(a - d/4)  (a >= d/4)
and the features a and a + d/2 of q and k (each head) rotate by theta_a:
    q'_a = q_a cos theta_a - q_(a+d/2) sin theta_a,   q'_(a+d/2) = q_(a+d/2) cos theta_a + q_a sin theta_a
so q'.k' depends on the coordinates only through their difference. [CLS] and the storage tokens are
not rotated (the rotation applies to the last H*W tokens of each sequence). The rotation runs in the
RoPE dtype (pos_embed_rope_dtype: fp32 for the hub models; the official class default and training
config default is bf16), q and k cast to it and back.

Masked key bias (mask_k_bias, LinearKMaskedBias): qkv(x) = x W^T + b * bias_mask, bias_mask a
persistent buffer of 3D entries, 1 on the q and v thirds and 0 on the k third: the key bias never
acts and gets zero gradient. (Without RoPE a key bias adds a per-query constant to the logits, which
softmax ignores; with RoPE it would rotate into position-dependent logits.) The official module fills
the buffer with NaN until init_weights() sets it; here it is set at construction, and a loaded state
dict overwrites it.

Blocks (SelfAttentionBlock): x += ls1(attn(norm1 x)); x += ls2(mlp(norm2 x)), attention
softmax(q' k'^T / sqrt(D_head)) v through fastdino.models.attention.packed_attention (torch SDPA or
flash-attn: model.attn). Norms: "layernorm" (eps 1e-6), "layernormbf16" (eps 1e-5: the hub models'),
"rmsnorm" (eps 1e-5, computed in fp32). FFN: "mlp" fc2(gelu(fc1 x)), hidden int(D * ffn_ratio);
"swiglu" w3(silu(w1 x) * w2 x), hidden h = int(int(D * ffn_ratio) * 2/3) rounded up to a multiple of
8 ("swiglu32" / "swiglu64" / "swiglu128": of 32 / 64 / 128).

Drop path (training, drop_path_rate p > 0), as official: the same rate p in every block; each branch
of block i runs on a uniformly random subset of k = max(int(rows * (1 - p)), 1) sequences of each
resolution group (torch.randperm(rows)[:k]) and is added back with index_add scaled by rows / k.
The draws, on the default generator of the tokens' device, are made in the official order: for each
block, the RoPE augmentations of every group, then the attention subsets of every group, then the
FFN subsets of every group. They are made before the block runs, so activation checkpointing
recomputes with the same subsets and coordinates.

Several resolution groups (a list of image batches: the global crops, then the local crops) run
through each block together, as official: one norm / qkv / proj / FFN matmul over all tokens,
attention within each sequence. The official list forward treats list entry 1 as the local crops:
with untie_global_and_local_cls_norm, in training, its [CLS] and storage tokens use local_cls_norm.

forward_features(x, masks=None) returns (a list of, for a list input) the dict
    x_norm_clstoken (B, D), x_norm_regtokens (B, R, D) (also as x_storage_tokens, the official key),
    x_norm_patchtokens (B, H*W, D), x_prenorm (B, 1+R+H*W, D) (after the last block), masks
with [CLS] and storage tokens normed by cls_norm (untied), local_cls_norm (untied, list entry 1,
training) or norm, the patch tokens by norm. forward(x) returns x_norm_clstoken; a list input
returns the [CLS] features of every group concatenated (forward_packed).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fastdino.models.attention import attention_weights_ref, packed_attention, resolve_backend, varlen_args
from fastdino.models.vision_transformer import LayerScale, Mlp, PatchEmbed, residual_stream

NORMS = ("layernorm", "layernormbf16", "rmsnorm")
FFN_ALIGN = {"mlp": None, "swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}
NORMALIZE_COORDS = ("min", "max", "separate")
ROPE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------
# RoPE
# ------------------------------------------------------------------------------------------------
def rope_rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x_0..x_{d/2-1}, x_{d/2}..x_{d-1}) -> (-x_{d/2}..-x_{d-1}, x_0..x_{d/2-1}) on the last dim."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rope_apply(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin: features a and a + d/2 rotated by theta_a, with
    sin / cos (..., d) = sin / cos of (theta_0..theta_{d/2-1}) repeated twice."""
    return x * cos + rope_rotate_half(x) * sin


class RopePositionEmbedding(nn.Module):
    """Axial 2D RoPE without learned weights: forward(H=, W=) -> (sin, cos), each (H*W, D_head), in
    `dtype`. Either `base` or both `min_period` and `max_period` (see the module docstring). The
    periods are a persistent buffer (official: the teacher loads the student's state dict)."""

    def __init__(self, embed_dim: int, num_heads: int, base: float | None = 100.0, min_period: float | None = None,
                 max_period: float | None = None, normalize_coords: str = "separate",
                 shift_coords: float | None = None, jitter_coords: float | None = None,
                 rescale_coords: float | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if embed_dim % (4 * num_heads):
            raise ValueError(f"RopePositionEmbedding: embed_dim {embed_dim} must be a multiple of 4 * num_heads "
                             f"= {4 * num_heads} (two axes, sin and cos pairs per head)")
        both = min_period is not None and max_period is not None
        if (base is None) == (not both) or (min_period is None) != (max_period is None):
            raise ValueError(f"RopePositionEmbedding: give either base or both min_period and max_period, got "
                             f"base={base}, min_period={min_period}, max_period={max_period}")
        if normalize_coords not in NORMALIZE_COORDS:
            raise ValueError(f"RopePositionEmbedding: normalize_coords must be one of {list(NORMALIZE_COORDS)}, "
                             f"got {normalize_coords!r}")
        for name, v, low in (("shift_coords", shift_coords, 0.0), ("jitter_coords", jitter_coords, 1.0),
                             ("rescale_coords", rescale_coords, 1.0)):
            if v is not None and not (isinstance(v, (int, float)) and v >= low):
                raise ValueError(f"RopePositionEmbedding: {name} must be None or a number >= {low}, got {v!r}")
        self.D_head = embed_dim // num_heads
        self.base, self.min_period, self.max_period = base, min_period, max_period
        self.normalize_coords = normalize_coords
        self.shift_coords, self.jitter_coords, self.rescale_coords = shift_coords, jitter_coords, rescale_coords
        self.dtype = dtype  # of coordinates, angles, sin, cos (not the periods buffer's: a module cast changes that)
        self.register_buffer("periods", torch.empty(self.D_head // 4, dtype=dtype), persistent=True)
        self._init_weights()

    def _init_weights(self) -> None:
        n = self.D_head // 4
        dd = {"device": self.periods.device, "dtype": self.dtype}
        if self.base is not None:
            periods = self.base ** (2 * torch.arange(n, **dd) / (self.D_head // 2))
        else:
            ratio = self.max_period / self.min_period
            periods = ratio ** torch.linspace(0, 1, n, **dd) / ratio * self.max_period
        self.periods.data = periods

    @property
    def augmented(self) -> bool:
        """True when coordinates are random (training with shift, jitter or rescale set)."""
        return self.training and any(v is not None for v in (self.shift_coords, self.jitter_coords,
                                                             self.rescale_coords))

    def coords(self, H: int, W: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(H*W, 2) patch coordinates (y, x), row-major, in [-1, 1]; augmented in training."""
        dd = {"device": self.periods.device, "dtype": self.dtype}
        if self.normalize_coords == "separate":
            n_h, n_w = H, W
        else:
            n_h = n_w = max(H, W) if self.normalize_coords == "max" else min(H, W)
        ys = torch.arange(0.5, H, **dd) / n_h
        xs = torch.arange(0.5, W, **dd) / n_w
        coords = 2.0 * torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1) - 1.0
        if self.training:  # draws in the official order: shift (2), jitter (2), rescale (1)
            if self.shift_coords is not None:
                s = self.shift_coords
                coords = coords + torch.empty(2, **dd).uniform_(-s, s, generator=generator)
            if self.jitter_coords is not None:
                j = math.log(self.jitter_coords)
                coords = coords * torch.empty(2, **dd).uniform_(-j, j, generator=generator).exp()
            if self.rescale_coords is not None:
                r = math.log(self.rescale_coords)
                coords = coords * torch.empty(1, **dd).uniform_(-r, r, generator=generator).exp()
        return coords

    def sincos(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sin, cos), each (..., D_head), of coordinates (..., 2) = (y, x): angles 2 pi y / p_m for the
        first D_head/4 features of each half, 2 pi x / p_m for the next D_head/4, repeated for both halves."""
        angles = 2 * math.pi * coords.unsqueeze(-1) / self.periods  # (..., 2, D_head/4)
        angles = angles.flatten(-2)  # (..., D_head/2): y angles, then x angles
        angles = torch.cat((angles, angles), dim=-1)  # (..., D_head)
        return torch.sin(angles), torch.cos(angles)

    def forward(self, *, H: int, W: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sincos(self.coords(H, W, generator))


# ------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, the normalization in fp32 (official DINOv3 RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=1e-6)
    if kind == "layernormbf16":
        return nn.LayerNorm(dim, eps=1e-5)
    return RMSNorm(dim)


class SwiGLUFFN(nn.Module):
    """w3(silu(w1 x) * w2 x); `hidden` is int(dim * ffn_ratio), the SwiGLU width int(hidden * 2/3)
    rounded up to a multiple of align_to (official DINOv3 SwiGLUFFN: three separate Linears)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True, align_to: int = 8):
        super().__init__()
        d = int(hidden * 2 / 3)
        hidden = d + (-d % align_to)
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(dim, hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class LinearKMaskedBias(nn.Linear):
    """The qkv Linear with the key bias masked out: x W^T + b * bias_mask (module docstring).
    bias_mask: persistent buffer (3*dim,), 1 on the q and v thirds, 0 on the k third; none without bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        if out_features % 3:
            raise ValueError(f"LinearKMaskedBias: out_features {out_features} is not q | k | v (a multiple of 3)")
        if bias:
            self.register_buffer("bias_mask", torch.empty(out_features))
            self.reset_bias_mask()

    def reset_bias_mask(self) -> None:
        o = self.out_features
        with torch.no_grad():
            self.bias_mask.fill_(1)
            self.bias_mask[o // 3:2 * o // 3] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias * self.bias_mask.to(self.bias.dtype)
        return F.linear(x, self.weight, bias)


class SelfAttention(nn.Module):
    """Multi-head self-attention with RoPE on the patch tokens, over packed token rows: x (T, dim)
    holding the groups ((rows_g, seq_g), ...) in order, ropes[g] = (sin, cos) of group g, each (P_g, D_head),
    rotating the last P_g tokens of each of its sequences."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True,
                 mask_k_bias: bool = False, backend: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"SelfAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.backend = backend
        self.qkv = (LinearKMaskedBias if mask_k_bias else nn.Linear)(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def rotate(self, qkv: torch.Tensor, groups, ropes) -> torch.Tensor:
        """qkv (T, 3*dim) with q and k of every patch token rotated (in the RoPE dtype, as official)."""
        H, hd = self.num_heads, qkv.shape[-1] // (3 * self.num_heads)
        parts, start = [], 0
        for (rows, seq), (sin, cos) in zip(groups, ropes):
            g = qkv[start:start + rows * seq].view(rows, seq, 3, H, hd)
            start += rows * seq
            prefix = seq - sin.shape[-2]
            if prefix < 0:
                raise ValueError(f"SelfAttention: RoPE for {sin.shape[-2]} patches but sequences of {seq} tokens")
            qk = g[:, prefix:, :2].to(sin.dtype)  # (rows, P, 2, H, hd)
            qk = rope_apply(qk, sin[:, None, None], cos[:, None, None]).to(g.dtype)
            parts.append(torch.cat((g[:, :prefix], torch.cat((qk, g[:, prefix:, 2:]), dim=2)), dim=1)
                         .reshape(rows * seq, 3 * H * hd))
        if start != qkv.shape[0]:
            raise ValueError(f"SelfAttention: groups {groups} cover {start} tokens, got {qkv.shape[0]}")
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def forward(self, x: torch.Tensor, groups, ropes, cu_seqlens=None, max_seqlen: int = 0) -> torch.Tensor:
        qkv = self.rotate(self.qkv(x), groups, ropes)
        return self.proj(packed_attention(qkv, groups, self.num_heads, self.backend, cu_seqlens, max_seqlen))

    def attention_weights(self, x: torch.Tensor, rope) -> torch.Tensor:
        """Explicit softmax(q' k'^T * scale) for x (B, N, dim): (B, heads, N, N), fp32. Visualization only."""
        B, N, C = x.shape
        qkv = self.rotate(self.qkv(x).reshape(B * N, 3 * C), ((B, N),), [rope])
        q, k, _ = qkv.view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return attention_weights_ref(q, k, self.scale)


def _flatten(xs: list[torch.Tensor]) -> torch.Tensor:
    """Groups (rows_g, seq_g, dim) -> one (T, dim) token matrix."""
    return xs[0].flatten(0, 1) if len(xs) == 1 else torch.cat([x.flatten(0, 1) for x in xs])


def _unflatten(x: torch.Tensor, groups) -> list[torch.Tensor]:
    if len(groups) == 1:
        return [x.view(*groups[0], -1)]
    return [t.view(rows, seq, -1) for t, (rows, seq) in zip(x.split([r * s for r, s in groups]), groups)]


class SelfAttentionBlock(nn.Module):
    """Pre-norm block over resolution groups xs = [(rows_g, seq_g, dim), ...]:
    x += ls1(attn(norm1 x)), then x += ls2(mlp(norm2 x)); ls1 / ls2 identities without LayerScale.
    drops: None, or per group (attention subset, FFN subset, rows / k) for the official drop path."""

    def __init__(self, dim: int, num_heads: int, ffn_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, layerscale_init: float | None = None,
                 norm_layer: str = "layernorm", ffn_layer: str = "mlp", mask_k_bias: bool = False,
                 backend: str = "sdpa"):
        super().__init__()
        self.norm1 = make_norm(norm_layer, dim)
        self.attn = SelfAttention(dim, num_heads, qkv_bias, proj_bias, mask_k_bias, backend)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.norm2 = make_norm(norm_layer, dim)
        hidden = int(dim * ffn_ratio)
        self.mlp = (Mlp(dim, hidden, ffn_bias) if ffn_layer == "mlp"
                    else SwiGLUFFN(dim, hidden, ffn_bias, FFN_ALIGN[ffn_layer]))
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()

    def _attn_branch(self, xs, ropes, cu_seqlens, max_seqlen):
        groups = tuple((x.shape[0], x.shape[1]) for x in xs)
        y = self.attn(self.norm1(_flatten(xs)), groups, ropes, cu_seqlens, max_seqlen)
        return _unflatten(self.ls1(y), groups)

    def _ffn_branch(self, xs):
        groups = tuple((x.shape[0], x.shape[1]) for x in xs)
        return _unflatten(self.ls2(self.mlp(self.norm2(_flatten(xs)))), groups)

    def forward(self, xs: list[torch.Tensor], ropes, drops=None, cu_seqlens=None, max_seqlen: int = 0):
        if drops is None:  # .to(x.dtype): a bf16 residual stream (model.residual_dtype) stays bf16
            xs = [x + y.to(x.dtype) for x, y in zip(xs, self._attn_branch(xs, ropes, cu_seqlens, max_seqlen))]
            return [x + y.to(x.dtype) for x, y in zip(xs, self._ffn_branch(xs))]
        ys = self._attn_branch([x[d[0]] for x, d in zip(xs, drops)], ropes, cu_seqlens, max_seqlen)
        xs = [torch.index_add(x, 0, d[0], y.to(x.dtype), alpha=d[2]) for x, y, d in zip(xs, ys, drops)]
        ys = self._ffn_branch([x[d[1]] for x, d in zip(xs, drops)])
        return [torch.index_add(x, 0, d[1], y.to(x.dtype), alpha=d[2]) for x, y, d in zip(xs, ys, drops)]


# ------------------------------------------------------------------------------------------------
# The backbone
# ------------------------------------------------------------------------------------------------
class DINOv3VisionTransformer(nn.Module):
    """The DINOv3 ViT backbone (module docstring). Arguments keep the official names; `attn` is
    fastdino's attention backend (model.attn), `activation_checkpointing` recomputes each block in
    backward (training with gradients only). Unknown arguments are an error (official: a warning)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 pos_embed_rope_base: float | None = 100.0, pos_embed_rope_min_period: float | None = None,
                 pos_embed_rope_max_period: float | None = None, pos_embed_rope_normalize_coords: str = "separate",
                 pos_embed_rope_shift_coords: float | None = None, pos_embed_rope_jitter_coords: float | None = None,
                 pos_embed_rope_rescale_coords: float | None = None, pos_embed_rope_dtype: str = "fp32",
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, ffn_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path_rate: float = 0.0, layerscale_init: float | None = None,
                 norm_layer: str = "layernorm", ffn_layer: str = "mlp", ffn_bias: bool = True, proj_bias: bool = True,
                 n_storage_tokens: int = 0, mask_k_bias: bool = False, untie_cls_and_patch_norms: bool = False,
                 untie_global_and_local_cls_norm: bool = False, attn: str = "auto",
                 activation_checkpointing: bool = False, **kwargs):
        super().__init__()
        if kwargs:
            raise ValueError(f"DINOv3VisionTransformer: unsupported arguments {sorted(kwargs)}")
        if norm_layer not in NORMS:
            raise ValueError(f"DINOv3VisionTransformer: norm_layer must be one of {list(NORMS)}, got {norm_layer!r}")
        if ffn_layer not in FFN_ALIGN:
            raise ValueError(f"DINOv3VisionTransformer: ffn_layer must be one of {list(FFN_ALIGN)}, got {ffn_layer!r}")
        if pos_embed_rope_dtype not in ROPE_DTYPES:
            raise ValueError(f"DINOv3VisionTransformer: pos_embed_rope_dtype must be one of {list(ROPE_DTYPES)}, "
                             f"got {pos_embed_rope_dtype!r}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"DINOv3VisionTransformer: drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if isinstance(n_storage_tokens, bool) or not isinstance(n_storage_tokens, int) or n_storage_tokens < 0:
            raise ValueError(f"DINOv3VisionTransformer: n_storage_tokens must be an int >= 0, got {n_storage_tokens!r}")
        if layerscale_init is not None and (isinstance(layerscale_init, bool) or not layerscale_init > 0):
            raise ValueError(f"DINOv3VisionTransformer: layerscale_init must be None or a float > 0 (hub: 1e-5), "
                             f"got {layerscale_init!r}")
        if embed_dim % (4 * num_heads):
            raise ValueError(f"DINOv3VisionTransformer: embed_dim {embed_dim} must be a multiple of 4 * num_heads "
                             f"= {4 * num_heads} (axial RoPE)")
        # global-crop attention shape: what `auto` times on CUDA
        self._attn_shape = ((img_size // patch_size) ** 2 + 1 + n_storage_tokens, num_heads, embed_dim // num_heads)
        self.attn_backend = resolve_backend(attn, shape=self._attn_shape)  # one-line error if unavailable
        self.num_features = self.embed_dim = embed_dim
        self.n_blocks = self.depth = depth
        self.num_heads, self.patch_size = num_heads, patch_size
        self.n_storage_tokens = n_storage_tokens
        self.drop_path_rate = float(drop_path_rate)
        self.layerscale_init = layerscale_init
        self.activation_checkpointing = activation_checkpointing
        self.residual_dtype: torch.dtype | None = None  # model.residual_dtype (residual_stream)
        self.layout = "dinov3"
        self._cu_seqlens: dict = {}

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if n_storage_tokens:
            self.storage_tokens = nn.Parameter(torch.zeros(1, n_storage_tokens, embed_dim))
        self.rope_embed = RopePositionEmbedding(
            embed_dim, num_heads, base=pos_embed_rope_base, min_period=pos_embed_rope_min_period,
            max_period=pos_embed_rope_max_period, normalize_coords=pos_embed_rope_normalize_coords,
            shift_coords=pos_embed_rope_shift_coords, jitter_coords=pos_embed_rope_jitter_coords,
            rescale_coords=pos_embed_rope_rescale_coords, dtype=ROPE_DTYPES[pos_embed_rope_dtype])
        self.blocks = nn.ModuleList(
            [SelfAttentionBlock(embed_dim, num_heads, ffn_ratio, qkv_bias, proj_bias, ffn_bias, layerscale_init,
                                norm_layer, ffn_layer, mask_k_bias, self.attn_backend) for _ in range(depth)])
        self.norm = make_norm(norm_layer, embed_dim)  # all tokens; the patch tokens only when untied
        self.cls_norm = make_norm(norm_layer, embed_dim) if untie_cls_and_patch_norms else None
        self.local_cls_norm = make_norm(norm_layer, embed_dim) if untie_global_and_local_cls_norm else None
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    @property
    def num_register_tokens(self) -> int:
        """fastdino's name of n_storage_tokens (the tokens between [CLS] and the patches)."""
        return self.n_storage_tokens

    @torch.no_grad()
    def init_weights(self) -> None:
        """As official: [CLS] and storage tokens ~N(0, 0.02^2), mask token 0, Linear weights truncated
        normal (std 0.02) and biases 0, norms 1 / 0, LayerScale gammas layerscale_init, patch conv
        U(+-1/sqrt(in_chans p^2)) (torch's default), RoPE periods and key-bias masks recomputed."""
        self.rope_embed._init_weights()
        nn.init.normal_(self.cls_token, std=0.02)
        if self.n_storage_tokens:
            nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
                if isinstance(m, LinearKMaskedBias) and m.bias is not None:
                    m.reset_bias_mask()
            elif isinstance(m, (nn.LayerNorm, RMSNorm, nn.Conv2d)):
                m.reset_parameters()
            elif isinstance(m, LayerScale):
                m.gamma.fill_(self.layerscale_init)

    # ---- tokens ---------------------------------------------------------------------------------
    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None):
        """(B, C, H, W) -> ((B, 1 + R + h*w, dim) tokens [CLS], storage, patches; (h, w) the patch grid).
        masks (B, h*w) bool, True = masked: those patch embeddings become the mask token. Without
        masks the mask token still enters as 0 * mask_token (official: it always gets a gradient)."""
        if x.dim() != 4:
            raise ValueError(f"DINOv3VisionTransformer: expected images (B, C, H, W), got shape {tuple(x.shape)}")
        B, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"DINOv3VisionTransformer: image size {H}x{W} is not a multiple of patch "
                             f"{self.patch_size}")
        h, w = H // self.patch_size, W // self.patch_size
        x = self.patch_embed(x)  # (B, h*w, dim), row-major
        if masks is not None:
            if masks.dtype != torch.bool or tuple(masks.shape) != (B, h * w):
                raise ValueError(f"DINOv3VisionTransformer: masks must be bool (B, npatch) = {(B, h * w)}, "
                                 f"got {masks.dtype} {tuple(masks.shape)}")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
            cls = self.cls_token
        else:
            cls = self.cls_token + 0 * self.mask_token
        prefix = [cls.expand(B, -1, -1)]
        if self.n_storage_tokens:
            prefix.append(self.storage_tokens.expand(B, -1, -1))
        return torch.cat(prefix + [x], dim=1), (h, w)

    # ---- per-block randomness (drawn before each block: checkpointing recomputes the same) --------
    def _ropes(self, grids):
        return [self.rope_embed(H=h, W=w) for h, w in grids]

    def _drop_draw(self, groups, device):
        """Official drop path: per group (attention subset, FFN subset, rows / k), or None when off."""
        if not self.training or self.drop_path_rate == 0.0:
            return None
        ks = [max(int(rows * (1 - self.drop_path_rate)), 1) for rows, _ in groups]
        first = [torch.randperm(rows, device=device)[:k] for (rows, _), k in zip(groups, ks)]
        second = [torch.randperm(rows, device=device)[:k] for (rows, _), k in zip(groups, ks)]
        return [(a, b, rows / k) for a, b, (rows, _), k in zip(first, second, groups, ks)]

    def _seqlens(self, groups, device):
        """(cu_seqlens, max_seqlen) of a layout for the varlen backends; (None, 0) when not needed."""
        return varlen_args(self._cu_seqlens, self.attn_backend, groups, device)

    def _run_blocks(self, xs: list[torch.Tensor], grids) -> list[torch.Tensor]:
        ckpt = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        groups = tuple((x.shape[0], x.shape[1]) for x in xs)
        device = xs[0].device
        fixed = None if self.rope_embed.augmented else self._ropes(grids)  # eval: one RoPE per forward
        xs = [residual_stream(x, self.residual_dtype) for x in xs]
        for blk in self.blocks:
            ropes = fixed if fixed is not None else self._ropes(grids)
            drops = self._drop_draw(groups, device)
            seen = groups if drops is None else tuple((d[0].shape[0], seq) for d, (_, seq) in zip(drops, groups))
            cu, mx = self._seqlens(seen, device)
            if ckpt:
                xs = checkpoint(blk, xs, ropes, drops, cu, mx, use_reentrant=False, preserve_rng_state=False)
            else:
                xs = blk(xs, ropes, drops, cu, mx)
        return xs

    def _encode(self, images: list[torch.Tensor], masks: list) -> list[torch.Tensor]:
        tokens, grids = zip(*[self.prepare_tokens(x, m) for x, m in zip(images, masks)])
        return self._run_blocks(list(tokens), grids)

    @staticmethod
    def _as_list(x, masks):
        if isinstance(x, torch.Tensor):
            return [x], [masks], False
        if not isinstance(x, (list, tuple)) or not x:
            raise ValueError(f"DINOv3VisionTransformer: expected images (B, C, H, W) or a non-empty list of them, "
                             f"got {type(x).__name__}")
        masks = [None] * len(x) if masks is None else list(masks)
        if len(masks) != len(x):
            raise ValueError(f"DINOv3VisionTransformer: {len(x)} image groups but {len(masks)} masks")
        return list(x), masks, True

    # ---- norms ----------------------------------------------------------------------------------
    def _prefix_norm(self, index: int) -> nn.Module:
        """The norm of the [CLS] and storage tokens of list entry `index` (official rule)."""
        if self.local_cls_norm is not None and self.training and index == 1:
            return self.local_cls_norm  # the local crops' (list entry 1), training only
        return self.cls_norm if self.cls_norm is not None else self.norm

    def _features(self, x: torch.Tensor, index: int, masks) -> dict:
        r = 1 + self.n_storage_tokens
        norm = self._prefix_norm(index)
        if norm is self.norm:
            normed = self.norm(x)
            prefix, patches = normed[:, :r], normed[:, r:]
        else:
            prefix, patches = norm(x[:, :r]), self.norm(x[:, r:])
        storage = prefix[:, 1:]
        return {"x_norm_clstoken": prefix[:, 0], "x_norm_regtokens": storage, "x_storage_tokens": storage,
                "x_norm_patchtokens": patches, "x_prenorm": x, "masks": masks}

    # ---- API ------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor | list[torch.Tensor], masks=None):
        """Features of every token (module docstring): a dict for images (B, C, H, W) with masks None
        or bool (B, npatch); a list of dicts for a list of resolution groups with masks None or a
        list (entries None or bool masks). Where module hooks must run (DeepSpeed ZeRO-3), call
        model(x, masks, is_training=True) instead: the same thing through __call__."""
        images, masks, is_list = self._as_list(x, masks)
        outs = self._encode(images, masks)
        feats = [self._features(o, i, m) for i, (o, m) in enumerate(zip(outs, masks))]
        return feats if is_list else feats[0]

    def forward(self, x: torch.Tensor | list[torch.Tensor], masks=None, is_training: bool = False):
        """Images (B, C, H, W) -> [CLS] features (B, dim); a list of groups -> forward_packed;
        is_training=True (the official switch) -> forward_features(x, masks)."""
        if is_training:
            return self.forward_features(x, masks)
        if isinstance(x, (list, tuple)):
            return self.forward_packed(x, masks)
        out = self._encode([x], [masks])[0]
        return self.head(self._prefix_norm(0)(out[:, 0]))  # norms are per token: the [CLS] rows only

    def forward_packed(self, images: list[torch.Tensor], masks=None) -> torch.Tensor:
        """[CLS] features of several resolution groups run together through each block:
        (sum rows_g, dim), in group order (entry 1 normed as the local crops, see the module docstring)."""
        images, masks, _ = self._as_list(list(images), masks)
        outs = self._encode(images, masks)
        cls = [self._prefix_norm(i)(o[:, 0]) for i, o in enumerate(outs)]
        return self.head(cls[0] if len(cls) == 1 else torch.cat(cls))

    # ---- evaluation / visualization (fastdino's API, as the DINO / DINOv2 backbones) --------------
    def _normed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        r = 1 + self.n_storage_tokens
        if self.cls_norm is None:
            return self.norm(x)
        return torch.cat((self.cls_norm(x[:, :r]), self.norm(x[:, r:])), dim=1)

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Outputs of the last n blocks, each normed ([CLS] and storage by cls_norm when untied, as
        official), (B, 1+R+h*w, dim) each: [CLS] at 0, storage tokens 1..R, patches from 1+R. (The
        official DINOv3 method returns the patch tokens only and takes n as a keyword.)"""
        tokens, grid = self.prepare_tokens(x)
        rope = self._ropes([grid])
        xs, out = [tokens], []
        for i, blk in enumerate(self.blocks):
            if self.rope_embed.augmented:
                rope = self._ropes([grid])
            xs = blk(xs, rope)
            if len(self.blocks) - i <= n:
                out.append(self._normed_tokens(xs[0]))
        return out

    @torch.no_grad()
    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights of the last block, (B, heads, 1+R+h*w, 1+R+h*w), explicit fp32 softmax
        with RoPE applied ([CLS] 0, storage tokens 1..R, patches from 1+R)."""
        tokens, grid = self.prepare_tokens(x)
        rope = self._ropes([grid])
        xs = [tokens]
        for blk in self.blocks[:-1]:
            xs = blk(xs, rope)
        last = self.blocks[-1]
        return last.attn.attention_weights(last.norm1(xs[0]), rope[0])


# ------------------------------------------------------------------------------------------------
# Builders: the official hub backbones (dinov3/hub/backbones.py); kwargs override any setting
# ------------------------------------------------------------------------------------------------
HUB_COMMON = dict(img_size=224, patch_size=16, pos_embed_rope_base=100.0, pos_embed_rope_normalize_coords="separate",
                  pos_embed_rope_rescale_coords=2, pos_embed_rope_dtype="fp32", qkv_bias=True, drop_path_rate=0.0,
                  layerscale_init=1e-5, norm_layer="layernormbf16", ffn_bias=True, proj_bias=True,
                  n_storage_tokens=4, mask_k_bias=True)
# name -> (embed_dim, depth, num_heads, ffn_ratio, ffn_layer, other hub settings)
DINOV3_HUB = {
    "dinov3_vitt16": (192, 12, 3, 4.0, "mlp", {}),  # no official weights: a ViT-Ti width for demos and tests
    "dinov3_vits16": (384, 12, 6, 4.0, "mlp", {}),
    "dinov3_vits16plus": (384, 12, 6, 6.0, "swiglu", {}),
    "dinov3_vitb16": (768, 12, 12, 4.0, "mlp", {}),
    "dinov3_vitl16": (1024, 24, 16, 4.0, "mlp", {}),  # LVD1689M; the SAT493M weights: untie_global_and_local_cls_norm
    "dinov3_vitl16plus": (1024, 24, 16, 6.0, "swiglu", {}),
    "dinov3_vith16plus": (1280, 32, 20, 6.0, "swiglu", {}),
    "dinov3_vit7b16": (4096, 40, 32, 3.0, "swiglu64", {"qkv_bias": False, "untie_global_and_local_cls_norm": True}),
}


def _dinov3(name: str, **kwargs) -> DINOv3VisionTransformer:
    dim, depth, heads, ratio, ffn, extra = DINOV3_HUB[name]
    opts = dict(HUB_COMMON, embed_dim=dim, depth=depth, num_heads=heads, ffn_ratio=ratio, ffn_layer=ffn, **extra)
    opts.update(kwargs)
    return DINOv3VisionTransformer(**opts)


def dinov3_vitt16(**kwargs) -> DINOv3VisionTransformer:
    return _dinov3("dinov3_vitt16", **kwargs)


def dinov3_vits16(**kwargs) -> DINOv3VisionTransformer:
    return _dinov3("dinov3_vits16", **kwargs)


def dinov3_vits16plus(**kwargs) -> DINOv3VisionTransformer:
    return _dinov3("dinov3_vits16plus", **kwargs)


def dinov3_vitb16(**kwargs) -> DINOv3VisionTransformer:
    return _dinov3("dinov3_vitb16", **kwargs)


def dinov3_vitl16(**kwargs) -> DINOv3VisionTransformer:
    return _dinov3("dinov3_vitl16", **kwargs)


def dinov3_vitl16plus(**kwargs) -> DINOv3VisionTransformer:
    return _dinov3("dinov3_vitl16plus", **kwargs)


def dinov3_vith16plus(**kwargs) -> DINOv3VisionTransformer:
    return _dinov3("dinov3_vith16plus", **kwargs)


def dinov3_vit7b16(**kwargs) -> DINOv3VisionTransformer:
    return _dinov3("dinov3_vit7b16", **kwargs)


DINOV3_ARCHS = {name: globals()[name] for name in DINOV3_HUB}
