"""Every choice of the engine, made once: what each "auto" becomes on this machine, and what runs.

    resolved = resolve(cfg, device, world_size)   # at build time, before any model exists
    log.info(resolved.line())                     # logged once; written to config.json and checkpoints

The rest of the engine reads the Resolved record, never the "auto" config values. Reference mode
(train.reference=true) is applied here: config.REFERENCE replaces the impl keys.

    field        values                            auto
    backend      local | ddp | deepspeed           from deepspeed.enabled and the world size
    loss         fused | reference                 fused (Triton) on CUDA when triton imports, else reference
    ema, clip    triton | cuda | foreach | loop    triton (flat buffers) on CUDA; under DeepSpeed cuda
                                                   (fastdino._C) when built, else foreach; foreach on CPU
    attn         a models.attention backend        the fastest fused kernel on CUDA (timed once), sdpa on CPU
    data         dali | torch                      dali when importable and on CUDA
    compile      off | blocks | step               model.compile -> blocks, train.compile_step -> step
    residual_norm  off | triton | torch            model.fused_residual_norm: the op's impl on this device
    bias_gelu    off | triton | torch              model.fused_bias_gelu: the op's impl on this device
    residual_dtype fp32 | bf16                     model.residual_dtype (fp32 in reference mode)
    tf32         bool                              train.allow_tf32, applied process-wide here
    cuda_graphs  bool                              train.cuda_graphs (CUDA, one process only)
    photometric  triton | torch                    data.photometric_impl: triton on CUDA
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from fastdino.config import REFERENCE, Config, ConfigError, with_overrides


@dataclass(frozen=True)
class Resolved:
    device: str
    backend: str  # local | ddp | deepspeed
    world_size: int
    precision: str  # fp32 | bf16 | fp16
    crops_dtype: str  # fp32 | bf16: the crops on the device
    loss: str  # fused | reference
    fused_head: bool
    ema: str  # triton | cuda | foreach | loop
    clip: str
    attn: str
    packed_multicrop: bool
    data: str  # dali | torch
    compile: str  # off | blocks | step
    residual_norm: str  # off | triton | torch: model.fused_residual_norm (the op's impl on this device)
    bias_gelu: str  # off | triton | torch: model.fused_bias_gelu (the op's impl on this device)
    residual_dtype: str  # fp32 | bf16: the blocks' residual stream under autocast
    tf32: bool  # train.allow_tf32: fp32 matmuls in TF32 (applied process-wide by resolve)
    reference: bool
    cuda_graphs: bool = False  # train.cuda_graphs: the step replayed from CUDA graphs (fastdino/cuda_graph.py)
    photometric: str = "torch"  # triton | torch: the crops' colour ops (kernels/photometric.py)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def line(self) -> str:
        return "resolved: " + ", ".join(f"{k}={v}" for k, v in self.to_dict().items())

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]


def effective_config(cfg: Config) -> Config:
    """The config the run builds from: with train.reference=true, config.REFERENCE replaces the impl
    keys (the models take their options from it; resolve records the result)."""
    return with_overrides(cfg, REFERENCE) if cfg.train.reference else cfg


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _block_op(on: bool, device: torch.device) -> str:
    """A fused block op's switch -> off, or the impl its "auto" runs here: triton on CUDA, torch elsewhere."""
    return ("triton" if device.type == "cuda" else "torch") if on else "off"


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_loss_impl(impl: str, device: torch.device) -> str:
    """loss.impl -> fused | reference for tensors on `device` (also used by the drop-in DINOLoss)."""
    device = torch.device(device)
    if impl == "auto":
        return "fused" if device.type == "cuda" and _triton_importable() else "reference"
    if impl == "fused":
        if not _triton_importable():
            raise ConfigError("config key 'loss.impl': 'fused' needs triton (pip install triton); use auto or reference")
        if device.type != "cuda" and not _interpreting():
            raise ConfigError(f"config key 'loss.impl': 'fused' needs CUDA (the device is {device}); use auto or "
                              "reference (tests interpret the kernels on CPU with TRITON_INTERPRET=1)")
    return impl


def _resolve_update_impl(key: str, impl: str, device: torch.device, deepspeed: bool) -> str:
    """optim.ema_impl / optim.clip_impl -> triton | cuda | foreach | loop."""
    from fastdino.multi_tensor import HAVE_C, WHY_NOT

    cuda = device.type == "cuda"
    if impl == "auto":
        if not cuda:
            return "foreach"
        if deepspeed:
            return "cuda" if HAVE_C else "foreach"
        return "triton" if _triton_importable() else "foreach"
    if impl == "triton":
        if deepspeed:
            raise ConfigError(f"config key '{key}': 'triton' runs on flat parameter buffers, which DeepSpeed's "
                              "parameters are not; use auto, cuda or foreach")
        if not _triton_importable() or not (cuda or _interpreting()):
            raise ConfigError(f"config key '{key}': 'triton' needs triton and CUDA (or TRITON_INTERPRET=1); "
                              "use auto or foreach")
    if impl == "cuda" and not (cuda and HAVE_C):
        raise ConfigError(f"config key '{key}': 'cuda' needs CUDA and the fastdino._C extension "
                          f"({WHY_NOT or 'no CUDA device'}); use auto or foreach")
    return impl


def crops_dtype(cfg: Config, device: torch.device) -> str:
    """data.dtype: auto -> bf16 when training in bf16 on a GPU, else fp32."""
    if cfg.data.dtype != "auto":
        return cfg.data.dtype
    return "bf16" if cfg.train.precision == "bf16" and device.type == "cuda" else "fp32"


def resolve(cfg: Config, device: torch.device, world_size: int = 1) -> Resolved:
    """The one place where "auto" is decided (see the module docstring). Raises ConfigError (one
    line) for a choice that cannot run here."""
    from fastdino.data import resolve_backend as resolve_data_backend
    from fastdino.data import resolve_photometric
    from fastdino.models import arch_spec, extra_tokens
    from fastdino.models.attention import resolve_backend as resolve_attention

    cfg = effective_config(cfg)
    device = torch.device(device)
    # a process-wide numerics setting of the recipe (not a fast path: reference mode keeps it), applied
    # here so that every choice below (the fused head's refusal, the Gram kernel's dots) sees it
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.allow_tf32
    m, ds = cfg.model, cfg.deepspeed.enabled
    spec = arch_spec(m.arch)
    dim, heads = spec["embed_dim"], spec["num_heads"]
    seq = (cfg.data.global_crop_size // m.patch_size) ** 2 + 1 + extra_tokens(m)  # `auto` times the global crop
    if ds and m.fused_head:
        raise ConfigError("config key 'model.fused_head': not supported with deepspeed.enabled yet "
                          "(set model.fused_head=false)")
    if m.fused_head and device.type == "cuda" and cfg.train.precision == "fp32" \
            and not torch.backends.cuda.matmul.allow_tf32:
        raise ConfigError("config key 'model.fused_head': with train.precision=fp32 its kernels use IEEE fp32 dots, "
                          "which spill 10-19 KB of registers per thread (~400x slower than bf16): use "
                          "train.precision=bf16 or set model.fused_head=false")
    if cfg.train.compile_step and world_size > 1:
        raise ConfigError("config key 'train.compile_step': one process only (DDP's gradient hooks are not "
                          "traced); use model.compile")
    if cfg.train.cuda_graphs and device.type != "cuda":
        raise ConfigError(f"config key 'train.cuda_graphs': needs a CUDA device (the device is {device}); "
                          "set train.cuda_graphs=false")
    if cfg.train.cuda_graphs and world_size > 1:
        raise ConfigError("config key 'train.cuda_graphs': one process only for now (DDP's gradient hooks are "
                          "not captured); set train.cuda_graphs=false")
    compile_mode = "step" if cfg.train.compile_step else ("blocks" if m.compile else "off")
    return Resolved(
        device=str(device),
        backend="deepspeed" if ds else ("ddp" if world_size > 1 else "local"),
        world_size=world_size,
        precision=cfg.train.precision,
        crops_dtype=crops_dtype(cfg, device),
        loss=resolve_loss_impl(cfg.loss.impl, device),
        fused_head=m.fused_head,
        ema=_resolve_update_impl("optim.ema_impl", cfg.optim.ema_impl, device, ds),
        clip=_resolve_update_impl("optim.clip_impl", cfg.optim.clip_impl, device, ds),
        attn=resolve_attention(m.attn, device.type, shape=(seq, heads, dim // heads)),
        packed_multicrop=m.packed_multicrop,
        data=resolve_data_backend(cfg.data.backend, device),
        compile=compile_mode,
        residual_norm=_block_op(m.fused_residual_norm, device),
        bias_gelu=_block_op(m.fused_bias_gelu, device),
        residual_dtype=m.residual_dtype,
        tf32=cfg.train.allow_tf32,
        reference=cfg.train.reference,
        cuda_graphs=cfg.train.cuda_graphs,
        photometric=resolve_photometric(cfg.data.photometric_impl, device),
    )
