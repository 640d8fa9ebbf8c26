"""What every evaluation shares: loading a frozen backbone from any DINO checkpoint, the eval
transform, labeled sample lists and their splits, and feature extraction with an on-disk cache.

Checkpoints understood by `load_backbone` (the `which` entry is picked where there is a choice):
  - fastdino training checkpoints: {"student", "teacher", ..., "config": Config.to_dict()}, the
    entries being MultiCropWrapper state dicts ("backbone.*", "head.*"; "module." from DDP);
  - official DINO training checkpoints: {"student", "teacher", ..., "args": argparse.Namespace};
  - plain backbone state dicts (the official `dino_vits16_pretrain.pth` files), possibly wrapped
    in {"state_dict": ...} / {"model": ...}.
"module." and "backbone." prefixes are stripped, the projection head ("head.*") is dropped, and a
position embedding of another grid size is resized (bicubic, as the official code does at runtime).
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import sys
import warnings
from collections import defaultdict

import torch
import torch.nn.functional as F

from fastdino.data.augment import IMAGENET_MEAN, IMAGENET_STD
from fastdino.models import DINOV2_BASE, DINOV3_ARCHS
from fastdino.models.vision_transformer import ARCH_DIMS

# embed_dim -> arch, for checkpoints that carry no arch name (plain backbone state dicts)
ARCH_BY_DIM = {dim: arch for arch, (dim, _) in ARCH_DIMS.items()}
ARCH_CHOICES = tuple(ARCH_BY_DIM.values()) + tuple(DINOV2_BASE) + tuple(DINOV3_ARCHS)


def model_arch_name(base: str) -> str:
    """The dinov2_* name of a DINOv2 backbone of width `base` (vit_small -> dinov2_vits14)."""
    return {b: name for name, b in DINOV2_BASE.items()}[base]


class EvalError(ValueError):
    """A bad evaluation input (checkpoint, folder, mask, option): one line naming the culprit."""


class UnreadableImage(EvalError):
    """An image file that cannot be decoded: skipped and counted by every command that reads images."""


# ------------------------------------------------------------------------------------------------
# device, images, transforms
# ------------------------------------------------------------------------------------------------
def resolve_device(device: str = "auto") -> torch.device:
    from fastdino.distributed import resolve_device as resolve

    try:
        return resolve(device)
    except (ValueError, RuntimeError) as e:
        raise EvalError(f"--device {device}: {e}") from None


def load_image(path: str, mode: str = "RGB"):
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except (OSError, ValueError) as e:
        raise UnreadableImage(f"cannot read image '{path}': {e}") from None


def resize_shorter(img, size: int, resample=None):
    """Resize a PIL image so that its shorter side is `size` (aspect kept)."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(new, Image.BICUBIC if resample is None else resample)


def center_crop(img, crop_w: int, crop_h: int):
    w, h = img.size
    left, top = (w - crop_w) // 2, (h - crop_h) // 2
    return img.crop((left, top, left + crop_w, top + crop_h))


def to_tensor(img) -> torch.Tensor:
    """PIL RGB -> float [3, H, W] in [0, 1] (no torchvision)."""
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(img.size[1], img.size[0], len(img.getbands())).permute(2, 0, 1).float().div_(255)


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(3, 1, 1)
    return (x - mean) / std


class EvalTransform:
    """Official DINO eval transform: bicubic resize of the shorter side to image_size * 256/224,
    center crop image_size, ImageNet normalization. Returns [3, image_size, image_size]."""

    def __init__(self, image_size: int = 224, resize_size: int | None = None):
        if image_size < 1:
            raise EvalError(f"image_size must be >= 1, got {image_size}")
        self.image_size = image_size
        self.resize_size = resize_size or int(round(image_size * 256 / 224))

    def __call__(self, img) -> torch.Tensor:
        img = center_crop(resize_shorter(img, self.resize_size), self.image_size, self.image_size)
        return normalize(to_tensor(img))


class SampleDataset(torch.utils.data.Dataset):
    """(path, label) list -> (image tensor, label, readable). An unreadable image gives zeros and
    readable=False: the caller drops it (skipped and counted, never the end of an evaluation)."""

    def __init__(self, samples, transform):
        self.samples, self.transform = list(samples), transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            return self.transform(load_image(path)), label, True
        except UnreadableImage:
            size = self.transform.image_size
            return torch.zeros(3, size, size), label, False


# ------------------------------------------------------------------------------------------------
# labeled samples and splits
# ------------------------------------------------------------------------------------------------
def labeled_samples(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    """Samples and class names of a labeled folder (one sub-folder per class)."""
    from fastdino.data import DataError, ImageFolder

    if not os.path.isdir(root):
        raise EvalError(f"data folder '{root}' does not exist")
    try:
        ds = ImageFolder(root)
    except DataError as e:
        raise EvalError(f"data folder '{root}': {e}") from None
    samples = [(p, int(y)) for p, y in ds.samples]
    if not samples:
        raise EvalError(f"data folder '{root}' holds no images")
    unlabeled = sum(1 for _, y in samples if y < 0)
    if unlabeled:
        raise EvalError(f"data folder '{root}': {unlabeled} images have no class folder; evaluation "
                        "needs one sub-folder per class")
    return samples, list(ds.classes)


def split_samples(samples, val_fraction: float = 0.2, seed: int = 0):
    """Stratified split: per class, a `val_fraction` share (at least one image when the class has
    two or more) goes to val. Deterministic for a given seed."""
    if not 0.0 < val_fraction < 1.0:
        raise EvalError(f"val_fraction must be in (0, 1), got {val_fraction}")
    by_class = defaultdict(list)
    for s in samples:
        by_class[s[1]].append(s)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        items = sorted(by_class[label])
        rng.shuffle(items)
        n_val = min(len(items) - 1, max(1, round(len(items) * val_fraction))) if len(items) > 1 else 0
        val += items[:n_val]
        train += items[n_val:]
    if not val or not train:
        raise EvalError(f"split of {len(samples)} images with val_fraction={val_fraction} leaves an empty side")
    return train, val


def holdout_split(samples, n_per_class: int, val_fraction: float = 0.5, seed: int = 0):
    """A small labeled holdout for the online k-NN: at most n_per_class images per class, split
    into bank (train) and queries (val)."""
    by_class = defaultdict(list)
    for s in samples:
        if s[1] >= 0:
            by_class[s[1]].append(s)
    if len(by_class) < 2:
        raise EvalError("online k-NN needs labeled images of at least two classes (one sub-folder per class)")
    rng = random.Random(seed)
    picked = []
    for label in sorted(by_class):
        items = sorted(by_class[label])
        rng.shuffle(items)
        picked += items[:n_per_class]
    return split_samples(picked, val_fraction, seed)


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------
def _safe_globals() -> list:
    """What DINO checkpoints pickle besides tensors: the official `args` Namespace and numpy arrays
    (the RNG state of fastdino checkpoints). Nothing here executes code on load."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [argparse.Namespace, np.ndarray, np.dtype, _reconstruct, type(np.dtype(np.uint32))]


def torch_load(path: str) -> object:
    """torch.load on CPU with safe unpickling (weights_only) extended to what DINO checkpoints hold;
    other files fall back to full unpickling with a note (load only checkpoints you trust).
    A .safetensors file, or a folder holding model.safetensors (`python -m fastdino.export --format
    safetensors`), is read as a plain state dict."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "model.safetensors")):
        path = os.path.join(path, "model.safetensors")
    if path.endswith(".safetensors"):
        return _safetensors_load(path)
    if os.path.isdir(path):
        raise EvalError(f"checkpoint '{path}' is a folder (a DeepSpeed checkpoint?): pass a .pth file: "
                        "OUTPUT_DIR/checkpoint.pth, or under DeepSpeed OUTPUT_DIR/consolidated.pth or teacher_backbone.pth")
    if not os.path.isfile(path):
        raise EvalError(f"checkpoint '{path}' does not exist")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as safe_error:  # noqa: BLE001 - any failure of the safe path
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001
            raise EvalError(f"checkpoint '{path}' cannot be loaded: {type(e).__name__}: {e}") from None
        print(f"note: '{path}' needed full unpickling ({type(safe_error).__name__}); load only "
              "checkpoints you trust", file=sys.stderr)
        return obj


def _safetensors_load(path: str) -> dict:
    if not os.path.isfile(path):
        raise EvalError(f"checkpoint '{path}' does not exist")
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise EvalError(f"checkpoint '{path}': reading .safetensors needs the safetensors package "
                        "(pip install safetensors)") from None
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise EvalError(f"checkpoint '{path}' cannot be loaded: {type(e).__name__}: {e}") from None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def strip_prefixes(state_dict: dict) -> dict:
    """Drop "module." (DDP) and "backbone." (MultiCropWrapper) prefixes, the DINO head and the
    iBOT head (DINOv2's dino_head / ibot_head)."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in ("module.", "backbone.", "_orig_mod."):
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        if key.split(".")[0] in ("head", "ibot_head", "dino_head"):
            continue  # projection head (or a classification head): not part of the backbone
        out[key] = value
    return out


def backbone_state_dict(checkpoint, which: str = "teacher") -> tuple[dict, dict]:
    """(backbone state dict, meta) from a loaded checkpoint. meta may hold "arch", "patch_size"
    and "source" (fastdino | official | state_dict)."""
    if which not in ("teacher", "student"):
        raise EvalError(f"which must be 'teacher' or 'student', got {which!r}")
    meta: dict = {}
    if not isinstance(checkpoint, dict):
        raise EvalError(f"checkpoint holds a {type(checkpoint).__name__}, expected a dict")
    if which in checkpoint and isinstance(checkpoint[which], dict):
        sd = checkpoint[which]
        cfg = checkpoint.get("config")
        args = checkpoint.get("args")
        if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
            meta.update(source="fastdino", arch=cfg["model"].get("arch"), patch_size=cfg["model"].get("patch_size"))
        elif args is not None:
            meta.update(source="official", arch=getattr(args, "arch", None), patch_size=getattr(args, "patch_size", None))
        else:
            meta["source"] = "training"
    else:
        other = "student" if which == "teacher" else "teacher"
        if other in checkpoint and isinstance(checkpoint[other], dict):
            raise EvalError(f"checkpoint has a '{other}' entry but no '{which}' entry")
        sd = checkpoint
        for key in ("state_dict", "model", "model_state_dict"):
            if key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
        meta["source"] = "state_dict"
    if not _is_state_dict(sd):
        raise EvalError(f"checkpoint entry '{which}' is not a state dict of tensors")
    sd = strip_prefixes(sd)
    if "patch_embed.proj.weight" not in sd:
        raise EvalError("checkpoint has no 'patch_embed.proj.weight': not a ViT backbone "
                        f"(keys start with: {', '.join(list(sd)[:4])})")
    return sd, meta


def infer_depth(state_dict: dict) -> int:
    """Number of transformer blocks of a ViT backbone state dict (its blocks.N. keys)."""
    ids = {int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if not ids or ids != set(range(len(ids))):
        raise EvalError(f"checkpoint blocks are not numbered 0..N-1 (found {sorted(ids)[:6]}): not a ViT backbone")
    return len(ids)


def infer_arch(state_dict: dict) -> tuple[str, int]:
    """(arch, patch_size) from the tensor shapes of a ViT backbone state dict."""
    w = state_dict["patch_embed.proj.weight"]  # [D, 3, p, p]
    dim, patch = int(w.shape[0]), int(w.shape[-1])
    if dim not in ARCH_BY_DIM:
        raise EvalError(f"cannot infer the arch from embed_dim={dim}; pass --arch")
    return ARCH_BY_DIM[dim], patch


def resize_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """[1, 1+n, D] -> [1, 1+num_patches, D]: bicubic resize of the square patch grid."""
    n_old = pos_embed.shape[1] - 1
    if n_old == num_patches:
        return pos_embed
    g_old, g_new = int(math.isqrt(n_old)), int(math.isqrt(num_patches))
    if g_old * g_old != n_old or g_new * g_new != num_patches:
        raise EvalError(f"pos_embed: cannot resize a {n_old}-token grid to {num_patches} tokens (not square)")
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, g_old, g_old, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, g_new * g_new, dim).to(pos_embed.dtype)
    return torch.cat([cls, grid], dim=1)


def dinov2_options(state_dict: dict) -> dict | None:
    """The builder options of a DINOv2-layout backbone state dict (LayerScale, mask token or
    registers), or None for a DINO v1 layout."""
    sd = state_dict
    if not ("mask_token" in sd or "register_tokens" in sd or "blocks.0.ls1.gamma" in sd):
        return None
    return {"num_register_tokens": int(sd["register_tokens"].shape[1]) if "register_tokens" in sd else 0,
            "ffn": "swiglu" if "blocks.0.mlp.w12.weight" in sd else "mlp", "mask_token": "mask_token" in sd,
            "layerscale_init": 1e-5 if "blocks.0.ls1.gamma" in sd else None}


def build_vit(arch: str, patch_size: int, depth: int = 0, dinov2: dict | None = None) -> torch.nn.Module:
    """arch: a DINO ViT (vit_*) or a DINOv2 one (dinov2_*, or vit_* with `dinov2` options from
    dinov2_options); depth 0: the architecture's own."""
    from fastdino import models

    if dinov2 is not None and arch not in DINOV2_BASE:
        arch = model_arch_name(arch)  # a vit_* width with the DINOv2 options of a checkpoint
    if arch not in ARCH_CHOICES:
        raise EvalError(f"arch {arch!r} is not supported (choose from {', '.join(ARCH_CHOICES)})")
    if depth < 0:
        raise EvalError(f"depth must be >= 1, got {depth}")
    depth = models.arch_spec(arch, depth)["depth"]
    if arch in models.DINOV2_ARCHS:
        return models.DINOV2_ARCHS[arch](depth=depth, drop_path_rate=0.0, **(dinov2 or {}))
    return getattr(models, arch)(patch_size=patch_size, depth=depth, drop_path_rate=0.0)


def dinov3_backbone(state_dict: dict, depth: int) -> torch.nn.Module | None:
    """The DINOv3 backbone (fastdino/models/dinov3.py) a state dict holds, built with its options
    (storage tokens, qkv bias and its key mask, LayerScale, untied norms, SwiGLU), or None when the
    state dict is not DINOv3's (no RoPE periods and no storage tokens)."""
    from fastdino.models.dinov3 import DINOV3_HUB

    sd = state_dict
    if not ("rope_embed.periods" in sd or "storage_tokens" in sd):
        return None
    dim = int(sd["patch_embed.proj.weight"].shape[0])
    swiglu = "blocks.0.mlp.w1.weight" in sd
    names = [n for n, (d, *_, ffn, _extra) in DINOV3_HUB.items() if d == dim and (ffn != "mlp") == swiglu]
    if not names:
        raise EvalError(f"cannot infer the DINOv3 arch of embed_dim={dim} ({'SwiGLU' if swiglu else 'MLP'} FFN)")
    model = DINOV3_ARCHS[names[0]](
        depth=depth, drop_path_rate=0.0,
        n_storage_tokens=int(sd["storage_tokens"].shape[1]) if "storage_tokens" in sd else 0,
        qkv_bias="blocks.0.attn.qkv.bias" in sd, mask_k_bias="blocks.0.attn.qkv.bias_mask" in sd,
        layerscale_init=1e-5 if "blocks.0.ls1.gamma" in sd else None,
        untie_cls_and_patch_norms="cls_norm.weight" in sd, untie_global_and_local_cls_norm="local_cls_norm.weight" in sd)
    model.arch = names[0]
    return model


def _dinov3_from_export(path: str):
    """The DINOv3 backbone a `python -m fastdino.export --format safetensors` folder describes (its
    fastdino.json's model_args: every constructor option, so non-hub options rebuild exactly), or None
    for anything else (the options are then read from the weights)."""
    meta_path = os.path.join(path, "fastdino.json") if os.path.isdir(path) else None
    if meta_path is None or not os.path.isfile(meta_path):
        return None
    import json

    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != "safetensors" or "model_args" not in meta:
        return None
    from fastdino.models.dinov3 import DINOv3VisionTransformer

    try:
        model = DINOv3VisionTransformer(**meta["model_args"])
    except (TypeError, ValueError) as e:
        raise EvalError(f"checkpoint '{path}': fastdino.json's model_args do not build a DINOv3 backbone: {e}") from None
    model.arch = meta.get("arch") or "dinov3"
    return model


def load_backbone(path: str | None, which: str = "teacher", arch: str | None = None,
                  patch_size: int | None = None, device="cpu", depth: int | None = None) -> torch.nn.Module:
    """A frozen ViT backbone in eval mode. `path=None` gives the random initialization of `arch`
    with `depth` blocks (default 12): the baseline the trained features are compared with.
    A checkpoint's depth is read from its weights; a `depth` that differs is an error."""
    if path is None:
        if arch is None:
            raise EvalError("a random-init backbone needs --arch")
        with torch.random.fork_rng(devices=[]):  # a fixed init, without touching the caller's RNG
            torch.manual_seed(0)
            patch_size = 14 if arch.startswith("dinov2_") else (patch_size or 16)  # DINOv2 backbones are /14
            if arch in DINOV3_ARCHS:
                from fastdino.models import arch_spec

                model = DINOV3_ARCHS[arch](depth=arch_spec(arch, depth or 0)["depth"], drop_path_rate=0.0)
            else:
                model = build_vit(arch, patch_size, depth or 0)
    else:
        sd, meta = backbone_state_dict(torch_load(path), which)
        v3 = _dinov3_from_export(path) or dinov3_backbone(sd, infer_depth(sd))
        if v3 is not None:  # RoPE: no position embedding to resize, any input size
            try:
                v3.load_state_dict(sd, strict=True)
            except RuntimeError as e:
                raise EvalError(f"checkpoint '{path}' ({which}) does not match {v3.arch}: "
                                f"{str(e).strip().splitlines()[0]}") from None
            v3.eval().requires_grad_(False)
            v3.patch_size = int(v3.patch_embed.proj.weight.shape[-1])
            return v3.to(device)
        arch_sd, patch_sd = infer_arch(sd)
        depth_sd = infer_depth(sd)
        if depth is not None and depth != depth_sd:
            raise EvalError(f"checkpoint '{path}' has {depth_sd} blocks, not --depth {depth}")
        dinov2 = dinov2_options(sd)
        arch = arch or meta.get("arch") or arch_sd
        patch_size = patch_size or meta.get("patch_size") or patch_sd
        if arch not in ARCH_CHOICES:
            arch = arch_sd  # e.g. official "deit_small"-style names: trust the shapes
        if patch_sd != patch_size:
            raise EvalError(f"checkpoint '{path}' has patch size {patch_sd}, not {patch_size}")
        base = DINOV2_BASE.get(arch, arch)
        if ARCH_BY_DIM.get(int(sd["patch_embed.proj.weight"].shape[0])) != base:
            raise EvalError(f"checkpoint '{path}' holds a {arch_sd}, not a {arch}")
        model = build_vit(base, patch_size, depth_sd, dinov2)
        arch = arch if dinov2 is None or arch in DINOV2_BASE else model_arch_name(base)
        own = model.state_dict()
        if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
            sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], own["pos_embed"].shape[1] - 1)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise EvalError(f"checkpoint '{path}' ({which}) does not match {arch}/{patch_size}: "
                            f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    model.eval().requires_grad_(False)
    model.arch, model.patch_size = arch, patch_size or 16
    return model.to(device)


def add_backbone_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None,
                        help="training checkpoint (fastdino or official DINO) or backbone state dict")
    parser.add_argument("--which", default="teacher", choices=("teacher", "student"),
                        help="network of a training checkpoint (the teacher is the one DINO evaluates)")
    parser.add_argument("--random_init", action="store_true",
                        help="evaluate a randomly initialized --arch instead (baseline)")
    parser.add_argument("--arch", default=None, choices=ARCH_CHOICES, help="default: from the checkpoint")
    parser.add_argument("--patch_size", type=int, default=None, help="default: from the checkpoint")
    parser.add_argument("--depth", type=int, default=None,
                        help="transformer blocks of a --random_init backbone (default 12; checkpoints: from the weights)")
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")


def default_num_workers(cap: int = 4) -> int:
    """min(cap, CPUs this process may run on): no more loader workers than cores (torch warns)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return min(cap, cpus)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data_path", default=None, help="one labeled folder (class sub-folders), split into train/val")
    parser.add_argument("--val_fraction", type=float, default=0.2, help="val share per class with --data_path")
    parser.add_argument("--train_path", default=None, help="labeled train folder (with --val_path)")
    parser.add_argument("--val_path", default=None, help="labeled val folder (with --train_path)")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=128, help="images per feature-extraction batch")
    parser.add_argument("--num_workers", type=int, default=default_num_workers(),
                        help="image-decoding workers (default: min(4, CPUs available to this process))")
    parser.add_argument("--output_dir", default=None, help="default: <checkpoint dir>/eval")
    parser.add_argument("--no_cache", action="store_true", help="recompute the features (default: cached)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split (and of training)")


def parse_checked(parser: argparse.ArgumentParser, argv=None):
    """parser.parse_args(argv), then the data-argument rules (check_data_args)."""
    args = parser.parse_args(argv)
    check_data_args(parser, args)
    return args


def check_data_args(parser: argparse.ArgumentParser, args) -> None:
    if bool(args.data_path) == bool(args.train_path or args.val_path):
        parser.error("give either --data_path or both --train_path and --val_path")
    if bool(args.train_path) != bool(args.val_path):
        parser.error("--train_path and --val_path go together")


def samples_from_args(args):
    """(train samples, val samples, class names) from --data_path or --train_path/--val_path."""
    if args.data_path:
        samples, classes = labeled_samples(args.data_path)
        train, val = split_samples(samples, args.val_fraction, args.seed)
        return train, val, classes
    train, classes = labeled_samples(args.train_path)
    val, val_classes = labeled_samples(args.val_path)
    if val_classes != classes:
        raise EvalError(f"class folders differ between '{args.train_path}' and '{args.val_path}'")
    return train, val, classes


def default_output_dir(args) -> str:
    if args.output_dir:
        return args.output_dir
    if args.random_init:
        return os.path.join("runs", f"eval-random-{args.arch}" + (f"-depth{args.depth}" if args.depth else ""))
    return os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval")


def backbone_from_args(args) -> torch.nn.Module:
    if args.random_init == (args.checkpoint is not None):
        raise EvalError("give exactly one of --checkpoint PATH or --random_init (with --arch)")
    return load_backbone(None if args.random_init else args.checkpoint, args.which, args.arch,
                         args.patch_size, resolve_device(args.device), args.depth)


class EvalRun:
    """What both evaluation commands start from: the labeled samples, the backbone on its device,
    the output folder and the feature cache (None with --no_cache); `features` extracts or loads."""

    def __init__(self, args):
        self.args = args
        self.train, self.val, self.classes = samples_from_args(args)
        self.model = backbone_from_args(args)
        self.device = next(self.model.parameters()).device
        self.out_dir = default_output_dir(args)
        self.cache_dir = None if args.no_cache else os.path.join(self.out_dir, "cache")
        from fastdino.data.folder import Unreadable

        self.unreadable = Unreadable("evaluation")

    def features(self, samples, feature_fn, kind: tuple) -> tuple[torch.Tensor, list]:
        """feature_fn(model, images) over the samples, cached under `kind` + the weights and images.
        Returns (features, samples) of the readable images: unreadable ones are skipped, named once
        in the log and counted in `self.unreadable`."""
        a = self.args
        key = (*kind, backbone_id(a), a.image_size, [s[0] for s in samples])
        out = cached_features(self.cache_dir, key, lambda: extract_features(
            self.model, samples, feature_fn, a.image_size, a.batch_size, a.num_workers, self.device,
            progress=sys.stderr.isatty()))
        return keep_readable(out["features"], out["readable"], samples, self.unreadable)


def unique_name(path: str, used: set) -> str:
    """The file's stem, made unique among `used` (same file name in two folders: stem-2, ...); added to used."""
    stem = os.path.splitext(os.path.basename(path))[0]
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}-{n}"
    used.add(name)
    return name


def backbone_id(args) -> str:
    """Identifies the weights in a feature cache key."""
    if args.random_init:
        return f"random:{args.arch}:{args.patch_size or 16}:{args.depth or 0}"
    st = os.stat(args.checkpoint)
    return f"{os.path.abspath(args.checkpoint)}:{st.st_mtime_ns}:{st.st_size}:{args.which}"


# ------------------------------------------------------------------------------------------------
# features
# ------------------------------------------------------------------------------------------------
def cls_features(model, x: torch.Tensor) -> torch.Tensor:
    """[CLS] token after the final norm: the k-NN features (normalized by the caller)."""
    return model(x)


@torch.no_grad()
def extract_features(model, samples, feature_fn=cls_features, image_size: int = 224, batch_size: int = 64,
                     num_workers: int = 0, device=None, progress: bool = False) -> dict:
    """feature_fn(model, images) for every sample, in order: {"features": [N, D] float32 on the CPU,
    "readable": [N] bool} (an unreadable image's row is zeros: drop it with keep_readable)."""
    device = device or next(model.parameters()).device
    loader = torch.utils.data.DataLoader(SampleDataset(samples, EvalTransform(image_size)), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers,
                                         pin_memory=torch.device(device).type == "cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda" else _null()
    feats, readable = [], []
    it = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, desc="features", leave=False)
    for images, _, ok in it:
        with amp:
            out = feature_fn(model, images.to(device, non_blocking=True))
        feats.append(out.float().cpu() * ok.view(-1, 1))
        readable.append(ok)
    return {"features": torch.cat(feats) if feats else torch.empty(0),
            "readable": torch.cat(readable) if readable else torch.zeros(0, dtype=torch.bool)}


def keep_readable(features: torch.Tensor, readable: torch.Tensor, samples: list, unreadable) -> tuple:
    """(features, samples) without the unreadable images; each one is named once (Unreadable)."""
    for (path, _), ok in zip(samples, readable.tolist()):
        if not ok:
            unreadable.add(path)
    keep = [i for i, ok in enumerate(readable.tolist()) if ok]
    if not keep:
        raise EvalError(f"none of the {len(samples)} images could be read (e.g. '{samples[0][0]}')")
    return features[keep], [samples[i] for i in keep]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def cache_key(*parts) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def cached_features(cache_dir: str | None, key_parts: tuple, compute):
    """compute() once per key: the result (a tensor or a dict of tensors) is saved under cache_dir."""
    if not cache_dir:
        return compute()
    path = os.path.join(cache_dir, f"features-{cache_key(*key_parts)}.pt")
    if os.path.isfile(path):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a broken cache file is recomputed
            warnings.warn(f"feature cache '{path}' is unreadable; recomputing")
    out = compute()
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(out, tmp)
    os.replace(tmp, path)
    return out


def save_report(report: dict, out_dir: str, name: str) -> str:
    """Write an evaluation's results as OUT_DIR/NAME (JSON) and say where."""
    import json

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"saved {path}")
    return path


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def prepare(img, image_size: int, patch_size: int, resample=None):
    """Resize the shorter side to image_size, center-crop both sides to multiples of the patch."""
    img = resize_shorter(img, image_size, resample)
    w, h = img.size
    return center_crop(img, w - w % patch_size, h - h % patch_size)


def list_images(items) -> list[str]:
    """The image files named by `items` (files, or folders walked in sorted order); one-line errors."""
    out = []
    for item in items:
        if os.path.isdir(item):
            for d, _, files in sorted(os.walk(item)):
                out += [os.path.join(d, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTS)]
        elif os.path.isfile(item):
            out.append(item)
        else:
            raise EvalError(f"image '{item}' does not exist")
    if not out:
        raise EvalError(f"no images found in {list(items)}")
    return out


def run_cli(main, *args) -> int:
    """Entry point of an evaluation / export command: main(*args); bad input ends with one line on
    stderr, `fastdino: error: ...` (as fastdino/train.py's), not a traceback. Returns the exit status
    (0, or 2 as argparse's errors)."""
    try:
        main(*args)
    except EvalError as e:
        print(f"fastdino: error: {e}", file=sys.stderr)
        return 2
    return 0
