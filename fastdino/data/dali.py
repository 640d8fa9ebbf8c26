"""DALI data path: GPU JPEG decoding and the geometric half of every crop made by DALI; the photometric
half runs batched on the device with the same op as the torch backend (kernels/photometric.py, data.photometric_impl).

Host (HostBatches: data.num_workers persistent DataLoader worker processes, so the file reads, header
checks and draws never take the training process's GIL; with 0 a background thread of the training
process, reading with a small thread pool): for each step, this rank's dataset indices (the same (data
pass, step in pass) of each step, per data.epoch_length, pass permutation and global-batch layout as the
torch backend: EpochBatches), the raw bytes (folder, file list or webdataset tar shards:
fastdino.data.folder.ImageSource), the image size read from the header, and every random draw of every
crop of the whole batch in one vectorized hash (augment.uniforms keyed by seed, data pass, dataset
index, crop: one numpy call of [B, 2+N, 36] draws per batch). So both backends use identical crop boxes
and parameters for a given key, and the output is a pure function of the key: resume (start_step), world
size and thread counts do not change it.

Graph (fed with feed_input; "mixed" decoder on GPU, "cpu" operators when device_id=None):
    decode once -> per crop: resize of the crop box (bicubic, antialiased; a flipped box flips), uint8
    -> stack same-size crops into one output per size group: [B, F, S, S, 3] uint8 (F = 2 globals,
    F = N locals).
Then on the device (consumer thread, torch): uint8 -> crop-major [F*B, 3, S, S] -> photometric (colour
jitter in the sample's random order with each op, hue included, applied once per crop; grayscale;
blur; solarize; normalization), exactly as the torch backend, so the two backends differ only by the
bicubic resampler (DALI vs PIL).

Crop layouts (fastdino/data/crop_plan.py): each step makes the crops of its layout, its crop set (data.crop_sets:
one drawn per step) and whether the Gram-teacher crops are made (from gram_from_epoch on). The loader keeps one
pipeline per layout, built on first use; a step's batch goes to its layout's pipeline and the outputs are taken in
step order (each pipeline returns its own batches in the order they were fed). The pipelines of layouts an epoch
can no longer have (before the Gram crops start) are dropped at its start.

Memory. The graph is a handful of operators on uint8 data and runs on DALI's dynamic executor
(exec_async + exec_pipelined), which frees inter-operator buffers as soon as they are consumed. At most
PIPELINE_DEPTH iterations are in flight per pipeline. Device memory held by DALI for B images of ~W x H px with
2 + N crops of G / L px: decoded images B*W*H*3 + crops 2 * B*3*(2*G^2 + N*L^2) (resize outputs and
the stacked outputs) per iteration in flight, plus nvJPEG scratch; for B=256, 500x375 JPEGs, 2+10 crops
of 224/96: 144 MB + 296 MB per iteration, about 1 GB in all. (The previous graph ran ~400 float32
elementwise operators per batch on the legacy executor, which keeps every operator's output buffer
alive: ~73 GiB at B=256.) The float32 photometric intermediates live in PyTorch's caching allocator
(~0.3 GB per [B*F,3,S,S] tensor at B=256). One pipeline per layout, built on first use, reused by
every epoch() call, and released by close() (or when the loader is garbage-collected); several crop sets
hold one such pipeline each.

Unreadable files: the host checks every file's header (JPEG SOI..EOI with a frame header, or PNG
IHDR) before it enters the graph; a failing file is replaced deterministically (as in the torch
backend) and counted. A file that passes the header check but still fails in the decoder makes the
pipeline raise: the loader then decodes the in-flight batches' files with PIL to find the culprits,
marks them bad, rebuilds the pipeline and redoes those batches (rare and slow, but never a crash). The
worker processes do not learn of such a file; a later batch of theirs that holds it is made again in the
training process (a replacement is a pure function of which files are unreadable, so it is the batch the
workers would have made). A batch a worker cannot make (DataError) reaches the training process as its
one line. The workers ignore SIGINT/SIGTERM (the training process checkpoints and stops them); close()
stops them, and so does fastdino's exit hook for a loader nothing closed.
"""
from __future__ import annotations

import collections
import copy
import io
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from fastdino.data.augment import (PARAM_KEYS, UNDISTORTED, draw_keys, photometric_params,
                                   resized_crop_boxes, uniforms)
from fastdino.data.crop_plan import CropPlan
from fastdino.data.folder import DataError, ImageSource, Unreadable, image_size_from_header
from fastdino.data.torch_loader import (EpochBatches, LayoutBatches, _first, check_batch_geometry, check_readable_batch,
                                        ignore_stop_signals, read_replacing, shutdown_workers, track_workers)
from fastdino.kernels.photometric import photometric

PIPELINE_DEPTH = 2  # DALI iterations in flight (prefetch_queue_depth): one running while one is consumed
HOST_QUEUE = 3  # host batches prepared ahead by the background thread


# ----------------------------------------------------------------------------- host-side parameters
def host_params(specs, seed: int, data_pass: int, indices: np.ndarray, widths: np.ndarray, heights: np.ndarray) -> dict:
    """All draws of one batch of pass `data_pass`, vectorized (one hash over [B, C, 36]).

    Returns {'roi_start{c}', 'roi_end{c}': float32 [B, 2] (y, x; a flipped crop has its x bounds
    swapped) for each crop c, 'photometric': per size group, a dict of CPU tensors [F*B] in crop-major
    order (as augment.stack_params; 'order' [F*B, 4])}."""
    B = len(indices)
    u = uniforms(seed, data_pass, np.asarray(indices)[:, None], draw_keys(specs)[None, :])  # [B, C, draws]
    p = photometric_params(u, np.array([s.p_blur for s in specs]), np.array([s.p_solarize for s in specs]),
                           np.array([s.p_flip for s in specs]))
    distort = np.array([s.distort for s in specs])
    for k in UNDISTORTED:  # Gram-teacher crops: geometry only
        p[k] = p[k] & distort
    feed = {}
    for c, s in enumerate(specs):
        top, left, h, w = resized_crop_boxes(u[:, c], widths, heights, s.scale).T
        flip = p["flip"][:, c]
        x0, x1 = np.where(flip, left + w, left), np.where(flip, left, left + w)
        feed[f"roi_start{c}"] = np.stack([top, x0], 1).astype(np.float32)
        feed[f"roi_end{c}"] = np.stack([top + h, x1], 1).astype(np.float32)
    groups = []
    for ids in size_groups(specs):
        q = {}
        for k in PARAM_KEYS:
            v = np.swapaxes(p[k][:, ids], 0, 1)  # crop-major [F, B, ...]
            v = v.reshape((len(ids) * B,) + v.shape[2:])
            q[k] = torch.from_numpy(np.ascontiguousarray(v.astype(np.float32) if v.dtype.kind == "f" else
                                                         v.astype(np.int64 if k == "order" else bool)))
        groups.append(q)
    feed["photometric"] = groups
    return feed


def size_groups(specs) -> list[list[int]]:
    """Crop ids grouped by (size, scale), in crop order: [[0, 1], [2, ..., N+1]] for DINO."""
    groups = {}
    for c, s in enumerate(specs):
        groups.setdefault((s.size, s.scale), []).append(c)
    return list(groups.values())


# ----------------------------------------------------------------------------- the graph
def build_pipeline(specs, batch_size: int, device_id: int | None, num_threads: int, seed: int = 0):
    """The DALI pipeline: decode, then per crop a resize of its box; one uint8 [F,S,S,3] output per
    size group. Dynamic executor (intermediate buffers freed as consumed), PIPELINE_DEPTH in flight."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    gpu = device_id is not None
    groups = size_groups(specs)

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=PIPELINE_DEPTH, exec_async=True, exec_pipelined=True, exec_dynamic=True)
    def pipe():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, no_copy=False)
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                   adjust_orientation=False)  # crop boxes use the stored (header) size
        outs = []
        for ids in groups:
            size = specs[ids[0]].size
            crops = [fn.resize(images, size=[size, size], roi_relative=False, interp_type=types.INTERP_CUBIC,
                               antialias=True, dtype=types.UINT8,
                               roi_start=fn.external_source(name=f"roi_start{c}", dtype=types.FLOAT, no_copy=False),
                               roi_end=fn.external_source(name=f"roi_end{c}", dtype=types.FLOAT, no_copy=False))
                     for c in ids]
            outs.append(fn.stack(*crops, axis=0, axis_name="F"))
        return tuple(outs)

    p = pipe()
    p.build()
    p.fastdino_inputs = ("encoded",) + tuple(f"roi_{e}{c}" for c in range(len(specs)) for e in ("start", "end"))
    return p


def release_dali_memory() -> None:
    """Give DALI's unused pooled memory back (device and pinned host), after a pipeline is dropped."""
    try:
        from nvidia.dali.backend import ReleaseUnusedMemory

        ReleaseUnusedMemory()
    except Exception:  # older DALI, or no CUDA
        pass


# ----------------------------------------------------------------------------- the host side
def pack_encoded(blobs) -> tuple[torch.Tensor, np.ndarray]:
    """A batch's encoded files as one uint8 tensor + [B+1] offsets: one shared-memory block from a worker
    process instead of B pickled byte strings."""
    offsets = np.zeros(len(blobs) + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    buf = bytearray(int(offsets[-1]))
    view = memoryview(buf)
    for b, a in zip(blobs, offsets[:-1]):
        view[a:a + len(b)] = b
    return torch.frombuffer(buf, dtype=torch.uint8) if len(buf) else torch.zeros(0, dtype=torch.uint8), offsets


def unpack_encoded(encoded: torch.Tensor, offsets: np.ndarray) -> list:
    """pack_encoded's inverse, as numpy views (what DALI's feed_input takes)."""
    buf = encoded.numpy()
    return [buf[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


class HostBatches(torch.utils.data.Dataset):
    """The host side of a DALI batch: a step's keys [(data pass, index, layout), ...] (LayoutBatches, as the
    torch loader's) -> item {'feed': the pipeline's inputs (encoded files packed, crop boxes) + 'photometric'
    params per size group, 'indices', 'masks', 'bad': [(index, name, reason)] of unreadable files met,
    'timing'}; {'error': one line} for a batch that cannot be made (DataError). Picklable: with data.num_workers
    > 0 DataLoader worker processes make the items (file reads, header checks and draws off the training
    process's GIL), with 0 a background thread of the training process does (reads in a small thread pool).

    `bad` (dataset indices known unreadable) is only a cache: a sample's replacement is a pure function of
    (seed, data pass, index) and of which files are unreadable, so every process makes the same batch."""

    def __init__(self, source: ImageSource, plan: CropPlan, seed: int, masking=None, read_threads: int = 1,
                 bad: set | None = None):
        self.source, self.plan, self.seed, self.masking = source, plan, seed, masking
        self.read_threads, self.bad = int(read_threads), set() if bad is None else bad
        self._readers = None

    def __getstate__(self):  # copies (pickled, copy.copy) read serially: a worker process is one of many
        state = dict(self.__dict__)
        state["_readers"], state["read_threads"], state["bad"] = None, 1, set(self.bad)
        return state

    def close(self) -> None:
        if self._readers is not None:
            self._readers.shutdown(wait=True)
            self._readers = None

    def read_checked(self, data_pass: int, index: int, found: list):
        """(dataset index, (bytes, (w, h)), tries) for one sample, unreadable files replaced as in the torch
        backend (read_replacing; a file passes when its header does) and appended to `found` as (index, name,
        reason)."""
        def bad(i, error):
            self.bad.add(i)
            found.append((i, self.source.name(i), str(error)))

        def with_size(data: bytes):
            return data, image_size_from_header(data)

        return read_replacing(self.source, self.seed, data_pass, index, with_size, skip=self.bad, on_bad=bad)

    def batch(self, keys: list) -> dict:
        """The batch of a step's keys [(data pass, index, layout), ...] (LayoutBatches)."""
        t0 = time.perf_counter()
        data_pass, layout = keys[0][0], keys[0][2]
        indices = [index for _, index, _ in keys]
        found = []
        if self.read_threads > 1:
            if self._readers is None:
                self._readers = ThreadPoolExecutor(self.read_threads, thread_name_prefix="fastdino-read")
            rows = list(self._readers.map(lambda i: self.read_checked(data_pass, i, found), indices))
        else:
            rows = [self.read_checked(data_pass, i, found) for i in indices]
        check_readable_batch(sum(tries > 0 for _, _, tries in rows), len(rows), found[0][1] if found else "")
        idx = np.array([i for i, _, _ in rows])
        sizes = np.array([size for _, (_, size), _ in rows])  # [B, 2]: (w, h)
        t1 = time.perf_counter()
        feed = host_params(self.plan.specs(layout), self.seed, data_pass, idx, sizes[:, 0], sizes[:, 1])
        feed["encoded"], feed["offsets"] = pack_encoded([data for _, (data, _), _ in rows])
        item = {"feed": feed, "indices": idx.tolist(), "keys": keys, "layout": layout, "bad": found,
                "timing": {"host_read_s": t1 - t0, "host_params_s": time.perf_counter() - t1}}
        if self.masking is not None:  # keyed by the sampler's indices, on the set's patch grid, as the torch loader's
            item["masks"] = self.masking.for_crop_size(self.plan.global_size(layout))(self.seed, data_pass, indices)
        return item

    def __getitems__(self, keys: list) -> dict:  # a DataLoader worker: a step's keys from LayoutBatches
        try:
            return self.batch(keys)
        except DataError as e:  # one line to the training process, not a worker traceback
            return {"error": str(e)}


# ----------------------------------------------------------------------------- the loader
class _Pipe:
    """One layout's DALI pipeline, its batches fed whose outputs are not taken yet, and whether its prefetch
    is primed (a fresh pipeline's first schedule_run starts PIPELINE_DEPTH iterations; a primed one schedules
    each fed batch at once)."""

    __slots__ = ("pipe", "fed", "primed")

    def __init__(self, pipe):
        self.pipe, self.fed, self.primed = pipe, 0, False


class DaliMultiCropLoader:
    """The DALI backend of build_train_loader: same interface as TorchMultiCropLoader, plus close()."""

    backend = "dali"

    def __init__(self, data_cfg, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device=None, dtype: torch.dtype = torch.float32, source: ImageSource | None = None,
                 num_threads: int | None = None, masking=None, gram_from_epoch: int = 0, photometric: str = "torch"):
        self.device = torch.device(device or "cpu")
        self.photometric = photometric  # triton | torch: kernels/photometric.py
        self.masking = masking  # fastdino.data.masking.IBOTMasks: also yield the batch's iBOT masks
        self.source = source or ImageSource(data_cfg.path)
        self.num_images = len(self.source)
        check_batch_geometry(self.num_images, batch_size, rank, world_size, self.source.path)
        self.batch_size, self.dtype, self.seed = batch_size, dtype, seed
        # data.epoch_length: 0, an epoch is a pass over the data; N > 0, N iterations (OFFICIAL_EPOCH_LENGTH)
        self.sampler = EpochBatches(self.num_images, batch_size, rank, world_size, seed,
                                    int(getattr(data_cfg, "epoch_length", 0)))
        self.steps_per_epoch = self.sampler.steps_per_epoch
        # each step's crops (its layout): its crop set (data.crop_sets, a draw per step) and, from epoch
        # gram_from_epoch on, the Gram-teacher crops (DINOv3)
        self.plan = CropPlan.from_config(data_cfg, seed, gram_from_epoch * self.steps_per_epoch)
        if self.plan.multi_resolution and masking is not None and masking.patch_size is None:
            raise ValueError("DaliMultiCropLoader: several crop sets (data.crop_sets) need the masking's patch_size "
                             "(IBOTMasks(..., patch_size=p)) to mask each set's patch grid")
        self.device_id = (self.device.index or 0) if self.device.type == "cuda" else None
        self.num_threads = int(num_threads or max(1, min(int(data_cfg.num_workers) or 1, 16)))
        # one DALI pipeline per layout met, built on first use (one with one crop set and no Gram start)
        self._pipes: dict = {}
        self._pipes_built = 0  # pipelines built over the loader's life (again after decoder errors, new layouts)
        self._bad: set[int] = set()  # dataset indices known unreadable on this rank
        self._decoder_bad: set[int] = set()  # of which: passed the header check, failed in DALI's decoder
        self._unreadable = Unreadable("training data")  # names them in the log
        # the host side of each batch: in data.num_workers worker processes (persistent, started by the first
        # epoch), or with 0 in a background thread of this process reading with a small thread pool
        self.host_workers = int(data_cfg.num_workers)
        self.batches = LayoutBatches(self.sampler, self.plan)  # each step's keys, as the torch loader's
        self.host = HostBatches(self.source, self.plan, seed, masking, read_threads=max(1, min(self.num_threads, 8)),
                                bad=self._bad)
        self._workers = None
        # seconds summed over batches: host side (file reads + header checks, parameter draws; in the worker
        # processes when there are some), consumer (waiting for host batches, waiting for DALI outputs,
        # photometric launch)
        self.timing = collections.Counter()

    @property
    def num_corrupt(self) -> int:
        """Distinct unreadable files met so far on this rank."""
        return len(self._bad)

    def _pipeline(self, layout) -> _Pipe:
        if layout not in self._pipes:
            self._pipes[layout] = _Pipe(build_pipeline(self.plan.specs(layout), self.batch_size, self.device_id,
                                                       self.num_threads, self.seed))
            self._pipes_built += 1
        return self._pipes[layout]

    def _drop_pipelines(self, keep=lambda layout: False) -> None:
        """Drop the pipelines whose layout `keep` refuses (their last references: DALI frees the executors and
        their buffers) and give the memory back."""
        dropped = [layout for layout in self._pipes if not keep(layout)]
        for layout in dropped:
            del self._pipes[layout]
        if dropped:
            release_dali_memory()

    def close(self) -> None:
        """Release the DALI pipelines and their memory, and stop the host workers (a later epoch() starts both
        again)."""
        self._drop_pipelines()
        self.host.close()
        if self._workers is not None:
            shutdown_workers(self._workers)
            self._workers = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # host side ------------------------------------------------------------
    def _accept(self, item: dict) -> dict:
        """A host item as the consumer uses it: its unreadable files counted and named, a batch holding a
        file only this process knows as undecodable made again here, the encoded files unpacked."""
        if "error" in item:
            raise DataError(item["error"])
        for i, name, reason in item["bad"]:
            self._bad.add(i)
            self._unreadable.add(name, reason)
        if self._decoder_bad.intersection(item["indices"]):  # a worker's snapshot of the bad files is older
            item = self.host.batch(item["keys"])
        for k, v in item.pop("timing").items():
            self.timing[k] += v
        self.timing["batches"] += 1
        feed = item["feed"]
        if "offsets" in feed:
            feed["encoded"] = unpack_encoded(feed["encoded"], feed.pop("offsets"))
        return item

    def _host_batch(self, epoch: int, step: int) -> dict:
        """Step `step` of epoch `epoch` made in this process (decoder recovery, benchmarks)."""
        return self._accept(self.host.batch(self.batches.keys(epoch, step)))

    def _host_items(self, epoch: int, start_step: int):
        """Host items of steps start_step.. of this epoch, in order (not yet accepted): LayoutBatches' keys of
        each step, made into a batch by HostBatches in the workers or the thread."""
        self.sampler.epoch, self.sampler.start_step = epoch, start_step
        if self.host_workers > 0:
            if self._workers is None:  # the workers' copy reads serially (no thread pool), bad files as known now
                self._workers = track_workers(torch.utils.data.DataLoader(
                    copy.copy(self.host), batch_sampler=self.batches, collate_fn=_first,
                    num_workers=self.host_workers, prefetch_factor=2, persistent_workers=True,
                    worker_init_fn=ignore_stop_signals, generator=torch.Generator()))
            yield from self._workers
            return
        q, stop = queue.Queue(maxsize=HOST_QUEUE), threading.Event()
        worker = threading.Thread(target=self._host_thread, args=(q, stop), daemon=True)
        worker.start()
        try:
            while True:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    return
                yield item
        finally:
            stop.set()
            worker.join()

    def _host_thread(self, out: queue.Queue, stop: threading.Event) -> None:
        try:
            for keys in self.batches:  # this epoch's steps (sampler.epoch / start_step, set before the thread starts)
                item = self.host.batch(keys)
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
    def _submit(self, item: dict) -> None:
        """Feed one batch to its layout's pipeline and schedule its DALI iteration (returns at once: the
        executor is async). A fresh pipeline's first schedule_run starts PIPELINE_DEPTH iterations, so its
        first call is deferred until that many batches are fed (see _flush)."""
        p = self._pipeline(item["layout"])
        for name in p.pipe.fastdino_inputs:
            p.pipe.feed_input(name, item["feed"][name])
        p.fed += 1
        if p.primed:
            p.pipe.schedule_run()
        elif p.fed == PIPELINE_DEPTH:
            p.pipe.schedule_run()
            p.primed = True

    def _flush(self, item: dict) -> None:
        """Make sure `item`'s batch is scheduled: its pipeline, fresh and fed fewer than PIPELINE_DEPTH batches,
        gets copies of its last batch to fill the prefetch (pending after every batch it was fed; their outputs
        are dropped)."""
        p = self._pipes[item["layout"]]
        if not p.primed and p.fed:
            last = next(it for it in reversed(self._pending) if it["layout"] == item["layout"])
            while not p.primed:
                self._pending.append(dict(last, duplicate=True))
                self._submit(last)

    def _outputs(self, item: dict) -> list:
        stream = torch.cuda.current_stream(self.device) if self.device_id is not None else None
        p = self._pipes[item["layout"]]
        outs = p.pipe.outputs(cuda_stream=stream)
        p.fed -= 1
        return outs

    def _to_torch(self, tl) -> torch.Tensor:
        """DALI uint8 batch [B, F, S, S, 3] -> torch uint8 on the device (stream-ordered copy on CUDA)."""
        t = tl.as_tensor()
        if self.device_id is None:
            return torch.from_numpy(np.array(t))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(t.shape(), dtype=torch.uint8, device=self.device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device))
        return out

    def to_crops(self, outs, params: list, layout) -> list:
        """DALI outputs (uint8 per size group) of a layout's pipeline + host params -> crop-major list of
        normalized [B,3,S,S]."""
        specs = self.plan.specs(layout)
        crops = [None] * len(specs)
        for ids, tl, p in zip(size_groups(specs), outs, params):
            x = self._to_torch(tl)  # [B, F, S, S, 3]
            B, F, H, W, _ = x.shape
            x = x.permute(1, 0, 4, 2, 3).reshape(F * B, 3, H, W)  # crop-major, as the torch backend
            for c, y in zip(ids, photometric(x, p, self.dtype, impl=self.photometric).split(B)):
                crops[c] = y
        return crops

    def _recover(self, err: Exception) -> None:
        """The decoder failed on a file that passed the header check: find it with PIL among the
        in-flight batches, mark it, rebuild the pipeline and resubmit those batches without it."""
        from PIL import Image

        found = False
        for item in self._pending:
            for i in item["indices"]:
                try:
                    Image.open(io.BytesIO(self.source.read(i))).load()
                except Exception as e:
                    if i not in self._bad:
                        self._bad.add(i)
                        self._decoder_bad.add(i)
                        self._unreadable.add(self.source.name(i), str(e))
                        found = True
        if not found:
            raise err
        self._drop_pipelines()
        items = [self._accept(self.host.batch(it["keys"])) for it in self._pending if not it.get("duplicate")]
        self._pending.clear()
        for it in items:
            self._pending.append(it)
            self._submit(it)

    def _in_flight(self) -> int:
        """Batches in flight, prefetch duplicates not counted."""
        return sum(not item.get("duplicate") for item in self._pending)

    def _next_output(self) -> tuple[dict, list] | None:
        """Outputs of the oldest in-flight batch (taking and dropping the prefetch duplicates before it); None
        when only duplicates were left."""
        failures = 0
        while self._pending:
            try:
                item = self._pending[0]
                self._flush(item)
                t0 = time.perf_counter()
                outs = self._outputs(item)
                self.timing["dali_wait_s"] += time.perf_counter() - t0
                self._pending.popleft()
                if item.get("duplicate"):
                    continue
                return item, outs
            except RuntimeError as e:
                failures += 1
                if failures == 4:
                    raise DataError(f"data source '{self.source.path}': the DALI pipeline keeps failing on a batch")
                self._recover(e)
        return None

    def _drain(self) -> None:
        """Consume the outputs of batches still in flight (early exit from an epoch), so the reused
        pipelines start the next epoch empty; pipelines that cannot be drained are dropped."""
        try:
            while self._pending:
                self._flush(self._pending[0])
                self._outputs(self._pending.popleft())
        except Exception:
            self._drop_pipelines()
        self._pending.clear()

    def epoch(self, epoch: int, start_step: int = 0):
        """Yields, for steps start_step..steps_per_epoch-1, the crop-major list of 2+N tensors (+2 Gram-teacher
        crops from the plan's gram_from on) [B,3,S,S] on the device, normalized, in self.dtype. Step s is the
        batch of sampler.position(epoch, s)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside [0, {self.steps_per_epoch}]")
        # the Gram-teacher crops start at an epoch's first step (gram_from_epoch): the pipelines of the layouts
        # this epoch cannot have (those before the start) are dropped with their memory
        gram = int(epoch) * self.steps_per_epoch >= self.plan.gram_from
        self._drop_pipelines(keep=lambda layout: layout[1] == (gram and bool(self.plan.sets[layout[0]].gram_size)))
        items = self._host_items(int(epoch), int(start_step))
        self._pending = collections.deque()  # fed batches whose outputs are not consumed yet, oldest first
        done = False
        try:
            while True:
                # keep PIPELINE_DEPTH batches in flight: feed the next one before taking the oldest's outputs
                while not done and self._in_flight() < PIPELINE_DEPTH:
                    t0 = time.perf_counter()
                    item = next(items, None)
                    self.timing["host_wait_s"] += time.perf_counter() - t0
                    if item is None:
                        done = True
                        break
                    item = self._accept(item)
                    self._pending.append(item)
                    self._submit(item)
                nxt = self._next_output() if self._in_flight() else None
                if nxt is None:
                    return
                item, outs = nxt
                t0 = time.perf_counter()
                crops = self.to_crops(outs, item["feed"]["photometric"], item["layout"])
                del outs
                self.timing["photometric_s"] += time.perf_counter() - t0
                yield crops if self.masking is None else (crops, item["masks"].to(self.device))
        finally:
            items.close()
            if self._pending:
                self._drain()
