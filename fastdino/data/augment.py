"""The DINO multi-crop recipe: parameter draws, batched photometric ops, and the per-image reference.

Recipe (official DataAugmentationDINO): 2 global crops (scale 0.4-1) and N local crops (scale
0.05-0.4), each: RandomResizedCrop (ratio 3/4-4/3, bicubic) -> horizontal flip p=.5 -> colour
jitter (brightness .4, contrast .4, saturation .2, hue .1, in a random order) p=.8 -> grayscale p=.2
-> gaussian blur sigma~U(0.1, 2) with p = 1.0 (global 1), 0.1 (global 2), 0.5 (locals) -> solarize
(threshold 128/255) p=.2 on global 2 only -> ImageNet mean/std normalization.

Randomness. Every draw for (seed, epoch, dataset index, crop) comes from a counter-based hash
(splitmix64 chained over the key), so it is a pure function of that key: independent of rank,
world size, workers, resume position and torch's global RNG, and vectorizes over a batch (the DALI
path draws a whole batch of parameters in one numpy call). Draw slots per crop:
    0-19  RandomResizedCrop tries (area, log-ratio) x 10     20-21  top/left offsets
    22 flip   23 jitter?   24-27 brightness/contrast/saturation/hue   28-31 jitter order keys
    32 grayscale?   33 blur?   34 sigma   35 solarize?

Photometric ops follow torchvision's tensor semantics (ColorJitter on float images in [0, 1];
grayscale weights .299/.587/.114). The fast path (`photometric`) applies them to a batch from
per-sample parameters, each op on the host-selected subset of samples that draw it (index lists are
built on the host from host parameters: no device sync). Blur: a true Gaussian of std sigma
(pixels of the output crop), truncated at +-6 px = 3*sigma_max, reflect padding. The official code
uses PIL's GaussianBlur(radius=sigma), which approximates the same Gaussian with three box passes;
`DataAugmentationDINORef` keeps PIL's filter, so the reference is the official pipeline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
SIGMA = (0.1, 2.0)
BLUR_RADIUS = 6  # taps on each side: 3 * SIGMA[1]
SOLARIZE_THRESHOLD = 128.0 / 255.0
N_DRAWS = 36
N_TRIES = 10


@dataclass(frozen=True)
class CropSpec:
    """What crop c of an image is: output size, scale range and per-crop probabilities.
    key: the crop number its draws are keyed by (None: its own, c); distort: False keeps only the
    geometry (box and flip) and the normalization, no colour jitter, grayscale, blur or solarize."""
    size: int
    scale: tuple
    p_blur: float
    p_solarize: float
    key: int | None = None
    distort: bool = True
    p_flip: float = 0.5  # horizontal flip (data.horizontal_flips=false: 0, DINOv3's 7B recipe)


def crop_specs(global_size: int, local_size: int, n_local: int, global_scale=(0.4, 1.0),
               local_scale=(0.05, 0.4), gram_size: int = 0, horizontal_flips: bool = True) -> list[CropSpec]:
    """Crop-major specs: global 1 (blur 1.0), global 2 (blur .1, solarize .2), local 1..N (blur .5),
    then with gram_size > 0 the two Gram-teacher crops (DINOv3, crops.gram_teacher_no_distortions):
    the same box and flip as global 1 and 2 (their draws), resized to gram_size, not distorted.

    The official DataAugmentationDINO makes both from one RandomResizedCrop at max(global, gram) px,
    resized again to the global size before the distortions; here each is one bicubic resize of the
    same box (the same geometry, one resampling fewer)."""
    g, l, f = tuple(global_scale), tuple(local_scale), 0.5 if horizontal_flips else 0.0
    specs = ([CropSpec(global_size, g, 1.0, 0.0, p_flip=f), CropSpec(global_size, g, 0.1, 0.2, p_flip=f)]
             + [CropSpec(local_size, l, 0.5, 0.0, p_flip=f) for _ in range(n_local)])
    if gram_size:
        specs += [CropSpec(gram_size, g, 0.0, 0.0, key=j, distort=False, p_flip=f) for j in range(2)]
    return specs


def draw_keys(specs) -> np.ndarray:
    """The crop number each spec's draws are keyed by (int64 [C])."""
    return np.array([c if s.key is None else s.key for c, s in enumerate(specs)], np.int64)


UNDISTORTED = ("jitter", "gray", "blur", "solarize")  # the draws a distort=False crop switches off


# ----------------------------------------------------------------------------- counter-based RNG
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer (bijective avalanche on uint64; arrays wrap modulo 2^64)."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, epoch: int, index, crop, n: int = N_DRAWS) -> np.ndarray:
    """float64 uniforms in [0, 1) of shape broadcast(index, crop) + (n,): a pure function of
    (seed, epoch, index, crop, slot)."""
    with np.errstate(over="ignore"):
        index = np.asarray(index, np.int64).astype(np.uint64)
        crop = np.asarray(crop, np.int64).astype(np.uint64)
        h = _mix(np.full((), np.uint64(seed & 0xFFFFFFFFFFFFFFFF)))
        h = _mix(h ^ np.uint64(epoch & 0xFFFFFFFFFFFFFFFF))
        h = _mix(h ^ index)
        h = _mix(h ^ crop)
        h = _mix(h[..., None] ^ np.arange(n, dtype=np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The epoch's shuffle of range(n): the same on every rank."""
    return np.argsort(uniforms(seed, epoch, np.arange(n), -1, 1)[:, 0], kind="stable")


# ----------------------------------------------------------------------------- parameter draws
def resized_crop_boxes(u: np.ndarray, width, height, scale, ratio=RATIO) -> np.ndarray:
    """torchvision RandomResizedCrop.get_params, vectorized: int64 [..., 4] = (top, left, h, w).

    u: [..., N_DRAWS] uniforms (slots 0-21). 10 tries of (area ~ U(scale) * W*H, log-ratio ~ U),
    w = round(sqrt(area*ratio)), h = round(sqrt(area/ratio)); the first try with 0 < w <= W and
    0 < h <= H wins and its offsets are uniform integers; else a center crop clamped to the ratio."""
    width = np.asarray(width, np.int64)
    height = np.asarray(height, np.int64)
    shape = np.broadcast_shapes(u.shape[:-1], width.shape, height.shape)
    u = np.broadcast_to(u, shape + u.shape[-1:])
    width, height = np.broadcast_to(width, shape), np.broadcast_to(height, shape)
    area = (width * height).astype(np.float64)[..., None]
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0:2 * N_TRIES:2])
    aspect = np.exp(log_r[0] + (log_r[1] - log_r[0]) * u[..., 1:2 * N_TRIES:2])
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)  # round half to even, as Python's round
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    ok = (w > 0) & (w <= width[..., None]) & (h > 0) & (h <= height[..., None])
    first = np.argmax(ok, axis=-1)[..., None]
    found = ok.any(axis=-1)
    w_t = np.take_along_axis(w, first, -1)[..., 0]
    h_t = np.take_along_axis(h, first, -1)[..., 0]
    top_t = np.floor(u[..., 20] * (height - h_t + 1)).astype(np.int64)
    left_t = np.floor(u[..., 21] * (width - w_t + 1)).astype(np.int64)
    # fallback: whole image, clamped to the ratio range
    in_ratio = width / height
    w_f = np.where(in_ratio < ratio[0], width, np.where(in_ratio > ratio[1], np.round(height * ratio[1]), width))
    h_f = np.where(in_ratio < ratio[0], np.round(width / ratio[0]), height)
    w_f, h_f = w_f.astype(np.int64), h_f.astype(np.int64)
    top_f, left_f = (height - h_f) // 2, (width - w_f) // 2
    return np.stack([np.where(found, top_t, top_f), np.where(found, left_t, left_f),
                     np.where(found, h_t, h_f), np.where(found, w_t, w_f)], -1)


def photometric_params(u: np.ndarray, p_blur, p_solarize, p_flip=0.5) -> dict:
    """Per-crop photometric draws from uniforms [..., N_DRAWS]; p_blur/p_solarize/p_flip broadcast."""
    b, c, s, hh = JITTER
    return {
        "flip": u[..., 22] < np.asarray(p_flip),
        "jitter": u[..., 23] < 0.8,
        "brightness": (1 - b) + 2 * b * u[..., 24],
        "contrast": (1 - c) + 2 * c * u[..., 25],
        "saturation": (1 - s) + 2 * s * u[..., 26],
        "hue": -hh + 2 * hh * u[..., 27],
        "order": np.argsort(u[..., 28:32], axis=-1, kind="stable"),  # a uniform random permutation of the 4 ops
        "gray": u[..., 32] < 0.2,
        "blur": u[..., 33] < np.asarray(p_blur),
        "sigma": SIGMA[0] + (SIGMA[1] - SIGMA[0]) * u[..., 34],
        "solarize": u[..., 35] < np.asarray(p_solarize),
    }


def draw_params(seed: int, epoch: int, index: int, crop: int, spec: CropSpec, width: int, height: int) -> dict:
    """All draws of one crop of one image: {'box': (top, left, h, w), 'flip', 'jitter', ...}, keyed by
    `crop` (or spec.key)."""
    u = uniforms(seed, epoch, index, crop if spec.key is None else spec.key)
    p = {k: v.item() for k, v in photometric_params(u, spec.p_blur, spec.p_solarize, spec.p_flip).items()
         if k != "order"}
    if not spec.distort:
        p.update({k: False for k in UNDISTORTED})
    p["order"] = tuple(int(i) for i in np.argsort(u[28:32], kind="stable"))
    p["box"] = tuple(int(v) for v in resized_crop_boxes(u, width, height, spec.scale))
    return p


PARAM_KEYS = ("jitter", "brightness", "contrast", "saturation", "hue", "order", "gray", "blur", "sigma", "solarize")


def stack_params(params: list[dict]) -> dict:
    """A list of per-sample param dicts -> dict of CPU tensors [B] (order: [B, 4])."""
    out = {}
    for k in PARAM_KEYS:
        v = np.asarray([p[k] for p in params])
        out[k] = torch.from_numpy(v.astype(np.float32) if v.dtype.kind == "f" else v.astype(np.int64 if k == "order" else bool))
    return out


# ----------------------------------------------------------------------------- batched photometric ops
def _gray(x: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] -> [B,1,H,W] luma (torchvision rgb_to_grayscale)."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f * x + (1 - f) * y).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision adjust_hue on float [B,3,H,W] in [0,1]: rgb -> hsv, h = (h + shift) mod 1, -> rgb."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + shift.view(-1, 1, 1), 1.0)
    # hsv -> rgb in closed form: channel n takes v - v*s*clamp(min(k, 4-k), 0, 1), k = (n + 6h) mod 6
    v = maxc
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + 6.0 * h, 6.0)
        out.append(v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(out, 1)


def _jitter_op(op: int, x: torch.Tensor, p: dict) -> torch.Tensor:
    f = lambda k: p[k].to(x.dtype).view(-1, 1, 1, 1)  # noqa: E731
    if op == 0:
        return (x * f("brightness")).clamp_(0, 1)
    if op == 1:
        return _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), f("contrast"))
    if op == 2:
        return _blend(x, _gray(x), f("saturation"))
    return adjust_hue(x, p["hue"].to(x.dtype))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian of per-sample std sigma [B] (pixels), taps -6..6, reflect padding."""
    B, C, H, W = x.shape
    t = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma.to(x.dtype).view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # [B*C, 13]
    y = x.reshape(1, B * C, H, W)
    pad_w, pad_h = min(BLUR_RADIUS, W - 1), min(BLUR_RADIUS, H - 1)  # reflect needs pad < size
    y = torch.nn.functional.pad(y, (pad_w, pad_w, 0, 0), mode="reflect")
    y = torch.nn.functional.conv2d(y, k[:, None, None, BLUR_RADIUS - pad_w:BLUR_RADIUS + pad_w + 1], groups=B * C)
    y = torch.nn.functional.pad(y, (0, 0, pad_h, pad_h), mode="reflect")
    y = torch.nn.functional.conv2d(y, k[:, None, BLUR_RADIUS - pad_h:BLUR_RADIUS + pad_h + 1, None], groups=B * C)
    return y.reshape(B, C, H, W)


def _apply_subset(x: torch.Tensor, mask: torch.Tensor, fn) -> None:
    """x[mask] = fn(x[mask], idx) in place; mask is a host bool tensor (no device sync)."""
    idx = mask.nonzero().flatten()
    if idx.numel() == 0:
        return
    idx_dev = idx.to(x.device, non_blocking=True)
    x.index_copy_(0, idx_dev, fn(x.index_select(0, idx_dev), idx))


def photometric(x: torch.Tensor, p: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The photometric half of the recipe on a batch, then normalization.

    x: [B,3,H,W] uint8 (0..255) or float in [0, 1], on the compute device (already cropped and
    flipped). p: dict of host (CPU) tensors [B] from stack_params. Returns normalized `dtype`."""
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float().clone()
    dev = lambda t, idx: t[idx].to(x.device, non_blocking=True)  # noqa: E731
    jit = p["jitter"]
    for slot in range(4):  # torchvision ColorJitter: the 4 ops in the sample's random order
        for op in range(4):
            _apply_subset(x, jit & (p["order"][:, slot] == op),
                          lambda y, idx, op=op: _jitter_op(op, y, {k: dev(p[k], idx) for k in ("brightness", "contrast", "saturation", "hue")}))
    _apply_subset(x, p["gray"], lambda y, idx: _gray(y).expand(-1, 3, -1, -1))
    _apply_subset(x, p["blur"], lambda y, idx: gaussian_blur(y, dev(p["sigma"], idx)))
    _apply_subset(x, p["solarize"], lambda y, idx: torch.where(y >= SOLARIZE_THRESHOLD, 1.0 - y, y))
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)


# ----------------------------------------------------------------------------- geometric part (PIL)
def resized_crop_pil(img, box, size: int, flip: bool):
    """PIL: crop box (top, left, h, w), bicubic resize to size x size (PIL antialiases when
    shrinking, like torchvision on PIL images), optional horizontal flip."""
    from PIL import Image

    top, left, h, w = box
    out = img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    return out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out


def pil_to_uint8(img) -> torch.Tensor:
    """PIL RGB image -> uint8 tensor [3, H, W]."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


# ----------------------------------------------------------------------------- per-image reference
class DataAugmentationDINORef:
    """The recipe applied image by image with PIL, like the official DataAugmentationDINO (which is
    torchvision's PIL path): PIL image -> list of 2+N normalized float32 tensors [3, S, S].

    Draws come from `draw_params` with the key (seed, epoch, index, crop), so for the same key the
    fast paths see the same parameters; call with explicit `params` to replay given draws."""

    def __init__(self, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), local_crops_number=8,
                 global_crop_size=224, local_crop_size=96, gram_crop_size=0):
        self.specs = crop_specs(global_crop_size, local_crop_size, local_crops_number, global_crops_scale,
                                local_crops_scale, gram_crop_size)

    def params(self, img, seed: int, epoch: int, index: int) -> list[dict]:
        return [draw_params(seed, epoch, index, c, s, img.width, img.height) for c, s in enumerate(self.specs)]

    def __call__(self, img, seed: int = 0, epoch: int = 0, index: int = 0, params: list[dict] | None = None):
        img = img.convert("RGB")
        params = params or self.params(img, seed, epoch, index)
        return [self.crop(img, s, p) for s, p in zip(self.specs, params)]

    @staticmethod
    def crop(img, spec: CropSpec, p: dict) -> torch.Tensor:
        from PIL import Image, ImageEnhance, ImageFilter, ImageOps

        out = resized_crop_pil(img, p["box"], spec.size, p["flip"])
        if p["jitter"] and spec.distort:
            for op in p["order"]:  # torchvision F.adjust_* on PIL images
                if op == 0:
                    out = ImageEnhance.Brightness(out).enhance(p["brightness"])
                elif op == 1:
                    out = ImageEnhance.Contrast(out).enhance(p["contrast"])
                elif op == 2:
                    out = ImageEnhance.Color(out).enhance(p["saturation"])
                else:
                    h, s, v = out.convert("HSV").split()
                    h = Image.fromarray(((np.asarray(h, np.uint8).astype(np.int16) + int(p["hue"] * 255)) % 256).astype(np.uint8), "L")
                    out = Image.merge("HSV", (h, s, v)).convert("RGB")
        if p["gray"] and spec.distort:
            out = out.convert("L").convert("RGB")
        if p["blur"] and spec.distort:
            out = out.filter(ImageFilter.GaussianBlur(radius=p["sigma"]))
        if p["solarize"] and spec.distort:
            out = ImageOps.solarize(out, threshold=128)
        x = pil_to_uint8(out).float() / 255.0
        return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
