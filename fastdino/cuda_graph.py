"""train.cuda_graphs: the whole training step (fastdino/step.py) captured in a CUDA graph and replayed.

The step is built for it: no host reads, hyper-parameters and counters on the device, gradients zeroed
in place, static shapes (iBOT masks padded to their upper bound). A replay launches the step's few
hundred kernels with one call, so the GPU never waits for Python.

    step_fn = GraphedStep(train_step)        # or GraphedStep(compile_step(train_step))
    out = step_fn(state, crops, masks)       # same call and outputs as train_step

Per layout (the shapes, dtypes and devices of the crops and masks, and which Gram teacher runs; a run
has one, or a few with data.crop_sets and from gram.start_epoch on): the first `warmup` steps run
eagerly on a side stream (Triton compiles, autograd and the optimizer make their state, cuBLAS its
workspaces), the next one is captured and then replayed, and every later step copies its crops and
masks into the graph's static inputs and replays. The outputs are cloned after each replay (the loop
keeps several steps' outputs until a log step reads them). All graphs share one memory pool (they
never run at the same time). Drop path's random draws advance with each replay (PyTorch's Philox
offsets), as in eager mode.

Refused by the config (one line): without CUDA, with several processes (DDP's gradient hooks), under
fp16 (the grad scaler reads its scale on the host) and with DeepSpeed (its engine step syncs). A host
synchronization or another uncapturable operation inside the step fails the capture: GraphCaptureError
names train.cuda_graphs and the cause.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import torch

log = logging.getLogger("fastdino")


class GraphCaptureError(RuntimeError):
    """The step could not be captured (one line: train.cuda_graphs and the first line of the cause)."""


def _no_mark(phase: str) -> None:
    pass


def _mask_tensors(masks) -> list[torch.Tensor]:
    """The tensors of a MaskBatch (fastdino/data/masking.py), in field order."""
    return [getattr(masks, f.name) for f in dataclasses.fields(masks)]


def _describe(x):
    if isinstance(x, torch.Tensor):
        return tuple(x.shape), x.dtype, x.device
    if x is None:
        return None
    return tuple(_describe(t) for t in _mask_tensors(x))


class _Captured:
    """One layout's graph: its static inputs and its outputs."""

    def __init__(self, graph, crops, masks, outputs):
        self.graph, self.crops, self.masks, self.outputs = graph, crops, masks, outputs

    def replay(self, crops, masks) -> dict:
        for static, x in zip(self.crops, crops):
            static.copy_(x, non_blocking=True)
        if masks is not None:
            for static, x in zip(_mask_tensors(self.masks), _mask_tensors(masks)):
                static.copy_(x, non_blocking=True)
        self.graph.replay()
        return {k: v.clone() for k, v in self.outputs.items()}


class GraphedStep:
    """A step function whose steps replay a CUDA graph per layout (see the module docstring)."""

    def __init__(self, step_fn, warmup: int = 2):
        self.step_fn, self.warmup = step_fn, int(warmup)
        self.graphs: dict = {}
        self.eager_steps: Counter = Counter()
        self.pool = None

    def layout(self, state, crops, masks) -> tuple:
        gram = getattr(state, "gram_teacher", None)
        return tuple(_describe(c) for c in crops), _describe(masks), None if gram is None else id(gram)

    def __call__(self, state, crops, masks=None, mark=_no_mark) -> dict:
        key = self.layout(state, crops, masks)
        captured = self.graphs.get(key)
        if captured is None:
            if self.eager_steps[key] < self.warmup:
                self.eager_steps[key] += 1
                return self._side_stream(state, crops, masks, mark)
            captured = self.graphs[key] = self._capture(state, crops, masks)
        return captured.replay(crops, masks)

    def _side_stream(self, state, crops, masks, mark) -> dict:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.step_fn(state, crops, masks, mark=mark)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, state, crops, masks) -> _Captured:
        static_crops = [c.clone() for c in crops]
        static_masks = None if masks is None else type(masks)(*(t.clone() for t in _mask_tensors(masks)))
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        try:
            # thread_local: the loader's threads (pinned copies, DALI) may use CUDA during the capture
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                outputs = self.step_fn(state, static_crops, static_masks)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GraphCaptureError(f"config key 'train.cuda_graphs': the step cannot be captured in a CUDA graph "
                                    f"({type(e).__name__}: {first}); set train.cuda_graphs=false") from e
        self.pool = graph.pool()
        log.info("train.cuda_graphs: step graph %d captured for crops %s", len(self.graphs) + 1,
                 [tuple(c.shape) for c in crops])
        return _Captured(graph, static_crops, static_masks, outputs)


__all__ = ["GraphedStep", "GraphCaptureError"]
