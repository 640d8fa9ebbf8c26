"""Regional torch.compile (model.compile): the transformer blocks and the heads, one static graph per
token layout, no recompiles.

A DINO step calls the same block with a few token layouts (teacher globals, student globals and
locals, or the packed student), each time with fixed shapes. torch.compile keeps one cache of graphs
per code object; a second layout through the same code object is a guard failure, a recompile and,
under automatic dynamic shapes, a dynamic-shape graph for every block. Here every layout gets its own
compiled copy of the forward's code object instead: the first call with a new layout compiles a
static graph for it (logged once), later calls with that layout reuse it, and no layout ever
invalidates another. All blocks of the student and the teacher share the graphs (parameters are graph
inputs), so a ViT-S/16 DINO step compiles about three block graphs and two head graphs.

The compiled forward is installed as the module's `forward`, so module __call__ and its hooks
(DeepSpeed ZeRO-3 gathering, activation checkpointing) run as before.
"""
from __future__ import annotations

import logging
import types

import torch
import torch.nn as nn

log = logging.getLogger("fastdino")


def _fresh_copy(fn):
    """The same Python function with its own code object (and so its own torch.compile cache)."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__  # keyword-only defaults (Block.forward's chain arguments)
    return copy


def _describe(x):
    """What a compiled graph is specialized on, for one argument: tensors by shape, dtype, device and
    requires_grad; tuples element by element; None, ints and strings by value."""
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.dtype, x.device, x.requires_grad)
    if isinstance(x, (tuple, list)):
        return tuple(_describe(v) for v in x)
    return x


def _static_attributes(module: nn.Module) -> tuple:
    """The plain attributes a traced forward may branch on (e.g. DINOHead.fused_last_layer, the
    attention backend), of the module and its submodules; `training` is read per call."""
    out = []
    for prefix, m in module.named_modules():
        for name, value in vars(m).items():
            if not name.startswith("_") and name != "training" and isinstance(value, (bool, int, float, str)):
                out.append((f"{prefix}.{name}", value))
    return tuple(sorted(out))


class LayoutCompiled:
    """`module.forward` replacement: dispatches each call to the graph compiled for its layout (the
    arguments' shapes, dtypes and devices, grad mode, autocast state, train/eval, the module's plain
    attributes). Shared by every module of one class (one `cache`)."""

    def __init__(self, module: nn.Module, cache: dict, options: dict):
        self.module, self.cache, self.options = module, cache, options
        self.fn = type(module).forward
        self.static = _static_attributes(module)

    def __call__(self, *args, **kwargs):
        device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        key = (_describe(args), _describe(tuple(sorted(kwargs.items()))), self.static, self.module.training,
               torch.is_grad_enabled(), torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        compiled = self.cache.get(key)
        if compiled is None:
            log.info("model.compile: %s graph %d for layout %s", type(self.module).__name__, len(self.cache) + 1,
                     [a[1] for a in key[0] if isinstance(a, tuple) and a and a[0] == "T"])
            compiled = self.cache[key] = torch.compile(_fresh_copy(self.fn), dynamic=False, **self.options)
        return compiled(self.module, *args, **kwargs)


_CACHES: dict = {}  # (module class, compile options) -> {layout: compiled forward}, for the process


def compile_modules(model: nn.Module, classes: tuple, **options) -> int:
    """Install LayoutCompiled forwards on every submodule of model that is an instance of `classes`;
    modules of one class share their graphs (the student's and the teacher's blocks alike). Returns
    how many modules were compiled."""
    n = 0
    for m in model.modules():
        if isinstance(m, classes) and not isinstance(m.forward, LayoutCompiled):
            cache = _CACHES.setdefault((type(m), tuple(sorted(options.items()))), {})
            m.forward = LayoutCompiled(m, cache, options)
            n += 1
    return n
