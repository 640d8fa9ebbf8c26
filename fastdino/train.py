"""DINO training: self-distillation with no labels (Caron et al. 2021), the official recipe.

    python fastdino/train.py --config configs/demo.json                  # one process (CPU demo)
    torchrun --nproc_per_node 8 fastdino/train.py --config configs/vits16.json
    deepspeed fastdino/train.py --config configs/vitb8.json             # DeepSpeed ZeRO
    python fastdino/train.py --config configs/vits16.json --set optim.lr=0.001 --resume

This file is the command line and the loop: data -> step -> log -> checkpoint. The step itself is
fastdino/step.py (one definition for every backend); where parameters live is the backend's
(fastdino/backend.py, fastdino/ds.py); every "auto" is decided once by fastdino/resolve.py.
The host reads values only every `train.log_every` steps. A non-finite loss skips the optimizer,
teacher and center updates on the device, and the run stops at the next log step naming the step.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass

if __name__ == "__main__" and __package__ in (None, ""):  # `python fastdino/train.py` from a checkout
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.nn as nn

from fastdino.checkpoint import (CheckpointError, checkpoint_path, client_state, first_mismatch, load_checkpoint,
                                 restore_client)
from fastdino.config import Config, ConfigError, load_config, split_cli_overrides
from fastdino.distributed import DistContext, barrier, cleanup, init_distributed
from fastdino.gram import GramAnchoring
from fastdino.losses import DINOTerm, GramTerm, IBOTTerm, KoLeoTerm
from fastdino.monitor import CollapseMonitor, knn_holdout, online_knn
from fastdino.preemption import Abort, Interrupted, StopControl
from fastdino.resolve import Resolved, effective_config, resolve
from fastdino.schedules import Schedules
from fastdino.step import BAD_STEPS, FIRST_BAD_STEP, SKIPPED_UPDATES, STEP, StepState, compile_step, new_counters, train_step
from fastdino.targets import Centering, SinkhornKnopp

log = logging.getLogger("fastdino")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class TrainingError(RuntimeError):
    """A run that cannot go on; the message is one line."""


# ----------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = split_cli_overrides(argv)
    parser = argparse.ArgumentParser(
        description="DINO training (fastdino)", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config overrides: any key of fastdino/config.py, after the JSON config, in either form:\n"
               "  --set section.key=value      e.g. --set optim.lr=0.001\n"
               "  --section.key value          e.g. --data.path /data/imagenet/train --train.reference=true\n"
               "unknown keys and bad values stop the run with one line naming the key.\n\n"
               "SIGINT / SIGTERM: the run stops at the next step with a checkpoint (exit 130 / 143); a second "
               "signal stops at once.\n--resume with no checkpoint in the output folder starts fresh (and says so).")
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


def build_models(cfg: Config, resolved: Resolved, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """Student and teacher: same architecture; the teacher starts as a copy of the student and
    learns only through the EMA. With the fused head the student's head stops at its bottleneck."""
    from fastdino.models import DINOHead, MultiCropWrapper, build_backbone

    m = effective_config(cfg).model  # train.reference=true: the reference's options (resolve logged them)
    student_backbone = build_backbone(m, teacher=False, attn=resolved.attn)
    teacher_backbone = build_backbone(m, teacher=True, attn=resolved.attn)
    dim = student_backbone.embed_dim
    ibot = cfg.loss.ibot_weight > 0

    def ibot_head():  # DINOv2's separate iBOT head: the DINO head's shape with its own prototypes
        if not ibot or m.ibot_head == "shared":
            return None
        return DINOHead(dim, m.ibot_out_dim, use_bn=m.use_bn_in_head, norm_last_layer=m.norm_last_layer,
                        last_layer=m.head_last_layer)

    student = MultiCropWrapper(student_backbone, DINOHead(dim, m.out_dim, use_bn=m.use_bn_in_head,
                                                         norm_last_layer=m.norm_last_layer,
                                                         fused_last_layer=resolved.fused_head,
                                                         last_layer=m.head_last_layer),
                               packed=resolved.packed_multicrop, ibot_head=ibot_head())
    teacher = MultiCropWrapper(teacher_backbone, DINOHead(dim, m.out_dim, use_bn=m.use_bn_in_head,
                                                         last_layer=m.head_last_layer),
                               ibot_head=ibot_head())
    student, teacher = student.to(device), teacher.to(device)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    if getattr(student_backbone, "mask_token", None) is not None and not ibot:
        student_backbone.mask_token.requires_grad = False  # DINOv2's mask token: only iBOT (masked crops) trains it
    return student, teacher


def build_masking(cfg: Config):
    """iBOT's block masks of the global crops (fastdino/data/masking.py), or None without iBOT."""
    if cfg.loss.ibot_weight == 0:
        return None
    from fastdino.data.masking import IBOTMasks

    d = cfg.data
    return IBOTMasks(d.global_crop_size // cfg.model.patch_size, mask_probability=d.mask_probability,
                     mask_ratio=d.mask_ratio, group_size=d.mask_group_size or None, patch_size=cfg.model.patch_size)


def init_from_teacher(path: str, student: nn.Module, teacher: nn.Module, arch: str) -> None:
    """train.init_from: the checkpoint's EMA teacher (backbone and heads) becomes the student and the teacher
    (DINOv3's student.resume_from_teacher_chkpt). A missing or foreign file, or another architecture, stops
    the run with one line naming the key."""
    key = "config key 'train.init_from'"
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise ConfigError(f"{key}: {e}") from None
    state = ckpt.get("teacher") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"{key}: '{path}' has no 'teacher' entry (a fastdino checkpoint.pth, or a DeepSpeed "
                          f"run's consolidated one, is expected)")
    missing = first_mismatch(teacher.state_dict(), state)
    if missing:
        raise ConfigError(f"{key}: cannot load the teacher of '{path}' into {arch}: {missing}")
    teacher.load_state_dict(state)
    student.load_state_dict(state)


def resumes(args: argparse.Namespace, cfg: Config, resolved: Resolved) -> bool:
    """Whether --resume will load a checkpoint (auto: the backend's checkpoint in the output folder exists)."""
    if args.resume is None:
        return False
    return args.resume != "auto" or os.path.exists(checkpoint_path(cfg.train.output_dir, resolved.backend))


def build_recipe(cfg: Config, resolved: Resolved, student: nn.Module,
                 device) -> tuple[nn.Module, nn.Module | None, nn.ModuleList]:
    """The recipe: teacher targets (centering, or Sinkhorn-Knopp), the DINO term over 2 + N crops;
    with loss.koleo_weight, KoLeo on the student's global [CLS] features (loss.koleo_distributed: their
    nearest neighbours among a group of ranks' batches); with loss.ibot_weight, the iBOT term on the
    masked patch tokens of the global crops and its own targets (its own center)."""
    lo = cfg.loss

    def make_targets(out_dim):  # a Sinkhorn-Knopp all_reduce is wired to the backend once that exists
        if lo.targets == "sinkhorn_knopp":
            return SinkhornKnopp(out_dim, lo.sinkhorn_iterations, resolved.loss)
        return Centering(out_dim, lo.center_momentum, resolved.loss).to(device)

    targets = make_targets(cfg.model.out_dim)
    head = student.head if resolved.fused_head else None
    terms = [DINOTerm(2 + cfg.data.local_crops_number, lo.student_temp, resolved.loss, weight=lo.dino_weight,
                      head=head, matmul_dtype=resolved.autocast_dtype or torch.float32,
                      reweight_local=lo.reweight_local)]  # its local weight: the step's hp (build_run binds it)
    if lo.koleo_weight > 0:
        group_ranks = 1  # DINOv2: each rank's batch is its own neighbour set
        if lo.koleo_distributed:  # DINOv3: the batches of koleo_group_size / B consecutive ranks
            batch, world = cfg.optim.batch_size_per_gpu, resolved.world_size
            group_size = lo.koleo_group_size or batch * world
            if (batch * world) % group_size:
                raise ConfigError(f"config key 'loss.koleo_group_size': must divide the global batch {batch * world} "
                                  f"(optim.batch_size_per_gpu={batch} x {world} ranks), got {group_size}")
            group_ranks = group_size // batch
        terms.append(KoLeoTerm(weight=lo.koleo_weight, group_ranks=group_ranks))
        student.keep_features = True  # the student also returns its global crops' [CLS] features
    patch_targets = None
    if lo.ibot_weight > 0:
        patch_targets = make_targets(cfg.model.ibot_out_dim if cfg.model.ibot_head == "separate" else cfg.model.out_dim)
        terms.append(IBOTTerm(2 * cfg.optim.batch_size_per_gpu, lo.student_temp, resolved.loss, weight=lo.ibot_weight))
    if cfg.gram.weight > 0:
        g = cfg.gram
        terms.append(GramTerm(g.img_level, g.remove_neg, g.remove_only_teacher_neg, resolved.loss, g.tokens_used))
        student.keep_patch_tokens = True  # the student also returns its global crops' patch tokens
    return targets, patch_targets, nn.ModuleList(terms)


def build_gram_anchoring(cfg: Config, resolved: Resolved, teacher: nn.Module, device: torch.device,
                         steps_per_epoch: int) -> GramAnchoring | None:
    """DINOv3 Gram anchoring (fastdino/gram.py): the Gram teacher, built when gram.start_epoch comes (a
    fresh copy of the teacher's architecture, unpartitioned whatever the backend). gram.teacher_checkpoint
    is checked against that architecture here (one line naming the key), and read again when needed."""
    if cfg.gram.weight <= 0:
        return None
    from fastdino.models import build_backbone

    m = effective_config(cfg).model

    def make_backbone() -> nn.Module:  # on its own RNG: building it later must not shift the run's random numbers
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return build_backbone(m, teacher=True, attn=resolved.attn).to(device)

    read_checkpoint = None
    if cfg.gram.teacher_checkpoint:
        from fastdino.eval.common import backbone_state_dict, torch_load

        path = cfg.gram.teacher_checkpoint

        def read_checkpoint() -> dict:
            return backbone_state_dict(torch_load(path), "teacher")[0]

        try:
            missing = first_mismatch(teacher.backbone.state_dict(), read_checkpoint())
        except Exception as e:  # not a checkpoint at all, no teacher in it
            missing = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if missing:
            raise ConfigError(f"config key 'gram.teacher_checkpoint': cannot load its teacher backbone into "
                              f"{cfg.model.arch}: {missing}")
    return GramAnchoring(cfg.gram, make_backbone, steps_per_epoch, cfg.optim.epochs, read_checkpoint)


@dataclass
class Run:
    """Everything a training run holds: the config and its resolved choices, the step's state, the
    schedules (host arrays for the log, a device table for the step) and the step function."""
    cfg: Config
    resolved: Resolved
    ctx: DistContext
    state: StepState
    schedules: Schedules
    table: torch.Tensor
    step_fn: object
    gram: GramAnchoring | None = None  # DINOv3 Gram anchoring: the Gram teacher, from gram.start_epoch

    @property
    def backend(self):
        return self.state.backend


def build_run(cfg: Config, ctx: DistContext, steps_per_epoch: int, resolved: Resolved | None = None,
              init_from: str = "") -> Run:
    """Models (from init_from's teacher: train.init_from), backend (DDP / DeepSpeed wrapping, optimizer),
    targets, terms and schedules."""
    from fastdino.backend import build_backend
    from fastdino.models import compile_blocks

    device = ctx.device
    resolved = resolved or resolve(cfg, device, ctx.world_size)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    student, teacher = build_models(cfg, resolved, device)
    if init_from:  # before any wrapping: every backend starts from these weights
        init_from_teacher(init_from, student, teacher, cfg.model.arch)
        if ctx.is_main:
            log.info("train.init_from: student and teacher start as the teacher of %s", init_from)
    gram = build_gram_anchoring(cfg, resolved, teacher, device, steps_per_epoch)  # no Gram teacher until its epoch
    torch.manual_seed(cfg.train.seed + ctx.rank)  # per-rank randomness (drop path) from here on
    if resolved.compile == "blocks":
        compile_blocks(student)
        compile_blocks(teacher)  # shares the student's graphs where the layouts agree
    targets, patch_targets, terms = build_recipe(cfg, resolved, student, device)
    backend = build_backend(cfg, resolved, ctx, student, teacher)
    for t in (targets, patch_targets):
        if isinstance(t, SinkhornKnopp) and ctx.world_size > 1:
            t.all_reduce = backend.all_reduce_  # its column maxima and prototype sums span every rank
    schedules = Schedules.from_config(cfg, cfg.optim.batch_size_per_gpu * ctx.world_size, steps_per_epoch)
    table = schedules.table(device)
    state = StepState(backend=backend, targets=targets, patch_targets=patch_targets, terms=terms,
                      hp=table[:, 0].clone(), counters=new_counters(device),
                      teacher_rows=2 * cfg.optim.batch_size_per_gpu * ctx.world_size, world_size=ctx.world_size,
                      autocast_dtype=resolved.autocast_dtype,
                      nonfinite_grads_are_bad=resolved.precision != "fp16")
    step_fn = compile_step(train_step) if resolved.compile == "step" else train_step
    if resolved.cuda_graphs:  # replayed from a CUDA graph per crop layout after 2 eager steps
        from fastdino.cuda_graph import GraphedStep

        step_fn = GraphedStep(step_fn)
    if ctx.is_main:
        log.info(resolved.line())
    return Run(cfg, resolved, ctx, state, schedules, table, step_fn, gram)


class MetricsLog:
    """metrics.jsonl in the output folder: one JSON object per step, written on log steps.

    With `tensorboard_dir` (train.tensorboard=true, main rank only) every numeric field of each record
    but "step" is also a TensorBoard scalar of the same name at global step = the record's "step"
    (loss, lr, wd, momentum, teacher_temp, teacher_entropy, kl, images_per_s, knn_top1, ...), in
    event files under OUTPUT_DIR/tensorboard/, flushed on log steps (`flush`). A resumed run
    (`purge_step` = the checkpoint's step) logs the steps after the checkpoint again: it writes a new
    event file that starts with a purge marker at that step, so TensorBoard drops the earlier run's
    values from that step on and shows the later ones (as metrics.jsonl, see drop_metrics_from)."""

    def __init__(self, path: str | None, tensorboard_dir: str | None = None, purge_step: int | None = None):
        self.file = open(path, "a", buffering=1) if path else None
        self.tensorboard = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter  # checked at startup: require_tensorboard

            self.tensorboard = SummaryWriter(tensorboard_dir, purge_step=purge_step, flush_secs=3600)

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
        if self.tensorboard:
            for tag, value in record.items():
                if tag != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(tag, value, global_step=record["step"])

    def flush(self) -> None:
        """End of a log step: the event files are on disk (metrics.jsonl is line-buffered)."""
        if self.tensorboard:
            self.tensorboard.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None
        if self.tensorboard:
            self.tensorboard.close()
            self.tensorboard = None


def require_tensorboard(cfg: Config) -> None:
    """train.tensorboard=true without the tensorboard package stops the run before anything is built."""
    if not cfg.train.tensorboard:
        return
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"config key 'train.tensorboard': true needs the tensorboard package ({why}): "
                          "pip install tensorboard (or set train.tensorboard=false)") from None


def write_config(cfg: Config, resolved: Resolved) -> None:
    """OUTPUT_DIR/config.json: the resolved config (loadable with --config) and what "auto" became."""
    with open(os.path.join(cfg.train.output_dir, "config.json"), "w") as f:
        json.dump({**cfg.to_dict(), "_resolved": resolved.to_dict()}, f, indent=2)


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def train(cfg: Config, args: argparse.Namespace) -> dict:
    ctx = init_distributed(cfg.train.device, args.local_rank)
    try:
        return _train(cfg, args, ctx)
    except BaseException as e:  # the failed run's objects (its DDP reducer) go before the process group
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        cleanup()


def _resume(run: Run, resume: str, steps_per_epoch: int) -> tuple[int, int, int]:
    """(epoch, step in epoch, global step) to start from. A checkpoint whose position does not fit
    this run's epochs (another data.epoch_length, or with 0 a data folder of another size) is refused:
    its schedules and batches would be out of step."""
    cfg = run.cfg
    ckpt = run.backend.resume(resume, cfg.train.output_dir)
    if ckpt is None:
        log.warning("--resume: nothing to resume (no checkpoint at %s): starting fresh",
                    run.backend.checkpoint_path(cfg.train.output_dir))
        return 0, 0, 0
    path = ckpt.get("path", resume if resume != "auto" else run.backend.checkpoint_path(cfg.train.output_dir))
    epoch, step_in_epoch, it = restore_client(ckpt, run.state.targets, path, run.ctx.rank, run.state.patch_targets,
                                              run.gram)
    if it != epoch * steps_per_epoch + step_in_epoch or step_in_epoch > steps_per_epoch:
        saved = (ckpt.get("config") or {}).get("data", {}).get("epoch_length", "?")
        raise CheckpointError(
            f"checkpoint '{path}' was saved at step {step_in_epoch} of epoch {epoch} (global step {it}), which does not "
            f"fit this run's {steps_per_epoch} steps per epoch (data.epoch_length={cfg.data.epoch_length} now, {saved} "
            f"in the checkpoint; 0 = a pass over the data, whose size may have changed): resume with the same "
            f"data.epoch_length and data")
    run.state.counters[STEP] = it
    if run.ctx.is_main:
        log.info("resumed from %s at epoch %d, step %d", path, epoch, it)
    return epoch, step_in_epoch, it


def demo_data_wanted(cfg: Config) -> bool:
    """data.generate_demo applies to the data.path of the same config layer (the demo config's own
    folder), or to any path when it is given on the command line; another missing folder is an error,
    not 2,000 synthetic images trained on by mistake."""
    d = cfg.data
    if not d.generate_demo or os.path.isdir(d.path):
        return d.generate_demo
    if cfg.source("data.generate_demo") == "cli" or cfg.source("data.path") == cfg.source("data.generate_demo"):
        return True
    from fastdino.data import DataError

    raise DataError(f"data folder '{d.path}' does not exist (data.generate_demo=true of the config file applies "
                    f"to its own data.path; add --data.generate_demo=true to generate the demo images there)")


def _train(cfg: Config, args: argparse.Namespace, ctx: DistContext) -> dict:
    from fastdino.data import build_train_loader, generate_demo_dataset

    device = ctx.device
    check_output_dir(cfg.train.output_dir)
    require_tensorboard(cfg)  # every rank: a missing package stops all of them, before any work
    resolved = resolve(cfg, device, ctx.world_size)

    # ============ data ============
    if demo_data_wanted(cfg) and ctx.is_main:
        d = cfg.data
        generate_demo_dataset(d.path, d.demo_num_images, d.demo_num_classes, d.demo_image_size, seed=cfg.train.seed,
                              progress=cfg.train.progress)
    barrier()
    batch = cfg.optim.batch_size_per_gpu
    loader = build_train_loader(cfg.data, batch_size=batch, rank=ctx.rank, world_size=ctx.world_size,
                                seed=cfg.train.seed, device=device, dtype=DTYPES[resolved.crops_dtype],
                                backend=resolved.data, photometric=resolved.photometric, masking=build_masking(cfg),
                                gram_from_epoch=cfg.gram.start_epoch)  # the Gram crops only once the Gram teacher runs
    steps_per_epoch = loader.steps_per_epoch  # >= 1: the loader refuses data smaller than one global batch
    if loader.plan.multi_resolution and ctx.is_main:
        log.info("data.crop_sets: %s, one drawn per step (data.local_crop_size and data.gram_crop_size are not used)",
                 ", ".join(f"{s.global_size}/{s.local_size}" + (f"/{s.gram_size}" if s.gram_size else "") + f" px p={s.p:g}"
                           for s in loader.plan.sets))

    # ============ student, teacher, recipe, backend ============
    run = build_run(cfg, ctx, steps_per_epoch, resolved,
                    init_from="" if resumes(args, cfg, resolved) else cfg.train.init_from)
    if ctx.is_main:
        write_config(cfg, resolved)

    # ============ resume ============
    start = (0, 0, 0) if args.resume is None else _resume(run, args.resume, steps_per_epoch)
    metrics_path = os.path.join(cfg.train.output_dir, "metrics.jsonl")
    if ctx.is_main and args.resume is not None:
        drop_metrics_from(metrics_path, start[2])  # the steps after the checkpoint are logged again
    tensorboard_dir = os.path.join(cfg.train.output_dir, "tensorboard") if cfg.train.tensorboard else None
    metrics = MetricsLog(metrics_path if ctx.is_main else None, tensorboard_dir if ctx.is_main else None,
                         purge_step=start[2] if args.resume is not None else None)
    progress = None
    try:
        with StopControl(ctx.world_size, ctx.is_main, cfg.train.checkpoint_minutes) as control:
            total_steps = cfg.optim.epochs * steps_per_epoch
            if cfg.train.max_steps:
                total_steps = min(total_steps, cfg.train.max_steps)
            if ctx.is_main and cfg.train.progress:
                from tqdm import tqdm

                progress = tqdm(total=total_steps, initial=start[2], unit="step", dynamic_ncols=True,
                                mininterval=1.0)
            if ctx.is_main:
                log.info("fastdino: %s/%d, %d+%d crops, %d images, %d steps/epoch, global batch %d, device %s",
                         cfg.model.arch, cfg.model.patch_size, 2, cfg.data.local_crops_number, loader.num_images,
                         steps_per_epoch, batch * ctx.world_size, device)
            summary = _loop(run, loader, metrics, progress, control, start, total_steps)
    finally:
        if progress is not None:
            progress.close()
        metrics.close()
        loader.close()
    barrier()
    summary.update(corrupt_images=loader.num_corrupt)
    if ctx.is_main and summary["steps"] == start[2]:
        log.info("done: nothing left to train, the run is at step %d (optim.epochs / train.max_steps)", start[2])
    elif ctx.is_main:
        log.info("done: %d steps, last loss %.4f, %d corrupt images skipped", summary["steps"], summary["loss"],
                 loader.num_corrupt)
    return summary


def _loop(run: Run, loader, metrics: MetricsLog, progress, control: StopControl, start: tuple,
          total_steps: int) -> dict:
    """The epochs: step, log (the only host reads), checkpoint (epoch ends, train.checkpoint_every,
    the clock, a stop signal), online k-NN. Returns {"steps", "loss"}."""
    cfg, ctx, state = run.cfg, run.ctx, run.state
    device, steps_per_epoch = ctx.device, loader.steps_per_epoch
    start_epoch, start_step_in_epoch, it = start
    monitor = CollapseMonitor(cfg.model.out_dim, targets=cfg.loss.targets)  # warns when entropy -> 0 or ln K, or KL -> 0
    knn_sets = (knn_holdout(cfg.data.path, cfg.train.knn_holdout_per_class, seed=cfg.train.seed)
                if cfg.train.knn_every > 0 else None)
    images_per_step = cfg.optim.batch_size_per_gpu * ctx.world_size
    pending: list[tuple[int, int, dict]] = []  # (step, epoch, step outputs) not yet read by the host
    last_log_time, last_log_step = time.perf_counter(), it
    summary = {"steps": it, "loss": float("nan")}

    def log_pending():
        nonlocal last_log_time, last_log_step
        now = time.perf_counter()
        ips = images_per_step * (it - last_log_step) / max(now - last_log_time, 1e-9)
        last_log_time, last_log_step = now, it
        losses, _ = _log_pending(run, pending, metrics, monitor, ips, loader.num_corrupt)
        pending.clear()
        summary.update(loss=losses[-1], steps=it)
        if progress is not None:
            progress.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4f}", img_s=f"{ips:.1f}",
                                 **({"warn": monitor.flag} if monitor.flag else {}))

    done = it >= total_steps
    for epoch in range(start_epoch, cfg.optim.epochs):
        if done:
            break
        first_step = start_step_in_epoch if epoch == start_epoch else 0
        for step_in_epoch, batch in enumerate(loader.epoch(epoch, start_step=first_step), start=first_step):
            crops, masks = batch if loader.masking is not None else (batch, None)  # iBOT: (crops, MaskBatch)
            state.load_hyperparams(run.table, it)
            if run.gram is not None:  # Gram anchoring: from its start epoch (built then), the EMA teacher when due
                state.gram_teacher = run.gram.before_step(it, run.backend.teacher_backbone_state)
            pending.append((it, epoch, run.step_fn(state, crops, masks)))
            it += 1
            if it % cfg.train.log_every == 0 or it == total_steps:  # ============ logging ============
                log_pending()
            if progress is not None:
                progress.update(1)

            # ============ checkpoint: epoch end, every N steps, on the clock, on a stop signal ============
            end_of_epoch = step_in_epoch + 1 == steps_per_epoch
            done = it >= total_steps
            stop, due = control.poll()
            if (cfg.train.checkpoint_every and it % cfg.train.checkpoint_every == 0) or end_of_epoch or done \
                    or due or stop:
                next_epoch, next_step = (epoch + 1, 0) if end_of_epoch else (epoch, step_in_epoch + 1)
                keep = end_of_epoch and (epoch + 1) % cfg.train.saveckp_freq == 0
                run.backend.save(client_state(state.targets, next_epoch, next_step, it, cfg, run.resolved,
                                              state.patch_targets, run.gram),
                                 cfg.train.output_dir, keep_as=f"checkpoint{epoch:04d}.pth" if keep else None)
                control.checkpointed()
            if stop:
                if pending:
                    log_pending()
                raise Interrupted(stop, it, run.backend.checkpoint_path(cfg.train.output_dir))
            if knn_sets is not None and end_of_epoch and (epoch + 1) % cfg.train.knn_every == 0:
                zero3 = run.resolved.backend == "deepspeed" and cfg.deepspeed.zero_stage == 3  # every rank gathers
                if ctx.is_main or zero3:
                    top1 = online_knn(run.backend.teacher_module.backbone, *knn_sets, device,
                                      image_size=cfg.data.global_crop_size)
                    if ctx.is_main:
                        metrics.write({"step": it - 1, "epoch": epoch, "knn_top1": top1})
                        metrics.flush()
                        log.info("epoch %d: online k-NN top-1 of the teacher %.2f%%", epoch, top1)
            if done:
                break
    summary["steps"] = it
    return summary


def drop_metrics_from(path: str, step: int) -> None:
    """Resuming at `step`: drop the records of steps >= step (they are about to be logged again), so
    metrics.jsonl holds each step once. Rewritten atomically; broken lines (a killed run) go too."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step", -1) < step:
                kept.append(json.dumps(record) + "\n")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def _log_pending(run: Run, pending: list, metrics: MetricsLog, monitor: CollapseMonitor, ips: float,
                 corrupt: int) -> tuple[list[float], dict]:
    """Read the pending steps' values and the counters in one device-to-host copy (fp64: exact step
    numbers), stop on a bad step, write one metrics record per step. Returns the losses."""
    cfg, state = run.cfg, run.state
    names = list(pending[-1][2])
    values = torch.cat([torch.stack([p[2]["loss"] for p in pending]).double(),
                        torch.stack([pending[-1][2][n] for n in names]).double(),
                        state.counters.double()]).cpu().tolist()
    n = len(pending)
    losses, last = values[:n], dict(zip(names, values[n:n + len(names)]))
    counters = values[n + len(names):]
    if counters[BAD_STEPS] > 0:
        raise TrainingError(
            f"non-finite loss at step {int(counters[FIRST_BAD_STEP])} (epoch {pending[-1][1]}): that step's "
            f"optimizer, teacher and center updates were skipped; last checkpoint in "
            f"'{cfg.train.output_dir}' is intact; lower optim.lr or check the data")
    for (step, ep, _), value in zip(pending, losses):
        record = {"step": step, "epoch": ep, "loss": value, **run.schedules.values(step)}
        record.pop("last_layer_frozen")
        if step == pending[-1][0]:
            entropy = last["teacher_entropy"]
            record.update({k: v for k, v in last.items() if k != "loss"}, kl=value - entropy, images_per_s=ips,
                          corrupt_images=corrupt, skipped_updates=int(counters[SKIPPED_UPDATES]))
            warning = monitor.update(entropy, value - entropy, step=step)
            if warning and run.ctx.is_main:
                log.warning(warning)
        metrics.write(record)
    metrics.flush()
    return losses, last


class ProgressAwareHandler(logging.StreamHandler):
    """Log lines go above the progress bar (tqdm.write), never onto its line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        handlers=[ProgressAwareHandler()])
    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        cfg, args = parse_args(argv)
        train(cfg, args)
    except Interrupted as e:  # checkpointed at a step boundary: exit as the signal would have
        if main_rank:
            print(f"fastdino: {e}", file=sys.stderr)
        return 128 + e.signum
    except (Abort, KeyboardInterrupt) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        if main_rank:
            print(f"fastdino: {'aborted' if isinstance(e, Abort) else 'interrupted'} by "
                  f"{signal.Signals(signum).name}: stopped at once; the last complete checkpoint is intact "
                  "(resume with --resume)", file=sys.stderr)
        return 128 + signum
    except (ConfigError, TrainingError, CheckpointError) as e:
        print(f"fastdino: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # data errors and the like: one line, not a traceback
        from fastdino.data import DataError
        from fastdino.eval.common import EvalError
        from fastdino.models import AttentionBackendError

        if isinstance(e, (DataError, EvalError, AttentionBackendError)):
            print(f"fastdino: error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
