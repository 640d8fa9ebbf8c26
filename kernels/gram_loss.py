"""Gram anchoring loss (DINOv3): MSE between the Gram matrices of the L2-normalized patch features of
the student and of the Gram teacher, computed tile by tile: no P x P matrix is ever stored.

Inputs: student patch features X (B, P, D) and Gram-teacher features Y (B, P, D) (the official
call: the 2 global crops' x_norm_patchtokens, crop-major, B = 2 * images; the teacher's resized to the
student grid), fp32 or bf16 (any float dtype for the reference). With img_level=False the Gram
matrix is taken over all B*P rows of the local batch at once (the official flattens to (B*P, D); it
also accepts (N, D) rows, e.g. the masked tokens only): the same math with B = 1, P = N.

The official steps (dinov3/loss/gram_loss.py, GramLoss; ssl_meta_arch.py calls it with
apply_norm = gram.normalized, img_level = gram.img_level, remove_neg, remove_only_teacher_neg; the
ViT-7B recipe: normalized, img_level, neither removal), in fp32 (both inputs upcast first):

    s = X / max(||X||, eps),  t = Y / max(||Y||, eps)     over D, eps = 1e-12 (F.normalize; apply_norm)
    G_s = s s^T,  G_t = t t^T                              per image (B, P, P)
    remove_neg:               G_s[G_s < 0] = 0;  G_t[G_t < 0] = 0
    remove_only_teacher_neg:  G_s[(G_s < 0) & (G_t < 0)] = 0;  G_t[G_t < 0] = 0
    loss = mean over all B*P*P entries of (G_s' - G_t')^2           (the two removals exclude each other)

No gradient reaches the teacher (the official teacher runs under no_grad; both paths detach it).

Gradient. Write E = G_s' - G_t' and M for the entries where G_s' still follows G_s (1 everywhere
without removal; G_s >= 0 with remove_neg; G_s >= 0 or G_t >= 0 with remove_only_teacher_neg, where E
is 0 wherever M is 0). With W = M * E (symmetric, like G_s and G_t) and n = B*P*P:

    dL/dG_s = 2 W / n,   dL/ds_i = (2 / n) sum_j (W_ij + W_ji) s_j = (4 / n) sum_j W_ij s_j
    dL/dx_i = r_i (dL/ds_i - [||x_i|| >= eps] s_i (s_i . dL/ds_i)),   r_i = 1 / max(||x_i||, eps)
    s_i . dL/ds_i = (4 / n) sum_j W_ij G_s,ij                                      (a row sum of the tile)

so the normalization's backward needs no extra pass over D: the projection coefficient is a row
reduction of W * G_s, accumulated with the tiles. The removal options only change E and W
elementwise (same kernels, a constexpr CLAMP); apply_norm=False drops r and the projection.

Kernels (fp32 accumulation, tensor cores; tl.dot in the input dtype: bf16 products are exact in fp32;
fp32 dots in TF32 where torch.backends.cuda.matmul.allow_tf32 is set, as the reference's matmuls,
else in 3xTF32 (input_precision "tf32x3": each operand split into a TF32 high and a TF32 low part,
three TF32 products summed, low x low dropped: ~fp32 accuracy at a third of the TF32 rate; exact
fp32 FMA dots, "ieee", ran at under 1 TFLOP/s on an H200; 3xTF32 is still slower than the
reference there, so impl="auto" takes the reference for it). Row norms (B, P) fp32 come from
torch.linalg.vector_norm; a tile's Gram entries are r_i r_j (x_i . x_j).
  _gram_loss_fwd_kernel, grid (B, P blocks): loss only (no gradient wanted). Program i loops over the
      column blocks j >= i (G is symmetric: off-diagonal blocks count twice), D in BLOCK_K chunks.
  _gram_loss_grad_kernel (gram_loss(dx="recompute"), the default), grid (B, P blocks, D chunks of
      BLOCK_DV): loss and dL/dX with upstream gradient 1, in the forward. Program (i, c) loops over
      every column block j: the G_s and G_t tiles over all of D, W, then acc += (W r_j) X_j[:, chunk]
      (tl.dot in X's dtype: W rounded to bf16 for bf16 inputs) and the row sums; at the end
      dX_i[:, chunk] from the formula above. The chunk-0 programs write the loss partials.
  _gram_loss_grad_accumulate_kernel (dx="accumulate"), grid (B, P blocks): the same outputs, each
      Gram tile computed once. Program i loops over every column block j: the G_s and G_t tiles over
      all of D, W and the row sums, then over D in BLOCK_DV chunks: DX_i[:, chunk] += (W r_j)
      X_j[:, chunk] (the same dot) in the fp32 output itself, which the program owns (the first j
      block stores, later ones load, add and store; a barrier after each j block makes one thread's
      stores visible to another thread's loads). A last pass over the chunks turns the sums into
      dX_i in place (the formula above) and the program writes its loss partial.
  The autograd backward multiplies the saved fp32 dL/dX by the upstream gradient: no backward kernel.
Each program owns its outputs (rows of block i, all of D or one chunk, and the loss partial of block
i): no atomics, deterministic in both modes (which add the same products in different orders: bit
for bit equal in the interpreter, within fp32 rounding on a GPU); the loss is torch's sum of the
partials / n. Host: 1 launch + 2 norms (normalized) + 1 sum, no synchronization.
The custom op fastdino::gram_loss (fake impl, autograd) keeps torch.compile on one graph.

Work and traffic. Useful FLOPs: G_s and G_t 2 * 2 B P^2 D, dL/dS 2 B P^2 D (6 B P^2 D fwd+bwd).
The recompute grad kernel does (4 n_chunks + 2) B P^2 D: the Gram tiles are recomputed for each of
the n_chunks = ceil(D / BLOCK_DV) D chunks of the dX accumulator, which lives in registers. bf16 at
D = 768: 3 chunks of 256, 14 B P^2 D (2.3x the useful work); D = 384: 2 chunks; TF32 and 3xTF32
(BLOCK_DV 128): 6 chunks at D = 768, 26 B P^2 D. The accumulate grad kernel does the useful
6 B P^2 D and moves dX instead: a read-modify-write of block i's fp32 rows, 2 * BLOCK_M * D * 4
bytes per (i, j) tile pair (the first j block writes only), 8 P^2 D / BLOCK_M bytes per image
(3 BLOCK_M / 4 FLOPs per byte: 48 at BLOCK_M = 64, 1.6 GB per image at P = 4096, D = 768). Those
rows should stay in L2: BLOCK_M * D * 4 bytes per running program (192 KiB at 64 x 768; one
program per SM at 8 warps and ~220 registers, ~26 MB on 132 SMs, half of an H100's or H200's 50 MB
L2, which also holds the X and Y tiles). When each mode wins (recompute's extra FLOPs against
accumulate's L2 traffic, per dtype, P and D) is a GPU measurement not yet made (benchmarks/gram.py
--dx recompute accumulate). The loss-only kernel does ~2 B P^2 D (the upper triangle of tiles).
Memory floor: X and Y read once, dX written once. DRAM traffic: X, Y once (tiles re-read from L2
while an image's rows stay resident: P D itemsize bytes per input, 6.3 MB at P = 4096, D = 768 in
bf16), the fp32 dL/dX written in the forward (by the accumulate kernel: if its sums stay in L2),
read and cast to X's dtype in the backward. Extra memory: the saved fp32 dL/dX (B, P, D) (the
accumulate kernel's sums too) and (B, P/BLOCK_M) partials; no (B, P, P) tensor (the reference keeps
several).
Design limits: untuned launch tables (measured on a GPU: the recompute tf32x3 row only, see
AUTO_TORCH_KINDS; the accumulate kernel never);
fp32 and bf16 inputs (fp16 and fp64 go to the reference with impl="auto"); fp32 without TF32
multiplies in 3xTF32, not exact fp32 (a product's relative error ~2^-21 instead of 2^-24, sums in
fp32 either way; the Triton interpreter ignores input_precision: fp32 products there); the tables
compile spill-free for D a multiple of 16 (16-byte aligned rows, as every ViT width); other D lose
the alignment hints, and the recompute grad kernel spills tens (fp32) to a few hundred (bf16) bytes
per thread on sm_80 and sm_90a, the accumulate kernel ~400-850 (bf16, tf32) and up to 160 (tf32x3)
(compiled with cuobjdump: correct, slower);
without removal, E = s s^T - t t^T allows a D x D formulation (||s^T s||^2 - 2 ||s^T t||^2 +
||t^T t||^2, O(P D^2)), much cheaper when P >> D (img_level=False): not implemented (it cancels
catastrophically when the student matches the teacher).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .soft_cross_entropy import check_float_tensors, check_runnable

log = logging.getLogger("fastdino")

NORM_EPS = 1e-12  # F.normalize's default, as the official GramLoss calls it
CLAMPS = {"none": 0, "remove_neg": 1, "remove_only_teacher_neg": 2}


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
def _check_inputs(student, teacher, img_level, remove_neg, remove_only_teacher_neg) -> int:
    """One-line ValueErrors; returns the CLAMP code of the removal options."""
    check_float_tensors("gram_loss", {"student": student, "teacher": teacher})
    if student.shape != teacher.shape:
        raise ValueError(f"gram_loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
                         f"features must have one shape")
    dims = (3,) if img_level else (2, 3)
    if student.dim() not in dims or min(student.shape) < 1:
        want = "(B, P, D)" if img_level else "(B, P, D) or (N, D)"
        raise ValueError(f"gram_loss: features must be {want} with every size >= 1 "
                         f"(img_level={img_level}), got {tuple(student.shape)}")
    if remove_neg and remove_only_teacher_neg:
        raise ValueError("gram_loss: remove_neg and remove_only_teacher_neg exclude each other")
    return CLAMPS["remove_neg" if remove_neg else "remove_only_teacher_neg" if remove_only_teacher_neg else "none"]


def gram_loss_ref(student, teacher, img_level=True, remove_neg=False, remove_only_teacher_neg=False, *,
                  apply_norm=True):
    """Plain PyTorch, the official GramLoss: both Gram matrices materialized.

    student, teacher (B, P, D) patch features (or (N, D) with img_level=False), any float dtype; math
    in fp32 (fp64 for fp64 inputs), teacher detached. Returns the scalar loss (fp32 or fp64). The
    official in-place masked assignments are written as torch.where (same values, same gradient:
    0 at the replaced entries)."""
    _check_inputs(student, teacher, img_level, remove_neg, remove_only_teacher_neg)
    dt = torch.float64 if student.dtype == torch.float64 else torch.float32
    s, t = student.to(dt), teacher.detach().to(dt)
    if apply_norm:
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    if not img_level and s.dim() == 3:
        s, t = s.flatten(0, 1), t.flatten(0, 1)
    g_s, g_t = s @ s.transpose(-1, -2), t @ t.transpose(-1, -2)
    if remove_neg:
        g_s = torch.where(g_s < 0, 0.0, g_s)
        g_t = torch.where(g_t < 0, 0.0, g_t)
    elif remove_only_teacher_neg:
        g_s = torch.where((g_s < 0) & (g_t < 0), 0.0, g_s)
        g_t = torch.where(g_t < 0, 0.0, g_t)
    return F.mse_loss(g_s, g_t)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _row_dots(X_ptr, base, rows_i, rows_j, mask_i, mask_j, D, stride_p,
              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Raw inner products x_i . x_j of a (BLOCK_M, BLOCK_M) tile over all of D, fp32; exactly 0 outside
    P (padding rows load as zeros)."""
    acc = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < D
        xi = tl.load(X_ptr + base + rows_i[:, None].to(tl.int64) * stride_p + cols[None, :],
                     mask=mask_i[:, None] & cmask[None, :], other=0.0)
        xj = tl.load(X_ptr + base + rows_j[:, None].to(tl.int64) * stride_p + cols[None, :],
                     mask=mask_j[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(xi, tl.trans(xj), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _gram_tiles(X_ptr, Y_ptr, x_base, y_base, rows_i, rows_j, mask_i, mask_j, D, stride_xp, stride_yp,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(x_i . x_j, y_i . y_j) of a tile. Two D loops one after the other, not one loop with two dots:
    half the live registers on sm_80 (no spills at 64 x 64 tiles)."""
    gs = _row_dots(X_ptr, x_base, rows_i, rows_j, mask_i, mask_j, D, stride_xp, BLOCK_M, BLOCK_K, DOT_PRECISION)
    gt = _row_dots(Y_ptr, y_base, rows_i, rows_j, mask_i, mask_j, D, stride_yp, BLOCK_M, BLOCK_K, DOT_PRECISION)
    return gs, gt


@triton.jit
def _inv_norm(Norm_ptr, idx, mask, eps):
    """r = 1 / max(||x||, eps) of the rows idx (F.normalize's divisor); padding rows: r = 1."""
    return 1.0 / tl.maximum(tl.load(Norm_ptr + idx, mask=mask, other=1.0), eps)


@triton.jit
def _cosine_tiles(X_ptr, Y_ptr, XNorm_ptr, YNorm_ptr, x_base, y_base, norm_base, rows_i, rows_j, mask_i, mask_j,
                  rxi, ryi, D, stride_xp, stride_yp, eps, NORMALIZE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(G_s, G_t, r_j) of a tile: the row dots, scaled by the rows' inverse norms r_i r_j when NORMALIZE
    (rxi / ryi: the i rows', read once per program; the j rows' read here; r_j of the student is
    returned for the gradient, 1 without NORMALIZE)."""
    gs, gt = _gram_tiles(X_ptr, Y_ptr, x_base, y_base, rows_i, rows_j, mask_i, mask_j, D, stride_xp, stride_yp,
                         BLOCK_M, BLOCK_K, DOT_PRECISION)
    rxj = tl.full([BLOCK_M], 1.0, tl.float32)
    if NORMALIZE:
        norm_j = norm_base + rows_j
        rxj = _inv_norm(XNorm_ptr, norm_j, mask_j, eps)
        ryj = _inv_norm(YNorm_ptr, norm_j, mask_j, eps)
        gs = gs * rxi[:, None] * rxj[None, :]
        gt = gt * ryi[:, None] * ryj[None, :]
    return gs, gt, rxj


@triton.jit
def _gram_error(gs, gt, CLAMP: tl.constexpr):
    """(E, W) of a tile: E = G_s' - G_t' after the removal option, W = E where G_s' follows G_s, else 0.
    CLAMP 0: no removal; 1: remove_neg; 2: remove_only_teacher_neg. Padding (gs = gt = 0): E = W = 0."""
    if CLAMP == 0:
        e = gs - gt
        w = e
    elif CLAMP == 1:
        e = tl.where(gs < 0, 0.0, gs) - tl.where(gt < 0, 0.0, gt)
        w = tl.where(gs < 0, 0.0, e)
    else:
        e = tl.where((gs < 0) & (gt < 0), 0.0, gs) - tl.where(gt < 0, 0.0, gt)
        w = e  # replaced entries have G_t' = 0 too: E = 0 there
    return e, w


@triton.jit
def _tile_weights(X_ptr, Y_ptr, XNorm_ptr, YNorm_ptr, x_base, y_base, norm_base, rows_i, rows_j, mask_i, mask_j,
                  rxi, ryi, D, stride_xp, stride_yp, eps, CLAMP: tl.constexpr, NORMALIZE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """What both grad kernels take from a tile: (W r_j, the dot's left operand (W_ij s_j = (W_ij r_j) x_j: the raw
    rows feed the dot), the rows' sums of E^2, the rows' sums of W G_s (0 without NORMALIZE))."""
    gs, gt, rxj = _cosine_tiles(X_ptr, Y_ptr, XNorm_ptr, YNorm_ptr, x_base, y_base, norm_base, rows_i, rows_j,
                                mask_i, mask_j, rxi, ryi, D, stride_xp, stride_yp, eps, NORMALIZE, BLOCK_M, BLOCK_K,
                                DOT_PRECISION)
    e, w = _gram_error(gs, gt, CLAMP)
    rowdot = tl.zeros([BLOCK_M], dtype=tl.float32)
    if NORMALIZE:
        rowdot = tl.sum(w * gs, axis=1)
        w = w * rxj[None, :]
    return w, tl.sum(e * e, axis=1), rowdot


@triton.jit
def _row_block(XNorm_ptr, YNorm_ptr, pid_b, pid_i, P, eps, NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row block pid_i of image pid_b, as every kernel here starts: its rows, their mask, their index into the
    (B*P,) norms, and the inverse norms of its x and y rows (ones, unused, unless NORMALIZE)."""
    rows_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_i = rows_i < P
    norm_i = pid_b.to(tl.int64) * P + rows_i
    rxi = tl.full([BLOCK_M], 1.0, tl.float32)
    ryi = rxi
    if NORMALIZE:
        rxi = _inv_norm(XNorm_ptr, norm_i, mask_i, eps)
        ryi = _inv_norm(YNorm_ptr, norm_i, mask_i, eps)
    return rows_i, mask_i, norm_i, rxi, ryi


@triton.jit
def _gram_loss_fwd_kernel(
    X_ptr, Y_ptr, XNorm_ptr, YNorm_ptr, LossPart_ptr,
    P, D, n_blocks, stride_xb, stride_xp, stride_yb, stride_yp, eps,
    CLAMP: tl.constexpr, NORMALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """LossPart[b, i] = sum of E^2 over the rows of block i of image b and every column (blocks
    j > i count twice for the mirrored j < i)."""
    pid_b = tl.program_id(0)
    pid_i = tl.program_id(1)
    x_base = pid_b.to(tl.int64) * stride_xb
    y_base = pid_b.to(tl.int64) * stride_yb
    i0 = pid_i * BLOCK_M
    rows_i, mask_i, norm_i, rxi, ryi = _row_block(XNorm_ptr, YNorm_ptr, pid_b, pid_i, P, eps, NORMALIZE, BLOCK_M)
    sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j0 in range(i0, P, BLOCK_M):
        rows_j = j0 + tl.arange(0, BLOCK_M)
        mask_j = rows_j < P
        gs, gt, rxj = _cosine_tiles(X_ptr, Y_ptr, XNorm_ptr, YNorm_ptr, x_base, y_base, pid_b.to(tl.int64) * P,
                                    rows_i, rows_j, mask_i, mask_j, rxi, ryi, D, stride_xp, stride_yp, eps,
                                    NORMALIZE, BLOCK_M, BLOCK_K, DOT_PRECISION)
        e, _w = _gram_error(gs, gt, CLAMP)
        sq += tl.sum(e * e, axis=1) * tl.where(j0 == i0, 1.0, 2.0)
    tl.store(LossPart_ptr + pid_b.to(tl.int64) * n_blocks + pid_i, tl.sum(sq, axis=0))


@triton.jit
def _gram_loss_grad_kernel(
    X_ptr, Y_ptr, XNorm_ptr, YNorm_ptr, DX_ptr, LossPart_ptr,
    P, D, n_blocks, stride_xb, stride_xp, stride_yb, stride_yp, eps, grad_scale,  # grad_scale = 4 / (B P^2)
    CLAMP: tl.constexpr, NORMALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dX[b, block i, chunk c] (fp32, DX contiguous (B, P, D)) for upstream gradient 1, and, in the
    chunk-0 programs, LossPart[b, i] = sum of E^2 over the block's rows and all columns."""
    pid_b = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_c = tl.program_id(2)
    x_base = pid_b.to(tl.int64) * stride_xb
    y_base = pid_b.to(tl.int64) * stride_yb
    rows_i, mask_i, norm_i, rxi, ryi = _row_block(XNorm_ptr, YNorm_ptr, pid_b, pid_i, P, eps, NORMALIZE, BLOCK_M)
    cols_v = pid_c * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mask_v = cols_v < D
    if NORMALIZE:
        keep_i = tl.load(XNorm_ptr + norm_i, mask=mask_i, other=1.0) >= eps  # F.normalize: no projection below eps
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)  # sum_j W_ij r_j x_j over this D chunk
    rowdot = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_j W_ij G_s,ij = s_i . sum_j W_ij s_j
    sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j0 in range(0, P, BLOCK_M):
        rows_j = j0 + tl.arange(0, BLOCK_M)
        mask_j = rows_j < P
        w, sq_j, rowdot_j = _tile_weights(X_ptr, Y_ptr, XNorm_ptr, YNorm_ptr, x_base, y_base, pid_b.to(tl.int64) * P,
                                          rows_i, rows_j, mask_i, mask_j, rxi, ryi, D, stride_xp, stride_yp, eps,
                                          CLAMP, NORMALIZE, BLOCK_M, BLOCK_K, DOT_PRECISION)
        sq += sq_j
        rowdot += rowdot_j
        xj = tl.load(X_ptr + x_base + rows_j[:, None].to(tl.int64) * stride_xp + cols_v[None, :],
                     mask=mask_j[:, None] & mask_v[None, :], other=0.0)
        acc = tl.dot(w.to(xj.dtype), xj, acc, input_precision=DOT_PRECISION)
    mask_out = mask_i[:, None] & mask_v[None, :]
    if NORMALIZE:
        xi = tl.load(X_ptr + x_base + rows_i[:, None].to(tl.int64) * stride_xp + cols_v[None, :],
                     mask=mask_out, other=0.0).to(tl.float32)
        proj = tl.where(keep_i, rowdot * rxi, 0.0)  # s_i (s_i . ds_i) = x_i r_i rowdot_i; none when clamped
        dx = (acc - xi * proj[:, None]) * (rxi * grad_scale)[:, None]
    else:
        dx = acc * grad_scale
    tl.store(DX_ptr + rows_i[:, None].to(tl.int64) * D + pid_b.to(tl.int64) * P * D + cols_v[None, :], dx,
             mask=mask_out)
    if pid_c == 0:
        tl.store(LossPart_ptr + pid_b.to(tl.int64) * n_blocks + pid_i, tl.sum(sq, axis=0))


@triton.jit
def _gram_loss_grad_accumulate_kernel(
    X_ptr, Y_ptr, XNorm_ptr, YNorm_ptr, DX_ptr, LossPart_ptr,
    P, D, n_blocks, stride_xb, stride_xp, stride_yb, stride_yp, eps, grad_scale,  # grad_scale = 4 / (B P^2)
    CLAMP: tl.constexpr, NORMALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dX[b, block i, :] (fp32, DX contiguous (B, P, D)) for upstream gradient 1 and LossPart[b, i], as
    _gram_loss_grad_kernel, but each Gram tile computed once: sum_j W_ij r_j x_j is accumulated in the
    block's own rows of DX (global memory, L2), chunk by chunk of BLOCK_DV columns, then turned into dX
    in place by a last pass over the chunks."""
    pid_b = tl.program_id(0)
    pid_i = tl.program_id(1)
    x_base = pid_b.to(tl.int64) * stride_xb
    y_base = pid_b.to(tl.int64) * stride_yb
    rows_i, mask_i, norm_i, rxi, ryi = _row_block(XNorm_ptr, YNorm_ptr, pid_b, pid_i, P, eps, NORMALIZE, BLOCK_M)
    dx_rows = DX_ptr + pid_b.to(tl.int64) * P * D + rows_i[:, None].to(tl.int64) * D  # (BLOCK_M, 1) row starts
    rowdot = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_j W_ij G_s,ij = s_i . sum_j W_ij s_j
    sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j0 in range(0, P, BLOCK_M):
        rows_j = j0 + tl.arange(0, BLOCK_M)
        mask_j = rows_j < P
        w, sq_j, rowdot_j = _tile_weights(X_ptr, Y_ptr, XNorm_ptr, YNorm_ptr, x_base, y_base, pid_b.to(tl.int64) * P,
                                          rows_i, rows_j, mask_i, mask_j, rxi, ryi, D, stride_xp, stride_yp, eps,
                                          CLAMP, NORMALIZE, BLOCK_M, BLOCK_K, DOT_PRECISION)
        sq += sq_j
        rowdot += rowdot_j
        w = w.to(X_ptr.dtype.element_ty)  # as the recompute kernel: rounded to bf16 for bf16 features
        for c0 in range(0, D, BLOCK_DV):
            cols_v = c0 + tl.arange(0, BLOCK_DV)
            mask_v = cols_v < D
            mask_out = mask_i[:, None] & mask_v[None, :]
            xj = tl.load(X_ptr + x_base + rows_j[:, None].to(tl.int64) * stride_xp + cols_v[None, :],
                         mask=mask_j[:, None] & mask_v[None, :], other=0.0)
            part = tl.dot(w, xj, input_precision=DOT_PRECISION)
            # the first column block stores its part: the masked-off load reads no (uninitialized) memory
            part += tl.load(dx_rows + cols_v[None, :], mask=mask_out & (j0 > 0), other=0.0)
            tl.store(dx_rows + cols_v[None, :], part, mask=mask_out)
        # The next column block (and the last pass) loads what this one stored, and the compiler may
        # give the load and the store different register layouts: an element stored by one thread can
        # be loaded by another thread of this program. bar.sync orders the CTA's global stores before
        # its later loads; without it a thread could read a sum that is one column block stale.
        tl.debug_barrier()
    if NORMALIZE:
        keep_i = tl.load(XNorm_ptr + norm_i, mask=mask_i, other=1.0) >= eps  # F.normalize: no projection below eps
        proj = tl.where(keep_i, rowdot * rxi, 0.0)  # s_i (s_i . ds_i) = x_i r_i rowdot_i; none when clamped
    for c0 in range(0, D, BLOCK_DV):
        cols_v = c0 + tl.arange(0, BLOCK_DV)
        mask_out = mask_i[:, None] & (cols_v < D)[None, :]
        acc = tl.load(dx_rows + cols_v[None, :], mask=mask_out, other=0.0)  # sum_j W_ij r_j x_j
        if NORMALIZE:
            xi = tl.load(X_ptr + x_base + rows_i[:, None].to(tl.int64) * stride_xp + cols_v[None, :],
                         mask=mask_out, other=0.0).to(tl.float32)
            dx = (acc - xi * proj[:, None]) * (rxi * grad_scale)[:, None]
        else:
            dx = acc * grad_scale
        tl.store(dx_rows + cols_v[None, :], dx, mask=mask_out)  # each element is read above before it is overwritten
    tl.store(LossPart_ptr + pid_b.to(tl.int64) * n_blocks + pid_i, tl.sum(sq, axis=0))


# ----------------------------------------------------------------------------------------------
# Launchers, custom op, public function
# ----------------------------------------------------------------------------------------------
# Per dot kind: (BLOCK_M (= BLOCK_N), BLOCK_K, BLOCK_DV, num_warps, num_stages), the loss-only and the
# recompute grad kernel. "bf16": bf16 features; "tf32": fp32 features with TF32 allowed; "tf32x3": fp32
# features without TF32, 3xTF32 dots (three TF32 dots on split operands, register-hungry: every 64-row
# tile's grad kernel spills on sm_80, so 32-row tiles). A bf16 student with an fp32 teacher takes the
# fp32 rows. Untuned (timed on a GPU: tf32x3 only, below): the largest BLOCK_DV (fewest D chunks, so
# fewest Gram recomputations) with which every kernel compiles for sm_80 and sm_90a without register
# spills (cuobjdump in tests/kernels/test_gram_loss.py):
# the bf16 grad kernel takes 255 registers on sm_80 (the limit; 512 spills) and ~225 on sm_90a; tf32
# at 256 spills on sm_80; tf32x3 takes ~230 on sm_80 and ~210 on sm_90a, and at 256 spills 16 B on
# sm_80 with a bf16 student. Tune with benchmarks/gram.py.
GRAM_CONFIG = {"bf16": (64, 64, 256, 8, 2), "tf32": (64, 32, 128, 8, 2), "tf32x3": (32, 32, 128, 8, 2)}
# The same columns for _gram_loss_grad_accumulate_kernel (gram_loss(dx="accumulate")); the loss-only
# kernel keeps GRAM_CONFIG. Here BLOCK_DV is only the width of the DX chunk read-modified-written per
# dot (no Gram recomputation rides on it). Untuned, never timed on a GPU: the GRAM_CONFIG rows where
# they compile for sm_80 and sm_90a without register spills at P = 4096, D = 768 (cuobjdump in
# tests/kernels/test_gram_loss.py): tf32 ~236 registers on sm_80, ~218 on sm_90a; tf32x3 ~211 and
# ~206 (~232 and ~213 with a bf16 student); bf16 at BLOCK_DV 256 spills 104 B per thread on sm_80
# (255 registers), so 128: ~228 and ~219. 64-row tf32x3 tiles spill on sm_80 at BLOCK_DV 64 and 128.
GRAM_ACCUMULATE_CONFIG = {"bf16": (64, 64, 128, 8, 2), "tf32": (64, 32, 128, 8, 2), "tf32x3": (32, 32, 128, 8, 2)}

# impl="auto" leaves the "tf32x3" kind to the reference (cuBLAS fp32 matmuls): measured on an H200
# (torch 2.11, triton 3.6), fwd+bwd fp32 without TF32, B=16 P=1024 D=768: the reference 2.84 ms, this
# row 47.4 ms, BLOCK_DV 256 24.3 ms, the former exact-fp32 "ieee" dots 167 ms; B=64 P=256 D=768:
# 1.21, 12.4, 6.4, 41.9 ms. The 32-row tiles and the Gram recomputation per D chunk cost more than
# the reference's three matmuls and (B, P, P) buffers.
AUTO_TORCH_KINDS = {"tf32x3": "fp32 features without TF32 (torch.backends.cuda.matmul.allow_tf32 is False): "
                              "the 3xTF32 kernel is 10-17x slower than the reference's fp32 matmuls on an H200"}
_logged_reasons: set[str] = set()


def dot_kind(*dtypes: torch.dtype) -> str:
    """The launch-table row and dot precision of features in these dtypes: "bf16" when all are bf16,
    else "tf32" where PyTorch's own fp32 matmuls would use TF32 (the reference's numbers), else
    "tf32x3" (~fp32 accuracy on tensor cores)."""
    if all(dt == torch.bfloat16 for dt in dtypes):
        return "bf16"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def launch_config(P: int, D: int, kind: str, block_m: int = 0, block_k: int = 0, block_dv: int = 0, *,
                  accumulate: bool = False) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_DV, num_warps, num_stages) for P rows of D features of dot_kind
    `kind`, from GRAM_CONFIG, or GRAM_ACCUMULATE_CONFIG for the accumulate grad kernel; nonzero
    overrides win (tests, tuning)."""
    bm, bk, bdv, nw, ns = (GRAM_ACCUMULATE_CONFIG if accumulate else GRAM_CONFIG)[kind]
    return (block_m or min(bm, max(16, triton.next_power_of_2(P))),
            block_k or min(bk, max(16, triton.next_power_of_2(D))),
            block_dv or min(bdv, max(16, triton.next_power_of_2(D))), nw, ns)


@torch.library.custom_op("fastdino::gram_loss", mutates_args=())
def gram_loss_op(student: torch.Tensor, teacher: torch.Tensor, clamp: int, normalize: bool, with_grad: bool,
                 accumulate: bool, block_m: int, block_k: int, block_dv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss 0-dim fp32, dL/dstudent (B, P, D) fp32 for upstream gradient 1, or an empty (0,) tensor
    when with_grad is False: then the loss-only kernel runs). student, teacher (B, P, D) fp32/bf16;
    clamp: CLAMPS code; accumulate: the gradient from _gram_loss_grad_accumulate_kernel (dX summed
    in global memory) instead of _gram_loss_grad_kernel (Gram tiles recomputed per D chunk);
    block_*: launch overrides, 0 = the table."""
    X, Y = student.contiguous(), teacher.contiguous()
    B, P, D = X.shape
    kind = dot_kind(X.dtype, Y.dtype)
    BM, BK, BDV, nw, ns = launch_config(P, D, kind, block_m, block_k, block_dv, accumulate=with_grad and accumulate)
    n_blocks = triton.cdiv(P, BM)
    if normalize:  # (B, P) fp32 row norms: the official F.normalize's, of the fp32 upcast
        x_norm = torch.linalg.vector_norm(X, dim=-1, dtype=torch.float32)
        y_norm = torch.linalg.vector_norm(Y, dim=-1, dtype=torch.float32)
    else:
        x_norm = y_norm = X  # not read (NORMALIZE=False)
    part = torch.empty((B, n_blocks), dtype=torch.float32, device=X.device)
    numel = B * P * P
    prec = "ieee" if kind == "bf16" else kind  # tl.dot's input_precision; ignored by bf16 dots
    strides = (X.stride(0), X.stride(1), Y.stride(0), Y.stride(1))
    if with_grad and accumulate:
        dX = torch.empty((B, P, D), dtype=torch.float32, device=X.device)  # the kernel's accumulator, then dX
        _gram_loss_grad_accumulate_kernel[(B, n_blocks)](
            X, Y, x_norm, y_norm, dX, part, P, D, n_blocks, *strides, NORM_EPS, 4.0 / numel,
            CLAMP=clamp, NORMALIZE=normalize, DOT_PRECISION=prec, BLOCK_M=BM, BLOCK_K=BK, BLOCK_DV=BDV,
            num_warps=nw, num_stages=ns)
    elif with_grad:
        dX = torch.empty((B, P, D), dtype=torch.float32, device=X.device)
        _gram_loss_grad_kernel[(B, n_blocks, triton.cdiv(D, BDV))](
            X, Y, x_norm, y_norm, dX, part, P, D, n_blocks, *strides, NORM_EPS, 4.0 / numel,
            CLAMP=clamp, NORMALIZE=normalize, DOT_PRECISION=prec, BLOCK_M=BM, BLOCK_K=BK, BLOCK_DV=BDV,
            num_warps=nw, num_stages=ns)
    else:
        dX = torch.empty(0, dtype=torch.float32, device=X.device)
        _gram_loss_fwd_kernel[(B, n_blocks)](
            X, Y, x_norm, y_norm, part, P, D, n_blocks, *strides, NORM_EPS,
            CLAMP=clamp, NORMALIZE=normalize, DOT_PRECISION=prec, BLOCK_M=BM, BLOCK_K=BK,
            num_warps=nw, num_stages=ns)
    return part.sum() / numel, dX


@gram_loss_op.register_fake
def _(student, teacher, clamp, normalize, with_grad, accumulate, block_m, block_k, block_dv):
    f32 = dict(dtype=torch.float32, device=student.device)
    return torch.empty((), **f32), torch.empty(student.shape if with_grad else (0,), **f32)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.student_dtype = inputs[0].dtype
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_dx):
    (dx,) = ctx.saved_tensors
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return (None,) * 9
    if dx.numel() == 0:
        raise RuntimeError("gram_loss: the forward ran with with_grad=False, so it kept no gradient")
    return ((grad_loss * dx).to(ctx.student_dtype),) + (None,) * 8


gram_loss_op.register_autograd(_backward, setup_context=_setup_context)

IMPLS = ("auto", "triton", "torch")
DX_MODES = ("recompute", "accumulate")  # gram_loss(dx=...): the grad kernel (see the header)
TRITON_DTYPES = (torch.float32, torch.bfloat16)


def gram_loss(student, teacher, img_level=True, remove_neg=False, remove_only_teacher_neg=False, impl="auto", *,
              apply_norm=True, dx="recompute", block_m=0, block_k=0, block_dv=0):
    """DINOv3 Gram anchoring loss (see the header), scalar fp32; gradient to student only.

    student, teacher (B, P, D) patch features (or (N, D) rows with img_level=False): student and Gram
    teacher, same shape. img_level: a Gram matrix per image (True) or one over all rows (False);
    remove_neg / remove_only_teacher_neg: the official removals of negative similarities (at most
    one); apply_norm: L2-normalize the features first (the official default and recipe).
    impl="triton": the custom op (CUDA, or CPU under TRITON_INTERPRET=1; fp32/bf16 features);
    "torch": gram_loss_ref; "auto": triton for CUDA fp32/bf16 features, else torch, and torch for fp32
    features without TF32 (AUTO_TORCH_KINDS: the reason is logged once, outside torch.compile traces).
    dx: how the Triton grad kernel forms dL/dstudent: "recompute" (_gram_loss_grad_kernel, the
    default: dX chunks in registers, Gram tiles recomputed per D chunk) or "accumulate"
    (_gram_loss_grad_accumulate_kernel: each Gram tile once, dX summed in global memory); the same
    math, not read by the reference. block_m / block_k / block_dv: launch overrides (tests, tuning).
    When the student needs a gradient, the forward computes it (saved in fp32, (B, P, D)); the
    backward only scales it.
    """
    if impl not in IMPLS:
        raise ValueError(f"gram_loss: impl={impl!r} is not one of {list(IMPLS)}")
    if dx not in DX_MODES:
        raise ValueError(f"gram_loss: dx={dx!r} is not one of {list(DX_MODES)}")
    clamp = _check_inputs(student, teacher, img_level, remove_neg, remove_only_teacher_neg)
    if impl == "auto":
        impl = "triton" if (student.is_cuda and student.dtype in TRITON_DTYPES
                            and teacher.dtype in TRITON_DTYPES) else "torch"
        reason = AUTO_TORCH_KINDS.get(dot_kind(student.dtype, teacher.dtype)) if impl == "triton" else None
        if reason is not None:
            impl = "torch"
            if reason not in _logged_reasons and not torch.compiler.is_compiling():
                _logged_reasons.add(reason)
                log.info("gram_loss(impl='auto'): the reference for %s", reason)
    if impl == "torch":
        return gram_loss_ref(student, teacher, img_level, remove_neg, remove_only_teacher_neg, apply_norm=apply_norm)
    for name, x in (("student", student), ("teacher", teacher)):
        if x.dtype not in TRITON_DTYPES:
            raise ValueError(f"gram_loss: impl='triton' takes fp32 or bf16 features, got {name} {x.dtype}")
    check_runnable(student, "gram_loss")
    x, y = student, teacher.detach()
    if x.dim() == 2:
        x, y = x[None], y[None]
    elif not img_level:
        x, y = x.reshape(1, -1, x.shape[-1]), y.reshape(1, -1, y.shape[-1])
    with_grad = bool(student.requires_grad and torch.is_grad_enabled())
    loss, _ = gram_loss_op(x, y, clamp, bool(apply_norm), with_grad, dx == "accumulate", block_m, block_k,
                           block_dv)
    return loss


def flop_floor(B: int, P: int, D: int, backward: bool = True) -> int:
    """Useful FLOPs: the two Gram matrices (2 * 2 B P^2 D), plus dL/dS = (W + W^T) S (2 B P^2 D)."""
    return (4 + 2 * backward) * B * P * P * D


def memory_floor_bytes(B: int, P: int, D: int, itemsize: int, teacher_itemsize: int | None = None,
                       backward: bool = True) -> int:
    """Bytes a forward (+ backward) must move: student and teacher read once, dL/dS written once."""
    return B * P * D * ((1 + backward) * itemsize + (teacher_itemsize or itemsize))


__all__ = ["gram_loss", "gram_loss_ref", "gram_loss_op", "launch_config", "flop_floor", "memory_floor_bytes",
           "dot_kind", "CLAMPS", "NORM_EPS", "GRAM_CONFIG",
           "GRAM_ACCUMULATE_CONFIG", "AUTO_TORCH_KINDS", "DX_MODES"]
