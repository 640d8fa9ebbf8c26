"""DeepSpeed glue: the DINO step, teacher, checkpoints and export on a DeepSpeed engine.

    deepspeed --num_gpus 8 fastdino/train.py --config configs/vitb8.json      (deepspeed.enabled: true)

The DeepSpeed backend of the one training step (fastdino/step.py; the interface is described in
fastdino/backend.py). What DeepSpeed owns: the student's data-parallel gradient reduction, ZeRO
partitioning (stage 0-3, optional CPU offload), bf16/fp16 mixed precision with fp32 master weights,
the fp16 loss scale, and the optimizer/engine checkpoint. This file holds only that: the engines,
the ZeRO partitions and the reductions over them. The step, schedules, optimizer rule (DINOAdamW),
per-tensor clipping rule, EMA (TeacherEMA), bad-step bookkeeping and checkpoint entries are the
engine's, shared with the local backend.

The DeepSpeed dict is built from the config (`deepspeed_config`), so lr and batch size live in one
place: micro batch = optim.batch_size_per_gpu, bf16/fp16 = train.precision, zero_optimization =
deepspeed.zero_stage / offload_*, then deepspeed.extra merged last. DeepSpeed's own gradient_clipping
stays 0 (it clips the global norm; DINO clips each tensor).

Per-tensor clipping under ZeRO. DeepSpeed hands its "basic optimizer" (ZeroAdamW below) one flat fp32
tensor per param group: this rank's partition of the group, already reduced and unscaled. A
parameter's gradient may be split over ranks, so each rank sums the squares of its fragments, one
small all-reduce per group (a vector of n_params floats) gives every tensor's full norm, and each
fragment is scaled by min(1, clip / (norm + 1e-6)). Under stage 0 each tensor is whole: no
communication. The same norms give the finiteness flag that gates fused AdamW (found_inf) on the
device, as the single-process engine does.

Param groups (fastdino.optim.param_groups): one per (last layer, lr multiplier, wd multiplier), so
DeepSpeed makes one flat partition per group; DINOAdamW reads each group's multipliers from the group
itself (ZeRO-1/2 step the groups one at a time, ZeRO-3 one sub-group at a time). With layer-wise lr
decay there are about two groups per block, hence as many small clipping all-reduces per step.
Frozen last layer: every head's last layer is in param groups of its own, whose flat partitions
DINOAdamW skips on the device while epoch < optim.freeze_last_layer (no weight decay, no moment or
step-count update), exactly as the official cancel_gradients_last_layer.

Teacher. Stages 0-2: a plain fp32 module, replicated on every rank; the EMA reads the student's full
parameters, which ZeRO-1/2 all-gather after each step anyway: no extra communication. Under bf16 the
student's parameters are bf16 copies of the fp32 master, so the teacher is an fp32 EMA of bf16
values (its error stays within half a bf16 ulp of the student's; it does not accumulate). Stage 3:
the teacher is a second DeepSpeed engine (ZeRO-3, no optimizer, fp32), partitioned like the student
(same shapes, same world size: element i of a teacher shard is element i of the student shard), and
each rank updates its own shard (p.ds_tensor) with no gather; its forward gathers as ZeRO-3 does.

Mixed precision (bf16/fp16). DeepSpeed casts the student to the compute dtype (its fp32 master copy
lives in the optimizer) and its engine forward turns an enclosing torch.autocast OFF (unless the DS
dict has a torch_autocast section, which would keep fp32 weights: another memory model). Without
autocast a bf16 student breaks as soon as an fp32 tensor meets a bf16 weight: the drop-path scales
are fp32 by design, so the residual stream turns fp32 after the first block and the next LayerNorm
fails (mixed input/weight dtypes). The contract here is therefore the single-process engine's:
  - the student's and the teacher's forwards (the whole MultiCropWrapper call, packed multi-crop and
    activation checkpointing included) run under torch.autocast(device, precision dtype), entered by
    a forward pre-hook on each module, i.e. inside DeepSpeed's engine forward (`autocast_forward`);
    checkpointed blocks record that state and recompute under it in the backward;
  - crops come in any float dtype (the loader's bf16 or fp32): autocast casts them at the patch
    convolution, for the bf16 student and the fp32 teacher (stages 0-2) or fp32 ZeRO-3 teacher alike;
  - matmuls run in the precision dtype, LayerNorm / softmax in fp32 (autocast's fp32 list), the
    residual stream after a drop-path branch in fp32, as in the single-process engine;
  - the DINO loss runs outside autocast, in fp32 (it upcasts the bf16/fp16 logits itself).

Non-finite steps, as in the local backend (fastdino/step.py): a non-finite loss skips the update
(device flag), the EMA and the center. fp16: DeepSpeed's loss scaler skips overflowed steps itself
and backs off the scale; the EMA and the center still run and the run goes on, as the official loop.
Non-finite gradients under fp32/bf16 skip the update (device flag) and count as a bad step. One host
sync per step is added: reading DeepSpeed's own `overflow` flag after engine.step() (DeepSpeed
already synchronizes there for its overflow check, so this costs nothing extra).

Checkpoints: OUTPUT_DIR/deepspeed/<tag>/ holds DeepSpeed's engine checkpoint (model, ZeRO optimizer
shards) plus dino_rank<r>.pt per rank (teacher: full on rank 0 for stages 0-2, each rank's shard under
stage 3; rank 0 also the shared entries of fastdino.checkpoint.client_state; every rank its RNG). `latest` names the newest tag. Resuming needs the same
zero_stage and the same world size (stages 1-3 partition by world size); otherwise a one-line
CheckpointError says what differs. Each save also exports OUTPUT_DIR/consolidated.pth (full fp32
student and teacher, the engine's checkpoint.pth layout: readable by fastdino.eval) and
OUTPUT_DIR/teacher_backbone.pth / student_backbone.pth (plain ViT state dicts, standard key names).
"""
from __future__ import annotations

import copy
import logging
import os
import shutil

import torch
import torch.distributed as dist

from fastdino.checkpoint import CheckpointError, atomic_save, checkpoint_path, load_states
from fastdino.config import Config, ConfigError
from fastdino.kernels.clip_grad import clip_grad_foreach_
from fastdino.optim import DINOAdamW, describe_param_groups, param_groups
from fastdino.teacher import TeacherEMA

log = logging.getLogger("fastdino")

# Keys of the DeepSpeed dict that come from the fastdino config: setting them in deepspeed.extra
# would set the same thing in two places.
_OWNED_KEYS = {
    "train_micro_batch_size_per_gpu": "optim.batch_size_per_gpu",
    "train_batch_size": "optim.batch_size_per_gpu (x world size)",
    "gradient_accumulation_steps": "deepspeed.gradient_accumulation_steps",
    "optimizer": "optim.* (fastdino builds the optimizer)",
    "scheduler": "optim.* (fastdino applies the DINO schedules each step)",
    "gradient_clipping": "optim.clip_grad (per-tensor clipping)",
    "bf16": "train.precision",
    "fp16": "train.precision",
}


def import_deepspeed(device_type: str):
    """Import deepspeed; on a machine without CUDA select its CPU accelerator (gloo)."""
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError(f"config key 'deepspeed.enabled': true needs the deepspeed package ({e}); "
                          "pip install deepspeed, or set deepspeed.enabled=false") from None
    return deepspeed


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def deepspeed_config(cfg: Config) -> dict:
    """The dict passed to deepspeed.initialize, built from the fastdino config."""
    ds, prec = cfg.deepspeed, cfg.train.precision
    for key in ds.extra:
        if key in _OWNED_KEYS:
            raise ConfigError(f"config key 'deepspeed.extra.{key}': set by fastdino from {_OWNED_KEYS[key]}; "
                              "remove it from deepspeed.extra")
    if ds.offload_optimizer and ds.zero_stage == 0:
        raise ConfigError("config key 'deepspeed.offload_optimizer': needs deepspeed.zero_stage 1, 2 or 3, got 0")
    if ds.offload_param and ds.zero_stage != 3:
        raise ConfigError(f"config key 'deepspeed.offload_param': needs deepspeed.zero_stage 3, got {ds.zero_stage}")
    zero = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    base = {
        "train_micro_batch_size_per_gpu": cfg.optim.batch_size_per_gpu,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "gradient_clipping": 0.0,  # global-norm clipping off: DINOAdamW clips each tensor
        "bf16": {"enabled": prec == "bf16"},
        "fp16": {"enabled": prec == "fp16", "loss_scale": 0, "initial_scale_power": 16},  # dynamic scale
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # DINOAdamW: torch AdamW plus per-tensor clipping
        "zero_force_ds_cpu_optimizer": False,  # offload runs torch's AdamW on the CPU partitions
        "steps_per_print": 2 ** 31 - 1,  # fastdino logs
        "wall_clock_breakdown": False,
    }
    return _merge(base, ds.extra)


def teacher_deepspeed_config(ds_dict: dict) -> dict:
    """ZeRO-3 engine for the teacher: no optimizer, fp32 weights (the EMA needs fp32), partitioned
    like the student; no persistent (replicated) parameters, so every weight lives in its shard and
    the EMA of the shards is the whole update."""
    zero = {k: v for k, v in ds_dict.get("zero_optimization", {}).items() if k != "offload_optimizer"}
    zero.update(stage=3, stage3_param_persistence_threshold=0)
    return {"train_micro_batch_size_per_gpu": ds_dict["train_micro_batch_size_per_gpu"],
            "gradient_accumulation_steps": ds_dict["gradient_accumulation_steps"],
            "zero_optimization": zero, "steps_per_print": 2 ** 31 - 1}


class _Segments:
    """Where this rank's fragments of a group's parameters lie in a flat fp32 tensor:
    fragment j is flat[start_j : start_j + length_j] and belongs to parameter index[j] of the group
    (n parameters in the group, the same list on every rank)."""

    def __init__(self, index: list[int], starts: list[int], lengths: list[int], n: int, pg=None, group: int = 0,
                 fp32: torch.Tensor | None = None, params: list | None = None):
        self.index, self.starts, self.lengths, self.n, self.pg = index, starts, lengths, n, pg
        self.group, self.fp32, self.params = group, fp32, params  # DeepSpeed's group (sub-group) number
        self._index_t = {}
        self.module_index = None  # per_module clipping: the module of each fragment (ZeroAdamW._seg_modules)

    def index_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._index_t:
            self._index_t[device] = torch.tensor(self.index, dtype=torch.long, device=device)
        return self._index_t[device]


def _fragments(offset: int, numel: int, lo: int, hi: int):
    """Overlap of [offset, offset+numel) with the partition [lo, hi), relative to lo (or None)."""
    a, b = max(offset, lo), min(offset + numel, hi)
    return (a - lo, b - a) if b > a else None


def build_layout(zero_optimizer, stage: int) -> dict[int, _Segments]:
    """id(flat fp32 tensor) -> _Segments, read from DeepSpeed's ZeRO optimizer once after
    initialize (the flat tensors live as long as the engine). Stage 0 needs none."""
    layout = {}
    if stage in (1, 2):
        for i, flat in enumerate(zero_optimizer.bit16_groups_flat):
            params = zero_optimizer.bit16_groups[i]
            pg = zero_optimizer.real_dp_process_group[i]
            size = int(zero_optimizer.partition_size[i])
            lo = dist.get_rank(group=pg) * size
            index, starts, lengths = [], [], []
            for k, p in enumerate(params):  # p.data is a view into the group's flat bit16 buffer
                offset = (p.data_ptr() - flat.data_ptr()) // p.element_size()
                if not 0 <= offset <= flat.numel() - p.numel():
                    raise RuntimeError("fastdino.ds: DeepSpeed ZeRO-1/2 parameter is not a view of its flat "
                                       "group buffer (unsupported DeepSpeed version?)")
                frag = _fragments(offset, p.numel(), lo, lo + size)
                if frag:
                    index.append(k), starts.append(frag[0]), lengths.append(frag[1])
            fp32 = zero_optimizer.single_partition_of_fp32_groups[i]
            layout[id(fp32)] = _Segments(index, starts, lengths, len(params), pg, i, fp32, params)
    elif stage == 3:
        for sg, params in enumerate(zero_optimizer.fp16_groups):
            fp32 = zero_optimizer.fp32_partitioned_groups_flat[sg]
            index, starts, lengths, offset = [], [], [], 0
            for k, p in enumerate(params):  # shards of the sub-group, concatenated in order
                n = p.partition_numel()
                index.append(k), starts.append(offset), lengths.append(n)
                offset += n
            if offset != fp32.numel():
                raise RuntimeError(f"fastdino.ds: ZeRO-3 sub-group {sg} holds {fp32.numel()} elements, its "
                                   f"parameter shards {offset} (unsupported DeepSpeed version?)")
            layout[id(fp32)] = _Segments(index, starts, lengths, len(params), zero_optimizer.sub_group_process_groups[sg],
                                         sg, fp32, params)
    return layout


class ZeroAdamW(DINOAdamW):
    """DINOAdamW as DeepSpeed's basic optimizer: before each update, clipping of whatever tensors
    DeepSpeed hands it (whole parameters under stage 0, flat ZeRO partitions otherwise; see the module
    docstring), per tensor or per student submodule (clip_mode), and non-finite gradients turn the
    skip flag on (on the device). `grads_bad` gathers that flag over the step() calls of one engine
    step (DeepSpeed calls step once per group or sub-group); the backend calls begin_step() before
    engine.step().

    per_module under ZeRO-1/2/3: a module's norm spans groups, and DeepSpeed hands over one group at a
    time, updating it before it flattens the next one's gradients. So the first step() call of an
    engine step reads every group's gradient partition where DeepSpeed holds it at that moment (the
    handed group's .grad; the others' flat fp32 .grad under CPU offload, else DeepSpeed's
    averaged_gradients, still loss-scaled under fp16), sums each module's squared fragment norms and
    all-reduces them once (a vector of n_modules floats); every call then scales its fragments by
    their module's factor."""

    def __init__(self, groups: list[dict], clip: float, clip_mode: str = "per_tensor", freeze_mode: str = "skip",
                 beta2: float = 0.999):
        from fastdino.clip import MODES

        if clip_mode not in MODES:
            raise ValueError(f"ZeroAdamW: clip_mode={clip_mode!r} is not one of {list(MODES)}")
        super().__init__(groups, static_state=False, freeze_mode=freeze_mode, beta2=beta2)  # ZeRO swaps the groups' parameters
        self.clip, self.clip_mode = clip, clip_mode
        self.layout: dict[int, _Segments] = {}  # filled after deepspeed.initialize (stages 1-3)
        self.grads_bad: torch.Tensor | None = None
        self.comm_device = torch.device("cpu")
        self.zero_optimizer, self.stage = None, 0  # set by bind(): the layout is read from them
        self.modules: list[str] = []  # per_module: the student's submodules, and each parameter's (by id)
        self._param_module: dict[int, int] = {}
        self._coefs: torch.Tensor | None = None  # per_module: this engine step's module factors, (M,) fp32
        self._coefs_bad: torch.Tensor | None = None

    def bind(self, zero_optimizer, stage: int, student: torch.nn.Module | None = None) -> None:
        """After deepspeed.initialize: DeepSpeed's optimizer (the ZeRO layout is read from it) and, for
        per_module clipping, the student (a MultiCropWrapper: its parameters' submodules)."""
        from fastdino.clip import module_of

        self.zero_optimizer, self.stage = zero_optimizer, stage
        if student is not None:
            named = list(student.named_parameters())
            self.modules, of = module_of([n for n, _ in named])
            self._param_module = {id(p): m for (_, p), m in zip(named, of)}
        elif self.clip_mode == "per_module":
            raise ValueError("ZeroAdamW.bind: per_module clipping needs the student module")
        self.layout = build_layout(zero_optimizer, stage) if stage > 0 else {}

    def begin_step(self) -> None:
        """Before engine.step(): forget the last engine step's flags and module factors."""
        self.grads_bad, self._coefs, self._coefs_bad = None, None, None

    def _segments(self, tensors: list[torch.Tensor]) -> list:
        if self.stage == 0:
            return [None] * len(tensors)
        if any(id(p) not in self.layout for p in tensors):  # DeepSpeed swapped its flat tensors (load)
            self.layout = build_layout(self.zero_optimizer, self.stage)
        missing = [tuple(p.shape) for p in tensors if id(p) not in self.layout]
        if missing:
            raise RuntimeError(f"fastdino.ds: ZeRO-{self.stage} handed the optimizer tensors {missing} that are "
                               "not flat partitions of its groups (unsupported DeepSpeed version?)")
        return [self.layout[id(p)] for p in tensors]

    @torch.no_grad()
    def _check_and_clip(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Clip each parameter's gradient to self.clip (if > 0); returns a 0-dim float, 1 if any
        gradient is non-finite (on any rank)."""
        if self.clip_mode == "per_module" and self.clip > 0:
            return self._clip_per_module(tensors)
        device = tensors[0].grad.device
        bad = torch.zeros((), device=device)
        segs = self._segments(tensors)
        if self.stage == 0:  # stage 0: whole tensors, gradients already all-reduced by DeepSpeed
            norms = clip_grad_foreach_([p.grad for p in tensors], self.clip if self.clip > 0 else float("inf"))
            return (~torch.isfinite(norms).all()).float()
        for p, seg in zip(tensors, segs):  # ZeRO: fragments of parameters, norms summed over ranks
            g = p.grad
            views = [g.narrow(0, s, n) for s, n in zip(seg.starts, seg.lengths)]
            sums = torch.zeros(seg.n + 1, dtype=torch.float32, device=g.device)
            if views:
                sq = torch.stack(torch._foreach_norm(views)).float().square()
                sums[:seg.n].index_add_(0, seg.index_on(g.device), sq)
            sums[seg.n] = bad
            sums = sums.to(self.comm_device)
            dist.all_reduce(sums, group=seg.pg)  # one small all-reduce per group and step
            sums = sums.to(g.device)
            norms = sums[:seg.n].sqrt()
            bad = ((sums[seg.n] > 0) | ~torch.isfinite(norms).all()).float()
            if self.clip > 0 and views:
                coefs = (self.clip / (norms + 1e-6)).clamp_max(1.0)[seg.index_on(g.device)]
                torch._foreach_mul_(views, list(coefs.to(g.dtype).unbind()))
        return bad

    # ---- per_module clipping ---------------------------------------------------------------------
    def _module_tensors(self, modules: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, n) bool mask and (n,) long index of the modules of n tensors or fragments."""
        index = torch.tensor(modules, dtype=torch.long)
        mask = torch.zeros(len(self.modules), len(modules), dtype=torch.bool)
        mask[index, torch.arange(len(modules))] = True
        return mask.to(device), index.to(device)

    def _seg_modules(self, seg: _Segments, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The module mask and index of a group's fragments on `device` (made once per layout)."""
        cache = seg.__dict__.setdefault("_module_t", {})
        if device not in cache:
            try:
                seg.module_index = [self._param_module[id(seg.params[k])] for k in seg.index]
            except (KeyError, TypeError):
                raise RuntimeError("fastdino.ds: a ZeRO group holds a parameter that is not the student's "
                                   "(unsupported DeepSpeed version?)") from None
            cache[device] = self._module_tensors(seg.module_index, device)
        return cache[device]

    def _pending_grad(self, seg: _Segments) -> torch.Tensor:
        """The flat gradient partition of a group DeepSpeed has not handed over yet (class docstring)."""
        if seg.fp32 is not None and seg.fp32.grad is not None:  # CPU offload: flat fp32 grads of every group
            return seg.fp32.grad
        grads = getattr(self.zero_optimizer, "averaged_gradients", None)
        try:
            grads = grads[seg.group]
        except (TypeError, KeyError, IndexError):
            grads = None
        if grads is None:
            raise RuntimeError(f"fastdino.ds: per_module clipping found no gradients of ZeRO-{self.stage} group "
                               f"{seg.group} before its update (unsupported DeepSpeed version?)")
        flat = getattr(grads, "flat_partition", None)
        if flat is not None:
            return flat.view(-1)
        if torch.is_tensor(grads):
            return grads.view(-1)
        parts = [g.reshape(-1) for g in grads]  # DeepSpeed flattens this list the same way into the partition
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _module_factors(self, tensors: list[torch.Tensor]) -> None:
        """This engine step's module factors (self._coefs) and non-finite flag, from every group's
        gradients (the first step() call of the engine step)."""
        device = tensors[0].grad.device
        partial: list[list] = []  # [process group, (M,) squared norms] per distinct process group
        if self.stage == 0:  # whole tensors, every group in this one call, gradients already all-reduced
            key = tuple(id(p) for p in tensors)
            if getattr(self, "_stage0", (None,))[0] != key:
                unknown = [tuple(p.shape) for p in tensors if id(p) not in self._param_module]
                if unknown:
                    raise RuntimeError(f"fastdino.ds: per_module clipping under ZeRO-0 got tensors {unknown[:3]} that "
                                       "are not the student's parameters (DeepSpeed's bf16/fp16 ZeRO-0 optimizer "
                                       "flattens its groups): use deepspeed.zero_stage >= 1, train.precision=fp32 or "
                                       "optim.clip_grad_mode=per_tensor")
                self._stage0 = (key, *self._module_tensors([self._param_module[k] for k in key], device))
            norms = torch.stack(torch._foreach_norm([p.grad for p in tensors], 2, dtype=torch.float32))
            partial.append([None, torch.where(self._stage0[1], norms.square(), 0.0).sum(1)])
        else:
            self._segments(tensors)  # the layout again if DeepSpeed swapped its flat tensors (a load)
            handed = {id(p) for p in tensors}
            scale = float(getattr(self.zero_optimizer, "loss_scale", 1.0) or 1.0)
            for seg in {id(x): x for x in self.layout.values()}.values():
                if not seg.index:
                    continue
                mask, _ = self._seg_modules(seg, device)
                now = seg.fp32 is not None and id(seg.fp32) in handed
                g = seg.fp32.grad if now else self._pending_grad(seg)
                if g.numel() < max(a + n for a, n in zip(seg.starts, seg.lengths)):
                    raise RuntimeError(f"fastdino.ds: ZeRO-{self.stage} group {seg.group}'s gradients hold {g.numel()} "
                                       "elements, fewer than its layout (unsupported DeepSpeed version?)")
                views = [g.narrow(0, a, n) for a, n in zip(seg.starts, seg.lengths)]
                sq = torch.stack(torch._foreach_norm(views, 2, dtype=torch.float32)).to(device).square()
                if not now and scale != 1.0:  # fp16: DeepSpeed unscales a group just before its update
                    sq = sq / (scale * scale)
                sums = torch.where(mask, sq, 0.0).sum(1)
                for entry in partial:
                    if entry[0] is seg.pg:
                        entry[1] = entry[1] + sums
                        break
                else:
                    partial.append([seg.pg, sums])
        total = torch.zeros(len(self.modules), dtype=torch.float32, device=device)
        for pg, sums in partial:
            if self.stage > 0:  # each rank holds fragments: one small all-reduce per engine step
                sums = sums.to(self.comm_device)
                dist.all_reduce(sums, group=pg)
                sums = sums.to(device)
            total = total + sums
        from fastdino.clip import EPS

        coefs = self.clip / (total.sqrt() + EPS)
        self._coefs = torch.where(coefs < 1, coefs, torch.ones_like(coefs))  # non-finite: 1, the step is skipped
        self._coefs_bad = (~torch.isfinite(total).all()).float()

    def _clip_per_module(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Scale the handed tensors' gradients by their modules' factors; returns the non-finite flag."""
        if self._coefs is None:
            self._module_factors(tensors)
        coefs = self._coefs
        if self.stage == 0:
            grads = [p.grad for p in tensors]
            torch._foreach_mul_(grads, list(coefs[self._stage0[2]].unbind()))
            return self._coefs_bad
        for p, seg in zip(tensors, self._segments(tensors)):
            if not seg.index:
                continue
            g = p.grad
            _, index = self._seg_modules(seg, coefs.device)
            views = [g.narrow(0, a, n) for a, n in zip(seg.starts, seg.lengths)]
            torch._foreach_mul_(views, list(coefs[index].to(g.device, g.dtype).unbind()))
        return self._coefs_bad

    @torch.no_grad()
    def step(self, closure=None):
        active = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not active:
            return None
        bad = self._check_and_clip(active)
        self.grads_bad = bad if self.grads_bad is None else torch.maximum(self.grads_bad, bad.to(self.grads_bad.device))
        lr, wd, skip, frozen = self.inputs
        self.inputs = (lr, wd, torch.maximum(skip, bad.to(skip.device)), frozen)
        try:
            return super().step()
        finally:
            self.inputs = (lr, wd, skip, frozen)


def autocast_forward(module: torch.nn.Module, device_type: str, dtype: torch.dtype) -> list:
    """Run every forward of `module` (its __call__, submodules and activation-checkpoint recomputes
    included) under torch.autocast(device_type, dtype), whatever autocast state the caller is in:
    DeepSpeed's engine forward disables an enclosing autocast, and this enters it again inside. A
    pre-hook enters the context, an always-called forward hook leaves it (also when the forward
    raises); torch.utils.checkpoint records the state at the forward and recomputes under it.

    CUDA autocast runs layer_norm in fp32 (input, weight and bias cast up), so a bf16 LayerNorm
    takes the fp32 residual stream. CPU autocast has no rule for layer_norm, and CPU layer_norm
    refuses fp32 input with bf16/fp16 weights: on other devices than CUDA, each LayerNorm whose
    weight is bf16/fp16 gets its input cast to that dtype instead (bf16 in and out, fp32 inside).
    Returns the hook handles (handle.remove() undoes it)."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast_forward: dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    active: list = []  # a stack: one context per call in flight

    def enter(mod, args):
        ctx = torch.autocast(device_type, dtype=dtype, enabled=True)
        ctx.__enter__()
        active.append(ctx)

    def leave(mod, args, output):
        if active:
            active.pop().__exit__(None, None, None)

    def norm_input_to_weight_dtype(norm, args):  # dtypes read at call time: DeepSpeed casts after this
        x, w = args[0], norm.weight
        low = w is not None and w.dtype in (torch.bfloat16, torch.float16)
        if low and x.is_floating_point() and x.dtype != w.dtype:
            return (x.to(w.dtype),) + tuple(args[1:])
        return None

    handles = [module.register_forward_pre_hook(enter, prepend=True),
               module.register_forward_hook(leave, always_call=True)]
    if device_type != "cuda":
        handles += [m.register_forward_pre_hook(norm_input_to_weight_dtype)
                    for m in module.modules() if isinstance(m, torch.nn.LayerNorm)]
    return handles


def _init_single_process(device: torch.device) -> None:
    import socket

    with socket.socket() as sock:  # a free local port for the one-process rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"),
                       ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)


def _zero3_params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.ds_tensor for p in module.parameters()]


class DeepSpeedBackend:
    """The backend interface of fastdino/backend.py on DeepSpeed engines (resolved.backend "deepspeed")."""

    def __init__(self, cfg, resolved, ctx, student_module, teacher_module):
        self.cfg, self.ctx = cfg, ctx
        deepspeed = import_deepspeed(ctx.device.type)
        self.deepspeed, self.stage = deepspeed, cfg.deepspeed.zero_stage
        if not dist.is_initialized():  # plain `python` (no launcher): a one-process group for DeepSpeed
            _init_single_process(ctx.device)
        self.ds_config = deepspeed_config(cfg)
        if ctx.distributed:  # the teacher starts as rank 0's student on every rank (DeepSpeed
            for tensor in list(teacher_module.parameters()) + list(teacher_module.buffers()):  # broadcasts the student)
                dist.broadcast(tensor.data, 0)
        self.student_module, self.teacher_module = student_module, teacher_module
        self.ema_impl = resolved.ema
        # bf16/fp16: both forwards under autocast, inside DeepSpeed's engine forward (module docstring)
        self.autocast_hooks = []
        if resolved.autocast_dtype is not None:
            for module in (student_module, teacher_module):
                self.autocast_hooks += autocast_forward(module, ctx.device.type, resolved.autocast_dtype)
        o = cfg.optim  # groups by (last layer, lr multiplier, wd multiplier): fastdino/optim.py
        self.basic = ZeroAdamW(param_groups(student_module, o.layerwise_decay, o.patch_embed_lr_mult), o.clip_grad,
                               clip_mode=o.clip_grad_mode, freeze_mode=o.freeze_last_layer_mode, beta2=o.adamw_beta2)
        if ctx.is_main:
            log.info(describe_param_groups(self.basic.param_groups))
        engine, _, _, _ = deepspeed.initialize(model=student_module, optimizer=self.basic, config=self.ds_config)
        self.engine = self.student = engine
        self.optimizer = engine.optimizer
        self.basic.comm_device = ctx.device
        self.basic.bind(engine.optimizer, self.stage, student_module)
        self.teacher_engine = None
        if self.stage == 3:
            self.teacher_engine, _, _, _ = deepspeed.initialize(model=teacher_module,
                                                                config=teacher_deepspeed_config(self.ds_config))
            s_shards, t_shards = _zero3_params(student_module), _zero3_params(teacher_module)
            if [s.numel() for s in s_shards] != [x.numel() for x in t_shards]:
                raise RuntimeError("fastdino.ds: student and teacher are not partitioned alike under ZeRO-3")
        else:
            self.ema = TeacherEMA(list(teacher_module.parameters()), list(student_module.parameters()), self.ema_impl)
        self.teacher = self.teacher_engine if self.teacher_engine is not None else teacher_module
        self.fp16 = resolved.precision == "fp16"
        if ctx.is_main:
            log.info("deepspeed: ZeRO-%d, %s, micro batch %d x %d ranks, offload optimizer %s / params %s",
                     self.stage, cfg.train.precision, cfg.optim.batch_size_per_gpu, ctx.world_size,
                     cfg.deepspeed.offload_optimizer, cfg.deepspeed.offload_param)

    # ---- the step ------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        pass  # DeepSpeed zeroes its gradient partitions after each engine step

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # reduce-scatter (ZeRO) / all-reduce, loss scale under fp16

    def step(self, lr, wd, skip, last_layer_frozen) -> torch.Tensor:
        self.basic.set_inputs(lr, wd, skip.float(), last_layer_frozen)
        self.basic.begin_step()
        self.engine.step()  # ZeroAdamW: clipping (optim.clip_grad_mode), then AdamW (skipped on device where told)
        overflow = bool(getattr(self.engine.optimizer, "overflow", False))  # a host flag DeepSpeed already read
        grads_bad = torch.zeros((), dtype=torch.bool, device=skip.device)
        if self.basic.grads_bad is not None:
            grads_bad = grads_bad | (self.basic.grads_bad.to(skip.device) > 0)
        return grads_bad | overflow  # fp16: DeepSpeed's loss scaler skipped the step and backed off

    @torch.no_grad()
    def ema_(self, momentum: torch.Tensor) -> None:
        if self.teacher_engine is not None:  # ZeRO-3: each rank updates its own shard, no gather
            self.teacher_engine.optimizer.partition_all_parameters()  # next forward re-gathers the shards
            TeacherEMA(_zero3_params(self.teacher_module), _zero3_params(self.student_module),
                       self.ema_impl).step_(momentum.to(self.ctx.device))
        else:
            self.ema.step_(momentum)

    def all_reduce_(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return x

    # ---- checkpoints and export ----------------------------------------------------------------
    def checkpoint_path(self, output_dir: str) -> str:
        return checkpoint_path(output_dir, "deepspeed")

    def save(self, client: dict, output_dir: str, keep_as: str | None = None) -> None:
        """Every rank calls this: OUTPUT_DIR/deepspeed/<tag>/ (DeepSpeed's shards, dino_rank<r>.pt),
        then the exports. keep_as: also keep this tag when later ones are written."""
        root, ctx = self.checkpoint_path(output_dir), self.ctx
        tag = f"{'keep-' if keep_as else ''}step{client['step']:09d}"
        os.makedirs(os.path.join(root, tag), exist_ok=True)
        state = {"rng": client["rng"], "rank": ctx.rank}
        if ctx.is_main:
            state.update({k: v for k, v in client.items() if k != "rng"}, zero_stage=self.stage,
                         world_size=ctx.world_size)
        if self.stage == 3:
            state["teacher_shards"] = [x.detach().cpu().clone() for x in _zero3_params(self.teacher_module)]
        elif ctx.is_main:
            state["teacher"] = self.teacher_module.state_dict()
        atomic_save(state, os.path.join(root, tag, f"dino_rank{ctx.rank}.pt"))
        # DeepSpeed writes model + optimizer shards, then `latest` (after our files exist)
        self.engine.save_checkpoint(root, tag=tag, client_state={"fastdino_step": client["step"]})
        self.export(client, output_dir)
        if dist.is_initialized():
            dist.barrier()
        if ctx.is_main:  # older tags go once the new one is complete
            for name in os.listdir(root):
                if name.startswith("step") and name != tag and os.path.isdir(os.path.join(root, name)):
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)

    def resume(self, resume: str, output_dir: str) -> dict | None:
        """resume: 'auto' (OUTPUT_DIR/deepspeed, latest tag; None when there is none) or a deepspeed
        checkpoint folder (optionally a tag folder inside it). Loads the engines and the teacher;
        returns rank 0's entries with this rank's RNG states."""
        ctx = self.ctx
        root, tag = (self.checkpoint_path(output_dir), None) if resume == "auto" else (resume.rstrip("/"), None)
        if os.path.isfile(os.path.join(root, "dino_rank0.pt")):  # a tag folder was given
            root, tag = os.path.dirname(root), os.path.basename(root)
        latest = os.path.join(root, "latest")
        if tag is None:
            if not os.path.isfile(latest):
                if resume == "auto":
                    return None
                raise CheckpointError(f"checkpoint '{resume}': no DeepSpeed checkpoint there (no 'latest' file)")
            with open(latest) as f:
                tag = f.read().strip()
        folder = os.path.join(root, tag)
        main_file = os.path.join(folder, "dino_rank0.pt")
        if not os.path.isfile(main_file):
            raise CheckpointError(f"checkpoint '{folder}': missing dino_rank0.pt (not a fastdino DeepSpeed checkpoint)")
        main = torch.load(main_file, map_location="cpu", weights_only=False)
        if main.get("zero_stage") != self.stage or main.get("world_size") != ctx.world_size:
            raise CheckpointError(
                f"checkpoint '{folder}' was written with ZeRO-{main.get('zero_stage')} on {main.get('world_size')} "
                f"ranks; this run is ZeRO-{self.stage} on {ctx.world_size} ranks: resume with the same "
                f"deepspeed.zero_stage and number of processes (or start a new run from "
                f"{os.path.join(output_dir, 'consolidated.pth')})")
        own = main if ctx.rank == 0 else torch.load(os.path.join(folder, f"dino_rank{ctx.rank}.pt"),
                                                    map_location="cpu", weights_only=False)
        path, _ = self.engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"checkpoint '{folder}': DeepSpeed could not load it")
        if self.stage == 3:
            try:
                for x, saved in zip(_zero3_params(self.teacher_module), own["teacher_shards"], strict=True):
                    x.data.copy_(saved)
            except (KeyError, RuntimeError, ValueError) as e:
                raise CheckpointError(f"checkpoint '{folder}' does not match this config ({e})")
        else:
            load_states([("teacher", self.teacher_module, main.get("teacher"))], folder)
        return {**main, "rng": own["rng"], "path": folder}

    def _full_state(self, module: torch.nn.Module) -> dict:
        """fp32 state dict of the whole module; under ZeRO-3 the shards are gathered (all ranks)."""
        if self.stage == 3:
            with self.deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}

    def teacher_backbone_state(self) -> dict:
        """The EMA teacher's backbone weights, fp32 on the CPU (ZeRO-3: gathered; every rank calls it)."""
        return self._full_state(self.teacher_module.backbone)

    def export(self, client: dict, output_dir: str) -> None:
        """OUTPUT_DIR/consolidated.pth and {teacher,student}_backbone.pth (all ranks call it)."""
        student, teacher = self._full_state(self.student_module), self._full_state(self.teacher_module)
        if not self.ctx.is_main:
            return
        atomic_save({"student": student, "teacher": teacher, "config": client["config"], "epoch": client["epoch"],
                     "step": client["step"]}, os.path.join(output_dir, "consolidated.pth"))
        for which, sd in (("teacher", teacher), ("student", student)):
            backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
            atomic_save(backbone, os.path.join(output_dir, f"{which}_backbone.pth"))
