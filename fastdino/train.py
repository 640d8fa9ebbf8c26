"""DINO training: self-distillation with no labels (Caron et al. 2021), the official recipe.

    python fastdino/train.py --config configs/demo.json                  # one process (CPU demo)
    torchrun --nproc_per_node 8 fastdino/train.py --config configs/vits16.json
    python fastdino/train.py --config configs/vits16.json --set optim.lr=0.001 --resume

One step (Algorithm 1 of the paper):
    teacher logits  <- teacher(global crops)                      (no grad)
    student logits  <- student(all crops)
    loss            <- DINO loss(student, teacher, center, temperatures); center updated after
    student         <- AdamW step (lr, wd schedules; per-tensor clipping; last layer frozen early)
    teacher         <- m * teacher + (1 - m) * student
The host reads values only every `train.log_every` steps. A non-finite loss skips the optimizer,
teacher and center updates on the device, and the run stops at the next log step naming the step.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

if __name__ == "__main__" and __package__ in (None, ""):  # `python fastdino/train.py` from a checkout
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.nn as nn

from fastdino.checkpoint import CheckpointError, atomic_save, load_checkpoint, rng_state, set_rng_state
from fastdino.clip import GradClipper
from fastdino.config import Config, ConfigError, load_config, split_cli_overrides
from fastdino.distributed import DistContext, barrier, cleanup, init_distributed
from fastdino.flat import FlatParams
from fastdino.loss import DINOHeadLoss, DINOLoss
from fastdino.monitor import CollapseMonitor, knn_holdout, online_knn
from fastdino.optim import build_optimizer, get_params_groups, set_lr_wd
from fastdino.schedules import Schedules
from fastdino.teacher import TeacherUpdater

log = logging.getLogger("fastdino")


class TrainingError(RuntimeError):
    """A run that cannot go on; the message is one line."""


# ----------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = split_cli_overrides(argv)
    parser = argparse.ArgumentParser(description="DINO training (fastdino)")
    parser.add_argument("--config", default=None, help="JSON config (overrides of fastdino/config.py defaults)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="continue from OUTPUT_DIR/checkpoint.pth (or the given checkpoint)")
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                        help="set by the deepspeed / torch.distributed launchers")
    args = parser.parse_args(rest)
    return load_config(args.config, overrides), args


def check_output_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")  # per process: ranks share the folder
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        raise TrainingError(f"output folder '{path}' is not writable ({e.strerror})")


def precision_dtype(precision: str) -> torch.dtype | None:
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def build_models(cfg: Config, device: torch.device):
    """Student and teacher: same architecture; the teacher starts as a copy of the student."""
    from fastdino.models import DINOHead, MultiCropWrapper, build_backbone

    m = cfg.model
    student_backbone = build_backbone(m, teacher=False)
    teacher_backbone = build_backbone(m, teacher=True)
    embed_dim = student_backbone.embed_dim
    student = MultiCropWrapper(student_backbone, DINOHead(embed_dim, m.out_dim, use_bn=m.use_bn_in_head,
                                                         norm_last_layer=m.norm_last_layer),
                               packed=m.packed_multicrop)
    teacher = MultiCropWrapper(teacher_backbone, DINOHead(embed_dim, m.out_dim, use_bn=m.use_bn_in_head))
    student, teacher = student.to(device), teacher.to(device)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False  # the teacher learns only through the EMA
    if m.compile:
        from fastdino.models import compile_blocks

        compile_blocks(student.backbone)
        compile_blocks(teacher.backbone)
    return student, teacher


class MetricsLog:
    """metrics.jsonl in the output folder: one JSON object per step, written on log steps."""

    def __init__(self, path: str | None):
        self.file = open(path, "a", buffering=1) if path else None

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.file:
            self.file.close()


# ----------------------------------------------------------------------------------------------
# training state and one step
# ----------------------------------------------------------------------------------------------
@dataclass
class DINOTraining:
    cfg: Config
    ctx: DistContext
    student: nn.Module  # DDP-wrapped when distributed
    student_module: nn.Module  # the bare MultiCropWrapper
    teacher: nn.Module
    dino_loss: DINOLoss | DINOHeadLoss
    student_flat: FlatParams  # student parameters and gradients as views into flat buffers
    clipper: GradClipper  # per-tensor clipping (flat Triton on GPU, foreach on CPU, loop in reference mode)
    teacher_update: TeacherUpdater  # EMA (flat Triton on GPU, foreach on CPU, loop in reference mode)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    schedules: Schedules
    momentum_schedule: torch.Tensor  # on the device: indexing it never syncs
    bad_steps: torch.Tensor  # device counters of skipped (non-finite) steps and the first one
    first_bad_step: torch.Tensor
    ds: object = None  # fastdino.ds.DeepSpeedRun when deepspeed.enabled (engines, step, checkpoints)

    def __post_init__(self):
        self.last_layer_params = [p for p in self.student_module.head.last_layer.parameters() if p.requires_grad]
        self.autocast_dtype = precision_dtype(self.cfg.train.precision)
        self.fused_head = self.cfg.model.fused_head
        self.skips_on_found_inf = isinstance(self.optimizer, torch.optim.AdamW)


def build_training(cfg: Config, ctx: DistContext, steps_per_epoch: int) -> DINOTraining:
    """Student (DDP-wrapped when distributed), teacher, loss, optimizer, scaler and schedules."""
    device = ctx.device
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    student_module, teacher = build_models(cfg, device)
    torch.manual_seed(cfg.train.seed + ctx.rank)  # per-rank randomness (drop path) from here on
    # flat buffers before DDP, the optimizer and any checkpoint load (they all keep the views)
    student_flat = FlatParams(student_module)
    teacher_flat = FlatParams(teacher, grads=False)
    clipper = GradClipper(student_flat, cfg.optim.clip_grad, impl=cfg.optim.clip_impl)
    teacher_update = TeacherUpdater(teacher_flat, student_flat, impl=cfg.optim.ema_impl)
    student = student_module
    if ctx.distributed and not cfg.deepspeed.enabled:  # DeepSpeed reduces the gradients itself
        student = nn.parallel.DistributedDataParallel(
            student_module, device_ids=[device.index] if device.type == "cuda" else None)
    ncrops = 2 + cfg.data.local_crops_number
    loss_cls = DINOHeadLoss if cfg.model.fused_head else DINOLoss  # fused head: no [n*B, K] logits
    dino_loss = loss_cls(cfg.model.out_dim, ncrops, cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp,
                         cfg.loss.warmup_teacher_temp_epochs, cfg.optim.epochs, cfg.loss.student_temp,
                         cfg.loss.center_momentum, impl=cfg.loss.impl).to(device)
    optimizer = build_optimizer(get_params_groups(student_module), cfg.optim.optimizer, device)
    scaler = torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" else None
    schedules = Schedules.from_config(cfg.optim, cfg.optim.batch_size_per_gpu * ctx.world_size, steps_per_epoch)
    if ctx.is_main:
        log.info("loss %s, clipping %s, teacher update %s, attention %s", dino_loss.resolve_impl(device),
                 clipper.impl, teacher_update.impl, getattr(student_module.backbone, "attn_backend", cfg.model.attn))
    t = DINOTraining(cfg, ctx, student, student_module, teacher, dino_loss, student_flat, clipper,
                     teacher_update, optimizer, scaler, schedules,
                     momentum_schedule=torch.tensor(schedules.momentum, dtype=torch.float32, device=device),
                     bad_steps=torch.zeros((), dtype=torch.int32, device=device),
                     first_bad_step=torch.full((), -1, dtype=torch.int64, device=device))
    if cfg.deepspeed.enabled:  # DeepSpeed engines replace student, teacher (ZeRO-3) and optimizer
        from fastdino.ds import DeepSpeedRun

        t.ds = DeepSpeedRun(t)
    return t


def _no_mark(phase: str) -> None:
    pass


def train_step(t: DINOTraining, crops: list[torch.Tensor], it: int, epoch: int, with_stats: bool = False,
               mark=_no_mark):
    """One DINO iteration. Returns (loss as a device tensor, stats dict of device tensors).

    `mark(phase)` is called as each phase ends (benchmarks/throughput.py records CUDA events there):
    teacher_forward, student_forward, loss, backward, optimizer, teacher_update.
    """
    if t.ds is not None:  # DeepSpeed: the same phases on its engine (fastdino/ds.py)
        return t.ds.train_step(t, crops, it, epoch, with_stats, mark)
    cfg = t.cfg
    # ============ schedules ============
    set_lr_wd(t.optimizer, float(t.schedules.lr[it]), float(t.schedules.wd[it]))
    stats = {}

    # ============ teacher and student forward, DINO loss ============
    with torch.autocast(t.ctx.device.type, dtype=t.autocast_dtype or torch.float32,
                        enabled=t.autocast_dtype is not None):
        with torch.no_grad():  # only the 2 global views pass through the teacher
            teacher_output = t.teacher(crops[:2], bottleneck=t.fused_head)
        mark("teacher_forward")
        student_output = t.student(crops, bottleneck=t.fused_head)
        mark("student_forward")
        # the DINO loss (fp32 math) updates the center; teacher entropy for the collapse monitor on log steps
        if t.fused_head:  # logits made tile by tile inside the loss (matmul in the autocast dtype)
            s_last, t_last = t.student_module.head.last_layer, t.teacher.head.last_layer
            out = t.dino_loss(student_output, teacher_output, s_last.weight_g, s_last.weight_v,
                              t_last.weight_g, t_last.weight_v, epoch, return_entropy=with_stats)
    if not t.fused_head:
        out = t.dino_loss(student_output, teacher_output, epoch, return_entropy=with_stats)
    loss, stats["teacher_entropy"] = out if with_stats else (out, None)
    mark("loss")

    # ============ student update ============
    t.student_flat.zero_grad()  # zeros the flat gradient buffer (never set_to_none: keeps the views)
    if t.scaler is not None:
        t.scaler.scale(loss).backward()
        t.scaler.unscale_(t.optimizer)
    else:
        loss.backward()
    if epoch < cfg.optim.freeze_last_layer:  # official cancel_gradients_last_layer: no update at all
        t.student_flat.drop_grads(t.last_layer_params)
    mark("backward")
    t.clipper.clip_()  # each tensor's gradient norm to clip_grad, no host sync
    ok = torch.isfinite(loss.detach()) & t.clipper.grads_finite()  # a device flag: no host sync
    if t.scaler is not None:
        t.scaler.step(t.optimizer)  # skips on inf/nan gradients by itself
        t.scaler.update()
    else:
        t.optimizer.found_inf = (~ok).float()  # torch's AdamW skips the whole step when set
        if t.skips_on_found_inf or bool(ok):  # others (apex) cannot: one host sync per step for them
            t.optimizer.step()

    mark("optimizer")

    # ============ teacher EMA ============
    momentum = torch.where(ok, t.momentum_schedule[it], torch.ones_like(t.momentum_schedule[it]))
    t.teacher_update.step(momentum)
    mark("teacher_update")

    # ============ bookkeeping on the device ============
    bad = (~ok).int()
    t.first_bad_step.copy_(torch.where((t.bad_steps == 0) & (bad > 0), torch.full_like(t.first_bad_step, it),
                                       t.first_bad_step))
    t.bad_steps.add_(bad)
    return loss.detach(), stats


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
def checkpoint_state(t: DINOTraining, epoch: int, step_in_epoch: int, global_step: int) -> dict:
    return {
        "student": t.student_module.state_dict(),
        "teacher": t.teacher.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "dino_loss": t.dino_loss.state_dict(),
        "scaler": t.scaler.state_dict() if t.scaler is not None else None,
        "epoch": epoch,  # the epoch to continue in
        "step_in_epoch": step_in_epoch,  # the next step of that epoch
        "step": global_step,  # the next global step
        "rng": rng_state(),
        "config": t.cfg.to_dict(),
    }


def restore(t: DINOTraining, ckpt: dict, path: str) -> tuple[int, int, int]:
    try:
        t.student_module.load_state_dict(ckpt["student"])
        t.teacher.load_state_dict(ckpt["teacher"])
        t.optimizer.load_state_dict(ckpt["optimizer"])
        t.dino_loss.load_state_dict(ckpt["dino_loss"])
        if t.scaler is not None and ckpt.get("scaler"):
            t.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        return ckpt["epoch"], ckpt["step_in_epoch"], ckpt["step"]
    except (KeyError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint '{path}' does not match this config ({first})")


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def train(cfg: Config, args: argparse.Namespace) -> dict:
    ctx = init_distributed(cfg.train.device, args.local_rank)
    try:
        return _train(cfg, args, ctx)
    finally:
        cleanup()


def _train(cfg: Config, args: argparse.Namespace, ctx: DistContext) -> dict:
    from fastdino.data import build_train_loader, generate_demo_dataset

    device = ctx.device
    check_output_dir(cfg.train.output_dir)
    if ctx.is_main:
        with open(os.path.join(cfg.train.output_dir, "config.json"), "w") as f:
            f.write(cfg.to_json())

    # ============ data ============
    if cfg.data.generate_demo and ctx.is_main:
        d = cfg.data
        generate_demo_dataset(d.path, d.demo_num_images, d.demo_num_classes, d.demo_image_size, seed=cfg.train.seed)
    barrier()
    crop_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(cfg.data.dtype)
    if crop_dtype is None:  # auto: bf16 crops when training in bf16 on a GPU
        crop_dtype = torch.bfloat16 if (cfg.train.precision == "bf16" and device.type == "cuda") else torch.float32
    batch = cfg.optim.batch_size_per_gpu
    loader = build_train_loader(cfg.data, batch_size=batch, rank=ctx.rank, world_size=ctx.world_size,
                                seed=cfg.train.seed, device=device, dtype=crop_dtype)
    steps_per_epoch = loader.steps_per_epoch  # >= 1: the loader refuses data smaller than one global batch

    # ============ student, teacher, loss, optimizer ============
    t = build_training(cfg, ctx, steps_per_epoch)
    schedules, dino_loss = t.schedules, t.dino_loss

    # ============ resume ============
    ckpt_path = os.path.join(cfg.train.output_dir, "checkpoint.pth")
    start_epoch, start_step_in_epoch, it = 0, 0, 0
    if args.resume is not None and t.ds is not None:  # DeepSpeed checkpoint in OUTPUT_DIR/deepspeed
        start_epoch, start_step_in_epoch, it = t.ds.resume(t, args.resume)
    elif args.resume is not None:
        path = ckpt_path if args.resume == "auto" else args.resume
        if args.resume == "auto" and not os.path.exists(path):
            log.warning("no checkpoint at %s: starting from scratch", path)
        else:
            start_epoch, start_step_in_epoch, it = restore(t, load_checkpoint(path), path)
            if ctx.is_main:
                log.info("resumed from %s at epoch %d, step %d", path, start_epoch, it)

    total_steps = cfg.optim.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    metrics = MetricsLog(os.path.join(cfg.train.output_dir, "metrics.jsonl") if ctx.is_main else None)
    monitor = CollapseMonitor(cfg.model.out_dim)  # warns when entropy -> 0 or ln K, or KL -> 0
    knn_sets = (knn_holdout(cfg.data.path, cfg.train.knn_holdout_per_class, seed=cfg.train.seed)
                if cfg.train.knn_every > 0 else None)
    progress = None
    if ctx.is_main and cfg.train.progress:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=it, unit="step", dynamic_ncols=True, mininterval=1.0)
    if ctx.is_main:
        log.info("fastdino: %s/%d, %d+%d crops, %d images, %d steps/epoch, global batch %d, device %s, "
                 "data %s, loss %s", cfg.model.arch, cfg.model.patch_size, 2, cfg.data.local_crops_number,
                 loader.num_images, steps_per_epoch, batch * ctx.world_size, device, loader.backend,
                 cfg.loss.impl)

    images_per_step = batch * ctx.world_size
    pending: list[tuple[int, int, torch.Tensor]] = []  # (step, epoch, loss) not yet read by the host
    last_log_time, last_log_step = time.perf_counter(), it
    summary = {"steps": 0, "loss": float("nan")}
    done = it >= total_steps
    for epoch in range(start_epoch, cfg.optim.epochs):
        if done:
            break
        first_step = start_step_in_epoch if epoch == start_epoch else 0
        for step_in_epoch, crops in enumerate(loader.epoch(epoch, start_step=first_step), start=first_step):
            log_step = (it + 1) % cfg.train.log_every == 0 or it + 1 == total_steps
            loss, stats = train_step(t, crops, it, epoch, with_stats=log_step)
            pending.append((it, epoch, loss))
            it += 1

            if log_step:  # ============ logging: the only host sync, one device-to-host copy ============
                read = torch.cat([torch.stack([p[2] for p in pending]).double(),  # fp64: exact step numbers
                                  stats["teacher_entropy"].double().view(1),
                                  t.bad_steps.double().view(1), t.first_bad_step.double().view(1)]).cpu().tolist()
                losses, entropy, bad_steps, first_bad_step = read[:-3], read[-3], int(read[-2]), int(read[-1])
                if bad_steps > 0:
                    raise TrainingError(
                        f"non-finite loss at step {first_bad_step} (epoch {epoch}): that step's "
                        f"optimizer, teacher and center updates were skipped; last checkpoint in "
                        f"'{cfg.train.output_dir}' is intact; lower optim.lr or check the data")
                now = time.perf_counter()
                ips = images_per_step * (it - last_log_step) / max(now - last_log_time, 1e-9)
                last_log_time, last_log_step = now, it
                for (step, ep, _), value in zip(pending, losses):
                    record = {"step": step, "epoch": ep, "loss": value, "lr": float(schedules.lr[step]),
                              "wd": float(schedules.wd[step]), "momentum": float(schedules.momentum[step]),
                              "teacher_temp": dino_loss.teacher_temp(ep)}
                    if step == it - 1:
                        record.update(teacher_entropy=entropy, kl=value - entropy, images_per_s=ips,
                                      corrupt_images=loader.num_corrupt)
                        warning = monitor.update(entropy, value - entropy, step=step)
                        if warning and ctx.is_main:
                            log.warning(warning)
                    metrics.write(record)
                pending.clear()
                summary.update(loss=losses[-1])
                if progress is not None:
                    progress.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4f}", img_s=f"{ips:.1f}",
                                         **({"warn": monitor.flag} if monitor.flag else {}))
            if progress is not None:
                progress.update(1)

            end_of_epoch = step_in_epoch + 1 == steps_per_epoch
            done = it >= total_steps
            ckpt_now = (cfg.train.checkpoint_every and it % cfg.train.checkpoint_every == 0) or end_of_epoch or done
            if ckpt_now and t.ds is not None:  # DeepSpeed: every rank writes its shards
                next_epoch, next_step = (epoch + 1, 0) if end_of_epoch else (epoch, step_in_epoch + 1)
                t.ds.save_checkpoint(t, next_epoch, next_step, it,
                                     keep=end_of_epoch and (epoch + 1) % cfg.train.saveckp_freq == 0)
            elif ckpt_now and ctx.is_main:
                next_epoch, next_step = (epoch + 1, 0) if end_of_epoch else (epoch, step_in_epoch + 1)
                state = checkpoint_state(t, next_epoch, next_step, it)
                atomic_save(state, ckpt_path)
                if end_of_epoch and (epoch + 1) % cfg.train.saveckp_freq == 0:
                    atomic_save(state, os.path.join(cfg.train.output_dir, f"checkpoint{epoch:04d}.pth"))
            if knn_sets is not None and end_of_epoch and (epoch + 1) % cfg.train.knn_every == 0:
                zero3 = t.ds is not None and cfg.deepspeed.zero_stage == 3  # sharded teacher: every rank runs it
                if ctx.is_main or zero3:
                    top1 = online_knn(t.teacher.backbone, *knn_sets, device, image_size=cfg.data.global_crop_size)
                    if ctx.is_main:
                        metrics.write({"step": it - 1, "epoch": epoch, "knn_top1": top1})
                        log.info("epoch %d: online k-NN top-1 of the teacher %.2f%%", epoch, top1)
            if done:
                break
    if progress is not None:
        progress.close()
    metrics.close()
    barrier()
    summary.update(steps=it, corrupt_images=loader.num_corrupt)
    if ctx.is_main:
        log.info("done: %d steps, last loss %.4f, %d corrupt images skipped", it, summary["loss"],
                 loader.num_corrupt)
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg, args = parse_args(argv)
        train(cfg, args)
    except (ConfigError, TrainingError, CheckpointError) as e:
        print(f"fastdino: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # data errors and the like: one line, not a traceback
        from fastdino.data import DataError
        from fastdino.eval.common import EvalError

        if isinstance(e, (DataError, EvalError)):
            print(f"fastdino: error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
