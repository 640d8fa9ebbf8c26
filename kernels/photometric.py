"""The photometric half of the DINO recipe on a batch of same-size crops, fused: colour jitter in each
sample's random order, grayscale, Gaussian blur, solarize, ImageNet normalization and the cast, in
three Triton passes, computing what fastdino.data.augment.photometric computes (the reference).

Inputs: x [B, 3, H, W] uint8 (0..255) or float in [0, 1] on the device (cropped and flipped); p, the
per-sample draws as host tensors [B] from augment.stack_params (order [B, 4]). Output [B, 3, H, W]
in `dtype`. Per sample b, on v = x / 255 (uint8) or x in fp32, as torchvision's float semantics:

    jitter (p["jitter"][b]): for op in p["order"][b] (a permutation of 0..3):
      0 brightness  v = clamp(v * f_b, 0, 1)
      1 contrast    v = clamp(f_c v + (1 - f_c) m, 0, 1),   m = mean over the image of gray(v), v as it is
                    at this point of the chain (a per-image reduction in the middle of the chain)
      2 saturation  v = clamp(f_s v + (1 - f_s) gray(v), 0, 1)
      3 hue         rgb -> hsv, h = (h + shift) mod 1, -> rgb (torchvision's tensor adjust_hue)
    gray (p["gray"][b]):   v_c = gray(v) = .299 r + .587 g + .114 b for every channel c
    blur (p["blur"][b]):   separable Gaussian of std p["sigma"][b], taps -6..6 normalized over all 13,
                           reflect padding; only the taps |t| <= min(6, size - 1) are kept (reflect
                           needs pad < size: the reference's clamp for tiny images)
    solarize (p["solarize"][b]):  v = 1 - v where v >= 128/255
    out = ((v - mean_c) / std_c).to(dtype)

Exactness. Every elementwise step is the reference's fp32 operation in the reference's order:
divisions by div_rn (Triton's `/` is approximate on NVIDIA GPUs), no FMA contraction (NO_FMA),
torch.fmod / torch.remainder written out for the ranges they see here (exact), the Gaussian taps
computed on the host by the reference's torch expression, bf16 rounded to nearest even. So a sample
with neither jitter nor blur has the reference's bits. Two sums are ordered differently: the contrast
mean (per-tile tree sums, then the tiles', against torch's reduction) and the blur (horizontal: a tree
over the 13 taps; vertical: in tap order; against conv2d's). Each is ~1 ulp, but hue's own rounding is
~1e-6 in [0, 1] and a 1-ulp change of the contrast mean before it moves that: |fast - ref| <= 1e-5
normalized (measured up to 5e-6; tests/kernels/test_photometric.py). Solarize is a step at 128/255:
after a jitter or blur, a pixel within rounding of the threshold may flip (as two runs of the
reference on different devices may). On CUDA the reference's conv2d uses TF32 unless
torch.backends.cudnn.allow_tf32 is False; this op is always fp32.

Passes (per size group of a loader's batch: 1 parameter copy + at most 3 kernel launches):
  0. the packed parameters: one fp32 tensor [B, NP] built on the host from p (the Gaussian taps, the
     slot of contrast in the order, the blur slots), one non_blocking copy from pinned memory.
  1. _contrast_sum_kernel, grid (pixel tiles, B): for jittered samples, the ops before contrast in the
     sample's order and gray; per (image, tile) sum of gray -> partial sums [B, tiles]. Other samples:
     nothing. Skipped when no sample is jittered.
  2. _color_kernel, grid (pixel tiles, B): the whole chain to gray (the contrast mean = the sum of the
     image's partial sums / HW); unblurred samples then solarize, normalize and store the output;
     blurred samples store the fp32 chain result in a scratch [n_blur, 3, H, W].
  3. _blur_kernel, grid (column blocks x row strips, 3, n_blur), blurred samples only: one program walks
     down a strip of BW columns: each (reflected) source row is blurred horizontally once (a [16, BW]
     gather, mostly L1 hits) into a window of the last 13 rows in registers; each output row is the
     vertical 13-tap sum of the window, then solarize, normalize, store. Skipped when no sample is
     blurred.
Traffic per pixel (3 channels; bf16 out writes 6 B, fp32 12 B): read the uint8 input 3 B, once more
where jittered (pass 1); write the output; where blurred, the fp32 scratch written and read once more
(+24 B; the strips' 6-row halos mostly from L2). A DINO batch (2 x 224 + 10 x 96 px crops, 80% jittered,
~53% of the pixels blurred): ~24 B/pixel with bf16 out. The reference (counted with a dispatch mode at
B = 128, bf16 out): ~475 device operators per size group (~85 of them host-to-device copies of parameter
subsets), whose operands add up to ~1.4 KB per pixel.
No host synchronization: the host reads only the host parameters; the parameters reach the device
by one asynchronous copy from pinned memory (CUDA).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdino.data import augment
from fastdino.data.augment import BLUR_RADIUS, GRAY_WEIGHTS, IMAGENET_MEAN, IMAGENET_STD, SOLARIZE_THRESHOLD

from .soft_cross_entropy import check_runnable

# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
photometric_ref = augment.photometric  # per op, on host-selected subsets; imported, not copied

# ----------------------------------------------------------------------------------------------
# Packed parameters: one fp32 row of NP values per sample (small integers are exact in fp32)
# ----------------------------------------------------------------------------------------------
NP = 32
P_JITTER, P_BRIGHTNESS, P_CONTRAST, P_SATURATION, P_HUE = 0, 1, 2, 3, 4
P_ORDER = 5  # 4 slots: the op of each slot
P_CSLOT = 9  # the slot of contrast (op 1) in the order: how many ops come before it
P_GRAY, P_BLUR, P_SOLARIZE = 10, 11, 12  # P_BLUR: the sample's scratch slot, -1 when not blurred
P_SAMPLE = 13  # row s: the sample of blur slot s (s < n_blur)
P_TAPS = 14  # 13 Gaussian taps t = -6..6, normalized over all 13 (augment.gaussian_blur)
N_TAPS = 2 * BLUR_RADIUS + 1

_P_JITTER, _P_BRIGHTNESS, _P_CONTRAST = tl.constexpr(P_JITTER), tl.constexpr(P_BRIGHTNESS), tl.constexpr(P_CONTRAST)
_P_SATURATION, _P_HUE, _P_ORDER = tl.constexpr(P_SATURATION), tl.constexpr(P_HUE), tl.constexpr(P_ORDER)
_P_CSLOT, _P_GRAY, _P_BLUR = tl.constexpr(P_CSLOT), tl.constexpr(P_GRAY), tl.constexpr(P_BLUR)
_P_SOLARIZE, _P_SAMPLE, _P_TAPS = tl.constexpr(P_SOLARIZE), tl.constexpr(P_SAMPLE), tl.constexpr(P_TAPS)
_RADIUS = tl.constexpr(BLUR_RADIUS)
_WR, _WG, _WB = (tl.constexpr(w) for w in GRAY_WEIGHTS)
_M0, _M1, _M2 = (tl.constexpr(m) for m in IMAGENET_MEAN)
_S0, _S1, _S2 = (tl.constexpr(s) for s in IMAGENET_STD)
_THRESHOLD = tl.constexpr(SOLARIZE_THRESHOLD)


def pack_params(p: dict) -> tuple[torch.Tensor, int, bool]:
    """Host parameters (stack_params' dict of CPU tensors [B]) -> (packed fp32 [B, NP] on the CPU,
    n_blur, any jitter). The Gaussian taps are the reference's expression on the sample's fp32 sigma."""
    jitter = p["jitter"].cpu().bool()
    B = jitter.shape[0]
    order = p["order"].cpu().long()
    if order.shape != (B, 4) or not torch.equal(order.sort(1).values, torch.arange(4).expand(B, 4)):
        raise ValueError(f"photometric: p['order'] must be [B, 4] permutations of 0..3, got {tuple(order.shape)}")
    blur = p["blur"].cpu().bool()
    packed = torch.zeros(B, NP, dtype=torch.float32)
    packed[:, P_JITTER] = jitter.float()
    for col, key in ((P_BRIGHTNESS, "brightness"), (P_CONTRAST, "contrast"), (P_SATURATION, "saturation"),
                     (P_HUE, "hue")):
        packed[:, col] = p[key].cpu().float()
    packed[:, P_ORDER:P_ORDER + 4] = order.float()
    packed[:, P_CSLOT] = (order == 1).float().argmax(1).float()
    packed[:, P_GRAY] = p["gray"].cpu().float()
    slots = blur.nonzero().flatten()
    packed[:, P_BLUR] = torch.where(blur, blur.long().cumsum(0) - 1, -1).float()
    packed[:slots.numel(), P_SAMPLE] = slots.float()
    packed[:, P_SOLARIZE] = p["solarize"].cpu().float()
    t = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / p["sigma"].cpu().float().view(-1, 1)) ** 2)  # augment.gaussian_blur's taps
    packed[:, P_TAPS:P_TAPS + N_TAPS] = k / k.sum(1, keepdim=True)
    return packed, int(slots.numel()), bool(jitter.any())


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _gray(r, g, b):
    return _WR * r + _WG * g + _WB * b


@triton.jit
def _blend(x, y, f):
    return tl.minimum(tl.maximum(f * x + (1.0 - f) * y, 0.0), 1.0)


@triton.jit
def _hsv_channel(n: tl.constexpr, h, v, vs):
    """Channel of hsv -> rgb in closed form: v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
    (n + 6h in [1, 11]: torch.remainder is one exact subtraction)."""
    k = n + 6.0 * h
    k = tl.where(k >= 6.0, k - 6.0, k)
    return v - vs * tl.minimum(tl.maximum(tl.minimum(k, 4.0 - k), 0.0), 1.0)


@triton.jit
def _adjust_hue(r, g, b, shift):
    """augment.adjust_hue, operation for operation. The hue is the one of hr, hg, hb that is not masked
    to zero (their sum); (h/6 + 1) is in [5/6, 11/6] and h + shift in [-0.1, 1.1), so torch.fmod and
    torch.remainder by 1 are one exact subtraction (and remainder's rounded + 1 below 0)."""
    maxc = tl.maximum(tl.maximum(r, g), b)
    minc = tl.minimum(tl.minimum(r, g), b)
    eqc = maxc == minc
    cr = maxc - minc
    s = tl.math.div_rn(cr, tl.where(eqc, 1.0, maxc))
    crd = tl.where(eqc, 1.0, cr)
    rc = tl.math.div_rn(maxc - r, crd)
    gc = tl.math.div_rn(maxc - g, crd)
    bc = tl.math.div_rn(maxc - b, crd)
    h6 = tl.where(maxc == r, bc - gc, tl.where(maxc == g, (2.0 + rc) - bc, (4.0 + gc) - rc))
    h = tl.math.div_rn(h6, 6.0) + 1.0
    h = tl.where(h >= 1.0, h - 1.0, h)  # torch.fmod(h, 1)
    h = h + shift
    h = tl.where(h >= 1.0, h - 1.0, tl.where(h < 0.0, h + 1.0, h))  # torch.remainder(h, 1)
    vs = maxc * s
    return _hsv_channel(5.0, h, maxc, vs), _hsv_channel(3.0, h, maxc, vs), _hsv_channel(1.0, h, maxc, vs)


@triton.jit
def _jitter_op(op, r, g, b, prow, mean):
    """augment._jitter_op: op 0 brightness, 1 contrast (blend with `mean`), 2 saturation, 3 hue, with
    the sample's factor read from its packed row."""
    if op == 0:
        f = tl.load(prow + _P_BRIGHTNESS)
        r = tl.minimum(tl.maximum(r * f, 0.0), 1.0)
        g = tl.minimum(tl.maximum(g * f, 0.0), 1.0)
        b = tl.minimum(tl.maximum(b * f, 0.0), 1.0)
    elif op == 1:
        f = tl.load(prow + _P_CONTRAST)
        r, g, b = _blend(r, mean, f), _blend(g, mean, f), _blend(b, mean, f)
    elif op == 2:
        f = tl.load(prow + _P_SATURATION)
        y = _gray(r, g, b)
        r, g, b = _blend(r, y, f), _blend(g, y, f), _blend(b, y, f)
    else:
        r, g, b = _adjust_hue(r, g, b, tl.load(prow + _P_HUE))
    return r, g, b


@triton.jit
def _load_rgb(X_ptr, b, offs, mask, HW, IS_U8: tl.constexpr):
    """Channels of pixels offs of image b of a contiguous [B, 3, H, W] tensor, as fp32 in [0, 1]."""
    base = X_ptr + b.to(tl.int64) * 3 * HW + offs
    r = tl.load(base, mask=mask, other=0).to(tl.float32)
    g = tl.load(base + HW, mask=mask, other=0).to(tl.float32)
    bl = tl.load(base + 2 * HW, mask=mask, other=0).to(tl.float32)
    if IS_U8:
        r, g, bl = tl.math.div_rn(r, 255.0), tl.math.div_rn(g, 255.0), tl.math.div_rn(bl, 255.0)
    return r, g, bl


@triton.jit
def _finish(v, solarize, mean, std, ty: tl.constexpr):
    """Solarize (where the sample draws it: v <= 1 never reaches the threshold 2), (v - mean) / std, cast
    to ty. bf16: rounded to nearest even on the fp32 bits first (the cast is then exact; the
    interpreter's own fp32 -> bf16 cast truncates)."""
    v = tl.where(v >= tl.where(solarize, _THRESHOLD, 2.0), 1.0 - v, v)
    v = tl.math.div_rn(v - mean, std)
    if ty == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
        v = u.to(tl.float32, bitcast=True)
    return v.to(ty)


@triton.jit
def _contrast_sum_kernel(
    X_ptr, P_ptr, Part_ptr,
    HW, n_tiles,
    IS_U8: tl.constexpr, NP_: tl.constexpr, BLOCK: tl.constexpr,
):
    """Part[b, tile] = sum over the tile's pixels of gray(v), v = the ops of the sample's order before
    contrast applied to x (jittered samples only; the others' partials are never read)."""
    tile = tl.program_id(0)
    b = tl.program_id(1)
    prow = P_ptr + b * NP_
    if tl.load(prow + _P_JITTER) != 0.0:
        offs = tile * BLOCK + tl.arange(0, BLOCK)
        mask = offs < HW
        r, g, bl = _load_rgb(X_ptr, b, offs, mask, HW, IS_U8)
        n_before = tl.load(prow + _P_CSLOT)
        for slot in tl.static_range(3):
            if slot < n_before:
                op = tl.load(prow + _P_ORDER + slot).to(tl.int32)
                r, g, bl = _jitter_op(op, r, g, bl, prow, 0.0)  # op != 1 here: the mean is not used
        y = tl.where(mask, _gray(r, g, bl), 0.0)
        tl.store(Part_ptr + b * n_tiles + tile, tl.sum(y, axis=0))


@triton.jit
def _color_kernel(
    X_ptr, P_ptr, Part_ptr, Out_ptr, S_ptr,
    HW, n_tiles,
    IS_U8: tl.constexpr, NP_: tl.constexpr, BLOCK: tl.constexpr, T_BLOCK: tl.constexpr,
):
    """Tile of image b: jitter chain (contrast mean = sum of Part[b, :] / HW) and grayscale; then a
    blurred sample's fp32 result goes to its scratch slot, an unblurred one is solarized, normalized
    and stored in Out's dtype."""
    tile = tl.program_id(0)
    b = tl.program_id(1)
    prow = P_ptr + b * NP_
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    mask = offs < HW
    r, g, bl = _load_rgb(X_ptr, b, offs, mask, HW, IS_U8)
    if tl.load(prow + _P_JITTER) != 0.0:
        t = tl.arange(0, T_BLOCK)
        part = tl.load(Part_ptr + b * n_tiles + t, mask=t < n_tiles, other=0.0)
        mean = tl.math.div_rn(tl.sum(part, axis=0), HW.to(tl.float32))
        for slot in tl.static_range(4):
            op = tl.load(prow + _P_ORDER + slot).to(tl.int32)
            r, g, bl = _jitter_op(op, r, g, bl, prow, mean)
    if tl.load(prow + _P_GRAY) != 0.0:
        y = _gray(r, g, bl)
        r, g, bl = y, y, y
    slot = tl.load(prow + _P_BLUR).to(tl.int32)
    if slot >= 0:
        tmp = S_ptr + slot.to(tl.int64) * 3 * HW + offs
        tl.store(tmp, r, mask=mask)
        tl.store(tmp + HW, g, mask=mask)
        tl.store(tmp + 2 * HW, bl, mask=mask)
    else:
        solarize = tl.load(prow + _P_SOLARIZE) != 0.0
        dst = Out_ptr + b.to(tl.int64) * 3 * HW + offs
        ty: tl.constexpr = Out_ptr.dtype.element_ty
        tl.store(dst, _finish(r, solarize, _M0, _S0, ty), mask=mask)
        tl.store(dst + HW, _finish(g, solarize, _M1, _S1, ty), mask=mask)
        tl.store(dst + 2 * HW, _finish(bl, solarize, _M2, _S2, ty), mask=mask)


@triton.jit
def _reflect(i, n):
    """Reflect padding's source index of i in [-pad, n - 1 + pad] (pad < n), clamped into [0, n - 1]
    for the indices only zero-weight taps read."""
    i = tl.where(i < 0, -i, i)
    i = tl.where(i >= n, 2 * (n - 1) - i, i)
    return tl.minimum(tl.maximum(i, 0), n - 1)


@triton.jit
def _blur_kernel(
    S_ptr, P_ptr, Out_ptr,
    H, W, n_cb,
    NP_: tl.constexpr, BW: tl.constexpr, RS: tl.constexpr,
):
    """Channel c of blur slot s, columns [cb BW, +BW), output rows [y0, y1) = [strip RS, +RS): virtual
    rows j = y0 - 6 .. y1 + 5 are blurred horizontally once each (source row reflect(j); the 13 taps as
    one [16, BW] gather and a sum over the taps) into the window w0..w12 (w12 the newest); output row
    j - 6 = sum_t kv_t w_t in tap order, then solarize, normalize, store. Taps with |t| > pad (the
    reference's pad clamp for tiny images) weigh 0: adding their 0 * v changes nothing."""
    pid = tl.program_id(0)
    c = tl.program_id(1)
    s = tl.program_id(2)
    cb = pid % n_cb
    y0 = (pid // n_cb) * RS
    y1 = tl.minimum(y0 + RS, H)
    b = tl.load(P_ptr + s * NP_ + _P_SAMPLE).to(tl.int32)
    prow = P_ptr + b * NP_
    taps = prow + _P_TAPS
    pad_w = tl.minimum(W - 1, _RADIUS)
    pad_h = tl.minimum(H - 1, _RADIUS)
    solarize = tl.load(prow + _P_SOLARIZE) != 0.0
    mean = tl.where(c == 0, _M0, tl.where(c == 1, _M1, _M2))
    std = tl.where(c == 0, _S0, tl.where(c == 1, _S1, _S2))
    cols = cb * BW + tl.arange(0, BW)
    cmask = cols < W
    t = tl.arange(0, 16) - _RADIUS  # tap offsets; t > 6 padding
    tmask = t <= _RADIUS
    kh = tl.load(taps + _RADIUS + t, mask=tmask & (t <= pad_w) & (-t <= pad_w), other=0.0)
    cidx = _reflect(cols[None, :] + t[:, None], W)
    hmask = tmask[:, None] & cmask[None, :]
    kv0 = tl.where(pad_h >= 6, tl.load(taps + 0), 0.0)
    kv1 = tl.where(pad_h >= 5, tl.load(taps + 1), 0.0)
    kv2 = tl.where(pad_h >= 4, tl.load(taps + 2), 0.0)
    kv3 = tl.where(pad_h >= 3, tl.load(taps + 3), 0.0)
    kv4 = tl.where(pad_h >= 2, tl.load(taps + 4), 0.0)
    kv5 = tl.where(pad_h >= 1, tl.load(taps + 5), 0.0)
    kv6 = tl.load(taps + 6)
    kv7 = tl.where(pad_h >= 1, tl.load(taps + 7), 0.0)
    kv8 = tl.where(pad_h >= 2, tl.load(taps + 8), 0.0)
    kv9 = tl.where(pad_h >= 3, tl.load(taps + 9), 0.0)
    kv10 = tl.where(pad_h >= 4, tl.load(taps + 10), 0.0)
    kv11 = tl.where(pad_h >= 5, tl.load(taps + 11), 0.0)
    kv12 = tl.where(pad_h >= 6, tl.load(taps + 12), 0.0)
    plane = S_ptr + (s * 3 + c).to(tl.int64) * H * W
    dst = Out_ptr + (b * 3 + c).to(tl.int64) * H * W + cols
    ty: tl.constexpr = Out_ptr.dtype.element_ty
    z = tl.zeros([BW], dtype=tl.float32)
    w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11 = z, z, z, z, z, z, z, z, z, z, z, z
    for j in range(y0 - _RADIUS, y1 + _RADIUS):
        v = tl.load(plane + _reflect(j, H) * W + cidx, mask=hmask, other=0.0)
        w12 = tl.sum(kh[:, None] * v, axis=0)
        if j >= y0 + _RADIUS:  # the window holds virtual rows j - 12 .. j: output row j - 6
            acc = kv0 * w0 + kv1 * w1 + kv2 * w2 + kv3 * w3 + kv4 * w4 + kv5 * w5 + kv6 * w6
            acc = acc + kv7 * w7 + kv8 * w8 + kv9 * w9 + kv10 * w10 + kv11 * w11 + kv12 * w12
            tl.store(dst + (j - _RADIUS) * W, _finish(acc, solarize, mean, std, ty), mask=cmask)
        w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11 = w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12


# ----------------------------------------------------------------------------------------------
# Launcher, public functions
# ----------------------------------------------------------------------------------------------
NO_FMA = {"enable_fp_fusion": False}  # every kernel: each product rounded on its own, as the reference's


def launch_config(H: int, W: int, block: int = 0, block_w: int = 0, rows: int = 0) -> dict:
    """Constexprs and warps: BLOCK pixels per program of passes 1-2 (8 per thread), T_BLOCK >= the
    tile count, BW columns x RS output rows per program of the blur. Nonzero overrides win (tests,
    tuning). Not tuned on a GPU yet."""
    block = block or min(1024, max(16, triton.next_power_of_2(H * W)))
    block_w = block_w or 32
    rows = rows or 32
    n_tiles = triton.cdiv(H * W, block)
    return dict(BLOCK=block, T_BLOCK=max(2, triton.next_power_of_2(n_tiles)), num_warps=max(1, min(4, block // 256)),
                BW=block_w, RS=rows, blur_warps=max(1, min(4, block_w // 32)))


def _check(x: torch.Tensor, p: dict, dtype: torch.dtype) -> None:
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"photometric: x must be [B, 3, H, W] with H, W > 0, got {tuple(x.shape)}")
    if x.dtype != torch.uint8 and not x.dtype.is_floating_point:
        raise ValueError(f"photometric: x must be uint8 or float, got {x.dtype}")
    if not dtype.is_floating_point:
        raise ValueError(f"photometric: dtype must be a float dtype, got {dtype}")
    missing = [k for k in ("jitter", "brightness", "contrast", "saturation", "hue", "order", "gray", "blur",
                           "sigma", "solarize") if k not in p]
    if missing:
        raise ValueError(f"photometric: p lacks {missing}")
    bad = [k for k, v in p.items() if v.shape[:1] != x.shape[:1]]
    if bad:
        raise ValueError(f"photometric: p[{bad}] do not have the batch size {x.shape[0]}")
    if any(v.device.type != "cpu" for v in p.values()):
        raise ValueError("photometric: p must be host (CPU) tensors (stack_params)")


def photometric_fused(x: torch.Tensor, p: dict, dtype: torch.dtype = torch.float32, *, block: int = 0,
                      block_w: int = 0, rows: int = 0) -> torch.Tensor:
    """photometric_ref's result by three Triton passes (see the header): x [B, 3, H, W] uint8 or
    float in [0, 1] (CUDA, or CPU under TRITON_INTERPRET=1); p stack_params' host tensors [B];
    returns normalized [B, 3, H, W] `dtype`. No host synchronization. block / block_w / rows override
    the launch table (tests, tuning)."""
    _check(x, p, dtype)
    check_runnable(x, "photometric")
    B, _, H, W = x.shape
    dev = x.device
    out = torch.empty((B, 3, H, W), dtype=dtype, device=dev)
    if B == 0:
        return out
    x = x.contiguous()
    packed, n_blur, any_jitter = pack_params(p)
    P = packed.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else packed.to(dev)
    cfg = launch_config(H, W, block, block_w, rows)
    HW, BLOCK = H * W, cfg["BLOCK"]
    n_tiles = triton.cdiv(HW, BLOCK)
    is_u8 = x.dtype == torch.uint8
    part = torch.empty(B * n_tiles, dtype=torch.float32, device=dev)
    scratch = torch.empty((n_blur, 3, H, W) if n_blur else (1,), dtype=torch.float32, device=dev)
    if any_jitter:
        _contrast_sum_kernel[(n_tiles, B)](x, P, part, HW, n_tiles, IS_U8=is_u8, NP_=NP, BLOCK=BLOCK,
                                           num_warps=cfg["num_warps"], **NO_FMA)
    _color_kernel[(n_tiles, B)](x, P, part, out, scratch, HW, n_tiles, IS_U8=is_u8, NP_=NP, BLOCK=BLOCK,
                                T_BLOCK=cfg["T_BLOCK"], num_warps=cfg["num_warps"], **NO_FMA)
    if n_blur:
        n_cb = triton.cdiv(W, cfg["BW"])
        _blur_kernel[(n_cb * triton.cdiv(H, cfg["RS"]), 3, n_blur)](
            scratch, P, out, H, W, n_cb, NP_=NP, BW=cfg["BW"], RS=cfg["RS"], num_warps=cfg["blur_warps"], **NO_FMA)
    return out


IMPLS = ("triton", "torch")


def photometric(x: torch.Tensor, p: dict, dtype: torch.dtype = torch.float32, impl: str = "triton") -> torch.Tensor:
    """The photometric half of the recipe, then normalization: x [B, 3, H, W] uint8 (0..255) or float
    in [0, 1] on the device, p the host tensors [B] of stack_params; returns [B, 3, H, W] `dtype`.
    impl="triton": photometric_fused (CUDA, or CPU under TRITON_INTERPRET=1); "torch": the reference
    (augment.photometric)."""
    if impl not in IMPLS:
        raise ValueError(f"photometric: impl={impl!r} is not one of {list(IMPLS)}")
    if impl == "torch":
        return photometric_ref(x, p, dtype)
    return photometric_fused(x, p, dtype)


__all__ = ["photometric", "photometric_ref", "photometric_fused", "pack_params", "launch_config"]
