"""Data: image sources, the DINO multi-crop recipe, and the two loaders (DALI on GPU, torch fallback).

    loader = build_train_loader(cfg.data, batch_size=B, rank=r, world_size=W, seed=cfg.train.seed,
                                device=device, dtype=torch.bfloat16)
    for crops in loader.epoch(epoch, start_step):   # crop-major list of 2+N [B,3,S,S] on device
        ...

An epoch is a pass over the data (data.epoch_length=0), or data.epoch_length iterations running on
across passes (DINOv2 / DINOv3's OFFICIAL_EPOCH_LENGTH); either way each batch is a pure function of
(seed, data pass, step in pass), fastdino/data/torch_loader.py's EpochBatches.

With masking=IBOTMasks(...) (the DINOv2 recipe's iBOT masks, fastdino/data/masking.py) each item is
(crops, MaskBatch on the device), the masks keyed by the batch's dataset indices: both loaders give
the same masks.
"""
from __future__ import annotations

import torch

from fastdino.data.augment import DataAugmentationDINORef, crop_specs
from fastdino.data.demo import generate_demo_dataset
from fastdino.data.folder import DataError, ImageFolder, ImageSource

__all__ = ["build_train_loader", "DataError", "generate_demo_dataset", "ImageFolder", "ImageSource",
           "DataAugmentationDINORef", "crop_specs", "dali_available", "resolve_backend", "resolve_photometric"]


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install raising at import
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """auto -> dali when DALI imports and the device is CUDA (with several crop sets too, data.crop_sets: the
    DALI loader keeps a pipeline per set), else torch. dali is also allowed on CPU (DALI's CPU operators:
    slower, used by the tests)."""
    if backend == "auto":
        return "dali" if device.type == "cuda" and dali_available() else "torch"
    if backend == "dali" and not dali_available():
        raise DataError("data.backend 'dali': nvidia.dali is not importable (pip install nvidia-dali-cuda130, "
                        "or set data.backend=torch)")
    if backend not in ("dali", "torch"):
        raise ValueError(f"data.backend {backend!r} is not one of ['auto', 'dali', 'torch']")
    return backend


def resolve_photometric(impl: str, device: torch.device) -> str:
    """data.photometric_impl -> triton | torch: auto is triton on CUDA (when triton imports), torch
    elsewhere; triton needs CUDA (or TRITON_INTERPRET=1, the tests)."""
    from fastdino.resolve import _interpreting, _triton_importable

    device = torch.device(device)
    have_triton = _triton_importable()
    if impl == "auto":
        return "triton" if device.type == "cuda" and have_triton else "torch"
    if impl == "triton" and not (have_triton and (device.type == "cuda" or _interpreting())):
        raise DataError(f"data.photometric_impl 'triton': needs triton and a CUDA device (the device is {device}); "
                        "use auto or torch")
    if impl not in ("triton", "torch"):
        raise ValueError(f"data.photometric_impl {impl!r} is not one of ['auto', 'triton', 'torch']")
    return impl


def build_train_loader(data_cfg, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                       device=None, dtype: torch.dtype = torch.float32, backend: str | None = None,
                       masking=None, gram_from_epoch: int = 0, photometric: str | None = None):
    """The training loader for this rank: `.epoch(e, start_step)`, `.steps_per_epoch` (data.epoch_length,
    or images // global batch when 0), `.num_images`, `.num_corrupt`, `.backend`, `.plan` (each step's
    crops: fastdino/data/crop_plan.py). backend: the resolved data backend (fastdino/resolve.py); None
    resolves data_cfg.backend here (standalone use). gram_from_epoch: the first epoch whose batches
    carry the Gram-teacher crops (data.gram_crop_size; gram.start_epoch). photometric: the resolved
    data.photometric_impl (None: resolved here). Generates the demo dataset first when
    data_cfg.generate_demo is set (safe when every rank calls it)."""
    device = torch.device(device or "cpu")
    if data_cfg.generate_demo:
        generate_demo_dataset(data_cfg.path, data_cfg.demo_num_images, data_cfg.demo_num_classes,
                              data_cfg.demo_image_size, seed)
    backend = backend or resolve_backend(data_cfg.backend, device)
    photometric = photometric or resolve_photometric(getattr(data_cfg, "photometric_impl", "torch"), device)
    if backend == "dali":
        from fastdino.data.dali import DaliMultiCropLoader

        return DaliMultiCropLoader(data_cfg, batch_size, rank, world_size, seed, device, dtype, masking=masking,
                                   gram_from_epoch=gram_from_epoch, photometric=photometric)
    from fastdino.data.torch_loader import TorchMultiCropLoader

    return TorchMultiCropLoader(data_cfg, batch_size, rank, world_size, seed, device, dtype, masking=masking,
                                gram_from_epoch=gram_from_epoch, photometric=photometric)
