"""Procedural demo dataset: a few visually distinct classes of JPEG images, generated in seconds.

Each class is a shape or texture family (disks, squares, triangles, stripes, checkerboards, rings,
crosses, blobs) with its own colour palette; every image draws position, scale, count, colours,
a background gradient and pixel noise, so no single pixel statistic separates the classes after
DINO's crops and colour jitter, but a small ViT learns them (shape and texture survive the recipe).

    python -m fastdino.data.demo --out data/demo --num-images 512
"""
from __future__ import annotations

import argparse
import colorsys
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from fastdino.data.folder import DataError, ImageFolder

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


def render_demo_image(index: int, label: int, num_classes: int, size: int, seed: int) -> np.ndarray:
    """One HxWx3 uint8 image of class `label`; a pure function of (seed, index, label, size)."""
    rng = np.random.default_rng([seed, index, label])
    shape = SHAPES[label % len(SHAPES)]
    hue = (label * 0.618034) % 1.0  # class palette (golden-ratio spaced hues)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # background: a random-direction gradient between two random low-saturation colours
    a, b = _rgb(rng.random(), rng.uniform(0, .4), rng.uniform(.2, .9)), _rgb(rng.random(), rng.uniform(0, .4), rng.uniform(.2, .9))
    t = (np.cos(rng.uniform(0, 2 * np.pi)) * xx + np.sin(rng.uniform(0, 2 * np.pi)) * yy) / size
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    img = a * (1 - t[..., None]) + b * t[..., None]
    for _ in range(int(rng.integers(1, 4))):
        r = size * rng.uniform(0.12, 0.32)
        cy, cx = rng.uniform(r * 0.5, size - r * 0.5, size=2)
        m = _mask(shape, yy, xx, cy, cx, r, rng.uniform(0, 2 * np.pi), rng)[..., None]
        col = _rgb(hue + rng.normal(0, 0.06), rng.uniform(0.45, 1.0), rng.uniform(0.35, 1.0))
        img = img * (1 - m) + col * m
    img = img + rng.normal(0, rng.uniform(0.01, 0.06), size=img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _count_images(root: str) -> int:
    try:
        return len(ImageFolder(root))
    except DataError:
        return 0


def generate_demo_dataset(root: str, num_images: int = 512, num_classes: int = 4, image_size: int = 96,
                          seed: int = 0) -> str:
    """Write root/class_XX/img_XXXXX.jpg (image i has class i % num_classes); returns root.

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
    try:
        for c in range(num_classes):
            os.makedirs(os.path.join(tmp, f"class_{c:02d}"))
        for i in range(num_images):
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
    p.add_argument("--num-images", type=int, default=512)
    p.add_argument("--num-classes", type=int, default=4)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    root = generate_demo_dataset(a.out, a.num_images, a.num_classes, a.image_size, a.seed)
    print(f"demo dataset: {a.num_images} images, {a.num_classes} classes, {a.image_size}px in {root}")


if __name__ == "__main__":
    main()
