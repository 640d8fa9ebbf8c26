"""Vision Transformer of official DINO and of official DINOv2, one class.

Pre-norm blocks, qkv bias, LayerNorm eps 1e-6, stochastic depth, learnable [CLS] and position
embeddings bicubically interpolated to other resolutions. The defaults build the DINO v1 backbone;
the DINOv2 options add, with the official DINOv2 names and shapes:
    layerscale_init        per-channel gamma on each residual branch: blocks.i.ls1.gamma, blocks.i.ls2.gamma
    num_register_tokens    register_tokens (1, R, dim), inserted after [CLS] once the position embedding is added
    ffn="swiglu"           fused SwiGLU: blocks.i.mlp.w12 Linear(dim, 2h), blocks.i.mlp.w3 Linear(h, dim),
                           h = int(mlp_ratio*dim * 2/3) rounded up to a multiple of 8 (DINOv2 SwiGLUFFNFused)
    mask_token             mask_token (1, dim): replaces the masked patch embeddings (iBOT) before the
                           position embedding
    interpolate_offset, interpolate_antialias   DINOv2's position-embedding interpolation
    drop_path_uniform, efficient_drop_path      DINOv2's stochastic-depth options (see below)

State dicts: DINO v1 models (no LayerScale, registers, mask token or SwiGLU) have the standard ViT
layout (cls_token, pos_embed, patch_embed.proj.*, blocks.i.{norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}, norm.*; head.* only when num_classes > 0), so official DINO backbones and timm
ViT checkpoints load with strict=True; DINOv2 models have the official DINOv2 backbone layout
(block_chunks=0: blocks.i.*), so the official DINOv2 / DINOv2-with-registers backbones load with
strict=True. `layout` says which: "dino" or "dinov2".

Token layout of every sequence: [CLS] at 0, the R register tokens at 1..R, the patch tokens from
1 + R on (row-major patch grid). forward_features, get_intermediate_layers and
get_last_selfattention return all of them in that order; `num_register_tokens` gives R.

forward_features(x, masks=None) returns, for a DINOv2 model, the official dict
    x_norm_clstoken (B, dim), x_norm_regtokens (B, R, dim), x_norm_patchtokens (B, P, dim),
    x_prenorm (B, 1+R+P, dim) (after the last block, before the final norm), masks (as given)
and for a DINO v1 model the normed tokens (B, 1+P, dim) (fastdino's v1 API). A list of image
groups gives a list of those, computed in one packed pass.

Speed-ups over the official modules, all exact:
- attention through fused kernels (fastdino.models.attention): no (seq x seq) matrix is stored;
  get_last_selfattention keeps an explicit-softmax path for visualization;
- forward_packed: crops of several resolutions run through each block together, as one (T, dim)
  token matrix (one LayerNorm / qkv / proj / MLP matmul per block), attention kept within each crop;
- per-block activation checkpointing; the drop-path draws are made before the blocks run, so
  packing and recomputation see the same masks;
- fused residual norm (set_residual_norm, model.fused_residual_norm): every residual add and the
  LayerNorm after it as one op (kernels/residual_layer_norm.py), the blocks run as a chain;
- fused bias + GELU (set_bias_gelu, model.fused_bias_gelu): the MLP's fc1 bias and GELU as one op after
  a bias-free matmul, the bias gradient made in the GELU's backward (kernels/bias_gelu.py). Exact in
  fp32; under bf16 autocast the matmul's output is rounded to bf16 before the bias is added (eager adds
  it in the matmul's fp32 epilogue): one more bf16 rounding.
Not exact, an option: residual_dtype (model.residual_dtype=bf16, residual_stream): a bf16 residual
stream under bf16 autocast, as DINOv3's mixed precision.

Drop path (stochastic depth): each block has two residual branches (attention, MLP). For a backbone
call on a batch of `rows` sequences, one uniform draw u of shape (depth, 2, rows) decides which
sequences keep which branch; forward_packed makes the same draw per resolution group, in group
order, so it uses exactly what separate backbone calls per group (the official MultiCropWrapper)
would use with the same RNG state. Two ways to use u:
- per-sample masks (default, DINO v1 and DINOv2's DropPath): the branch of sequence r in block i is
  kept when u < 1 - p_i and then scaled by 1 / (1 - p_i);
- efficient_drop_path (DINOv2's drop_add_residual_stochastic_depth): the branch runs only on a
  uniformly random subset of k_i = max(int(rows * (1 - p_i)), 1) sequences (the first k_i of
  argsort(u)) and is added back with index_add, scaled by rows / k_i. Same expectation, and the
  dropped sequences cost nothing. Official DINOv2 takes this path for every block with p_i > 0 in its
  multi-crop (list) forward, the one its training uses; here it applies to every block with p_i > 0
  of every training forward. With one sequence (k = 1 = rows) nothing is dropped, as official.
  The branch shapes depend on k_i: under model.compile, blocks with different rates compile
  different graphs (drop_path_uniform, DINOv2's recipe, keeps one per token layout).
Rates: linear from 0 (first block) to drop_path_rate (last), or drop_path_rate for every block with
drop_path_uniform (DINOv2's recipe).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fastdino.models.attention import attention_weights_ref, packed_attention, resolve_backend, varlen_args

FFNS = ("mlp", "swiglu", "swiglufused")  # "swiglufused" is the official DINOv2 config name of "swiglu"


def drop_path_scales(rows: int, keep: torch.Tensor, generator=None) -> torch.Tensor:
    """Per-sequence residual scales (depth, 2, rows), fp32: 0 (branch dropped) or 1/keep_i (kept).

    keep: (depth,) keep probability 1 - p_i of each block, on the device (no host copy per call: the
    draw is CUDA-graph capturable). One draw per backbone call per resolution group."""
    keep = keep.view(-1, 1, 1)
    u = torch.rand(keep.shape[0], 2, rows, device=keep.device, generator=generator)
    return (u < keep).float() / keep


def subset_size(rows: int, rate: float) -> int:
    """Sequences whose branch runs under efficient drop path at rate p: max(int(rows * (1 - p)), 1) (official)."""
    return max(int(rows * (1 - rate)), 1)


def drop_path_subsets(rows: int, rates: list[float], device=None, generator=None) -> list[torch.Tensor | None]:
    """Efficient drop path: for each block with rate p > 0, the (2, k) int64 indices of the sequences
    whose attention / MLP branch runs (a uniformly random k-subset per branch, k = subset_size(rows, p));
    None for p = 0. Makes the same torch.rand(depth, 2, rows) draw as drop_path_scales (the subsets
    are the first k of its argsort), so switching modes does not shift the RNG stream."""
    order = torch.rand(len(rates), 2, rows, device=device, generator=generator).argsort(-1)
    return [None if p == 0 else order[i, :, :subset_size(rows, p)] for i, p in enumerate(rates)]


def residual_stream(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The tokens entering the blocks. dtype None (default): as they come, fp32 under autocast (the
    fp32 [CLS] token and position embedding), as the official DINO and DINOv2 code. model.residual_dtype
    = bf16 (DINOv3's mixed precision): cast once here, while autocast is on; the blocks' residual adds
    then stay bf16 (half the residual traffic). Without autocast (fp32 evaluation) nothing changes."""
    if dtype is None or x.dtype == dtype or not torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(dtype)


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
    """fc2(GELU(fc1(x))). With bias_gelu_impl set (model.fused_bias_gelu, set_bias_gelu): fc1 without its
    bias, then fc1's bias and the exact GELU as one op (kernels/bias_gelu.py), whose backward also makes
    the bias gradient; the same parameters and state dict."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.bias_gelu_impl: str | None = None  # None: the unfused modules

    def forward(self, x):
        if self.bias_gelu_impl is None or self.fc1.bias is None:
            return self.fc2(self.act(self.fc1(x)))
        from fastdino.kernels.bias_gelu import bias_gelu

        return self.fc2(bias_gelu(F.linear(x, self.fc1.weight), self.fc1.bias, impl=self.bias_gelu_impl))


class SwiGLUFFN(nn.Module):
    """DINOv2's SwiGLUFFNFused: w3(silu(a) * b), (a | b) = w12(x) (the two halves of one matmul).
    `hidden` is the MLP width int(mlp_ratio*dim); the SwiGLU width is 2/3 of it, rounded up to a
    multiple of 8 (ViT-g: 6144 -> 4096), which keeps the parameter count of the MLP."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (CaiT / DINOv2): x * gamma, gamma initialized to `init`."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


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


def _row_scale(drop_scale: torch.Tensor | None, branch: int, x: torch.Tensor) -> torch.Tensor | None:
    """Branch `branch`'s drop-path scale per row of x (the fused op's (N,) scale), or None."""
    return None if drop_scale is None else torch.broadcast_to(drop_scale[branch], (*x.shape[:-1], 1))[..., 0]


class Block(nn.Module):
    """Pre-norm transformer block: x + drop_path(ls1(attn(norm1 x))), then x + drop_path(ls2(mlp(norm2 x)));
    ls1 / ls2 are LayerScale with layerscale_init, else identities (no parameters)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 backend: str = "sdpa", layerscale_init: float | None = None, ffn: str = "mlp"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, backend)
        self.ls1 = nn.Identity() if layerscale_init is None else LayerScale(dim, layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = (Mlp if ffn == "mlp" else SwiGLUFFN)(dim, int(dim * mlp_ratio))
        self.ls2 = nn.Identity() if layerscale_init is None else LayerScale(dim, layerscale_init)
        # model.fused_residual_norm: each residual add (drop path, LayerScale) and the LayerNorm after it
        # as one op (kernels/residual_layer_norm.py; "auto": Triton on CUDA, its torch reference elsewhere)
        self.residual_norm_impl: str | None = None

    def forward(self, x: torch.Tensor, drop_scale: torch.Tensor | None = None, groups=None,
                cu_seqlens=None, max_seqlen: int = 0, drop_index: torch.Tensor | None = None, *,
                normed: torch.Tensor | None = None, next_weight: torch.Tensor | None = None,
                next_bias: torch.Tensor | None = None, next_eps: float = 1e-6):
        """drop_scale: None (no drop path) or fp32 residual scales (2, ...) broadcastable to each branch's
        output. drop_index (efficient drop path): (2, n) rows of x (sequences of a dense (B, N, dim) x,
        tokens of a packed (T, dim) x) on which each branch runs; the branch output times drop_scale is
        index-added there, and groups / cu_seqlens / max_seqlen describe the attention branch's subset.
        With the fused residual norm (residual_norm_impl set, no drop_index), the chain of blocks: normed
        = norm1(x) when the previous block computed it, and with next_weight / next_bias / next_eps (the
        next block's norm1) the MLP residual add and that norm are one op too: returns (x, normed_next)."""
        if drop_index is None and self.residual_norm_impl is not None:
            from fastdino.kernels.residual_layer_norm import residual_layer_norm

            # the normed rows feed a Linear only: under autocast store them in its dtype (the same
            # rounding as LayerNorm's fp32 output cast by the Linear; one write, no cast pass)
            device = x.device.type
            out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
            y = self.attn(self.norm1(x) if normed is None else normed, groups, cu_seqlens, max_seqlen)
            x, normed = residual_layer_norm(x, y, self.norm2.weight, self.norm2.bias, scale=_row_scale(drop_scale, 0, x),
                                            gamma=getattr(self.ls1, "gamma", None), eps=self.norm2.eps,
                                            out_dtype=out_dtype, impl=self.residual_norm_impl)
            if next_weight is None:
                y = self.ls2(self.mlp(normed))
                return x + (y if drop_scale is None else y * drop_scale[1]).to(x.dtype)
            return residual_layer_norm(x, self.mlp(normed), next_weight, next_bias, scale=_row_scale(drop_scale, 1, x),
                                       gamma=getattr(self.ls2, "gamma", None), eps=next_eps, out_dtype=out_dtype,
                                       impl=self.residual_norm_impl)
        if drop_index is None:  # .to(x.dtype): a bf16 residual stream (model.residual_dtype) stays bf16
            y = self.ls1(self.attn(self.norm1(x), groups, cu_seqlens, max_seqlen))
            x = x + (y if drop_scale is None else y * drop_scale[0]).to(x.dtype)
            y = self.ls2(self.mlp(self.norm2(x)))
            return x + (y if drop_scale is None else y * drop_scale[1]).to(x.dtype)
        idx = drop_index[0]
        y = self.ls1(self.attn(self.norm1(x[idx]), groups, cu_seqlens, max_seqlen))
        x = x.index_add(0, idx, (y * drop_scale[0]).to(x.dtype))
        idx = drop_index[1]
        y = self.ls2(self.mlp(self.norm2(x[idx])))
        return x.index_add(0, idx, (y * drop_scale[1]).to(x.dtype))


class VisionTransformer(nn.Module):
    """ViT backbone (DINO v1 by default, DINOv2 with its options, see the module docstring);
    forward(x) returns the [CLS] token after the final norm, (B, embed_dim)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 0,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path_rate: float = 0.0, attn: str = "auto",
                 activation_checkpointing: bool = False, layerscale_init: float | None = None,
                 num_register_tokens: int = 0, ffn: str = "mlp", mask_token: bool = False,
                 interpolate_offset: float = 0.1, interpolate_antialias: bool = False,
                 drop_path_uniform: bool = False, efficient_drop_path: bool = False, **kwargs):
        super().__init__()
        if isinstance(img_size, (list, tuple)):  # official DINO passes img_size=[224]
            img_size = img_size[0]
        if kwargs:
            raise ValueError(f"VisionTransformer: unsupported arguments {sorted(kwargs)}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"VisionTransformer: drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if layerscale_init is not None and (isinstance(layerscale_init, bool) or not isinstance(layerscale_init, (int, float))
                                            or layerscale_init <= 0):
            raise ValueError(f"VisionTransformer: layerscale_init must be None (no LayerScale) or a float > 0 "
                             f"(DINOv2: 1e-5), got {layerscale_init!r}")
        if isinstance(num_register_tokens, bool) or not isinstance(num_register_tokens, int) or num_register_tokens < 0:
            raise ValueError(f"VisionTransformer: num_register_tokens must be an int >= 0, got {num_register_tokens!r}")
        if ffn not in FFNS:
            raise ValueError(f"VisionTransformer: ffn must be one of {list(FFNS)}, got {ffn!r}")
        if not isinstance(interpolate_offset, (int, float)) or interpolate_offset < 0:
            raise ValueError(f"VisionTransformer: interpolate_offset must be a float >= 0 (DINO, DINOv2: 0.1; "
                             f"DINOv2 with registers: 0.0), got {interpolate_offset!r}")
        ffn = "swiglu" if ffn == "swiglufused" else ffn
        # global-crop attention shape: what `auto` times on CUDA
        self._attn_shape = ((img_size // patch_size) ** 2 + 1 + num_register_tokens, num_heads, embed_dim // num_heads)
        self.attn_backend = resolve_backend(attn, shape=self._attn_shape)  # one-line error if unavailable
        self.num_features = self.embed_dim = embed_dim
        self.depth, self.num_heads, self.patch_size = depth, num_heads, patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_offset, self.interpolate_antialias = float(interpolate_offset), bool(interpolate_antialias)
        self.efficient_drop_path = bool(efficient_drop_path)
        self.activation_checkpointing = activation_checkpointing
        self.residual_dtype: torch.dtype | None = None  # model.residual_dtype (residual_stream)
        # which official backbone the state dict (and forward_features) follows
        self.layout = "dinov2" if (layerscale_init is not None or num_register_tokens or mask_token
                                   or ffn != "mlp") else "dino"
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if mask_token else None  # official: zeros
        # stochastic depth rule as official: linear from 0 (first block) to drop_path_rate (last)
        self.dpr = ([float(drop_path_rate)] * depth if drop_path_uniform
                    else torch.linspace(0, drop_path_rate, depth, device="cpu").tolist())
        self.drop_path_rate = drop_path_rate
        # made once per device, not per call (no host-to-device copy in the step; not a buffer, so a
        # bf16 cast of the module, as DeepSpeed does, cannot round the probabilities)
        self._drop_keep: dict = {}  # device -> (depth,) fp32 keep probabilities 1 - p_i
        self._drop_consts: dict = {}  # efficient drop path: (what, ..., device) -> scales / offsets
        self._cu_seqlens: dict = {}  # packed flash-attn: cu_seqlens per token layout
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias, self.attn_backend, layerscale_init, ffn)
             for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.layout == "dino":
            nn.init.trunc_normal_(self.cls_token, std=0.02)  # official DINO
        else:
            nn.init.normal_(self.cls_token, std=1e-6)  # official DINOv2
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:  # as official DINO / DINOv2; the patch conv keeps torch's default
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
        (B, 1 + npatch, dim) tokens before the registers: bicubic resize of the learned grid, as
        official. With interpolate_offset > 0 (DINO; DINOv2 0.1) the resize is given by scale factors
        (npatch_side + offset) / side, as official (so outputs match it); with 0 (DINOv2 with
        registers) by the target size; interpolate_antialias as DINOv2. The resize runs in fp32."""
        npatch, n = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if npatch == n and w == h:
            return self.pos_embed
        side = int(math.sqrt(n))
        dim = x.shape[-1]
        w0, h0 = w // self.patch_size, h // self.patch_size
        grid = self.pos_embed[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            resize = {"scale_factor": ((w0 + self.interpolate_offset) / side, (h0 + self.interpolate_offset) / side)}
        else:
            resize = {"size": (w0, h0)}
        grid = F.interpolate(grid, mode="bicubic", antialias=self.interpolate_antialias, **resize)
        if grid.shape[-2:] != (w0, h0):
            raise ValueError(f"interpolate_pos_encoding: got a {tuple(grid.shape[-2:])} grid for a {w}x{h} image")
        grid = grid.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((self.pos_embed[:, :1], grid), dim=1)

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + R + H/p * W/p, dim): [CLS], registers, patch tokens, as official:
        masked patch embeddings (masks (B, npatch) bool, True = masked) become the mask token, then
        [CLS] is prepended and the position embedding added, then the registers go after [CLS]."""
        if x.dim() != 4:
            raise ValueError(f"VisionTransformer: expected images (B, C, H, W), got shape {tuple(x.shape)}")
        B, _, w, h = x.shape
        if w % self.patch_size or h % self.patch_size:
            raise ValueError(f"VisionTransformer: image size {w}x{h} is not a multiple of patch {self.patch_size}")
        x = self.patch_embed(x)
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("VisionTransformer: masks given to a model without a mask token (mask_token=False)")
            if masks.dtype != torch.bool or tuple(masks.shape) != tuple(x.shape[:2]):
                raise ValueError(f"VisionTransformer: masks must be bool (B, npatch) = {tuple(x.shape[:2])}, "
                                 f"got {masks.dtype} {tuple(masks.shape)}")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]), dim=1)
        return x

    # ---- drop path ------------------------------------------------------------------------------
    def _drop_draw(self, rows: int, device):
        """The draw of one backbone call (one resolution group): per-sequence scales (depth, 2, rows),
        or with efficient_drop_path the per-block subsets (drop_path_subsets); None when off."""
        if not self.training or self.drop_path_rate == 0.0:
            return None
        if self.efficient_drop_path:
            return drop_path_subsets(rows, self.dpr, device)
        if device not in self._drop_keep:
            self._drop_keep[device] = torch.tensor([1.0 - p for p in self.dpr], dtype=torch.float32).to(device)
        return drop_path_scales(rows, self._drop_keep[device])

    def _const(self, key, make):
        """Small constant tensors of the efficient drop path, made once per layout and device."""
        if key not in self._drop_consts:
            self._drop_consts[key] = make()
        return self._drop_consts[key]

    def _seqlens(self, groups, device):
        """(cu_seqlens, max_seqlen) of a packed layout for the varlen backends; (None, 0) when not needed."""
        return varlen_args(self._cu_seqlens, self.attn_backend, groups, device)

    def _dense_block_args(self, rows: int, device) -> list[tuple]:
        """Per block (drop_scale, groups, cu_seqlens, max_seqlen, drop_index) for a dense (rows, N, dim) pass."""
        draw = self._drop_draw(rows, device)
        if draw is None:
            return [(None, None, None, 0, None)] * self.depth
        if not self.efficient_drop_path:
            scales = draw[..., None, None]  # (depth, 2, rows, 1, 1) against (rows, N, dim)
            return [(scales[i], None, None, 0, None) for i in range(self.depth)]
        args = []
        for idx in draw:
            if idx is None:
                args.append((None, None, None, 0, None))
                continue
            k = idx.shape[1]
            scale = self._const(("dense", rows, k, device),
                                lambda: torch.full((2, 1, 1, 1), rows / k, dtype=torch.float32, device=device))
            args.append((scale, None, None, 0, idx))
        return args

    def _packed_block_args(self, groups, device) -> list[tuple]:
        """Per block (drop_scale, groups, cu_seqlens, max_seqlen, drop_index) for a packed (T, dim) pass."""
        cu, mx = self._seqlens(groups, device)
        draws = [self._drop_draw(rows, device) for rows, _ in groups]  # same draws, same order as separate calls
        if draws[0] is None:
            return [(None, groups, cu, mx, None)] * self.depth
        if not self.efficient_drop_path:
            scales = [s[..., None].expand(-1, -1, rows, seq).reshape(self.depth, 2, rows * seq, 1)
                      for s, (rows, seq) in zip(draws, groups)]
            scales = scales[0] if len(scales) == 1 else torch.cat(scales, dim=2)
            return [(scales[i], groups, cu, mx, None) for i in range(self.depth)]
        args = []
        for i in range(self.depth):
            if draws[0][i] is None:  # rate 0: same for every group
                args.append((None, groups, cu, mx, None))
                continue
            index, sub, start = [], [], 0
            for d, (rows, seq) in zip(draws, groups):  # token ids of the kept sequences, group by group
                k = d[i].shape[1]
                offsets = self._const(("arange", seq, device), lambda: torch.arange(seq, device=device))
                index.append((d[i][..., None] * seq + (start + offsets)).reshape(2, k * seq))
                sub.append((k, seq))
                start += rows * seq
            sub = tuple(sub)
            scale = self._const(("packed", groups, sub, device), lambda: torch.cat(
                [torch.full((2, k * seq, 1), rows / k, dtype=torch.float32, device=device)
                 for (rows, _), (k, seq) in zip(groups, sub)], dim=1))
            index = torch.cat(index, dim=1) if len(index) > 1 else index[0]
            args.append((scale, sub, *self._seqlens(sub, device), index))
        return args

    # ---- blocks ---------------------------------------------------------------------------------
    def _run_blocks(self, x, args):
        ckpt = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        x = residual_stream(x, self.residual_dtype)
        # fused residual norm without efficient drop path: a chain, each block's MLP residual add fused
        # with the next block's norm1 (Block.forward); the last block's output goes to the final norm
        chain = self.blocks[0].residual_norm_impl is not None and all(a[-1] is None for a in args)
        normed = None
        for i, (blk, a) in enumerate(zip(self.blocks, args)):
            if a[-1] is None:
                a = a[:-1]  # Block's call as without efficient drop path
            kw = {}
            nxt = self.blocks[i + 1].norm1 if chain and i + 1 < len(self.blocks) else None
            if chain:
                kw = {"normed": normed} if nxt is None else \
                    {"normed": normed, "next_weight": nxt.weight, "next_bias": nxt.bias, "next_eps": nxt.eps}
            if ckpt:
                # no RNG inside a block (drop-path draws are inputs): skip saving/restoring RNG state
                out = checkpoint(blk, x, *a, use_reentrant=False, preserve_rng_state=False, **kw)
            else:
                out = blk(x, *a, **kw)
            x, normed = out if nxt is not None else (out, None)
        return x

    def _encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Dense (B, N, dim) tokens through all blocks (drop path drawn for B sequences)."""
        return self._run_blocks(tokens, self._dense_block_args(tokens.shape[0], tokens.device))

    def _encode_packed(self, tokens: list[torch.Tensor]):
        """Several (rows_g, seq_g, dim) groups through all blocks as one (T, dim) token matrix.
        Returns (x (T, dim), groups ((rows_g, seq_g), ...))."""
        groups = tuple((t.shape[0], t.shape[1]) for t in tokens)
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in tokens]) if len(tokens) > 1 else tokens[0].flatten(0, 1)
        return self._run_blocks(x, self._packed_block_args(groups, x.device)), groups

    def _features(self, normed: torch.Tensor, prenorm: torch.Tensor, masks):
        if self.layout == "dino":
            return normed
        r = self.num_register_tokens
        return {"x_norm_clstoken": normed[:, 0], "x_norm_regtokens": normed[:, 1:r + 1],
                "x_norm_patchtokens": normed[:, r + 1:], "x_prenorm": prenorm, "masks": masks}

    def forward_features(self, x: torch.Tensor | list[torch.Tensor], masks=None):
        """Features of every token (see the module docstring for the token layout).

        x: images (B, C, H, W) with masks None or bool (B, npatch); or a list of resolution groups with
        masks None or a list (entries None or bool masks), run in one packed pass -> a list.
        DINOv2 models return the official dict (x_norm_clstoken, x_norm_regtokens, x_norm_patchtokens,
        x_prenorm, masks); DINO v1 models the normed tokens (B, 1 + npatch, dim). Where module hooks
        must run (DeepSpeed ZeRO-3 gathers this module's own parameters in its pre-forward hook), call
        model(x, masks, is_training=True) instead: the same thing through __call__."""
        if isinstance(x, (list, tuple)):
            masks = [None] * len(x) if masks is None else list(masks)
            if len(masks) != len(x):
                raise ValueError(f"VisionTransformer: {len(x)} image groups but {len(masks)} masks")
            out, groups = self._encode_packed([self.prepare_tokens(im, m) for im, m in zip(x, masks)])
            normed, feats, start = self.norm(out), [], 0
            for (rows, seq), m in zip(groups, masks):
                part = slice(start, start + rows * seq)
                feats.append(self._features(normed[part].view(rows, seq, -1), out[part].view(rows, seq, -1), m))
                start += rows * seq
            return feats
        out = self._encode(self.prepare_tokens(x, masks))
        return self._features(self.norm(out), out, masks)

    def forward(self, x: torch.Tensor | list[torch.Tensor], masks=None, is_training: bool = False):
        """x: images (B, C, H, W) -> [CLS] features (B, dim); or a list of resolution groups -> the
        packed pass (forward_packed). is_training=True (the official DINOv2 switch) returns
        forward_features(x, masks) instead. Going through __call__ keeps module hooks working (ZeRO-3
        gathers cls_token / pos_embed / register_tokens / mask_token in this module's pre-forward hook)."""
        if is_training:
            return self.forward_features(x, masks)
        if isinstance(x, (list, tuple)):
            return self.forward_packed(x, masks)
        x = self._encode(self.prepare_tokens(x, masks))
        return self.head(self.norm(x[:, 0]))  # LayerNorm is per token: norm the [CLS] rows only

    def forward_packed(self, images: list[torch.Tensor], masks=None) -> torch.Tensor:
        """[CLS] features of several resolution groups in one pass: images[g] is (rows_g, C, H_g, W_g);
        returns (sum rows_g, dim) in group order, equal to torch.cat([self(x) for x in images]).

        All tokens are concatenated to one (T, dim) matrix, so LayerNorm, qkv, proj and the MLP run
        as single matmuls; attention runs per sequence (varlen flash-attn, or one SDPA call per group).
        """
        masks = [None] * len(images) if masks is None else list(masks)
        x, groups = self._encode_packed([self.prepare_tokens(im, m) for im, m in zip(images, masks)])
        cls, start = [], 0
        for rows, seq in groups:  # [CLS] is the first token of every sequence (registers follow it)
            cls.append(x[start:start + rows * seq].view(rows, seq, -1)[:, 0])
            start += rows * seq
        return self.head(self.norm(torch.cat(cls) if len(cls) > 1 else cls[0]))

    # ---- evaluation / visualization (official DINO API) ---------------------------------------
    @torch.no_grad()
    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights of the last block, (B, heads, 1+R+N, 1+R+N) ([CLS] 0, registers 1..R,
        patches from 1+R), by an explicit fp32 softmax."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1].attn.attention_weights(self.blocks[-1].norm1(x))

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Outputs of the last n blocks, each after the final norm, (B, 1+R+N, dim) each (official DINO;
        [CLS] at 0, registers at 1..R, patch tokens from 1+R)."""
        x = self.prepare_tokens(x)
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if len(self.blocks) - i <= n:
                out.append(self.norm(x))
        return out


# width (embed_dim) and heads of each architecture. DINO v1 builders: depth from the caller (default
# 12, model.depth) and mlp_ratio 4 for all; the DINOv2 builders below use the official depths.
ARCH_DIMS = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12), "vit_large": (1024, 16),
             "vit_giant2": (1536, 24)}


def _vit(arch: str, patch_size: int, depth: int, **kwargs) -> VisionTransformer:
    dim, heads = ARCH_DIMS[arch]
    return VisionTransformer(patch_size=patch_size, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=4, **kwargs)


def vit_tiny(patch_size: int = 16, depth: int = 12, **kwargs) -> VisionTransformer:
    return _vit("vit_tiny", patch_size, depth, **kwargs)


def vit_small(patch_size: int = 16, depth: int = 12, **kwargs) -> VisionTransformer:
    return _vit("vit_small", patch_size, depth, **kwargs)


def vit_base(patch_size: int = 16, depth: int = 12, **kwargs) -> VisionTransformer:
    return _vit("vit_base", patch_size, depth, **kwargs)


def vit_large(patch_size: int = 16, depth: int = 12, **kwargs) -> VisionTransformer:
    """Width 1024, 16 heads; the official ViT-L has 24 blocks (pass depth=24, or use dinov2_vitl14)."""
    return _vit("vit_large", patch_size, depth, **kwargs)


def vit_giant2(patch_size: int = 16, depth: int = 12, **kwargs) -> VisionTransformer:
    """Width 1536, 24 heads of 64; the official ViT-g has 40 blocks and SwiGLU (dinov2_vitg14)."""
    return _vit("vit_giant2", patch_size, depth, **kwargs)


# ---- DINOv2 backbones (official hub definitions: img_size 518, patch 14) -------------------------
DINOV2_DEPTH = {"vit_tiny": 12, "vit_small": 12, "vit_base": 12, "vit_large": 24, "vit_giant2": 40}


def _dinov2(arch: str, num_register_tokens: int, ffn: str = "mlp", **kwargs) -> VisionTransformer:
    """DINOv2 backbone with the official dims, LayerScale 1e-5 (the training recipe; the hub's 1.0 is
    overwritten by any checkpoint) and a mask token. With registers, the interpolation of the reg
    models (offset 0, antialias). kwargs override any of these (e.g. depth for a short test model)."""
    dim, heads = ARCH_DIMS[arch]
    opts = dict(img_size=518, patch_size=14, embed_dim=dim, depth=DINOV2_DEPTH[arch], num_heads=heads, mlp_ratio=4,
                layerscale_init=1e-5, mask_token=True, ffn=ffn, num_register_tokens=num_register_tokens,
                interpolate_offset=0.0 if num_register_tokens else 0.1, interpolate_antialias=bool(num_register_tokens))
    opts.update(kwargs)
    return VisionTransformer(**opts)


def dinov2_vitt14(num_register_tokens: int = 0, **kwargs) -> VisionTransformer:
    """ViT-Ti width (192, 3 heads) with the DINOv2 options: no official weights; the CPU demo's model."""
    return _dinov2("vit_tiny", num_register_tokens, **kwargs)


def dinov2_vits14(num_register_tokens: int = 0, **kwargs) -> VisionTransformer:
    return _dinov2("vit_small", num_register_tokens, **kwargs)


def dinov2_vitb14(num_register_tokens: int = 0, **kwargs) -> VisionTransformer:
    return _dinov2("vit_base", num_register_tokens, **kwargs)


def dinov2_vitl14(num_register_tokens: int = 0, **kwargs) -> VisionTransformer:
    return _dinov2("vit_large", num_register_tokens, **kwargs)


def dinov2_vitg14(num_register_tokens: int = 0, **kwargs) -> VisionTransformer:
    return _dinov2("vit_giant2", num_register_tokens, **{"ffn": "swiglu", **kwargs})


# ------------------------------------------------------------------------------------------------
# Reference: the official block math written out with an explicit fp32 softmax (tests, benchmarks)
# ------------------------------------------------------------------------------------------------
def vit_forward_ref(model: VisionTransformer, x: torch.Tensor, drop_scales: torch.Tensor | None = None) -> torch.Tensor:
    """All tokens after the final norm, (B, N+1, dim) (N+1+R with registers), computed block by block
    from model's weights: x += s_attn * g1 * proj(softmax(q k^T / sqrt(hd)) v),
    x += s_mlp * g2 * fc2(gelu(fc1(norm2 x)))  (or w3(silu(a) * b), (a | b) = w12(norm2 x));
    g1, g2 the LayerScale gammas (1 without). drop_scales: optional (depth, 2, B) residual scales
    (see drop_path_scales)."""
    x = model.prepare_tokens(x)
    B, N, C = x.shape
    H = model.num_heads
    for i, blk in enumerate(model.blocks):
        h = F.layer_norm(x, (C,), blk.norm1.weight, blk.norm1.bias, 1e-6)
        q, k, v = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias).view(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        a = torch.softmax((q.float() @ k.float().transpose(-2, -1)) * (C // H) ** -0.5, dim=-1)
        y = F.linear((a @ v.float()).to(x.dtype).transpose(1, 2).reshape(B, N, C), blk.attn.proj.weight, blk.attn.proj.bias)
        if isinstance(blk.ls1, LayerScale):
            y = y * blk.ls1.gamma
        x = x + (y if drop_scales is None else y * drop_scales[i, 0].view(B, 1, 1))
        h = F.layer_norm(x, (C,), blk.norm2.weight, blk.norm2.bias, 1e-6)
        if isinstance(blk.mlp, SwiGLUFFN):
            a, b = F.linear(h, blk.mlp.w12.weight, blk.mlp.w12.bias).chunk(2, dim=-1)
            y = F.linear(F.silu(a) * b, blk.mlp.w3.weight, blk.mlp.w3.bias)
        else:
            y = F.linear(F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
        if isinstance(blk.ls2, LayerScale):
            y = y * blk.ls2.gamma
        x = x + (y if drop_scales is None else y * drop_scales[i, 1].view(B, 1, 1))
    return F.layer_norm(x, (C,), model.norm.weight, model.norm.bias, 1e-6)
