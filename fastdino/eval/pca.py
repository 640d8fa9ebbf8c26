"""PCA of patch features (DINOv2 paper, Fig. 1 and Sec. 7.3): foreground and part colors.

The images are processed jointly (as the paper does for images of one category):

    F        = the last block's normed patch tokens of every image ([CLS] and registers skipped)  [N, D]
    PCA 1    over all N patches; z = first-component score / its standard deviation
    sign     of the first component: border rule (below)
    fg       = z > threshold (default 0: above the mean)
    PCA 2    over the foreground patches only; its first 3 component scores, each min-max scaled to
             [0, 1] over the foreground, are R, G, B; background patches are black

Sign rule ("border", the default): an eigenvector's sign is arbitrary, so the first component is
oriented to make the mean score of the border patches (the outermost rows and columns of every
image's patch grid) negative: objects are framed by the photographer, the image border is mostly
background, and that holds whatever share of the image the objects fill. Where every patch is a
border patch (grids of 2 rows or columns) the rule falls back to "minority": the foreground side is
the one with fewer patches above the mean (`--sign_rule minority` picks that rule everywhere).
PCA is an exact SVD of the centered features in float64; every component's sign is fixed (the
score of largest magnitude is positive, the first component's by the rule above), so the pictures
do not depend on the LAPACK build.

Images: the shorter side is resized to --image_size and both sides are center-cropped to multiples
of the patch size (as the attention maps do). For each image, writes into <output_dir>/:
<name>.png (the PCA colors upsampled to the image, nearest) and <name>-side.png (image | colors),
and pca.json (grids, foreground shares, explained variances).

    python -m fastdino.eval.pca --checkpoint dinov2_vits14_reg4_pretrain.pth --images photos/dogs
    python -m fastdino.eval.pca --checkpoint runs/demo/checkpoint.pth --images a.jpg b.jpg --threshold 0.5
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from fastdino.data.folder import Unreadable
from fastdino.eval.common import (EvalError, UnreadableImage, add_backbone_args, backbone_from_args, list_images,
                                  load_image, normalize, prepare, run_cli, save_report, to_tensor, unique_name)

SIGN_RULES = ("border", "minority")


# ------------------------------------------------------------------------------------------------
# the math (no model)
# ------------------------------------------------------------------------------------------------
def pca(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Principal components of the rows of x [N, D] by an exact SVD of the centered rows (float64).

    Returns (components [k, D] orthonormal rows, scores [N, k] = centered x @ components.T,
    variances [k] = the variance of each score, descending). Each component's sign is fixed: its
    score of largest magnitude is positive. Components past the rank (k > min(N, D)) are zeros."""
    if x.dim() != 2 or x.shape[0] < 1:
        raise EvalError(f"pca: expected [N >= 1, D] features, got {tuple(x.shape)}")
    xc = x.detach().to("cpu", torch.float64)
    xc = xc - xc.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    comps = torch.zeros(k, x.shape[1], dtype=torch.float64)
    n = min(k, vh.shape[0])
    comps[:n] = vh[:n]
    scores = xc @ comps.T
    flip = scores.gather(0, scores.abs().argmax(0, keepdim=True)).squeeze(0) < 0
    sign = 1.0 - 2.0 * flip.double()
    variances = torch.zeros(k, dtype=torch.float64)
    variances[:n] = s[:n] ** 2 / max(x.shape[0] - 1, 1)
    return comps * sign[:, None], scores * sign, variances


def _border_mask(grids) -> torch.Tensor:
    """[N] bool over the concatenated row-major patch grids: outermost rows and columns."""
    out = []
    for h, w in grids:
        b = torch.zeros(h, w, dtype=torch.bool)
        b[0], b[-1], b[:, 0], b[:, -1] = True, True, True, True
        out.append(b.flatten())
    return torch.cat(out)


def orient_first_component(score: torch.Tensor, grids, sign_rule: str = "border") -> float:
    """+1 or -1: the sign that puts the foreground on the positive side of the first component
    `score` [N] (centered, over the concatenated grids). border: the border patches' mean score is
    made negative (falls back to minority when every patch is on a border); minority: fewer patches
    than not are made positive (ties: no flip)."""
    if sign_rule not in SIGN_RULES:
        raise EvalError(f"sign_rule must be one of {', '.join(SIGN_RULES)}, got {sign_rule!r}")
    if sign_rule == "border":
        border = _border_mask(grids)
        if not border.all():
            return -1.0 if score[border].mean() > 0 else 1.0
    positive, negative = int((score > 0).sum()), int((score < 0).sum())
    return -1.0 if positive > negative else 1.0


def _minmax(v: torch.Tensor) -> torch.Tensor:
    """Min-max scale each column of v [M, C] to [0, 1]; a constant column becomes 0.5."""
    lo, hi = v.min(0).values, v.max(0).values
    span = hi - lo
    out = (v - lo) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, out, torch.full_like(out, 0.5))


def pca_maps(features, threshold: float = 0.0, sign_rule: str = "border") -> dict:
    """The two-stage PCA picture, with everything the report needs.

    features: [N_img, H, W, D], or a list of [H_i, W_i, D] (grids may differ; all patches are pooled).
    Returns {"rgb", "foreground", "z"} (each a tensor [N_img, H, W, ...] for a tensor input, a list of
    per-image tensors for a list input: rgb float32 [.., 3] in [0, 1], black on the background;
    foreground bool; z the oriented, standardized first-component score) and "variance_ratio_1",
    "variance_ratio_2" (the explained-variance shares of the first 3 components of each PCA)."""
    stacked = torch.is_tensor(features)
    if stacked and features.dim() != 4:
        raise EvalError(f"patch features must be [N_img, H, W, D], got {tuple(features.shape)}")
    maps = list(features)
    if not maps or any(m.dim() != 3 for m in maps) or len({m.shape[-1] for m in maps}) != 1:
        raise EvalError(f"patch features must be [H, W, D] per image with one D, got {[tuple(m.shape) for m in maps]}")
    grids = [(m.shape[0], m.shape[1]) for m in maps]
    flat = torch.cat([m.reshape(-1, m.shape[-1]) for m in maps])
    if flat.shape[0] < 2:
        raise EvalError("PCA needs at least 2 patches")

    _, scores1, var1 = pca(flat, 3)
    total1 = _total_variance(flat)
    s = scores1[:, 0] * orient_first_component(scores1[:, 0], grids, sign_rule)
    std = s.std()
    z = s / std if std > 0 else torch.zeros_like(s)
    fg = z > threshold
    if not fg.any():
        raise EvalError(f"--threshold {threshold} leaves no foreground patch (first-component z-scores range "
                        f"{z.min().item():.2f} .. {z.max().item():.2f})")
    fg_feats = flat[fg]
    _, scores2, var2 = pca(fg_feats, 3)
    rgb = torch.zeros(flat.shape[0], 3, dtype=torch.float32)
    rgb[fg] = _minmax(scores2).float()

    out = {"rgb": [], "foreground": [], "z": []}
    start = 0
    for h, w in grids:
        part = slice(start, start + h * w)
        out["rgb"].append(rgb[part].view(h, w, 3))
        out["foreground"].append(fg[part].view(h, w))
        out["z"].append(z[part].float().view(h, w))
        start += h * w
    if stacked:
        out = {key: torch.stack(v) for key, v in out.items()}
    out["variance_ratio_1"] = (var1 / total1).tolist() if total1 > 0 else [0.0] * 3
    total2 = _total_variance(fg_feats)
    out["variance_ratio_2"] = (var2 / total2).tolist() if total2 > 0 else [0.0] * 3
    return out


def _total_variance(x: torch.Tensor) -> float:
    x = x.double()
    return float(((x - x.mean(0)) ** 2).sum() / max(x.shape[0] - 1, 1))


def pca_rgb(features, threshold: float = 0.0, sign_rule: str = "border"):
    """(rgb, foreground) of the two-stage PCA (see the module docstring).

    features [N_img, H, W, D] -> rgb float32 [N_img, H, W, 3] in [0, 1] (background black),
    foreground bool [N_img, H, W]; a list of [H_i, W_i, D] gives lists of per-image maps."""
    out = pca_maps(features, threshold, sign_rule)
    return out["rgb"], out["foreground"]


# ------------------------------------------------------------------------------------------------
# features, pictures, command line
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def patch_features(model, x: torch.Tensor) -> torch.Tensor:
    """The last block's normed patch tokens of images x [B, 3, H, W] (H, W multiples of the patch)
    as a grid [B, H/p, W/p, D]: [CLS] and register tokens are left out."""
    p = model.patch_size
    h, w = x.shape[-2] // p, x.shape[-1] // p
    out = model.forward_features(x)
    if isinstance(out, dict):  # DINOv2 layout
        tokens = out["x_norm_patchtokens"]
    else:  # DINO v1 layout: [CLS], (registers), patches
        tokens = out[:, 1 + getattr(model, "num_register_tokens", 0):]
    if tokens.shape[1] != h * w:
        raise EvalError(f"the model gives {tokens.shape[1]} patch tokens, expected {h}x{w}")
    return tokens.float().reshape(x.shape[0], h, w, -1)


def upsample_rgb(rgb: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[h, w, 3] float in [0, 1] -> uint8 [h*p, w*p, 3], nearest."""
    u8 = (rgb * 255).round().clamp(0, 255).to(torch.uint8)
    return u8.repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1)


def side_by_side(image_u8: torch.Tensor, colors_u8: torch.Tensor, gap: int = 4) -> torch.Tensor:
    h, w = image_u8.shape[:2]
    out = torch.full((h, 2 * w + gap, 3), 255, dtype=torch.uint8)
    out[:, :w], out[:, w + gap:] = image_u8, colors_u8
    return out


def _save_png(arr: torch.Tensor, path: str) -> str:
    from PIL import Image

    Image.fromarray(arr.contiguous().numpy()).save(path)
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastdino.eval.pca", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backbone_args(p)
    p.add_argument("--images", nargs="+", required=True, help="image files and/or folders (processed jointly)")
    p.add_argument("--image_size", type=int, default=224, help="shorter side before cropping to the patch grid")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="foreground: first-component score above this many standard deviations from the mean")
    p.add_argument("--sign_rule", default="border", choices=SIGN_RULES,
                   help="which side of the first component is the foreground: border (default): the side "
                        "away from the image borders; minority: the side with fewer patches")
    p.add_argument("--output_dir", default=None, help="default: <checkpoint dir>/pca")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.image_size < 1:
        raise EvalError(f"--image_size must be >= 1, got {args.image_size}")
    images = list_images(args.images)
    model = backbone_from_args(args)
    device = next(model.parameters()).device
    p = model.patch_size
    out_dir = args.output_dir or (os.path.join("runs", f"pca-random-{args.arch}") if args.random_init
                                  else os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "pca"))
    inside = os.path.join(os.path.abspath(out_dir), "")
    images = [i for i in images if not os.path.abspath(i).startswith(inside)]  # our own earlier pictures
    if not images:
        raise EvalError(f"no images found in {list(args.images)} outside the output folder '{out_dir}'")
    unreadable = Unreadable("pca")
    kept, feats = [], []
    for path in images:
        try:
            img = prepare(load_image(path), args.image_size, p)
        except UnreadableImage as e:
            unreadable.add(path, str(e))
            continue
        if img.size[0] < p or img.size[1] < p:
            raise EvalError(f"image '{path}' is smaller than one patch ({p} px) after resizing to --image_size "
                            f"{args.image_size}")
        x = normalize(to_tensor(img))[None].to(device)
        feats.append(patch_features(model, x)[0].cpu())
        kept.append((path, img))
    if not kept:
        raise EvalError(f"none of the {len(images)} images could be read (e.g. '{images[0]}')")

    maps = pca_maps(feats, args.threshold, args.sign_rule)
    os.makedirs(out_dir, exist_ok=True)
    report, used = {"images": {}}, set()
    for (path, img), rgb, fg in zip(kept, maps["rgb"], maps["foreground"]):
        name = unique_name(path, used)
        colors = upsample_rgb(rgb, p)
        image_u8 = (to_tensor(img) * 255).round().to(torch.uint8).permute(1, 2, 0)
        _save_png(colors, os.path.join(out_dir, f"{name}.png"))
        _save_png(side_by_side(image_u8, colors), os.path.join(out_dir, f"{name}-side.png"))
        h, w = fg.shape
        report["images"][name] = {"path": os.path.abspath(path), "size": list(img.size), "grid": [h, w],
                                  "patch_tokens": h * w, "foreground_fraction": float(fg.float().mean())}
        print(f"{name}: {img.size[0]}x{img.size[1]}, {h}x{w} patches, foreground "
              f"{100 * float(fg.float().mean()):.0f}% -> {os.path.join(out_dir, name)}.png")
    n_fg = int(sum(int(fg.sum()) for fg in maps["foreground"]))
    n_all = sum(fg.numel() for fg in maps["foreground"])
    report.update(arch=model.arch, patch_size=p, num_register_tokens=getattr(model, "num_register_tokens", 0),
                  threshold=args.threshold, sign_rule=args.sign_rule, image_size=args.image_size,
                  patches=n_all, foreground_patches=n_fg, variance_ratio_pca1=maps["variance_ratio_1"],
                  variance_ratio_pca2=maps["variance_ratio_2"], unreadable_images=len(unreadable),
                  checkpoint=None if args.random_init else os.path.abspath(args.checkpoint))
    print(f"{len(kept)} images, {n_fg}/{n_all} foreground patches; first PCA explains "
          f"{100 * maps['variance_ratio_1'][0]:.0f}% with its first component")
    save_report(report, out_dir, "pca.json")
    return report


def cli(argv=None) -> int:
    """Entry point: bad input ends with one line `fastdino: error: ...` (exit status 2)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
