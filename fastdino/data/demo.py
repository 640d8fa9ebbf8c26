"""Procedural demo dataset: a few classes of JPEG images, generated in seconds, on which DINO's
features beat a random network's within a few CPU minutes.

The class of an image is the hue of the small dots scattered over all of it (class c: hue c / C),
so every crop, global or local, shows it. On top of them lie 2-3 large shapes (disks, squares,
triangles, stripes, checkerboards, rings, crosses, blobs) in random colours, over a grey gradient.
The shapes are the loudest thing in the pixels, so a randomly initialized ViT's [CLS] feature mixes
them with the dots and its k-NN accuracy stays near 60% (4 classes); they are local, so a small crop
rarely predicts them from the rest of the image, and DINO's local-to-global objective learns the
dots' hue instead (see README.md for the measured k-NN of both).

    python -m fastdino.data.demo --out data/demo --num-images 2000
"""
from __future__ import annotations

import argparse
import colorsys
import logging
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from fastdino.data.folder import DataError, ImageFolder

log = logging.getLogger("fastdino")

SHAPES = ("disk", "square", "triangle", "stripes", "checker", "ring", "cross", "blob")


def _mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float,
          angle: float, rng: np.random.Generator) -> np.ndarray:
    """Soft mask in [0, 1] of one object of the given family, centred at (cy, cx) with size r."""
    c, s = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * c + (yy - cy) * s) / r  # rotated, size-normalized coordinates
    v = (-(xx - cx) * s + (yy - cy) * c) / r
    d = np.sqrt(u * u + v * v)
    if shape == "disk":
        m = d < 1
    elif shape == "square":
        m = np.maximum(np.abs(u), np.abs(v)) < 0.85
    elif shape == "triangle":
        m = (v < 0.6) & (v > -0.9 + 1.6 * np.abs(u) * 1.15)
    elif shape == "stripes":
        m = (d < 1.2) & (np.sin(u * np.pi * 3.0) > 0)
    elif shape == "checker":
        m = (np.maximum(np.abs(u), np.abs(v)) < 1.0) & ((np.floor(u * 2.5) + np.floor(v * 2.5)) % 2 == 0)
    elif shape == "ring":
        m = (d < 1.0) & (d > 0.6)
    elif shape == "cross":
        m = ((np.abs(u) < 0.28) & (np.abs(v) < 1.0)) | ((np.abs(v) < 0.28) & (np.abs(u) < 1.0))
    else:  # blob: a disk with a wobbly radius
        theta = np.arctan2(v, u)
        k = rng.integers(3, 6)
        m = d < 0.8 + 0.25 * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    return m.astype(np.float32)


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0), 1), min(max(v, 0), 1)), np.float32)


def _disk(img: np.ndarray, cy: float, cx: float, r: float, color: np.ndarray) -> None:
    """Paint a hard-edged disk in place, touching only its bounding box."""
    size_y, size_x = img.shape[:2]
    y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 2, size_y)
    x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 2, size_x)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    img[y0:y1, x0:x1][inside] = color


def render_demo_image(index: int, label: int, num_classes: int, size: int, seed: int) -> np.ndarray:
    """One HxWx3 uint8 image of class `label`; a pure function of (seed, index, label, size)."""
    rng = np.random.default_rng([seed, index, label])
    hue = label / num_classes + 0.02  # class hue; DINO's hue jitter (0.1) stays within a class for C <= 4
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # background: a grey gradient in a random direction
    lo, hi = rng.uniform(0.2, 0.45), rng.uniform(0.6, 0.85)
    theta = rng.uniform(0, 2 * np.pi)
    t = np.cos(theta) * xx + np.sin(theta) * yy
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = np.repeat((lo + (hi - lo) * t)[..., None], 3, axis=2).astype(np.float32)
    # the class: 40-80 small dots of the class hue all over the image
    for _ in range(int(rng.integers(40, 80))):
        r = size * rng.uniform(0.025, 0.05)
        cy, cx = rng.uniform(0, size, size=2)
        _disk(img, cy, cx, r, _rgb(hue + rng.normal(0, 0.03), rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0)))
    # the nuisance: 2-3 large shapes of any family in random colours
    for _ in range(int(rng.integers(2, 4))):
        r = size * rng.uniform(0.2, 0.4)
        cy, cx = rng.uniform(0, size, size=2)
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        m = _mask(shape, yy, xx, cy, cx, r, rng.uniform(0, 2 * np.pi), rng)[..., None]
        img = img * (1 - m) + _rgb(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.3, 1.0)) * m
    img = img + rng.normal(0, 0.03, size=img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _count_images(root: str) -> int:
    try:
        return len(ImageFolder(root))
    except DataError:
        return 0


def generate_demo_dataset(root: str, num_images: int = 2000, num_classes: int = 4, image_size: int = 96,
                          seed: int = 0, progress: bool = False) -> str:
    """Write root/class_XX/img_XXXXX.jpg (image i has class i % num_classes); returns root.
    progress: say so in the log and show a progress bar (it takes about a minute for the demo).

    Skipped when root already holds num_images images. Written into a temporary sibling folder and
    renamed into place, so an interrupted run never leaves a partial dataset, and concurrent callers
    (one per rank) are safe: the losers of the rename find the finished folder."""
    root = os.path.abspath(str(root))
    if num_images < 1 or num_classes < 1 or image_size < 8:
        raise ValueError(f"demo dataset: need num_images >= 1, num_classes >= 1, image_size >= 8, "
                         f"got {num_images}, {num_classes}, {image_size}")
    if os.path.isdir(root):
        found = _count_images(root)
        if found == num_images:
            return root
        if found or os.listdir(root):
            raise DataError(f"data folder '{root}' exists with {found} images, not the {num_images} of the "
                            f"demo dataset: remove it or point data.path elsewhere")
        os.rmdir(root)  # an empty folder: replace it
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
    indices = range(num_images)
    if progress:
        from tqdm import tqdm

        log.info("generating the demo dataset: %d images of %d px in %s", num_images, image_size, root)
        indices = tqdm(indices, desc="demo images", unit="img", leave=False, mininterval=1.0)
    try:
        for c in range(num_classes):
            os.makedirs(os.path.join(tmp, f"class_{c:02d}"))
        for i in indices:
            label = i % num_classes
            pixels = render_demo_image(i, label, num_classes, image_size, seed)
            Image.fromarray(pixels).save(os.path.join(tmp, f"class_{label:02d}", f"img_{i:05d}.jpg"), quality=90)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first
            if _count_images(root) != num_images:
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Generate the procedural fastdino demo dataset (JPEG folders).")
    p.add_argument("--out", required=True, help="output folder (created; skipped if already complete)")
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--num-classes", type=int, default=4)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    root = generate_demo_dataset(a.out, a.num_images, a.num_classes, a.image_size, a.seed)
    print(f"demo dataset: {a.num_images} images, {a.num_classes} classes, {a.image_size}px in {root}")


if __name__ == "__main__":
    main()
