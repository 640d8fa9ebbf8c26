"""Per-tensor gradient clipping over a flat gradient buffer: two launches, no host synchronization.

The official DINO clips each parameter's gradient separately (not a global norm):

    norm_i = ||g_i||_2,     coef_i = clip / (norm_i + 1e-6),     g_i <- g_i * coef_i   if coef_i < 1

Here the gradients g_i are segments of one flat buffer (fastdino.flat.FlatParams). Each segment is
cut into chunks of CHUNK elements (a chunk never spans two segments):

    _seg_sumsq_kernel   one program per chunk: partial[c] = sum over the chunk of g^2 (fp32)
    _seg_scale_kernel   one program per chunk: norm = sqrt(sum of its segment's partials, in a fixed
                        order, so deterministic), coef as above; the chunk is read and rewritten only
                        if coef < 1; the segment's first chunk writes norm_i (for logging)

Traffic: read N (norms) + read and write the clipped segments only: between N and 3 N elements.
Segments start and end on multiples of 16 elements (FlatParams pads them with zeros, which change
no norm), so the loads vectorize. A NaN norm gives a NaN coef, which is not < 1: left as is, as the
official loop does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

EPS = 1e-6  # as the official clip_gradients


@torch.no_grad()
def clip_grad_per_tensor_ref(grads, clip: float) -> torch.Tensor:
    """Reference: the official per-tensor loop on a list of tensors, in place, without the host
    syncs (torch.where). Returns the fp32 norms before clipping, shape (len(grads),)."""
    norms = []
    for g in grads:
        norm = g.float().norm(2)
        coef = clip / (norm + EPS)
        g.copy_(torch.where(coef < 1, g.float() * coef, g.float()))
        norms.append(norm)
    if not norms:
        return torch.zeros(0)
    return torch.stack(norms)


class SegmentTable:
    """Chunk tables for segments [start, end) of a flat buffer, built once on the host.

    segments: list of (start, end) element offsets (start a multiple of 16; end may be padded up to
    a multiple of 16 where the padding holds zeros). chunk: elements per program (multiple of 16).
    """

    def __init__(self, segments, device, chunk: int = 16384):
        if chunk % 16 != 0 or chunk <= 0:
            raise ValueError(f"SegmentTable: chunk must be a positive multiple of 16, got {chunk}")
        chunk_start, chunk_end, chunk_seg, seg_lo, seg_hi = [], [], [], [], []
        for i, (start, end) in enumerate(segments):
            if start % 16 != 0:
                raise ValueError(f"SegmentTable: segment {i} starts at {start}, not a multiple of 16")
            seg_lo.append(len(chunk_start))
            for c in range(start, end, chunk):
                chunk_start.append(c)
                chunk_end.append(min(c + chunk, end))
                chunk_seg.append(i)
            seg_hi.append(len(chunk_start))
        self.chunk, self.num_segments, self.num_chunks = chunk, len(segments), len(chunk_start)
        self.max_chunks_per_segment = max([h - l for l, h in zip(seg_lo, seg_hi)] or [0])

        def dev(x, dtype):
            return torch.tensor(x, dtype=dtype, device=device)

        self.chunk_start, self.chunk_end = dev(chunk_start, torch.int64), dev(chunk_end, torch.int64)
        self.chunk_seg = dev(chunk_seg, torch.int32)
        self.seg_lo, self.seg_hi = dev(seg_lo, torch.int32), dev(seg_hi, torch.int32)
        self.partial = torch.zeros(self.num_chunks, dtype=torch.float32, device=device)
        self.norms = torch.zeros(self.num_segments, dtype=torch.float32, device=device)


@triton.jit
def _seg_sumsq_kernel(G_ptr, CHUNK_START, CHUNK_END, PARTIAL, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    start = tl.multiple_of(tl.load(CHUNK_START + c), 16)
    end = tl.multiple_of(tl.load(CHUNK_END + c), 16)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, CHUNK, BLOCK):
        offs = start + k + tl.arange(0, BLOCK)
        g = tl.load(G_ptr + offs, mask=offs < end, other=0.0).to(tl.float32)
        acc += g * g
    tl.store(PARTIAL + c, tl.sum(acc, axis=0))


@triton.jit
def _seg_scale_kernel(G_ptr, CHUNK_START, CHUNK_END, CHUNK_SEG, SEG_LO, SEG_HI, PARTIAL, NORMS, clip, eps,
                      CHUNK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    c = tl.program_id(0)
    seg = tl.load(CHUNK_SEG + c)
    lo = tl.load(SEG_LO + seg)
    hi = tl.load(SEG_HI + seg)
    # the segment's norm from its chunks' partial sums, same order in every program: deterministic
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for k in range(0, hi - lo, BLOCK_P):
        offs_p = lo + k + tl.arange(0, BLOCK_P)
        acc += tl.load(PARTIAL + offs_p, mask=offs_p < hi, other=0.0)
    norm = tl.sqrt(tl.sum(acc, axis=0))
    if c == lo:
        tl.store(NORMS + seg, norm)
    coef = clip / (norm + eps)
    if coef < 1.0:  # most segments in a DINO step are below the clip: no read, no write
        start = tl.multiple_of(tl.load(CHUNK_START + c), 16)
        end = tl.multiple_of(tl.load(CHUNK_END + c), 16)
        for k in range(0, CHUNK, BLOCK):
            offs = start + k + tl.arange(0, BLOCK)
            mask = offs < end
            g = tl.load(G_ptr + offs, mask=mask).to(tl.float32)
            tl.store(G_ptr + offs, (g * coef).to(G_ptr.dtype.element_ty), mask=mask)


def clip_grad_flat_(grad: torch.Tensor, table: SegmentTable, clip: float, block: int | None = None,
                    num_warps: int = 8) -> torch.Tensor:
    """Clip every segment of the 1-D buffer `grad` to norm `clip`, in place, in two launches.
    Returns table.norms (num_segments,) fp32: the norms before clipping (no host sync).
    block: default 2048 on a GPU; a whole chunk per iteration on CPU tensors (the interpreter)."""
    if block is None:
        block = 2048 if grad.is_cuda else table.chunk
    if grad.dim() != 1 or not grad.is_contiguous():
        raise ValueError(f"clip_grad_flat_: grad must be a 1-D contiguous buffer, got shape {tuple(grad.shape)}")
    if table.partial.device != grad.device:
        raise ValueError(f"clip_grad_flat_: table is on {table.partial.device}, grad on {grad.device}")
    if table.num_chunks == 0:
        return table.norms
    block = min(block, table.chunk)
    grid = (table.num_chunks,)
    _seg_sumsq_kernel[grid](grad, table.chunk_start, table.chunk_end, table.partial,
                            CHUNK=table.chunk, BLOCK=block, num_warps=num_warps)
    block_p = max(16, min(1024, triton.next_power_of_2(table.max_chunks_per_segment)))
    _seg_scale_kernel[grid](grad, table.chunk_start, table.chunk_end, table.chunk_seg, table.seg_lo,
                            table.seg_hi, table.partial, table.norms, float(clip), EPS,
                            CHUNK=table.chunk, BLOCK=block, BLOCK_P=block_p, num_warps=num_warps)
    return table.norms


def clip_grad_per_tensor_(grad: torch.Tensor, table: SegmentTable, clip: float, impl: str = "triton") -> torch.Tensor:
    """Public op: per-segment clipping of a flat gradient buffer; impl="triton"|"torch"."""
    if impl == "triton":
        return clip_grad_flat_(grad, table, clip)
    if impl == "torch":
        starts, ends = table.chunk_start.tolist(), table.chunk_end.tolist()
        lo, hi = table.seg_lo.tolist(), table.seg_hi.tolist()
        segs = [grad[starts[a]:ends[b - 1]] if b > a else grad[:0] for a, b in zip(lo, hi)]
        table.norms.copy_(clip_grad_per_tensor_ref(segs, clip).to(table.norms.device).reshape(-1))
        return table.norms
    raise ValueError(f"clip_grad_per_tensor_: impl={impl!r} is not one of ['triton', 'torch']")
