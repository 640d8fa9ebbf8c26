"""Per-tensor gradient clipping, as the official DINO (each tensor's norm clipped, not a global norm):

    norm_i = ||g_i||_2,     coef_i = clip / (norm_i + 1e-6),     g_i <- g_i * coef_i   if coef_i < 1

    clip_grad_per_tensor_ref(grads, clip)      the reference, over a list of tensors
    clip_grad_foreach_(grads, clip)            torch._foreach_* over a list (a few launches)
    SegmentTable, _seg_sumsq_kernel,           Triton over one flat gradient buffer whose segments
    _seg_scale_kernel                          are the g_i (fastdino.flat.FlatParams)
    torch.ops.fastdino.clip_grad_flat_         the two launches as a custom op (+ fake impl):
                                               torch.compile traces it, a CUDA graph captures it
    clip_grad_flat_(grad, table, clip)         public: validate, call the op

All return the norms before clipping, (n,) fp32, and none synchronizes with the host. A NaN norm
gives a NaN coef, which is not < 1: the gradient is left as is, as the official loop does.

Flat kernels: each segment is cut into chunks of CHUNK elements (a chunk never spans two segments):

    _seg_sumsq_kernel   one program per chunk: partial[c] = sum over the chunk of g^2 (fp32)
    _seg_scale_kernel   one program per chunk: norm = sqrt(sum of its segment's partials, in a fixed
                        order, so deterministic), coef as above; the chunk is read and rewritten only
                        if coef < 1; the segment's first chunk writes norm_i

Traffic: read N (norms) + read and write the clipped segments only: between N and 3 N elements.
Segments start and end on multiples of 16 elements (FlatParams pads them with zeros, which change
no norm), so the loads vectorize.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

EPS = 1e-6  # as the official clip_gradients
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the flat kernels load and store


@torch.no_grad()
def clip_grad_per_tensor_ref(grads, clip: float) -> torch.Tensor:
    """Reference, in place over a list of tensors: the official per-tensor loop in fp32 math (fp64
    for fp64 grads), with torch.where instead of its host syncs. Returns the norms before clipping,
    (len(grads),) fp32 (fp64 when every grad is fp64)."""
    grads = list(grads)
    if not grads:
        return torch.zeros(0)
    norms = []
    for g in grads:
        g32 = g.to(torch.float64 if g.dtype == torch.float64 else torch.float32)
        norm = g32.norm(2)
        coef = clip / (norm + EPS)
        g.copy_(torch.where(coef < 1, g32 * coef, g32))
        norms.append(norm)
    dtype = torch.float64 if all(g.dtype == torch.float64 for g in grads) else torch.float32
    return torch.stack([n.to(dtype) for n in norms])


@torch.no_grad()
def clip_grad_foreach_(grads, clip: float) -> torch.Tensor:
    """The reference's semantics with torch._foreach_* (any float dtypes, norms in fp32): a few
    launches, no host sync. Returns the norms before clipping, (len(grads),) fp32."""
    grads = list(grads)
    if not grads:
        return torch.zeros(0)
    norms = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))
    coefs = clip / (norms + EPS)
    coefs = torch.where(coefs < 1, coefs, torch.ones_like(coefs))  # NaN norm: coef 1, left as is
    torch._foreach_mul_(grads, coefs.unbind(0))
    return norms


class SegmentTable:
    """Chunk tables for segments [start, end) of a flat buffer, built once on the host.

    segments: list of (start, end) element offsets (start a multiple of 16; end may be padded up to
    a multiple of 16 where the padding holds zeros). chunk: elements per program (multiple of 16).
    Device tensors: chunk_start, chunk_end (num_chunks,) int64; chunk_seg (num_chunks,) int32;
    seg_lo, seg_hi (num_segments,) int32: segment i owns chunks [seg_lo[i], seg_hi[i]).
    """

    def __init__(self, segments, device, chunk: int = 16384):
        if chunk % 16 != 0 or chunk <= 0:
            raise ValueError(f"SegmentTable: chunk must be a positive multiple of 16, got {chunk}")
        chunk_start, chunk_end, chunk_seg, seg_lo, seg_hi = [], [], [], [], []
        for i, (start, end) in enumerate(segments):
            if start % 16 != 0 or end < start:
                raise ValueError(f"SegmentTable: segment {i} is [{start}, {end}): start must be a multiple of 16, end >= start")
            seg_lo.append(len(chunk_start))
            for c in range(start, end, chunk):
                chunk_start.append(c)
                chunk_end.append(min(c + chunk, end))
                chunk_seg.append(i)
            seg_hi.append(len(chunk_start))
        self.chunk, self.num_segments, self.num_chunks = chunk, len(segments), len(chunk_start)
        self.extent = max([end for _, end in segments] or [0])  # the buffer must hold this many elements
        max_chunks = max([h - l for l, h in zip(seg_lo, seg_hi)] or [0])
        self.block_p = max(16, min(1024, triton.next_power_of_2(max_chunks)))  # partials summed per step

        def dev(x, dtype):
            return torch.tensor(x, dtype=dtype, device=device)

        self.chunk_start, self.chunk_end = dev(chunk_start, torch.int64), dev(chunk_end, torch.int64)
        self.chunk_seg = dev(chunk_seg, torch.int32)
        self.seg_lo, self.seg_hi = dev(seg_lo, torch.int32), dev(seg_hi, torch.int32)


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


@torch.library.custom_op("fastdino::clip_grad_flat_", mutates_args=("grad",))
def _clip_grad_flat_op(grad: torch.Tensor, chunk_start: torch.Tensor, chunk_end: torch.Tensor,
                       chunk_seg: torch.Tensor, seg_lo: torch.Tensor, seg_hi: torch.Tensor, chunk: int,
                       block: int, block_p: int, num_warps: int, clip: float) -> torch.Tensor:
    """Clip the segments of grad (N,) described by a SegmentTable's tensors, in place; returns the
    norms before clipping, (num_segments,) fp32 (0 for an empty segment)."""
    norms = torch.zeros(seg_lo.shape[0], dtype=torch.float32, device=grad.device)
    num_chunks = chunk_start.shape[0]
    if num_chunks == 0:
        return norms
    partial = torch.empty(num_chunks, dtype=torch.float32, device=grad.device)
    _seg_sumsq_kernel[(num_chunks,)](grad, chunk_start, chunk_end, partial, CHUNK=chunk, BLOCK=block,
                                     num_warps=num_warps)
    _seg_scale_kernel[(num_chunks,)](grad, chunk_start, chunk_end, chunk_seg, seg_lo, seg_hi, partial, norms,
                                     clip, EPS, CHUNK=chunk, BLOCK=block, BLOCK_P=block_p, num_warps=num_warps)
    return norms


@_clip_grad_flat_op.register_fake
def _(grad, chunk_start, chunk_end, chunk_seg, seg_lo, seg_hi, chunk, block, block_p, num_warps, clip):
    return grad.new_empty(seg_lo.shape[0], dtype=torch.float32)


def clip_grad_flat_(grad: torch.Tensor, table: SegmentTable, clip: float, *, block: int | None = None,
                    num_warps: int = 8) -> torch.Tensor:
    """Clip every segment of the 1-D buffer `grad` (fp32/bf16/fp16) to norm `clip` (inf: measure
    only), in place, in two launches. Returns the norms before clipping, (table.num_segments,) fp32.
    block: elements per loop step (a power of 2); default 2048 on a GPU, a whole chunk on CPU (the
    interpreter pays per step, not per element)."""
    if grad.dim() != 1 or not grad.is_contiguous():
        raise ValueError(f"clip_grad_flat_: grad must be a 1-D contiguous buffer, got shape {tuple(grad.shape)}")
    if grad.dtype not in DTYPES:
        raise ValueError(f"clip_grad_flat_: grad has dtype {grad.dtype}, the kernels take {', '.join(map(str, DTYPES))}")
    if table.seg_lo.device != grad.device:
        raise ValueError(f"clip_grad_flat_: table is on {table.seg_lo.device}, grad on {grad.device}")
    if grad.numel() < table.extent:
        raise ValueError(f"clip_grad_flat_: grad has {grad.numel()} elements, the table's segments reach {table.extent}")
    if not clip >= 0:
        raise ValueError(f"clip_grad_flat_: clip must be >= 0, got {clip}")
    whole = triton.next_power_of_2(table.chunk)
    block = min(block or (2048 if grad.is_cuda else whole), whole)
    if block & (block - 1):
        raise ValueError(f"clip_grad_flat_: block must be a power of 2, got {block}")
    return _clip_grad_flat_op(grad, table.chunk_start, table.chunk_end, table.chunk_seg, table.seg_lo, table.seg_hi,
                              table.chunk, block, table.block_p, num_warps, float(clip))
