"""DeepSpeed glue: the DINO step, teacher, checkpoints and export on a DeepSpeed engine.

    deepspeed --num_gpus 8 fastdino/train.py --config configs/vitb8.json      (deepspeed.enabled: true)

What DeepSpeed owns: the student's data-parallel gradient reduction, ZeRO partitioning (stage 0-3,
optional CPU offload), bf16/fp16 mixed precision with fp32 master weights, the fp16 loss scale, and
the optimizer/engine checkpoint. What stays DINO's (applied every step, as in the single-process
engine): the lr / weight-decay / teacher-momentum schedules, per-tensor gradient clipping, the frozen
last layer, the teacher EMA and the center.

The DeepSpeed dict is built from the config (`deepspeed_config`), so lr and batch size live in one
place: micro batch = optim.batch_size_per_gpu, bf16/fp16 = train.precision, zero_optimization =
deepspeed.zero_stage / offload_*, then deepspeed.extra merged last. DeepSpeed's own gradient_clipping
stays 0 (it clips the global norm; DINO clips each tensor).

Per-tensor clipping under ZeRO. DeepSpeed hands its "basic optimizer" (DINOAdamW below) one flat fp32
tensor per param group: this rank's partition of the group, already reduced and unscaled. A
parameter's gradient may be split over ranks, so each rank sums the squares of its fragments, one
small all-reduce per group (a vector of n_params floats) gives every tensor's full norm, and each
fragment is scaled by min(1, clip / (norm + 1e-6)). Under stage 0 each tensor is whole: no
communication. The same norms give the finiteness flag that gates fused AdamW (found_inf) on the
device, as the single-process engine does.

Frozen last layer: the head's last layer is a param group of its own ("last_layer"), whose flat
tensor gets no gradient (grad None, so AdamW skips it: no weight decay, no moment or step-count
update) while epoch < optim.freeze_last_layer, exactly as the official cancel_gradients_last_layer.

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

Non-finite steps. fp16: DeepSpeed's loss scaler skips overflowed steps itself (not counted as bad
steps; the teacher EMA is skipped too). A non-finite loss or gradient under fp32/bf16 sets the
found_inf flag on the device (no update of that group, teacher momentum 1, center kept) and counts
as a bad step (the training loop stops at the next log step, as without DeepSpeed). One host sync
per step is added: reading DeepSpeed's own `overflow` flag after engine.step() (DeepSpeed already
synchronizes there for its overflow check, so this costs nothing extra).

Checkpoints: OUTPUT_DIR/deepspeed/<tag>/ holds DeepSpeed's engine checkpoint (model, ZeRO optimizer
shards) plus dino_rank<r>.pt per rank (teacher: full on rank 0 for stages 0-2, each rank's shard under
stage 3; center, epoch/step, config, rng). `latest` names the newest tag. Resuming needs the same
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

from fastdino.checkpoint import CheckpointError, atomic_save, rng_state, set_rng_state
from fastdino.config import Config, ConfigError
from fastdino.teacher import ema_update_foreach

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
    if cfg.optim.optimizer != "adamw":
        raise ConfigError(f"config key 'optim.optimizer': {cfg.optim.optimizer!r} is not supported with "
                          "deepspeed.enabled (use adamw)")
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


def param_groups(student_module: torch.nn.Module) -> list[dict]:
    """The student's groups for DeepSpeed: weights (decayed), biases/norms (not decayed), and the
    head's last layer in groups of its own so it can be frozen as a whole flat partition. Same
    decay rule as fastdino.optim.get_params_groups."""
    last = {id(p) for p in student_module.head.last_layer.parameters()}
    buckets: dict = {}
    for name, p in student_module.named_parameters():
        if not p.requires_grad:
            continue
        regularized = not (name.endswith(".bias") or p.ndim <= 1)
        buckets.setdefault((id(p) in last, regularized), []).append(p)
    groups = []
    for is_last, regularized in ((False, True), (False, False), (True, True), (True, False)):
        params = buckets.get((is_last, regularized))
        if params:
            group = {"params": params, "regularized": regularized, "last_layer": is_last}
            if not regularized:
                group["weight_decay"] = 0.0
            groups.append(group)
    return groups


def set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("regularized"):
            group["weight_decay"] = wd


class _Segments:
    """Where this rank's fragments of a group's parameters lie in a flat fp32 tensor:
    fragment j is flat[start_j : start_j + length_j] and belongs to parameter index[j] of the group
    (n parameters in the group, the same list on every rank)."""

    def __init__(self, index: list[int], starts: list[int], lengths: list[int], n: int, pg=None):
        self.index, self.starts, self.lengths, self.n, self.pg = index, starts, lengths, n, pg
        self._index_t = {}

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
            layout[id(fp32)] = _Segments(index, starts, lengths, len(params), pg)
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
            layout[id(fp32)] = _Segments(index, starts, lengths, len(params), zero_optimizer.sub_group_process_groups[sg])
    return layout


class DINOAdamW(torch.optim.AdamW):
    """torch's fused AdamW as DeepSpeed's basic optimizer, plus what DINO does before each update:
    per-tensor clipping on whatever tensors DeepSpeed hands it (whole parameters under stage 0, flat
    ZeRO partitions otherwise; see the module docstring), the frozen last layer, and a device
    found_inf flag (non-finite loss or gradient) that makes fused AdamW skip the update."""

    def __init__(self, groups: list[dict], fused: bool = True):
        super().__init__(groups, lr=0.0, fused=fused)
        self.layout: dict[int, _Segments] = {}  # filled after deepspeed.initialize (stages 1-3)
        self.clip = 0.0
        self.freeze_last_layer = False
        self.loss_bad: torch.Tensor | None = None  # this rank's loss is non-finite (0-dim float)
        self.any_bad: torch.Tensor | None = None  # set by step(): some group found non-finite values
        self.comm_device = torch.device("cpu")
        self.zero_optimizer, self.stage = None, 0  # set by DeepSpeedRun: the layout is read from them

    def bind(self, zero_optimizer, stage: int) -> None:
        self.zero_optimizer, self.stage = zero_optimizer, stage
        self.layout = build_layout(zero_optimizer, stage) if stage > 0 else {}

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
        gradient (or the loss) is non-finite."""
        device = tensors[0].grad.device
        bad = self.loss_bad.to(device) if self.loss_bad is not None else torch.zeros((), device=device)
        segs = self._segments(tensors)
        if self.stage == 0:  # stage 0: whole tensors, gradients already all-reduced by DeepSpeed
            grads = [p.grad for p in tensors]
            norms = torch.stack(torch._foreach_norm(grads)).float()
            bad = torch.maximum(bad, (~torch.isfinite(norms)).any().float())
            if self.clip > 0:
                coefs = (self.clip / (norms + 1e-6)).clamp_max(1.0)
                torch._foreach_mul_(grads, list(coefs.to(grads[0].dtype).unbind()))
            return bad
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

    @torch.no_grad()
    def step(self, closure=None):
        # DeepSpeed calls this once (stage 0) or once per param group / sub-group (ZeRO), with
        # only that group in self.param_groups; flags gathered over the calls of one engine step.
        active = []
        for group in self.param_groups:
            if group.get("last_layer") and self.freeze_last_layer:
                for p in group["params"]:
                    p.grad = None  # AdamW skips tensors without a gradient: frozen
            active += [p for p in group["params"] if p.grad is not None]
        if not active:
            return None
        bad = self._check_and_clip(active)
        self.any_bad = bad if self.any_bad is None else torch.maximum(self.any_bad, bad.to(self.any_bad.device))
        self.found_inf = bad  # read by torch's fused AdamW: skip the update on the device
        try:
            return super().step()
        finally:
            self.found_inf = None


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


class DeepSpeedRun:
    """Replaces the student, teacher and optimizer of a DINOTraining by DeepSpeed engines, and runs
    its step, checkpoints and export. Built by the training loop when deepspeed.enabled is true."""

    def __init__(self, t):
        cfg, ctx = t.cfg, t.ctx
        deepspeed = import_deepspeed(ctx.device.type)
        self.deepspeed, self.stage = deepspeed, cfg.deepspeed.zero_stage
        if not dist.is_initialized():  # plain `python` (no launcher): a one-process group for DeepSpeed
            _init_single_process(ctx.device)
        self.ds_config = deepspeed_config(cfg)
        if cfg.model.fused_head:
            raise ConfigError("config key 'model.fused_head': not supported with deepspeed.enabled yet "
                              "(set model.fused_head=false)")
        if ctx.distributed:  # the teacher starts as rank 0's student on every rank (DeepSpeed
            for tensor in list(t.teacher.parameters()) + list(t.teacher.buffers()):  # broadcasts the student)
                dist.broadcast(tensor.data, 0)
        # DeepSpeed owns the student's gradients and storage: drop the engine's flat-buffer helpers
        # (their buffers would otherwise stay allocated beside DeepSpeed's own)
        for p in t.student_module.parameters():
            p.grad = None
        for name in ("student_flat", "clipper", "teacher_update"):
            if hasattr(t, name):
                setattr(t, name, None)
        self.student_params, self.teacher_params = list(t.student_module.parameters()), list(t.teacher.parameters())
        # bf16/fp16: both forwards under autocast, inside DeepSpeed's engine forward (module docstring)
        self.autocast_hooks = []
        if t.autocast_dtype is not None:
            for module in (t.student_module, t.teacher):
                self.autocast_hooks += autocast_forward(module, ctx.device.type, t.autocast_dtype)
        self.basic = DINOAdamW(param_groups(t.student_module), fused=ctx.device.type in ("cuda", "cpu"))
        self.basic.clip = cfg.optim.clip_grad
        engine, _, _, _ = deepspeed.initialize(model=t.student_module, optimizer=self.basic, config=self.ds_config)
        self.engine = engine
        self.basic.comm_device = ctx.device
        self.basic.bind(engine.optimizer, self.stage)
        self.teacher_engine = None
        if self.stage == 3:
            self.teacher_engine, _, _, _ = deepspeed.initialize(model=t.teacher,
                                                                config=teacher_deepspeed_config(self.ds_config))
            s_shards, t_shards = _zero3_params(t.student_module), _zero3_params(t.teacher)
            if [s.numel() for s in s_shards] != [x.numel() for x in t_shards]:
                raise RuntimeError("fastdino.ds: student and teacher are not partitioned alike under ZeRO-3")
        t.student, t.optimizer, t.scaler = engine, engine.optimizer, None
        self.fp16 = cfg.train.precision == "fp16"
        if ctx.is_main:
            log.info("deepspeed: ZeRO-%d, %s, micro batch %d x %d ranks, offload optimizer %s / params %s",
                     self.stage, cfg.train.precision, cfg.optim.batch_size_per_gpu, ctx.world_size,
                     cfg.deepspeed.offload_optimizer, cfg.deepspeed.offload_param)

    # ------------------------------------------------------------------------------------------
    # one step
    # ------------------------------------------------------------------------------------------
    def train_step(self, t, crops: list[torch.Tensor], it: int, epoch: int, with_stats: bool = False, mark=None):
        """fastdino.train.train_step under DeepSpeed: same phases and return value."""
        cfg, mark = t.cfg, mark or (lambda phase: None)
        # ============ schedules ============
        set_lr_wd(self.basic, float(t.schedules.lr[it]), float(t.schedules.wd[it]))
        self.basic.freeze_last_layer = epoch < cfg.optim.freeze_last_layer
        stats = {}

        # ============ teacher and student forward, DINO loss ============
        # bf16/fp16: each forward enters autocast itself (autocast_forward hooks), since DeepSpeed's
        # engine forward switches an enclosing autocast off; the loss stays outside, in fp32
        with torch.no_grad():
            teacher = self.teacher_engine if self.teacher_engine is not None else t.teacher
            teacher_output = teacher(crops[:2])
        mark("teacher_forward")
        student_output = self.engine(crops)
        mark("student_forward")
        if with_stats:
            stats["teacher_entropy"] = t.dino_loss.teacher_entropy(teacher_output, epoch)
        loss = t.dino_loss(student_output, teacher_output, epoch)  # fp32; center all-reduced, gated
        mark("loss")

        # ============ student update (DeepSpeed: reduce, unscale, DINOAdamW: clip, step) ============
        loss_ok = torch.isfinite(loss.detach())
        self.basic.loss_bad, self.basic.any_bad = (~loss_ok).float(), None
        self.engine.backward(loss)
        mark("backward")
        self.engine.step()
        overflow = bool(getattr(self.engine.optimizer, "overflow", False))  # host flag DeepSpeed already read
        bad = ~loss_ok
        if self.basic.any_bad is not None:
            bad = bad | (self.basic.any_bad.to(loss_ok.device) > 0)
        if overflow and not self.fp16:  # fp32/bf16: DeepSpeed skipped a step with a non-finite norm
            bad = torch.ones_like(bad)
        ok = ~bad & (not overflow)
        mark("optimizer")

        # ============ teacher EMA ============
        m = t.momentum_schedule[it]
        momentum = torch.where(ok, m, torch.ones_like(m))
        self.ema_update(t, momentum)
        mark("teacher_update")

        # ============ bookkeeping on the device ============
        bad = bad.int()
        t.first_bad_step.copy_(torch.where((t.bad_steps == 0) & (bad > 0), torch.full_like(t.first_bad_step, it),
                                           t.first_bad_step))
        t.bad_steps.add_(bad)
        return loss.detach(), stats

    @torch.no_grad()
    def ema_update(self, t, momentum: torch.Tensor) -> None:
        if self.teacher_engine is not None:  # ZeRO-3: each rank updates its own shard, no gather
            self.teacher_engine.optimizer.partition_all_parameters()  # next forward re-gathers the shards
            teachers, students = _zero3_params(t.teacher), _zero3_params(t.student_module)
        else:
            teachers, students = self.teacher_params, self.student_params
        # bf16/fp16 student weights: EMA in fp32 (the teacher is fp32), a tensor at a time
        same = [(x, s) for x, s in zip(teachers, students) if s.dtype == x.dtype]
        if same:
            ema_update_foreach([x for x, _ in same], [s for _, s in same], momentum.to(same[0][0].device))
        for x, s in zip(teachers, students):
            if s.dtype != x.dtype:
                ema_update_foreach([x], [s.to(x.dtype)], momentum.to(x.device))

    # ------------------------------------------------------------------------------------------
    # checkpoints and export
    # ------------------------------------------------------------------------------------------
    def checkpoint_dir(self, cfg) -> str:
        return os.path.join(cfg.train.output_dir, "deepspeed")

    def save_checkpoint(self, t, epoch: int, step_in_epoch: int, global_step: int, keep: bool = False) -> None:
        """Every rank calls this. `keep`: also keep this tag when later ones are written."""
        cfg, ctx = t.cfg, t.ctx
        root = self.checkpoint_dir(cfg)
        tag = f"{'keep-' if keep else ''}step{global_step:09d}"
        os.makedirs(os.path.join(root, tag), exist_ok=True)
        state = {"rng": rng_state(), "rank": ctx.rank}
        if ctx.is_main:
            state.update(dino_loss=t.dino_loss.state_dict(), epoch=epoch, step_in_epoch=step_in_epoch,
                         step=global_step, config=cfg.to_dict(), zero_stage=self.stage, world_size=ctx.world_size)
        if self.stage == 3:
            state["teacher_shards"] = [x.detach().cpu().clone() for x in _zero3_params(t.teacher)]
        elif ctx.is_main:
            state["teacher"] = t.teacher.state_dict()
        atomic_save(state, os.path.join(root, tag, f"dino_rank{ctx.rank}.pt"))
        # DeepSpeed writes model + optimizer shards, then `latest` (after our files exist)
        self.engine.save_checkpoint(root, tag=tag, client_state={"fastdino_step": global_step})
        self.export(t, epoch, global_step)
        if dist.is_initialized():
            dist.barrier()
        if ctx.is_main:  # older tags go once the new one is complete
            for name in os.listdir(root):
                if name.startswith("step") and name != tag and os.path.isdir(os.path.join(root, name)):
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)

    def resume(self, t, resume: str) -> tuple[int, int, int]:
        """resume: 'auto' (OUTPUT_DIR/deepspeed, latest tag) or a deepspeed checkpoint folder
        (optionally a tag folder inside it). Returns (epoch, step_in_epoch, global step)."""
        cfg, ctx = t.cfg, t.ctx
        root, tag = (self.checkpoint_dir(cfg), None) if resume == "auto" else (resume.rstrip("/"), None)
        if os.path.isfile(os.path.join(root, "dino_rank0.pt")):  # a tag folder was given
            root, tag = os.path.dirname(root), os.path.basename(root)
        latest = os.path.join(root, "latest")
        if tag is None:
            if not os.path.isfile(latest):
                if resume == "auto":
                    log.warning("no DeepSpeed checkpoint in %s: starting from scratch", root)
                    return 0, 0, 0
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
                f"{os.path.join(cfg.train.output_dir, 'consolidated.pth')})")
        own_file = os.path.join(folder, f"dino_rank{ctx.rank}.pt")
        own = main if ctx.rank == 0 else torch.load(own_file, map_location="cpu", weights_only=False)
        path, _ = self.engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"checkpoint '{folder}': DeepSpeed could not load it")
        try:
            if self.stage == 3:
                for x, saved in zip(_zero3_params(t.teacher), own["teacher_shards"], strict=True):
                    x.data.copy_(saved)
            else:
                t.teacher.load_state_dict(main["teacher"])
            t.dino_loss.load_state_dict(main["dino_loss"])
        except (KeyError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"checkpoint '{folder}' does not match this config ({first})")
        set_rng_state(own["rng"])
        if ctx.is_main:
            log.info("resumed DeepSpeed checkpoint %s at epoch %d, step %d", folder, main["epoch"], main["step"])
        return main["epoch"], main["step_in_epoch"], main["step"]

    def _full_state(self, module: torch.nn.Module, zero3: bool) -> dict:
        """fp32 state dict of the whole module; under ZeRO-3 the shards are gathered (all ranks)."""
        if zero3:
            with self.deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}

    def export(self, t, epoch: int, global_step: int) -> None:
        """OUTPUT_DIR/consolidated.pth and {teacher,student}_backbone.pth (all ranks call it)."""
        zero3, ctx = self.stage == 3, t.ctx
        student = self._full_state(t.student_module, zero3)
        teacher = self._full_state(t.teacher, zero3)
        if not ctx.is_main:
            return
        out = t.cfg.train.output_dir
        atomic_save({"student": student, "teacher": teacher, "config": t.cfg.to_dict(), "epoch": epoch,
                     "step": global_step}, os.path.join(out, "consolidated.pth"))
        for which, sd in (("teacher", teacher), ("student", student)):
            backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
            atomic_save(backbone, os.path.join(out, f"{which}_backbone.pth"))


# ----------------------------------------------------------------------------------------------
# step timing on synthetic crops:  python -m fastdino.ds --config configs/vitb8.json --steps 20
# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    """Time the DeepSpeed step (deepspeed.enabled forced on) on synthetic crops of the config's
    sizes: images/s and peak GPU memory, printed as a markdown row (and --json PATH). The head's
    last layer is unfrozen (epoch = optim.freeze_last_layer), so the full update is timed."""
    import argparse
    import json
    import sys
    import time

    from fastdino.config import load_config, split_cli_overrides
    from fastdino.distributed import cleanup, init_distributed
    from fastdino.train import build_training, train_step

    overrides, rest = split_cli_overrides(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(description="DeepSpeed DINO step timing (synthetic crops)")
    parser.add_argument("--config", default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None)
    args, _ = parser.parse_known_args(rest)
    cfg = load_config(args.config, overrides + ["deepspeed.enabled=true"])
    ctx = init_distributed(cfg.train.device)
    try:
        t = build_training(cfg, ctx, steps_per_epoch=args.warmup + args.steps)
        dev, d, B = ctx.device, cfg.data, cfg.optim.batch_size_per_gpu
        dtype = torch.bfloat16 if (cfg.train.precision == "bf16" and dev.type == "cuda") else torch.float32
        gen = torch.Generator(device="cpu").manual_seed(0)
        crops = [torch.randn(B, 3, d.global_crop_size, d.global_crop_size, generator=gen) for _ in range(2)]
        crops += [torch.randn(B, 3, d.local_crop_size, d.local_crop_size, generator=gen)
                  for _ in range(d.local_crops_number)]
        crops = [c.to(dev, dtype) for c in crops]
        epoch = min(cfg.optim.freeze_last_layer, cfg.optim.epochs - 1)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        for i in range(args.warmup):
            train_step(t, crops, i, epoch)
        sync()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        start = time.perf_counter()
        for i in range(args.warmup, args.warmup + args.steps):
            loss, _ = train_step(t, crops, i, epoch)
        sync()
        seconds = (time.perf_counter() - start) / args.steps
        row = {"arch": f"{cfg.model.arch}/{cfg.model.patch_size}", "zero_stage": cfg.deepspeed.zero_stage,
               "precision": cfg.train.precision, "batch_per_gpu": B, "world_size": ctx.world_size,
               "crops": f"2x{d.global_crop_size}+{d.local_crops_number}x{d.local_crop_size}",
               "ms_per_step": 1e3 * seconds, "images_per_s": B * ctx.world_size / seconds,
               "peak_mem_gib": torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None,
               "loss": float(loss), "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
        if ctx.is_main:
            print("| " + " | ".join(row) + " |\n|" + "---|" * len(row) + "\n| "
                  + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(row, f, indent=2)
        return row
    finally:
        cleanup()


if __name__ == "__main__":
    main()
