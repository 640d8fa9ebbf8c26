"""Fused residual add + drop path + LayerScale + LayerNorm: the seam between two sub-blocks of a
pre-norm ViT block, forward and backward, one pass over the rows each.

Inputs: residual stream x (N, C) fp32 or bf16, branch output y (N, C) fp32 or bf16, optional per-row
scale s (N,) fp32 (drop path: 0 or 1 / keep_prob for the row's sample, broadcast over its tokens;
None = 1), optional LayerScale gamma g (C,) (None = 1), LayerNorm weight w (C,), bias b (C,), eps.
All math in fp32:

    h   = x + s[:, None] * (g * y)                  stored in residual_dtype (default x's dtype): h_r
    mu  = mean_c(h_r),  rstd = 1 / sqrt(mean_c((h_r - mu)^2) + eps)      (biased variance, F.layer_norm)
    xhat = (h_r - mu) * rstd
    out = xhat * w + b                              stored in out_dtype (default x's dtype)

The LayerNorm reads the stored (rounded) h_r, as the unfused x + y; LayerNorm(x + y) does: out is
exactly the normalization of the residual the next sub-block adds to. mean and rstd (N,) fp32 are
saved for the backward (with h_r, s, w, and g and y only with gamma: without it the branch output
is not kept alive).

Backward. Given dh (N, C) (the gradient reaching the residual stream from later) and dout (N, C):

    dxhat  = dout * w
    dh_tot = dh + rstd * (dxhat - mean_c(dxhat) - xhat * mean_c(dxhat * xhat))     (LayerNorm backward)
    dx = dh_tot                                     (in x's dtype)
    dy = s[:, None] * g * dh_tot                    (in y's dtype)
    dg = sum_rows(s[:, None] * y * dh_tot),  dw = sum_rows(dout * xhat),  db = sum_rows(dout)

s gets no gradient (drop-path scales are constants; a scale that requires grad is refused). The
rounding of h to residual_dtype passes the gradient straight through, as autograd's .to() does.

Kernels (one row tile of BLOCK_M rows x BLOCK_C = next_pow2(C) columns in registers; compiled and
checked at C = 384 / 768 / 1024; far larger C, one row per tile with 8 warps, is unchecked):
  _residual_layer_norm_fwd_kernel, grid (cdiv(N, BLOCK_M),): loads x, y (and s, g, w, b), writes h_r,
      out, mean, rstd.
  _residual_layer_norm_bwd_kernel, grid (P,) with P <= cdiv(N, BLOCK_M): program p takes the row tiles
      p, p + P, p + 2P, ...; loads h_r, dout, dh (and y with g), writes dx, dy, and its partial
      column sums of dw, db (and dg) to a (P, C) fp32 buffer each; torch sums the P partials (fixed
      order: deterministic, no atomics). The tile loop is software-pipelined by Triton (tl.range,
      3 stages: the next tiles' loads go to shared memory by cp.async while one is reduced): on an
      H200 (bf16, the 4 benchmark shapes) 53-113 us, 3600-4100 GB/s of floor traffic, against
      80-182 us for the plain loop, which waits on each tile's loads. P = 3 x the SM count on CUDA:
      bf16 at up to 168 registers x 128 threads and 25-33 KB shared (the launch table's backward,
      cuobjdump) fits 3 programs an SM at once; a 4th would run as a second partial wave (fp32 with
      gamma at C > 512: 230 registers, 57 KB, 2 an SM).
Host: 1 launch forward; 1 launch + 2 (3) small sums backward; no synchronization. Eagerly the
backward op's call (custom op, launch, sums) took 0.13-0.39 ms on an H200 (do_bench) where its GPU
time was 0.10-0.21 ms (plain loop, CUDA graph replay): at ViT sizes eager training is host-bound here,
and CUDA graphs remove that. The torch sums of the partials take ~8 us of GPU time each.
The custom ops fastdino::residual_layer_norm and fastdino::residual_layer_norm_bwd (fake impls,
autograd on the first) keep torch.compile on one graph.

Memory traffic (the floor, bytes per element of (N, C); 2 for bf16, 4 for fp32):
  forward:  read x, y; write h, out                              (bf16: 8 B/element)
  backward: read h, dout, dh (and y with g); write dx, dy        (bf16: 10, 12 with g)
  plus O(N + P C) for s, mean, rstd and the partials. The unfused torch chain (scale, add, layer_norm
  and their backwards) moves each (N, C) tensor several times more.
Design limits: one row tile in registers (BLOCK_C = next_pow2(C)); fp32/bf16 x, y, h, out (fp16/fp64
go to the reference with impl="auto"); rows must be contiguous (stride 1 over C); the launch table
is measured at bf16 C = 384 / 768 only (H200; fp32 and other widths are not) and compiles spill-free
with 16-byte loads for C a multiple of 16 (tests/kernels/test_residual_layer_norm.py, AOT for sm_80
and sm_90a).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .soft_cross_entropy import check_float_tensors, check_runnable

IMPLS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float32, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
def _check_inputs(x, y, weight, bias, scale, gamma) -> None:
    """One-line ValueErrors naming the culprit."""
    check_float_tensors("residual_layer_norm", {"x": x, "y": y, "weight": weight, "bias": bias, "scale": scale,
                                                "gamma": gamma}, optional=("scale", "gamma"))
    if x.dim() < 1 or x.shape[-1] < 1 or x.numel() == 0:
        raise ValueError(f"residual_layer_norm: x must be (..., C) with C >= 1 and rows, got {tuple(x.shape)}")
    C = x.shape[-1]
    if y.shape != x.shape:
        raise ValueError(f"residual_layer_norm: y {tuple(y.shape)} must have x's shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("gamma", gamma)):
        if t is not None and tuple(t.shape) != (C,):
            raise ValueError(f"residual_layer_norm: {name} must be ({C},), got {tuple(t.shape)}")
    if scale is not None and tuple(scale.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"residual_layer_norm: scale must be one per row {tuple(x.shape[:-1])}, "
                         f"got {tuple(scale.shape)}")


def residual_layer_norm_ref(x, y, weight, bias, scale=None, gamma=None, eps=1e-6, residual_dtype=None,
                            out_dtype=None):
    """Plain PyTorch (see the header): (h, out). x, y (..., C); scale (...,) per row or None; gamma,
    weight, bias (C,). Math in fp32 (fp64 when x is fp64); h in residual_dtype (default x's dtype),
    out in out_dtype (default x's dtype); the LayerNorm reads the stored h."""
    _check_inputs(x, y, weight, bias, scale, gamma)
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    t = y.to(dt)
    if gamma is not None:
        t = t * gamma.to(dt)
    if scale is not None:
        t = t * scale.detach().to(dt)[..., None]
    h = (x.to(dt) + t).to(residual_dtype or x.dtype)
    out = F.layer_norm(h.to(dt), (x.shape[-1],), weight.to(dt), bias.to(dt), eps)
    return h, out.to(out_dtype or x.dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _residual_layer_norm_fwd_kernel(
    X_ptr, Y_ptr, S_ptr, G_ptr, W_ptr, B_ptr, H_ptr, Out_ptr, Mean_ptr, Rstd_ptr,
    N, C, stride_x, stride_y, stride_h, stride_o, eps,
    HAS_SCALE: tl.constexpr, HAS_GAMMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Rows [pid * BLOCK_M, +BLOCK_M): h = x + s (g y) stored in H's dtype, out = LN(h) w + b in Out's,
    mean and rstd fp32."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < N
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X_ptr + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y_ptr + r64 * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_GAMMA:
        y = y * tl.load(G_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        y = y * tl.load(S_ptr + rows, mask=rmask, other=0.0)[:, None]
    h = (x + y).to(H_ptr.dtype.element_ty)
    tl.store(H_ptr + r64 * stride_h + cols[None, :], h, mask=mask)
    h = h.to(tl.float32)  # the LayerNorm reads the stored residual
    mean = tl.sum(h, axis=1) / C
    d = tl.where(mask, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
    w = tl.load(W_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(B_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    out = d * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Out_ptr + r64 * stride_o + cols[None, :], out.to(Out_ptr.dtype.element_ty), mask=mask)
    tl.store(Mean_ptr + rows, mean, mask=rmask)
    tl.store(Rstd_ptr + rows, rstd, mask=rmask)


@triton.jit
def _residual_layer_norm_bwd_kernel(
    DH_ptr, DOut_ptr, H_ptr, Y_ptr, S_ptr, G_ptr, W_ptr, Mean_ptr, Rstd_ptr,
    DX_ptr, DY_ptr, DWPart_ptr, DBPart_ptr, DGPart_ptr,
    N, C, stride_dh, stride_do, stride_h, stride_y, stride_dx, stride_dy,
    HAS_SCALE: tl.constexpr, HAS_GAMMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Row tiles pid, pid + P, ... (P programs): dx = dh + LN backward, dy = s g dx; the program's
    column sums of dout xhat, dout (and s y dx) to row pid of the (P, C) partial buffers."""
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    w = tl.load(W_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    g = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_GAMMA:
        g = tl.load(G_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    dg_acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)  # unused without HAS_GAMMA
    # pipelined by Triton: the next tiles' loads (cp.async into shared memory) are in flight while this
    # one is reduced and stored; the plain loop waits on each tile's loads (1.5x slower on an H200)
    for tile in tl.range(pid, tl.cdiv(N, BLOCK_M), n_progs, num_stages=3):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < N
        mask = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        mean = tl.load(Mean_ptr + rows, mask=rmask, other=0.0)
        rstd = tl.load(Rstd_ptr + rows, mask=rmask, other=0.0)
        h = tl.load(H_ptr + r64 * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
        dout = tl.load(DOut_ptr + r64 * stride_do + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dxhat = dout * w[None, :]
        c1 = tl.sum(dxhat * xhat, axis=1) / C
        c2 = tl.sum(dxhat, axis=1) / C
        dh = tl.load(DH_ptr + r64 * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dx = dh + (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(DX_ptr + r64 * stride_dx + cols[None, :], dx.to(DX_ptr.dtype.element_ty), mask=mask)
        dw_acc += dout * xhat
        db_acc += dout
        dt = dx
        if HAS_SCALE:
            dt = dx * tl.load(S_ptr + rows, mask=rmask, other=0.0)[:, None]
        if HAS_GAMMA:
            y = tl.load(Y_ptr + r64 * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dg_acc += dt * y
        tl.store(DY_ptr + r64 * stride_dy + cols[None, :], (dt * g[None, :]).to(DY_ptr.dtype.element_ty),
                 mask=mask)
    part = pid.to(tl.int64) * C + cols
    tl.store(DWPart_ptr + part, tl.sum(dw_acc, axis=0), mask=cmask)
    tl.store(DBPart_ptr + part, tl.sum(db_acc, axis=0), mask=cmask)
    if HAS_GAMMA:
        tl.store(DGPart_ptr + part, tl.sum(dg_acc, axis=0), mask=cmask)


# ----------------------------------------------------------------------------------------------
# Launchers, custom ops, public function
# ----------------------------------------------------------------------------------------------
# Row tile = BLOCK_M rows x BLOCK_C = next_pow2(C) columns; BLOCK_M from the tile's element count
# (forward 4096, backward 2048: it keeps ~3x more live tiles), num_warps 4 (8 from 8k elements).
# Spill-free with 16-byte loads on sm_80 / sm_90a at C 384 / 768 / 1024 (tests/kernels/
# test_residual_layer_norm.py): forward 72-96 registers, 2-4 KB shared (the row reductions); backward
# 128-168 registers, 25-33 KB shared bf16, up to 230 and 62 KB fp32 (the pipeline's stages).
# benchmarks/residual_norm.py --sweep-bwd on an H200 (bf16, N ~50k, C 384 / 768, with and without
# gamma; block_m x num_warps 4/8 x 1-8 programs an SM or one per tile): this table's backward was the
# fastest launch at all four shapes with the plain tile loop, and with the pipelined loop the fastest
# of a smaller grid (block_m x 1/2, 1, 2; num_warps 4/8; 2, 3, 4, 6 programs an SM).
FWD_TILE, BWD_TILE = 4096, 2048


def launch_config(C: int, backward: bool = False, block_m: int = 0, num_warps: int = 0) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps) for rows of C channels; a nonzero block_m / num_warps wins (tests,
    tuning: benchmarks/residual_norm.py --sweep-bwd)."""
    BLOCK_C = triton.next_power_of_2(C)
    BLOCK_M = block_m or max(1, (BWD_TILE if backward else FWD_TILE) // BLOCK_C)
    return BLOCK_M, BLOCK_C, num_warps or (8 if BLOCK_M * BLOCK_C >= 8192 else 4)


def backward_programs(N: int, BLOCK_M: int, device: torch.device, programs: int = 0) -> int:
    """Backward grid: at most one program per row tile; 3 per SM on CUDA (as many as are resident at
    once; each loops over its tiles), 2 under the interpreter (slow per program); a nonzero
    `programs` wins (tests, tuning)."""
    if not programs:
        programs = 3 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(programs, triton.cdiv(N, BLOCK_M)))


@torch.library.custom_op("fastdino::residual_layer_norm", mutates_args=())
def residual_layer_norm_op(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           scale: torch.Tensor | None, gamma: torch.Tensor | None, eps: float,
                           residual_dtype: torch.dtype, out_dtype: torch.dtype, block_m: int, programs: int,
                           num_warps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h (N, C) residual_dtype, out (N, C) out_dtype, mean (N,) fp32, rstd (N,) fp32). x, y (N, C)
    with unit column stride; scale (N,) fp32 or None; gamma, weight, bias (C,). block_m / programs /
    num_warps: launch overrides (0 = the table; block_m and num_warps for both kernels, programs for
    the backward's)."""
    N, C = x.shape
    BM, BC, nw = launch_config(C, block_m=block_m, num_warps=num_warps)
    h = torch.empty((N, C), dtype=residual_dtype, device=x.device)
    out = torch.empty((N, C), dtype=out_dtype, device=x.device)
    mean = torch.empty(N, dtype=torch.float32, device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    _residual_layer_norm_fwd_kernel[(triton.cdiv(N, BM),)](
        x, y, scale if scale is not None else x, gamma if gamma is not None else x, weight, bias, h, out, mean, rstd,
        N, C, x.stride(0), y.stride(0), h.stride(0), out.stride(0), eps,
        HAS_SCALE=scale is not None, HAS_GAMMA=gamma is not None, BLOCK_M=BM, BLOCK_C=BC, num_warps=nw)
    return h, out, mean, rstd


@residual_layer_norm_op.register_fake
def _(x, y, weight, bias, scale, gamma, eps, residual_dtype, out_dtype, block_m, programs, num_warps):
    N, C = x.shape
    return (x.new_empty((N, C), dtype=residual_dtype), x.new_empty((N, C), dtype=out_dtype),
            x.new_empty(N, dtype=torch.float32), x.new_empty(N, dtype=torch.float32))


@torch.library.custom_op("fastdino::residual_layer_norm_bwd", mutates_args=())
def residual_layer_norm_bwd_op(dh: torch.Tensor, dout: torch.Tensor, h: torch.Tensor, y: torch.Tensor | None,
                               weight: torch.Tensor, scale: torch.Tensor | None, gamma: torch.Tensor | None,
                               mean: torch.Tensor, rstd: torch.Tensor, x_dtype: torch.dtype, y_dtype: torch.dtype,
                               block_m: int, programs: int, num_warps: int
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (N, C) x_dtype, dy (N, C) y_dtype, dgamma (C,) gamma's dtype or an empty (0,) without
    gamma, dweight, dbias (C,) weight's dtype); see the header. y (the branch output) is read for
    dgamma only: None without gamma (the forward then does not keep it alive). block_m / programs /
    num_warps: launch overrides (0 = the table)."""
    if gamma is not None and y is None:
        raise ValueError("residual_layer_norm_bwd: gamma needs the branch output y for its gradient")
    N, C = h.shape
    dh, dout = dh.contiguous(), dout.contiguous()
    BM, BC, nw = launch_config(C, backward=True, block_m=block_m, num_warps=num_warps)
    P = backward_programs(N, BM, h.device, programs)
    dx = torch.empty((N, C), dtype=x_dtype, device=h.device)
    dy = torch.empty((N, C), dtype=y_dtype, device=h.device)
    dw_part = torch.empty((P, C), dtype=torch.float32, device=h.device)
    db_part = torch.empty((P, C), dtype=torch.float32, device=h.device)
    dg_part = torch.empty((P, C) if gamma is not None else (0,), dtype=torch.float32, device=h.device)
    _residual_layer_norm_bwd_kernel[(P,)](
        dh, dout, h, y if y is not None else h, scale if scale is not None else h,
        gamma if gamma is not None else h, weight, mean, rstd, dx, dy, dw_part, db_part, dg_part,
        N, C, dh.stride(0), dout.stride(0), h.stride(0), C if y is None else y.stride(0), dx.stride(0), dy.stride(0),
        HAS_SCALE=scale is not None, HAS_GAMMA=gamma is not None, BLOCK_M=BM, BLOCK_C=BC, num_warps=nw)
    dgamma = dg_part.sum(0).to(gamma.dtype) if gamma is not None else dg_part
    return dx, dy, dgamma, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)


@residual_layer_norm_bwd_op.register_fake
def _(dh, dout, h, y, weight, scale, gamma, mean, rstd, x_dtype, y_dtype, block_m, programs, num_warps):
    N, C = h.shape
    return (h.new_empty((N, C), dtype=x_dtype), h.new_empty((N, C), dtype=y_dtype),
            h.new_empty((C,) if gamma is not None else (0,), dtype=gamma.dtype if gamma is not None else torch.float32),
            h.new_empty((C,), dtype=weight.dtype), h.new_empty((C,), dtype=weight.dtype))


def _setup_context(ctx, inputs, output):
    x, y, weight, bias, scale, gamma, eps, residual_dtype, out_dtype, block_m, programs, num_warps = inputs
    h, _out, mean, rstd = output
    ctx.save_for_backward(h, y if gamma is not None else None, weight, scale, gamma, mean, rstd)
    ctx.x_dtype, ctx.y_dtype, ctx.launch = x.dtype, y.dtype, (block_m, programs, num_warps)


def _backward(ctx, dh, dout, _dmean, _drstd):
    h, y, weight, scale, gamma, mean, rstd = ctx.saved_tensors
    dx, dy, dgamma, dweight, dbias = residual_layer_norm_bwd_op(
        dh, dout, h, y, weight, scale, gamma, mean, rstd, ctx.x_dtype, ctx.y_dtype, *ctx.launch)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, dy if need[1] else None, dweight if need[2] else None,
            dbias if need[3] else None, None, dgamma if gamma is not None and need[5] else None,
            None, None, None, None, None, None)


residual_layer_norm_op.register_autograd(_backward, setup_context=_setup_context)


def residual_layer_norm(x, y, weight, bias, scale=None, gamma=None, eps=1e-6, residual_dtype=None, out_dtype=None,
                        impl="auto", *, block_m=0, programs=0, num_warps=0):
    """(h, out): h = x + scale * (gamma * y) in residual_dtype (default x's), out = LayerNorm(h) * weight
    + bias in out_dtype (default x's); see the header for the math and the backward.

    x, y (..., C) residual stream and branch output; scale (...,) fp32 per row (drop path: 0 or
    1 / keep_prob, the same for all tokens of a sample) or None; gamma (C,) LayerScale or None;
    weight, bias (C,) the next LayerNorm's. impl="triton": the custom op (CUDA, or CPU under
    TRITON_INTERPRET=1; fp32/bf16 x, y, h, out); "torch": residual_layer_norm_ref; "auto": triton for
    CUDA fp32/bf16, else torch. block_m / programs / num_warps: launch overrides (tests, tuning)."""
    if impl not in IMPLS:
        raise ValueError(f"residual_layer_norm: impl={impl!r} is not one of {list(IMPLS)}")
    _check_inputs(x, y, weight, bias, scale, gamma)
    residual_dtype = residual_dtype or x.dtype
    out_dtype = out_dtype or x.dtype
    if impl == "auto":
        impl = "triton" if (x.is_cuda and all(dt in TRITON_DTYPES for dt in (x.dtype, y.dtype, residual_dtype,
                                                                              out_dtype))) else "torch"
    if impl == "torch":
        return residual_layer_norm_ref(x, y, weight, bias, scale, gamma, eps, residual_dtype, out_dtype)
    for name, dt in (("x", x.dtype), ("y", y.dtype), ("residual_dtype", residual_dtype), ("out_dtype", out_dtype)):
        if dt not in TRITON_DTYPES:
            raise ValueError(f"residual_layer_norm: impl='triton' takes fp32 or bf16, got {name} {dt}")
    if scale is not None and scale.requires_grad:
        raise ValueError("residual_layer_norm: scale (drop-path scales) gets no gradient; pass it detached")
    check_runnable(x, "residual_layer_norm")
    shape, C = x.shape, x.shape[-1]
    x2, y2 = x.reshape(-1, C), y.reshape(-1, C)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    y2 = y2 if y2.stride(-1) == 1 else y2.contiguous()
    s2 = None if scale is None else scale.reshape(-1).to(torch.float32).contiguous()
    g = None if gamma is None else gamma.contiguous()
    h, out, _mean, _rstd = residual_layer_norm_op(x2, y2, weight.contiguous(), bias.contiguous(), s2, g, float(eps),
                                                  residual_dtype, out_dtype, block_m, programs, num_warps)
    return h.view(shape), out.view(shape)


def memory_floor_bytes(N: int, C: int, itemsize: int, backward: bool = True, gamma: bool = False) -> int:
    """Bytes of (N, C) tensors a forward (+ backward) must move, all in one itemsize: forward reads x, y
    and writes h, out; backward reads h, dout, dh (y with gamma) and writes dx, dy."""
    return N * C * itemsize * (4 + backward * (5 + gamma))


__all__ = ["residual_layer_norm", "residual_layer_norm_ref", "residual_layer_norm_op", "residual_layer_norm_bwd_op",
           "launch_config", "backward_programs", "memory_floor_bytes", "FWD_TILE", "BWD_TILE"]
