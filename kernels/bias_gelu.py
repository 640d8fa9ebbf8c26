"""Fused bias + exact GELU: the activation after the first Linear of the ViT MLP (fc1), with the Linear
computed without its bias (h = x @ W^T), forward and backward, one pass over the rows each.

Inputs: h (N, H) fp32 or bf16 (the bias-less fc1 output, H the MLP hidden width: 1536 ViT-S, 3072
ViT-B, 4096 ViT-L), bias (H,) fp32 or h's dtype. All math in fp32:

    z = h + bias
    a = gelu(z) = z * Phi(z) = 0.5 z (1 + erf(z / sqrt(2)))      stored in h's dtype
                                                   (exact GELU: torch.nn.GELU()'s default, not tanh)
The forward saves h and bias for the backward (not z, not a: z is recomputed, a is not needed).

Backward. Given da (N, H) in h's dtype:

    gelu'(z) = Phi(z) + z phi(z) = 0.5 (1 + erf(z / sqrt(2))) + z exp(-z^2 / 2) / sqrt(2 pi)
    dz = da * gelu'(z)                             (fp32)
    dh = dz                                        stored in h's dtype
    dbias = sum_rows(dz)                           fp32 sum of the unrounded dz, stored in bias's dtype

Kernels (row tiles of BLOCK_M rows x BLOCK_H = min(next_pow2(H), 512) columns: 512 divides the ViT
widths, so no lane is masked there; wider rows are several column tiles, each its own program):
  _bias_gelu_fwd_kernel, grid (cdiv(N, BLOCK_M), cdiv(H, BLOCK_H)): loads h and the bias, writes a.
  _bias_gelu_bwd_kernel, grid (P, cdiv(H, BLOCK_H)) with P <= cdiv(N, BLOCK_M): program (p, c) takes
      the row tiles p, p + P, p + 2P, ... of column tile c; loads da and h (the bias once), writes dh
      and its fp32 column sums of dz to row p of a (P, H) partial buffer; torch sums the P partials
      (fixed order: deterministic, no atomics). The tile loop is software-pipelined by Triton (tl.range,
      3 stages: the next tiles' loads go to shared memory while one is computed), as in
      residual_layer_norm's backward. P = 4 x the SM count / the column tiles on CUDA (see
      backward_programs), 2 under the interpreter.
Host: 1 launch forward; 1 launch + 1 small sum (the (P, H) partials) backward; no synchronization.
The custom ops fastdino::bias_gelu and fastdino::bias_gelu_bwd (fake impls, autograd on the first) keep
torch.compile on one graph.

Memory traffic (the floor, bytes per element of (N, H); 2 for bf16, 4 for fp32):
  forward:  read h; write a                                     (bf16: 4 B/element)
  backward: read da, h; write dh                                (bf16: 6 B/element)
  plus O(P H) for the bias and the partials. The unfused eager chain is Linear with its bias (cuBLAS
  adds it in the matmul's epilogue: z is written instead of h, no extra pass), F.gelu (read z, write a),
  then gelu_backward (read da, z; write dz) and the Linear's bias gradient dz.sum(0), which reads dz
  again: one more (N, H) pass in the backward (bf16: 8 B/element against 6). In eager PyTorch with the
  bias added apart, F.gelu(h + bias), the forward also writes and re-reads z (8 B/element against 4).

Design limits: fp32/bf16 h (fp16/fp64 go to the reference with impl="auto", impl="triton" refuses
them), bias fp32 or h's dtype; h's rows must be contiguous (unit stride over H; leading dimensions that
flatten to one row stride); the launch table is not measured on a GPU (no GPU run of this op yet): it
compiles spill-free with 16-byte loads for sm_80 and sm_90a at H = 1536 / 3072 / 4096, bf16 and fp32
(tests/kernels/test_bias_gelu.py, AOT), where every width gets the same tile (BLOCK_H = 512).
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
def _check_inputs(h, bias) -> None:
    """One-line ValueErrors naming the culprit."""
    check_float_tensors("bias_gelu", {"h": h, "bias": bias})
    if h.dim() < 1 or h.shape[-1] < 1 or h.numel() == 0:
        raise ValueError(f"bias_gelu: h must be (..., H) with H >= 1 and rows, got {tuple(h.shape)}")
    if tuple(bias.shape) != (h.shape[-1],):
        raise ValueError(f"bias_gelu: bias must be ({h.shape[-1]},), got {tuple(bias.shape)}")


def bias_gelu_ref(h, bias):
    """Plain PyTorch (see the header): gelu(h + bias) in h's dtype, h (..., H), bias (H,). Math in fp32
    (fp64 when h is fp64); autograd gives dh in h's dtype and dbias as the sum of the fp32 gradient,
    cast to bias's dtype."""
    _check_inputs(h, bias)
    dt = torch.float64 if h.dtype == torch.float64 else torch.float32
    return F.gelu(h.to(dt) + bias.to(dt)).to(h.dtype)


def _rows(h: torch.Tensor) -> torch.Tensor | None:
    """h as an (N, H) view with unit column stride, or None where there is no such view."""
    if h.stride(-1) != 1 and h.shape[-1] > 1:
        return None
    try:
        return h.view(-1, h.shape[-1])
    except RuntimeError:  # leading dimensions that do not flatten to one row stride
        return None


def triton_refusal(h, bias) -> str | None:
    """Why the Triton kernels cannot take (h, bias) (impl="auto" then runs the reference), or None."""
    if h.dtype not in TRITON_DTYPES:
        return f"impl='triton' takes fp32 or bf16 h, got {h.dtype}"
    if bias.dtype not in (torch.float32, h.dtype):
        return f"impl='triton' takes an fp32 bias or one in h's dtype {h.dtype}, got {bias.dtype}"
    if _rows(h) is None:
        return (f"impl='triton' needs h's rows contiguous (unit stride over H), got shape {tuple(h.shape)} "
                f"strides {h.stride()}; pass h.contiguous()")
    return None


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _bias_gelu_fwd_kernel(
    H_ptr, Bias_ptr, A_ptr, N, H, stride_h, stride_a,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Rows [pid0 * BLOCK_M, +BLOCK_M) x columns [pid1 * BLOCK_H, +BLOCK_H): a = gelu(h + bias) in A's
    dtype."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    mask = (rows < N)[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    b = tl.load(Bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    z = tl.load(H_ptr + r64 * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32) + b[None, :]
    a = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))  # 1/sqrt(2)
    tl.store(A_ptr + r64 * stride_a + cols[None, :], a.to(A_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    DA_ptr, H_ptr, Bias_ptr, DH_ptr, DBPart_ptr, N, H, stride_da, stride_h, stride_dh,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Row tiles pid0, pid0 + P, ... (P programs) of column tile pid1: dh = da gelu'(h + bias) in DH's
    dtype; the program's column sums of the fp32 dh to row pid0 of the (P, H) partial buffer."""
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    b = tl.load(Bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    # per-lane sums, reduced over the rows once at the end (not a cross-warp reduction per tile)
    db_acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    # pipelined by Triton: the next tiles' loads (cp.async into shared memory) are in flight while this
    # one is computed and stored
    for tile in tl.range(pid, tl.cdiv(N, BLOCK_M), n_progs, num_stages=3):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < N)[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        z = tl.load(H_ptr + r64 * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32) + b[None, :]
        da = tl.load(DA_ptr + r64 * stride_da + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))  # Phi(z)
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327  # phi(z) = exp(-z^2/2) / sqrt(2 pi)
        dz = da * (cdf + z * pdf)  # masked lanes: da = 0, so dz = 0 and the sums are untouched
        tl.store(DH_ptr + r64 * stride_dh + cols[None, :], dz.to(DH_ptr.dtype.element_ty), mask=mask)
        db_acc += dz
    tl.store(DBPart_ptr + pid.to(tl.int64) * H + cols, tl.sum(db_acc, axis=0), mask=cmask)


# ----------------------------------------------------------------------------------------------
# Launchers, custom ops, public function
# ----------------------------------------------------------------------------------------------
# Row tile = BLOCK_M rows x BLOCK_H = min(next_pow2(H), 512) columns (at least 16); BLOCK_M from the
# tile's element count (forward 4096, backward 2048: it keeps the fp32 sums and the pipeline's stages
# live), num_warps 4 (8 from 8k elements). Not tuned on a GPU: chosen so that both kernels compile
# spill-free with 16-byte loads on sm_80 / sm_90a (tests/kernels/test_bias_gelu.py prints registers
# and shared memory): forward 72-80 registers, 0-2 KB shared; backward 85-100 registers, 16 KB
# shared bf16, 32 KB fp32 (the pipeline's stages). benchmarks/bias_gelu.py measures it.
FWD_TILE, BWD_TILE, MAX_BLOCK_H, MIN_BLOCK_H = 4096, 2048, 512, 16
# backward programs an SM: at <= 128 registers x 128 threads and 32 KB shared, 4 fit at once (65536
# registers, 164-228 KB shared), so the persistent grid is one wave
BWD_PROGRAMS_PER_SM = 4


def launch_config(H: int, backward: bool = False, block_m: int = 0, block_h: int = 0,
                  num_warps: int = 0) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_H, num_warps) for rows of H columns; a nonzero block_m / block_h / num_warps wins
    (tests, tuning)."""
    BLOCK_H = block_h or min(max(triton.next_power_of_2(H), MIN_BLOCK_H), MAX_BLOCK_H)
    BLOCK_M = block_m or max(1, (BWD_TILE if backward else FWD_TILE) // BLOCK_H)
    return BLOCK_M, BLOCK_H, num_warps or (8 if BLOCK_M * BLOCK_H >= 8192 else 4)


def backward_programs(N: int, BLOCK_M: int, col_tiles: int, device: torch.device, programs: int = 0) -> int:
    """Backward row programs P per column tile: at most one per row tile; on CUDA the P x col_tiles grid
    fills BWD_PROGRAMS_PER_SM per SM (each program loops over its row tiles), 2 under the interpreter
    (slow per program); a nonzero `programs` wins (tests, tuning)."""
    if not programs:
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            programs = max(1, BWD_PROGRAMS_PER_SM * sms // col_tiles)
        else:
            programs = 2
    return max(1, min(programs, triton.cdiv(N, BLOCK_M)))


@torch.library.custom_op("fastdino::bias_gelu", mutates_args=())
def bias_gelu_op(h: torch.Tensor, bias: torch.Tensor, block_m: int, block_h: int, programs: int,
                 num_warps: int) -> torch.Tensor:
    """a (N, H) in h's dtype = gelu(h + bias); h (N, H) with unit column stride, bias (H,) contiguous.
    block_m / block_h / programs / num_warps: launch overrides (0 = the table; programs is the
    backward's, kept for it)."""
    N, H = h.shape
    BM, BH, nw = launch_config(H, block_m=block_m, block_h=block_h, num_warps=num_warps)
    a = torch.empty((N, H), dtype=h.dtype, device=h.device)
    _bias_gelu_fwd_kernel[(triton.cdiv(N, BM), triton.cdiv(H, BH))](
        h, bias, a, N, H, h.stride(0), a.stride(0), BLOCK_M=BM, BLOCK_H=BH, num_warps=nw)
    return a


@bias_gelu_op.register_fake
def _(h, bias, block_m, block_h, programs, num_warps):
    return h.new_empty(h.shape)


@torch.library.custom_op("fastdino::bias_gelu_bwd", mutates_args=())
def bias_gelu_bwd_op(da: torch.Tensor, h: torch.Tensor, bias: torch.Tensor, block_m: int, block_h: int,
                     programs: int, num_warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh (N, H) in h's dtype, dbias (H,) in bias's dtype); see the header. da (N, H), h (N, H) with
    unit column stride, bias (H,) contiguous. block_m / block_h / programs / num_warps: launch
    overrides (0 = the table)."""
    N, H = h.shape
    da = da if da.stride(-1) == 1 else da.contiguous()
    BM, BH, nw = launch_config(H, backward=True, block_m=block_m, block_h=block_h, num_warps=num_warps)
    col_tiles = triton.cdiv(H, BH)
    P = backward_programs(N, BM, col_tiles, h.device, programs)
    dh = torch.empty((N, H), dtype=h.dtype, device=h.device)
    db_part = torch.empty((P, H), dtype=torch.float32, device=h.device)
    _bias_gelu_bwd_kernel[(P, col_tiles)](
        da, h, bias, dh, db_part, N, H, da.stride(0), h.stride(0), dh.stride(0),
        BLOCK_M=BM, BLOCK_H=BH, num_warps=nw)
    return dh, db_part.sum(0).to(bias.dtype)


@bias_gelu_bwd_op.register_fake
def _(da, h, bias, block_m, block_h, programs, num_warps):
    return h.new_empty(h.shape), bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    h, bias, block_m, block_h, programs, num_warps = inputs
    ctx.save_for_backward(h, bias)
    ctx.launch = (block_m, block_h, programs, num_warps)


def _backward(ctx, da):
    h, bias = ctx.saved_tensors
    dh, dbias = bias_gelu_bwd_op(da, h, bias, *ctx.launch)
    need = ctx.needs_input_grad
    return dh if need[0] else None, dbias if need[1] else None, None, None, None, None


bias_gelu_op.register_autograd(_backward, setup_context=_setup_context)


def bias_gelu(h, bias, impl="auto", *, block_m=0, block_h=0, programs=0, num_warps=0):
    """gelu(h + bias) in h's dtype (exact GELU, math in fp32); see the header for the backward.

    h (..., H) the bias-less output of the MLP's first Linear, bias (H,) its bias. impl="triton": the
    custom op (CUDA, or CPU under TRITON_INTERPRET=1; fp32/bf16 h, bias fp32 or h's dtype, rows
    contiguous), else a one-line ValueError; "torch": bias_gelu_ref; "auto": triton for CUDA inputs it
    takes, else torch. block_m / block_h / programs / num_warps: launch overrides (tests, tuning)."""
    if impl not in IMPLS:
        raise ValueError(f"bias_gelu: impl={impl!r} is not one of {list(IMPLS)}")
    _check_inputs(h, bias)
    refusal = triton_refusal(h, bias)
    if impl == "auto":
        impl = "triton" if h.is_cuda and refusal is None else "torch"
    if impl == "torch":
        return bias_gelu_ref(h, bias)
    if refusal is not None:
        raise ValueError(f"bias_gelu: {refusal}")
    check_runnable(h, "bias_gelu")
    a = bias_gelu_op(_rows(h), bias.contiguous(), block_m, block_h, programs, num_warps)
    return a.view(h.shape)


def memory_floor_bytes(N: int, H: int, itemsize: int, backward: bool = True) -> int:
    """Bytes of (N, H) tensors a forward (+ backward) must move, all in one itemsize: forward reads h
    and writes a; backward reads da, h and writes dh (the O(P H) bias and partials not counted)."""
    return N * H * itemsize * (2 + 3 * backward)


__all__ = ["bias_gelu", "bias_gelu_ref", "bias_gelu_op", "bias_gelu_bwd_op", "triton_refusal", "launch_config",
           "backward_programs", "memory_floor_bytes", "FWD_TILE", "BWD_TILE"]
