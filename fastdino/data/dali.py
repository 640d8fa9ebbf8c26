"""DALI data path: GPU JPEG decoding and every crop of the DINO recipe made on the device.

Host (one background thread): for each step, this rank's dataset indices (the same epoch
permutation and global-batch layout as the torch backend), the raw bytes (folder, file list or
webdataset tar shards: fastdino.data.folder.ImageSource), the image size read from the header, and
every random draw of every crop from the same counter-based hash as the torch backend
(augment.uniforms keyed by seed, epoch, dataset index, crop). So both backends use identical
crop boxes and parameters for a given key, and the DALI output is a pure function of the key too:
resume (start_step), world size and thread counts do not change it.

Graph (fed with feed_input; device "mixed" decoder on GPU, "cpu" operators when device_id=None):
    decode once -> per crop: resize of the crop box (bicubic, antialiased; a flipped box flips) ->
    stack same-size crops into a sequence (F = 2 globals, F = N locals; frames carry their own params)
    -> 4 jitter slots: one affine op (brightness/contrast/saturation; factors neutral unless the slot's
    op) + one hue op (shift 0 unless the slot's op), which realizes torchvision's random order with no
    per-sample branching -> grayscale blend (mask 0/1) -> gaussian blur (sigma, or 0.01 = identity when
    not drawn; 13 taps, reflect) -> solarize mask (global 2) -> normalize, FCHW.
Neutral parameters are exact identities, except the hue round trip rgb->hsv->rgb (float rounding,
~1e-7).

Unreadable files: the host checks every file's header (JPEG SOI..EOI with a frame header, or PNG
IHDR) before it enters the graph; a failing file is replaced deterministically (as in the torch
backend) and counted. A file that passes the header check but still fails in the decoder makes the
pipeline raise: the loader then decodes that batch's files with PIL to find the culprits, marks them
bad, rebuilds the pipeline and redoes the batch (rare and slow, but never a crash).
"""
from __future__ import annotations

import io
import queue
import threading

import numpy as np
import torch

from fastdino.data.augment import (BLUR_RADIUS, GRAY_WEIGHTS, IMAGENET_MEAN, IMAGENET_STD, SOLARIZE_THRESHOLD,
                                   crop_specs, photometric_params, resized_crop_boxes, uniforms)
from fastdino.data.folder import DataError, ImageSource, image_size_from_header
from fastdino.data.torch_loader import MAX_REPLACEMENTS, EpochBatches, check_batch_geometry

NO_BLUR_SIGMA = 0.01  # Gaussian weights at +-1 px are exp(-5000) = 0: the identity


# ----------------------------------------------------------------------------- host-side parameters
def host_params(specs, seed: int, epoch: int, indices: np.ndarray, widths: np.ndarray, heights: np.ndarray) -> dict:
    """Feed arrays for one batch. Per crop c: roi_start{c}/roi_end{c} [B,2] (y, x; a flipped crop has
    its x bounds swapped). Per size group gi (frames f = its crops): affine/hue params of the 4 jitter
    slots, gray mask, blur sigma, solarize mask, each [B,F,1,1,1] ([B,F,1,1] for hue)."""
    B, C = len(indices), len(specs)
    u = uniforms(seed, epoch, indices[:, None], np.arange(C)[None, :])  # [B, C, draws]
    p = photometric_params(u, np.array([s.p_blur for s in specs]), np.array([s.p_solarize for s in specs]))
    feed = {}
    for c, s in enumerate(specs):
        top, left, h, w = resized_crop_boxes(u[:, c], widths, heights, s.scale).T
        flip = p["flip"][:, c]
        x0, x1 = np.where(flip, left + w, left), np.where(flip, left, left + w)
        feed[f"roi_start{c}"] = np.stack([top, x0], 1).astype(np.float32)
        feed[f"roi_end{c}"] = np.stack([top + h, x1], 1).astype(np.float32)
    for gi, ids in enumerate(size_groups(specs)):
        q = {k: v[:, ids] for k, v in p.items()}  # [B, F] (order: [B, F, 4])
        frame = lambda a: np.ascontiguousarray(a, np.float32).reshape(B, len(ids), 1, 1, 1)  # noqa: E731
        for slot in range(4):
            op = np.where(q["jitter"], q["order"][..., slot], -1)
            feed[f"g{gi}_a{slot}"] = frame(np.select([op == 0, op == 1, op == 2], [q["brightness"], q["contrast"], q["saturation"]], 1.0))
            feed[f"g{gi}_gc{slot}"] = frame(np.where(op == 2, 1 - q["saturation"], 0.0))
            feed[f"g{gi}_mc{slot}"] = frame(np.where(op == 1, 1 - q["contrast"], 0.0))
            feed[f"g{gi}_hue{slot}"] = frame(np.where(op == 3, q["hue"], 0.0))[..., 0]
        feed[f"g{gi}_gray"] = frame(q["gray"])
        feed[f"g{gi}_sigma"] = np.ascontiguousarray(np.where(q["blur"], q["sigma"], NO_BLUR_SIGMA), np.float32)
        feed[f"g{gi}_solarize"] = frame(q["solarize"])
    return feed


def size_groups(specs) -> list[list[int]]:
    """Crop ids grouped by (size, scale), in crop order: [[0, 1], [2, ..., N+1]] for DINO."""
    groups = {}
    for c, s in enumerate(specs):
        groups.setdefault((s.size, s.scale), []).append(c)
    return list(groups.values())


# ----------------------------------------------------------------------------- the graph
def _gray(x):
    return x[:, :, :, 0] * GRAY_WEIGHTS[0] + x[:, :, :, 1] * GRAY_WEIGHTS[1] + x[:, :, :, 2] * GRAY_WEIGHTS[2]


def _hue(x, shift):
    """torchvision adjust_hue on FHWC float in [0,1], as DALI arithmetic; shift: [F,1,1]."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath

    r, g, b = x[:, :, :, 0], x[:, :, :, 1], x[:, :, :, 2]
    maxc = dmath.max(r, dmath.max(g, b))
    minc = dmath.min(r, dmath.min(g, b))
    cr = maxc - minc
    eq = maxc == minc
    s = cr / (maxc + eq)  # eq: cr = 0 -> s = 0 (torchvision divides by 1 there)
    crd = cr + eq
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    h = ((maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
         + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)) / 6.0 + shift
    h = h - dmath.floor(h)
    out = []
    for n in (5.0, 3.0, 1.0):  # channel = v - v*s*clamp(min(k, 4-k), 0, 1), k = (n + 6h) mod 6
        k = n + 6.0 * h
        k = k - 6.0 * dmath.floor(k * (1.0 / 6.0))
        out.append(maxc - maxc * s * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0))
    return fn.stack(*out, axis=3)


def _photometric(x, inp, gi: int, solarize: bool):
    """Jitter slots, grayscale, blur, solarize on a float FHWC sequence; inp(name) -> fed DataNode."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath

    for slot in range(4):
        g = _gray(x)
        m = fn.expand_dims(fn.reductions.mean(g, axes=[1, 2]), axes=[1, 2, 3])
        x = dmath.clamp(inp(f"g{gi}_a{slot}") * x + inp(f"g{gi}_gc{slot}") * fn.expand_dims(g, axes=[3])
                        + inp(f"g{gi}_mc{slot}") * m, 0.0, 1.0)
        x = _hue(x, inp(f"g{gi}_hue{slot}"))
    x = x + inp(f"g{gi}_gray") * (fn.expand_dims(_gray(x), axes=[3]) - x)
    x = fn.reshape(x, layout="FHWC")  # arithmetic drops the layout; blur needs it
    x = fn.gaussian_blur(x, sigma=fn.per_frame(inp(f"g{gi}_sigma", cpu=True)), window_size=2 * BLUR_RADIUS + 1)
    if solarize:
        x = x + inp(f"g{gi}_solarize") * (x >= SOLARIZE_THRESHOLD) * (1.0 - 2.0 * x)
    return x


def build_pipeline(specs, batch_size: int, device_id: int | None, num_threads: int, seed: int = 0):
    """The DALI pipeline; outputs one FCHW float32 normalized sequence [F,3,S,S] per size group."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    gpu = device_id is not None
    groups = size_groups(specs)
    names = {"encoded"}

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
    def pipe():
        nodes = {}

        def inp(name, cpu=False):
            if name not in nodes:
                names.add(name)
                nodes[name] = fn.external_source(name=name, dtype=types.FLOAT, no_copy=False)
            return nodes[name].gpu() if gpu and not cpu else nodes[name]

        encoded = fn.external_source(name="encoded", dtype=types.UINT8, no_copy=False)
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                   adjust_orientation=False)  # crop boxes use the stored (header) size
        outs = []
        for gi, ids in enumerate(groups):
            size = specs[ids[0]].size
            crops = [fn.resize(images, size=[size, size], roi_start=inp(f"roi_start{c}", cpu=True),
                               roi_end=inp(f"roi_end{c}", cpu=True), roi_relative=False,
                               interp_type=types.INTERP_CUBIC, antialias=True) for c in ids]
            x = fn.stack(*crops, axis=0, axis_name="F") * (1.0 / 255.0)
            x = _photometric(x, inp, gi, solarize=any(specs[c].p_solarize > 0 for c in ids))
            outs.append(fn.crop_mirror_normalize(fn.reshape(x, layout="FHWC"), mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD),
                                                 output_layout="FCHW", dtype=types.FLOAT))
        return tuple(outs)

    p = pipe()
    p.build()
    p.fastdino_inputs = frozenset(names)  # feed only what the graph reads (no solarize input for locals)
    return p


# ----------------------------------------------------------------------------- the loader
class DaliMultiCropLoader:
    """The DALI backend of build_train_loader: same interface as TorchMultiCropLoader."""

    backend = "dali"

    def __init__(self, data_cfg, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device=None, dtype: torch.dtype = torch.float32, source: ImageSource | None = None,
                 num_threads: int | None = None):
        self.device = torch.device(device or "cpu")
        self.source = source or ImageSource(data_cfg.path)
        self.num_images = len(self.source)
        self.steps_per_epoch = check_batch_geometry(self.num_images, batch_size, rank, world_size, self.source.path)
        self.specs = crop_specs(data_cfg.global_crop_size, data_cfg.local_crop_size, data_cfg.local_crops_number,
                                data_cfg.global_crops_scale, data_cfg.local_crops_scale)
        self.groups = size_groups(self.specs)
        self.batch_size, self.dtype, self.seed = batch_size, dtype, seed
        self.sampler = EpochBatches(self.num_images, batch_size, rank, world_size, seed)
        self.device_id = (self.device.index or 0) if self.device.type == "cuda" else None
        self.num_threads = int(num_threads or max(1, min(int(data_cfg.num_workers) or 1, 16)))
        self._pipe = None
        self._bad: set[int] = set()  # dataset indices known unreadable on this rank

    @property
    def num_corrupt(self) -> int:
        """Distinct unreadable files met so far on this rank."""
        return len(self._bad)

    def _pipeline(self):
        if self._pipe is None:
            self._pipe = build_pipeline(self.specs, self.batch_size, self.device_id, self.num_threads, self.seed)
        return self._pipe

    # host side ------------------------------------------------------------
    def _host_batch(self, epoch: int, step: int) -> dict:
        n = self.num_images
        datas, idx, widths, heights, primary_bad, first_bad = [], [], [], [], 0, None
        for index in self.sampler.indices(epoch, step):
            for k in range(MAX_REPLACEMENTS + 1):
                i = int(index) if k == 0 else int(uniforms(self.seed, epoch, int(index), -2 - k, 1)[0] * n)
                if i in self._bad:
                    continue
                try:
                    data = self.source.read(i)
                    w, h = image_size_from_header(data)
                    break
                except (OSError, ValueError):
                    self._bad.add(i)
                    first_bad = first_bad or self.source.name(i)
            else:
                raise DataError(f"data source '{self.source.path}': {MAX_REPLACEMENTS + 1} unreadable files in a row, "
                                f"e.g. '{first_bad}'")
            primary_bad += k > 0
            datas.append(np.frombuffer(data, np.uint8))
            idx.append(i)
            widths.append(w)
            heights.append(h)
        if 2 * primary_bad > self.batch_size:
            raise DataError(f"{primary_bad} of {self.batch_size} images of a batch are unreadable, e.g. '{first_bad}' "
                            f"(check data.path)")
        feed = host_params(self.specs, self.seed, epoch, np.array(idx), np.array(widths), np.array(heights))
        feed["encoded"] = datas
        return {"feed": feed, "indices": idx, "epoch": epoch, "step": step}

    def _host_batches(self, epoch: int, start_step: int, out: queue.Queue, stop: threading.Event) -> None:
        try:
            for step in range(start_step, self.steps_per_epoch):
                item = self._host_batch(epoch, step)
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            out.put(None)
        except BaseException as e:  # hand the error to the consumer
            out.put(e)

    # device side ----------------------------------------------------------
    def _run(self, feed: dict) -> list:
        pipe = self._pipeline()
        for name in pipe.fastdino_inputs:
            pipe.feed_input(name, feed[name])
        return pipe.run()

    def _to_torch(self, tl) -> torch.Tensor:
        t = tl.as_tensor()
        if self.device_id is None:
            return torch.from_numpy(np.array(t))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(t.shape(), dtype=torch.float32, device=self.device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device))
        return out

    def _recover(self, item: dict, err: Exception) -> dict:
        """The decoder failed on a file that passed the header check: find it with PIL, mark it,
        rebuild the pipeline and rebuild the batch without it."""
        from PIL import Image

        found = False
        for i in item["indices"]:
            try:
                Image.open(io.BytesIO(self.source.read(i))).load()
            except Exception:
                self._bad.add(i)
                found = True
        if not found:
            raise err
        self._pipe = None
        return self._host_batch(item["epoch"], item["step"])

    def epoch(self, epoch: int, start_step: int = 0):
        """Yields, for steps start_step..steps_per_epoch-1, the crop-major list of 2+N tensors
        [B,3,S,S] on the device, normalized, in self.dtype."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside [0, {self.steps_per_epoch}]")
        q, stop = queue.Queue(maxsize=2), threading.Event()
        worker = threading.Thread(target=self._host_batches, args=(int(epoch), int(start_step), q, stop), daemon=True)
        worker.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                for _ in range(4):
                    try:
                        outs = self._run(item["feed"])
                        break
                    except RuntimeError as e:
                        item = self._recover(item, e)
                else:
                    raise DataError(f"data source '{self.source.path}': the DALI pipeline keeps failing on a batch")
                crops = [None] * len(self.specs)
                for ids, tl in zip(self.groups, outs):
                    x = self._to_torch(tl).to(self.dtype)  # [B, F, 3, S, S]
                    for f, c in enumerate(ids):
                        crops[c] = x[:, f].contiguous()
                yield crops
        finally:
            stop.set()
            worker.join()
