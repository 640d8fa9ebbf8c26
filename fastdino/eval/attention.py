"""Self-attention maps of the last block's [CLS] query (DINO paper, Fig. 1 and Sec. 4.2.1).

    a_h      = softmax attention of [CLS] over the patch tokens in the last block, head h   [h_p, w_p]
    mask_h   = the smallest set of largest entries of a_h holding >= `keep` (60%) of its mass
    Jaccard  = |mask & gt| / |mask | gt| at pixel resolution (mask upsampled nearest, as DINO does)

Processes the first `--max_images` (8) images of the list (a folder's images in sorted order; the
rest are skipped, one line says how many) and writes one labelled summary, <output_dir>/attention_grid.png:
one row per image (its name, and its Jaccard scores with ground truth), columns: the image, each
head's attention map (heat map, upsampled to pixels), the head-averaged map's mask, and the overlay of
every head's mask in that head's colour (the swatch beside its column label). With --per_image it
also writes into <output_dir>/<image stem>/: img.png, attn-head{h}.png (heat map), mask-head{h}.png,
overlay-head{h}.png (mask blended on the image), the same for the head-averaged map (attn-mean.png
...), and grid.png (image | heat maps | overlays). With ground-truth masks it prints and saves
(attention.json) the Jaccard index of each head, of the best head, the mean over heads, and of the
head-averaged map's mask. PNGs are written with PIL (no matplotlib).

    python -m fastdino.eval.attention --checkpoint runs/demo/checkpoint.pth --images a.jpg b.jpg
    python -m fastdino.eval.attention --checkpoint dino_vits8.pth --images DAVIS/JPEGImages/480p/cows \\
        --mask_dir DAVIS/Annotations/480p/cows --image_size 480 --max_images 20 --per_image
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from fastdino.data.folder import Unreadable
from fastdino.eval.common import (EvalError, UnreadableImage, add_backbone_args, backbone_from_args, list_images,
                                  load_image, normalize, prepare, run_cli, save_report, to_tensor, unique_name)

# a perceptually ordered dark-to-bright color map (anchors of an inferno-like ramp), for heat maps
_RAMP = torch.tensor([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
                      [245, 125, 21], [250, 193, 39], [252, 255, 164]], dtype=torch.float32)
# distinct colors for head overlays
_HEAD_COLORS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255)]


def mass_threshold_mask(attn: torch.Tensor, keep: float = 0.6) -> torch.Tensor:
    """Boolean mask over the last dim of `attn` [..., N] (non-negative) keeping the largest entries
    until their share of the total reaches `keep`: sort ascending, normalize, cumulative sum; an
    entry is kept when the mass up to and including it exceeds 1 - keep (the official rule). So the
    kept mass is >= keep, and dropping the smallest kept entry would leave < keep."""
    if not 0.0 < keep <= 1.0:
        raise EvalError(f"threshold (mass to keep) must be in (0, 1], got {keep}")
    vals, idx = torch.sort(attn.float(), dim=-1)
    vals = vals / vals.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    kept_sorted = vals.cumsum(dim=-1) > (1.0 - keep)
    return torch.zeros_like(kept_sorted).scatter(-1, idx, kept_sorted)


def jaccard(mask: torch.Tensor, gt: torch.Tensor) -> float:
    """|mask & gt| / |mask | gt| of two boolean maps (1.0 when both are empty)."""
    if mask.shape != gt.shape:
        raise EvalError(f"mask shape {tuple(mask.shape)} differs from ground truth {tuple(gt.shape)}")
    union = (mask | gt).sum().item()
    return 1.0 if union == 0 else (mask & gt).sum().item() / union


@torch.no_grad()
def cls_attention(model, x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[heads, H/p, W/p]: last block's attention of [CLS] to every patch token, for one image x
    [1, 3, H, W] (H, W multiples of the patch size)."""
    attn = model.get_last_selfattention(x)  # [1, heads, 1 + R + N, 1 + R + N]: [CLS], R registers, patches
    h, w = x.shape[-2] // patch_size, x.shape[-1] // patch_size
    cls = attn[0, :, 0, 1 + getattr(model, "num_register_tokens", 0):].float()
    if cls.shape[-1] != h * w:
        raise EvalError(f"attention has {cls.shape[-1]} patch tokens, expected {h}x{w}")
    return cls.reshape(-1, h, w)


def load_gt_mask(path: str, image_size: int, patch_size: int) -> torch.Tensor:
    """Ground truth as a boolean [H, W] after the image's resize and crop: foreground is any non-zero
    index for palette masks (DAVIS), gray level >= 128 otherwise (1-bit masks included)."""
    from PIL import Image

    try:
        with Image.open(path) as m:
            mode, m = m.mode, m.copy()
    except OSError as e:
        raise EvalError(f"cannot read mask '{path}': {e}") from None
    palette = mode == "P"  # DAVIS-style: pixel values are object indices, 0 is background
    if not palette:
        m = m.convert("L")
    m = prepare(m, image_size, patch_size, Image.NEAREST)
    t = torch.frombuffer(bytearray(m.tobytes()), dtype=torch.uint8).view(m.size[1], m.size[0])
    return t > 0 if palette else t >= 128


def colorize(heat: torch.Tensor) -> torch.Tensor:
    """[H, W] -> uint8 [H, W, 3] through the color ramp, min-max scaled."""
    x = heat.float()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    pos = x * (len(_RAMP) - 1)
    lo = pos.floor().long().clamp(max=len(_RAMP) - 2)
    frac = (pos - lo)[..., None]
    return (_RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac).round().clamp(0, 255).to(torch.uint8)


def upsample(grid: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[..., h, w] -> [..., h*p, w*p], nearest (each patch's value covers its pixels)."""
    return grid.repeat_interleave(patch_size, -2).repeat_interleave(patch_size, -1)


def _pil(arr: torch.Tensor):
    from PIL import Image

    arr = arr.contiguous()
    mode = "L" if arr.dim() == 2 else "RGB"
    return Image.frombytes(mode, (arr.shape[1], arr.shape[0]), arr.numpy().tobytes())


def overlay(image_u8: torch.Tensor, mask: torch.Tensor, color, alpha: float = 0.5) -> torch.Tensor:
    """Blend `color` into the masked pixels of an RGB uint8 image [H, W, 3]."""
    out = image_u8.float()
    c = torch.tensor(color, dtype=torch.float32)
    out[mask] = out[mask] * (1 - alpha) + c * alpha
    return out.round().to(torch.uint8)


def save_maps(out_dir: str, img, attn: torch.Tensor, masks: torch.Tensor, patch_size: int) -> list[str]:
    """Write the PNGs for one image; attn, masks: [heads + 1, h, w] (the last one is the mean)."""
    os.makedirs(out_dir, exist_ok=True)
    image_u8 = (to_tensor(img) * 255).round().to(torch.uint8).permute(1, 2, 0)
    names = [f"head{i}" for i in range(attn.shape[0] - 1)] + ["mean"]
    written = [os.path.join(out_dir, "img.png")]
    _pil(image_u8).save(written[0])
    heats, overlays = [], []
    for i, name in enumerate(names):
        heat = colorize(upsample(attn[i], patch_size))
        mask = upsample(masks[i], patch_size)
        over = overlay(image_u8, mask, _HEAD_COLORS[i % len(_HEAD_COLORS)] if name != "mean" else (255, 255, 255))
        for kind, arr in (("attn", heat), ("mask", mask.to(torch.uint8) * 255), ("overlay", over)):
            path = os.path.join(out_dir, f"{kind}-{name}.png")
            _pil(arr).save(path)
            written.append(path)
        heats.append(heat)
        overlays.append(over)
    # grid: image, then one column per map; top row heat maps, bottom row overlays
    gap = 4
    h, w = image_u8.shape[:2]
    grid = torch.full((2 * h + gap, (len(names) + 1) * (w + gap) - gap, 3), 255, dtype=torch.uint8)
    grid[:h, :w] = image_u8
    for i, (heat, over) in enumerate(zip(heats, overlays)):
        x0 = (i + 1) * (w + gap)
        grid[:h, x0:x0 + w] = heat
        grid[h + gap:, x0:x0 + w] = over
    path = os.path.join(out_dir, "grid.png")
    _pil(grid).save(path)
    written.append(path)
    return written


# the summary grid's layout (pixels): a header band of column labels, then per image a name strip and
# a row of cells; each picture is scaled to fit its cell (aspect kept), the maps with nearest resampling
GRID_HEADER = 20
GRID_NAME = 14
GRID_GAP = 4


def heads_overlay(image_u8: torch.Tensor, masks: torch.Tensor, alpha: float = 0.55) -> torch.Tensor:
    """Every head's mask on the image [H, W, 3] uint8, masks [heads, H, W] bool: a pixel takes the mean
    of the colours of the heads whose masks hold it, blended with weight alpha (order-free)."""
    colors = torch.tensor([_HEAD_COLORS[i % len(_HEAD_COLORS)] for i in range(masks.shape[0])], dtype=torch.float32)
    m = masks.float()
    count = m.sum(0)[..., None]  # [H, W, 1]
    mean_color = torch.einsum("khw,kc->hwc", m, colors) / count.clamp_min(1)
    out = image_u8.float()
    out = torch.where(count > 0, out * (1 - alpha) + mean_color * alpha, out)
    return out.round().to(torch.uint8)


def grid_row(img, attn: torch.Tensor, masks: torch.Tensor, patch_size: int) -> list[torch.Tensor]:
    """The pictures of one image's grid row, uint8 [H, W, 3] at pixel resolution: the image, each
    head's heat map, the head-averaged map's mask, every head's mask overlaid (attn, masks: [heads + 1,
    h, w], the mean last)."""
    image_u8 = (to_tensor(img) * 255).round().to(torch.uint8).permute(1, 2, 0)
    heats = [colorize(upsample(a, patch_size)) for a in attn[:-1]]
    mean_mask = upsample(masks[-1], patch_size).to(torch.uint8)[..., None].expand(-1, -1, 3) * 255
    return [image_u8, *heats, mean_mask, heads_overlay(image_u8, upsample(masks[:-1], patch_size))]


def grid_columns(heads: int) -> list[str]:
    return ["image", *(f"head {h}" for h in range(heads)), "mask (mean)", "overlay"]


def summary_grid(rows: list[tuple[str, list[torch.Tensor]]], heads: int, cell: int):
    """One PIL image: the header band of column labels (head labels with their overlay colour), then
    for each (name, pictures) a name strip and the pictures, each scaled to fit a cell x cell square.
    Size: width = cols * cell + (cols - 1) * GRID_GAP, cols = heads + 3; height = GRID_HEADER +
    rows * (GRID_NAME + cell) + (rows - 1) * GRID_GAP."""
    from PIL import Image, ImageDraw, ImageFont

    labels = grid_columns(heads)
    width = len(labels) * (cell + GRID_GAP) - GRID_GAP
    height = GRID_HEADER + len(rows) * (GRID_NAME + cell + GRID_GAP) - GRID_GAP
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for c, label in enumerate(labels):
        x = c * (cell + GRID_GAP)
        if label.startswith("head "):  # the colour of this head in the overlay column
            draw.rectangle((x, 5, x + 9, 14), fill=_HEAD_COLORS[int(label.split()[1]) % len(_HEAD_COLORS)])
            x += 13
        draw.text((x, 4), label, fill=(0, 0, 0), font=font)
    for r, (name, pictures) in enumerate(rows):
        y = GRID_HEADER + r * (GRID_NAME + cell + GRID_GAP)
        draw.text((0, y + 1), name, fill=(0, 0, 0), font=font)
        for c, pic in enumerate(pictures):
            tile = _pil(pic)
            scale = cell / max(tile.size)
            size = (max(1, round(tile.size[0] * scale)), max(1, round(tile.size[1] * scale)))
            tile = tile.resize(size, Image.BILINEAR if c in (0, len(pictures) - 1) else Image.NEAREST)
            canvas.paste(tile, (c * (cell + GRID_GAP), y + GRID_NAME))
    return canvas


def analyze_image(model, path: str, image_size: int, keep: float, device, gt_path: str | None = None):
    """(cropped PIL image, attn [heads+1, h, w], masks [heads+1, h, w], jaccard dict or None)."""
    p = model.patch_size
    img = prepare(load_image(path), image_size, p)
    if img.size[0] < p or img.size[1] < p:
        raise EvalError(f"image '{path}' is smaller than one patch after resizing")
    x = normalize(to_tensor(img))[None].to(device)
    attn = cls_attention(model, x, p).cpu()
    attn = torch.cat([attn, attn.mean(0, keepdim=True)])  # the head-averaged map last
    masks = mass_threshold_mask(attn.flatten(1), keep).view_as(attn)
    scores = None
    if gt_path is not None:
        gt = load_gt_mask(gt_path, image_size, p)
        if gt.shape != (img.size[1], img.size[0]):
            raise EvalError(f"mask '{gt_path}' is {gt.shape[1]}x{gt.shape[0]} after resizing, the image "
                            f"'{path}' {img.size[0]}x{img.size[1]}: they must have the same aspect")
        per_head = [jaccard(upsample(m, p), gt) for m in masks[:-1]]
        best = max(range(len(per_head)), key=lambda i: per_head[i])
        scores = {"per_head": per_head, "best_head": best, "best": per_head[best],
                  "mean_over_heads": sum(per_head) / len(per_head), "mean_attention": jaccard(upsample(masks[-1], p), gt)}
    return img, attn, masks, scores


def _match_masks(images, masks, mask_dir):
    if masks:
        if len(masks) != len(images):
            raise EvalError(f"{len(masks)} masks for {len(images)} images: give one per image, in order")
        return list(masks)
    if mask_dir:
        found = {}
        for d, _, files in os.walk(mask_dir):
            for f in files:
                found.setdefault(os.path.splitext(f)[0], os.path.join(d, f))
        out = []
        for img in images:
            stem = os.path.splitext(os.path.basename(img))[0]
            if stem not in found:
                raise EvalError(f"no mask named '{stem}.*' in '{mask_dir}' for image '{img}'")
            out.append(found[stem])
        return out
    return [None] * len(images)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastdino.eval.attention", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backbone_args(p)
    p.add_argument("--images", nargs="+", required=True, help="image files and/or folders")
    p.add_argument("--max_images", type=int, default=8,
                   help="process the first N images of the list (a folder's in sorted order); the rest are skipped")
    p.add_argument("--per_image", action="store_true",
                   help="also write each image's PNGs (image, heat map, mask and overlay per head) into a folder")
    p.add_argument("--cell_size", type=int, default=224, help="pixels of a picture's cell in the summary grid")
    p.add_argument("--masks", nargs="+", default=None, help="ground-truth masks, one per image, in order")
    p.add_argument("--mask_dir", default=None, help="ground-truth masks named like the images (any extension)")
    p.add_argument("--image_size", type=int, default=480, help="shorter side before cropping to the patch grid")
    p.add_argument("--threshold", type=float, default=0.6, help="share of the attention mass the masks keep")
    p.add_argument("--output_dir", default=None, help="default: <checkpoint dir>/attention")
    args = p.parse_args(argv)
    if args.max_images < 1:
        raise EvalError(f"--max_images must be >= 1, got {args.max_images}")
    if args.cell_size < 16:
        raise EvalError(f"--cell_size must be >= 16 pixels, got {args.cell_size}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    images = list_images(args.images)
    skipped = max(0, len(images) - args.max_images)
    if args.masks:  # one per listed image: checked against the whole list, then cut with it
        gts = _match_masks(images, args.masks, None)[:args.max_images]
        images = images[:args.max_images]
    else:  # --mask_dir: only the processed images need a mask
        images = images[:args.max_images]
        gts = _match_masks(images, None, args.mask_dir)
    if skipped:
        print(f"attention maps of the first {len(images)} of {len(images) + skipped} images (--max_images "
              f"{args.max_images}): {skipped} skipped")
    model = backbone_from_args(args)
    device = next(model.parameters()).device
    out_dir = args.output_dir or (os.path.join("runs", f"attention-random-{args.arch}") if args.random_init
                                  else os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "attention"))
    report, used, rows = {"images": {}}, set(), []
    unreadable = Unreadable("attention maps")
    for path, gt in zip(images, gts):
        try:
            img, attn, masks, scores = analyze_image(model, path, args.image_size, args.threshold, device, gt)
        except UnreadableImage as e:
            unreadable.add(path, str(e))
            continue
        name = unique_name(path, used)
        label = name if not scores else (f"{name}  Jaccard: best head {scores['best']:.2f} (head "
                                         f"{scores['best_head']}), mean map {scores['mean_attention']:.2f}")
        rows.append((label, grid_row(img, attn, masks, model.patch_size)))
        if args.per_image:
            save_maps(os.path.join(out_dir, name), img, attn, masks, model.patch_size)
        kept = [float(masks[i].float().mean()) for i in range(masks.shape[0])]
        report["images"][name] = {"path": os.path.abspath(path), "mask": gt, "size": list(img.size),
                                  "kept_fraction_of_patches": kept, "jaccard": scores}
        line = f"{name}: {attn.shape[0] - 1} heads, {img.size[0]}x{img.size[1]}"
        if args.per_image:
            line += f" -> {os.path.join(out_dir, name)}"
        if scores:
            line += (f"  Jaccard best head {scores['best']:.3f} (head {scores['best_head']}), mean over heads "
                     f"{scores['mean_over_heads']:.3f}, mean attention {scores['mean_attention']:.3f}")
        print(line)
    grid_path = None
    if rows:
        os.makedirs(out_dir, exist_ok=True)
        grid_path = os.path.join(out_dir, "attention_grid.png")
        summary_grid(rows, len(rows[0][1]) - 3, args.cell_size).save(grid_path)
        print(f"summary grid ({len(rows)} images x {len(rows[0][1])} columns): {grid_path}")
    scored = [r["jaccard"] for r in report["images"].values() if r["jaccard"]]
    if scored:  # dataset level: the best head is the one with the best mean Jaccard over the images
        per_head = [sum(s["per_head"][h] for s in scored) / len(scored) for h in range(len(scored[0]["per_head"]))]
        best = max(range(len(per_head)), key=lambda h: per_head[h])
        report["mean"] = {"per_head": per_head, "best_head": best, "best": per_head[best],
                          "mean_over_heads": sum(per_head) / len(per_head),
                          "mean_attention": sum(s["mean_attention"] for s in scored) / len(scored)}
        m = report["mean"]
        print(f"mean Jaccard over {len(scored)} images: best head {m['best']:.3f} (head {best}), mean over "
              f"heads {m['mean_over_heads']:.3f}, head-averaged map {m['mean_attention']:.3f}")
    report.update(threshold=args.threshold, image_size=args.image_size, unreadable_images=len(unreadable),
                  max_images=args.max_images, skipped_images=skipped, grid=grid_path,
                  checkpoint=None if args.random_init else os.path.abspath(args.checkpoint))
    save_report(report, out_dir, "attention.json")
    return report


if __name__ == "__main__":
    sys.exit(run_cli(main))
