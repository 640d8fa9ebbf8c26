"""Fallback data path: DataLoader workers decode (PIL) and crop; photometric ops run batched on the device.

Workers: decode, RandomResizedCrop (PIL bicubic, antialiased) + flip, and draw every photometric
parameter of every crop (augment.draw_params). They send uint8 crops (4x less traffic than float) and
the parameters. The main process copies them to the device (pinned memory, non_blocking on CUDA) and
runs the photometric op (kernels/photometric.py: fused Triton, or augment.photometric, the torch
reference; data.photometric_impl) on each group of same-size crops (the 2 globals together, the N locals
together), then splits them into the crop-major list.

Order of samples: one permutation per (seed, data pass), the same on every rank; global batch g of
a pass is positions [g*B*W, (g+1)*B*W) of it, rank r takes [g*B*W + r*B, g*B*W + (r+1)*B); the last
partial global batch of a pass is dropped, so a pass has P = images // (B*W) steps. Draws are keyed
by (seed, data pass, dataset index, crop), so the crops do not depend on rank, world size,
num_workers, start_step or torch's global RNG. Each step's crop sizes, and whether it makes the
Gram-teacher crops, are its CropPlan layout (fastdino/data/crop_plan.py), a function of the step too.

Epochs (data.epoch_length L): L = 0, an epoch is a pass (epoch e = pass e, steps_per_epoch = P);
L > 0, an epoch is L iterations (DINOv2 / DINOv3's OFFICIAL_EPOCH_LENGTH): step s of epoch e is the
global iteration e*L + s, which is step (e*L + s) % P of pass (e*L + s) // P. Batches run on across
pass boundaries into the next pass's permutation, as an infinite sampler, and every batch is a
function of its global iteration, so resuming at any step is exact.

Unreadable files: sample i is replaced by the deterministic draw index (seed, data pass, i, try k);
each distinct bad file is counted in num_corrupt; a batch where more than half of the files fail
raises DataError naming one of them.
"""
from __future__ import annotations

import atexit
import io
import multiprocessing.util  # noqa: F401 (its exit hook is registered before ours)
import weakref

import numpy as np
import torch

from fastdino.data.augment import draw_params, pil_to_uint8, resized_crop_pil, stack_params, uniforms
from fastdino.data.crop_plan import CropPlan
from fastdino.data.folder import DataError, ImageSource, Unreadable
from fastdino.kernels.photometric import photometric

MAX_REPLACEMENTS = 16


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT / SIGTERM to the main process (which checkpoints and stops
    them): Ctrl-C reaches the whole process group, and SLURM signals every process of a job."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def read_replacing(source: ImageSource, seed: int, data_pass: int, index: int, load, skip=frozenset(),
                   on_bad=lambda i, error: None) -> tuple[int, object, int]:
    """Sample `index` of pass `data_pass` as load(its bytes), or, when its file is unreadable (the read or `load`
    raises), the first readable of its keyed replacements: try k > 0 reads dataset index
    uniforms(seed, pass, index, -2 - k) * n. Both data backends replace files by this one rule, so a batch is a
    pure function of which files are unreadable. Indices in `skip` (known unreadable) are passed over unread;
    on_bad(i, error) is called for each file that fails. Returns (dataset index, load(bytes), tries before it).
    Raises DataError after MAX_REPLACEMENTS + 1 unreadable files in a row."""
    n, first = len(source), None
    for k in range(MAX_REPLACEMENTS + 1):
        i = int(index) if k == 0 else int(uniforms(seed, data_pass, int(index), -2 - k, 1)[0] * n)
        if i in skip:
            continue
        try:
            return i, load(source.read(i)), k
        except Exception as e:  # any read or decode failure (OSError, SyntaxError, DecompressionBomb, struct.error...)
            first = first or source.name(i)
            on_bad(i, e)
    raise DataError(f"data source '{source.path}': {MAX_REPLACEMENTS + 1} unreadable files in a row, "
                    f"e.g. '{first or source.name(int(index))}'")


def check_readable_batch(primary_bad: int, batch_size: int, first_bad: str) -> None:
    """One DataError line when more than half of a batch's own files are unreadable (a wrong data.path, not a
    few bad files)."""
    if 2 * primary_bad > batch_size:
        raise DataError(f"{primary_bad} of {batch_size} images of a batch are unreadable, e.g. '{first_bad}' "
                        f"(check data.path)")


def shutdown_workers(loader: torch.utils.data.DataLoader) -> None:
    """Stop a DataLoader's persistent workers now (they ignore SIGTERM: see TorchMultiCropLoader.close)."""
    it = getattr(loader, "_iterator", None)
    if it is not None:
        loader._iterator = None
        it._shutdown_workers()


_WORKER_LOADERS = weakref.WeakSet()  # DataLoaders with persistent workers that ignore stop signals


def track_workers(loader: torch.utils.data.DataLoader) -> torch.utils.data.DataLoader:
    """Stop this loader's workers at interpreter exit if nothing closed it (a run or test that raised
    while its iterator is still referenced): multiprocessing's own exit hook terminates workers with
    SIGTERM, which they ignore, and then joins them forever."""
    _WORKER_LOADERS.add(loader)
    return loader


def _shutdown_tracked_workers() -> None:
    for loader in list(_WORKER_LOADERS):
        try:
            shutdown_workers(loader)
        except Exception:
            pass


atexit.register(_shutdown_tracked_workers)  # after multiprocessing.util's hook is registered: runs before it


def _decode(data: bytes):
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()  # decode now: a truncated or corrupt file raises here, not later
    return img.convert("RGB")


class MultiCropDataset(torch.utils.data.Dataset):
    """Map-style dataset over keys (data pass, index, layout); `__getitems__` makes a whole batch (all
    of one pass and one layout: fastdino/data/crop_plan.py) in the worker:
    {'crops': list of uint8 [B,3,S,S] per crop, 'params': list of param dicts per crop, 'layout',
     'bad': names of unreadable files met, 'primary_bad': how many of the batch's own files failed}."""

    def __init__(self, source: ImageSource, plan: CropPlan, seed: int, masking=None):
        self.source, self.plan, self.seed, self.masking = source, plan, seed, masking

    def __len__(self) -> int:
        return len(self.source)

    def sample(self, data_pass: int, index: int, specs, bad: list) -> tuple[list, list]:
        """(list of uint8 [3,S,S] crops, list of param dicts) of one image (its names of unreadable files
        appended to `bad`)."""
        i, img, _ = read_replacing(self.source, self.seed, data_pass, index, _decode,
                                   on_bad=lambda j, error: bad.append(self.source.name(j)))
        crops, params = [], []
        for c, spec in enumerate(specs):
            p = draw_params(self.seed, data_pass, i, c, spec, img.width, img.height)
            crops.append(pil_to_uint8(resized_crop_pil(img, p["box"], spec.size, p["flip"])))
            params.append(p)
        return crops, params

    def __getitem__(self, key):
        return self.__getitems__([key])

    def __getitems__(self, keys):
        bad, primary_bad, per_image = [], 0, []
        layout = keys[0][2]
        specs = self.plan.specs(layout)
        for data_pass, index, _ in keys:
            before = len(bad)
            per_image.append(self.sample(data_pass, index, specs, bad))
            primary_bad += len(bad) > before
        crops = [torch.stack([im[0][c] for im in per_image]) for c in range(len(specs))]
        params = [stack_params([im[1][c] for im in per_image]) for c in range(len(specs))]
        out = {"crops": crops, "params": params, "layout": layout, "bad": bad, "primary_bad": primary_bad}
        if self.masking is not None:  # keyed by the sampler's indices (not the replacements of bad files)
            masking = self.masking.for_crop_size(self.plan.global_size(layout))  # the set's patch grid
            out["masks"] = masking(self.seed, keys[0][0], [index for _, index, _ in keys])
        return out


def _first(batch):
    return batch  # __getitems__ already collated


class EpochBatches:
    """Batch sampler: this rank's lists of (data pass, index) for steps start_step..steps_per_epoch-1
    of epoch `epoch`. epoch_length 0: an epoch is a pass (steps_per_pass steps); > 0: an epoch is
    epoch_length iterations, running on across passes (see position)."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int, epoch_length: int = 0):
        self.n, self.B, self.rank, self.W, self.seed = n, batch_size, rank, world_size, seed
        self.steps_per_pass = n // (batch_size * world_size)
        if epoch_length < 0:
            raise ValueError(f"EpochBatches: epoch_length must be >= 0, got {epoch_length}")
        if epoch_length and not self.steps_per_pass:
            raise ValueError(f"EpochBatches: {n} images are fewer than one global batch ({batch_size} x {world_size})")
        self.epoch_length = epoch_length
        self.steps_per_epoch = epoch_length or self.steps_per_pass
        self.epoch, self.start_step = 0, 0
        self._perm = None  # (pass, its permutation), the last one used

    def position(self, epoch: int, step: int) -> tuple[int, int]:
        """(data pass, step in that pass) of step `step` of epoch `epoch`: global iteration
        it = epoch * steps_per_epoch + step is step it % steps_per_pass of pass it // steps_per_pass
        ((epoch, step) itself when an epoch is a pass)."""
        if not self.epoch_length:
            return epoch, step
        return divmod(epoch * self.epoch_length + step, self.steps_per_pass)

    def indices(self, data_pass: int, step: int) -> np.ndarray:
        """Dataset indices of this rank's rows of global batch `step` of pass `data_pass`."""
        from fastdino.data.augment import permutation

        cached = self._perm  # one attribute read and write: safe with the DALI loader's two threads
        if cached is None or cached[0] != data_pass:
            cached = self._perm = (data_pass, permutation(self.seed, data_pass, self.n))
        start = step * self.B * self.W + self.rank * self.B
        return cached[1][start:start + self.B]

    def __iter__(self):
        for step in range(self.start_step, self.steps_per_epoch):
            data_pass, step_in_pass = self.position(self.epoch, step)
            yield [(data_pass, int(i)) for i in self.indices(data_pass, step_in_pass)]

    def __len__(self) -> int:
        return max(self.steps_per_epoch - self.start_step, 0)


class LayoutBatches:
    """Batch sampler of both loaders: EpochBatches' keys of each step (steps start_step.. of its epoch), each
    with the step's crop layout (CropPlan.layout of its global iteration): [(data pass, index, layout), ...]."""

    def __init__(self, sampler: EpochBatches, plan: CropPlan):
        self.sampler, self.plan = sampler, plan

    def keys(self, epoch: int, step: int) -> list:
        """The keys of step `step` of epoch `epoch`."""
        s = self.sampler
        data_pass, step_in_pass = s.position(epoch, step)
        layout = self.plan.layout(epoch * s.steps_per_epoch + step)
        return [(data_pass, int(i), layout) for i in s.indices(data_pass, step_in_pass)]

    def __iter__(self):
        s = self.sampler
        for step in range(s.start_step, s.steps_per_epoch):
            yield self.keys(s.epoch, step)

    def __len__(self) -> int:
        return len(self.sampler)


def check_batch_geometry(n: int, batch_size: int, rank: int, world_size: int, path: str) -> int:
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"data loader: need batch_size >= 1 and 0 <= rank < world_size, got "
                         f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
    steps = n // (batch_size * world_size)
    if steps == 0:
        raise DataError(f"data source '{path}' has {n} images, fewer than one global batch "
                        f"({batch_size} x {world_size} ranks)")
    return steps


class TorchMultiCropLoader:
    """The torch backend of build_train_loader (see fastdino.data)."""

    backend = "torch"

    def __init__(self, data_cfg, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device=None, dtype: torch.dtype = torch.float32, source: ImageSource | None = None,
                 masking=None, gram_from_epoch: int = 0, photometric: str = "torch"):
        self.source = source or ImageSource(data_cfg.path)
        self.photometric = photometric  # triton | torch: kernels/photometric.py
        self.masking = masking  # fastdino.data.masking.IBOTMasks: also yield the batch's iBOT masks
        self.num_images = len(self.source)
        check_batch_geometry(self.num_images, batch_size, rank, world_size, self.source.path)
        self.batch_size, self.device, self.dtype = batch_size, torch.device(device or "cpu"), dtype
        # data.epoch_length: 0, an epoch is a pass over the data; N > 0, N iterations (OFFICIAL_EPOCH_LENGTH)
        self.sampler = EpochBatches(self.num_images, batch_size, rank, world_size, seed,
                                    int(getattr(data_cfg, "epoch_length", 0)))
        self.steps_per_epoch = self.sampler.steps_per_epoch
        # each step's crop sizes (data.crop_sets) and whether it makes the Gram-teacher crops (from gram_from_epoch)
        self.plan = CropPlan.from_config(data_cfg, seed, gram_from_epoch * self.steps_per_epoch)
        if self.plan.multi_resolution and masking is not None and masking.patch_size is None:
            raise ValueError("TorchMultiCropLoader: several crop sets (data.crop_sets) need the masking's patch_size "
                             "(IBOTMasks(..., patch_size=p)) to mask each set's patch grid")
        workers = int(data_cfg.num_workers)
        self._loader = track_workers(torch.utils.data.DataLoader(
            MultiCropDataset(self.source, self.plan, seed, masking),
            batch_sampler=LayoutBatches(self.sampler, self.plan), collate_fn=_first,
            num_workers=workers, pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=2 if workers > 0 else None,
            generator=torch.Generator(),  # the loader's base seed must not consume torch's global RNG
            worker_init_fn=ignore_stop_signals if workers > 0 else None,
        ))
        self._bad = Unreadable("training data")

    def close(self) -> None:
        """Stop the persistent workers now. They ignore SIGTERM (ignore_stop_signals), so the
        interpreter's exit, which terminates and then joins them, would wait forever for a run that
        ends by an exception while their iterator is still referenced."""
        shutdown_workers(self._loader)

    @property
    def num_corrupt(self) -> int:
        """Distinct unreadable files met so far on this rank."""
        return len(self._bad)

    def epoch(self, epoch: int, start_step: int = 0):
        """Yields, for steps start_step..steps_per_epoch-1, the crop-major list of 2+N tensors (+2 Gram-teacher
        crops on the steps that make them) [B,3,S,S] on the device, normalized, in self.dtype, of the sizes of
        the step's crop set (self.plan). Step s is the batch of sampler.position(epoch, s)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside [0, {self.steps_per_epoch}]")
        self.sampler.epoch, self.sampler.start_step = int(epoch), int(start_step)
        for batch in self._loader:
            for name in batch["bad"]:
                self._bad.add(name)
            check_readable_batch(batch["primary_bad"], self.batch_size, batch["bad"][0] if batch["bad"] else "")
            crops = self.to_device(batch["crops"], batch["params"], self.plan.specs(batch["layout"]))
            yield crops if self.masking is None else (crops, batch["masks"].to(self.device, non_blocking=True))

    def to_device(self, crops: list, params: list, specs) -> list:
        """uint8 crops + host params -> normalized device crops; same-size crops are processed together."""
        out = [None] * len(crops)
        groups = {}
        for c, spec in enumerate(specs):
            groups.setdefault(spec.size, []).append(c)
        for ids in groups.values():
            x = torch.cat([crops[c] for c in ids]).to(self.device, non_blocking=True)
            p = {k: torch.cat([params[c][k] for c in ids]) for k in params[ids[0]]}
            for c, y in zip(ids, photometric(x, p, self.dtype, impl=self.photometric).split(self.batch_size)):
                out[c] = y
        return out
