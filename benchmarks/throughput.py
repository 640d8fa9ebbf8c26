"""End-to-end DINO training throughput: fastdino against its reference mode, in one run, on this device.

    python benchmarks/throughput.py --config configs/vits16.json                   # markdown table on stdout
    python benchmarks/throughput.py --config configs/vitb8.json --batch-size 64 --json vitb8.json
    python benchmarks/throughput.py --config configs/demo.json --steps 3 --warmup 1   # CPU smoke run (CI)
    python benchmarks/throughput.py --config configs/vits16.json --baseline-repo ~/src/dino
    python benchmarks/throughput.py --config configs/vits16.json --time-budget 200 --json out.json  # bounded wall time

Rows (each one config, built and timed in turn in this process on the same device and batch):
    reference     train.reference=true: the official algorithm, every component's plain reference
                  (per-pair loss loop, per-parameter EMA and clipping, crops unpacked through math
                  attention, CPU augmentation: fastdino.config.REFERENCE)
    +loss, +ema_clip, +attention, +packed, +fused_head, +compile, +residual_norm, +bias_gelu,
    +bf16_residual, +cuda_graphs, +data
                  the reference with one fast component switched on: what that component buys alone
                  (+cuda_graphs: the reference step replayed from a CUDA graph; its phases are not split.
                  The config's fastdino row with graphs: --train.cuda_graphs true --rows fastdino)
    fastdino      the config as given (impls at "auto": every fast path available on this device)
    official      with --baseline-repo: a checkout of facebookresearch/dino timed on the same crops
A component whose fast impl cannot be built here (no Triton, no DALI, no flash-attn), or resolves to
the reference impl on this device, shows as n/a with the reason; a row that crashes while timed shows
as failed (and the exit status is 1).

Data (--data): "synthetic" feeds random crops already on the device (the model step alone); "real"
runs the configured loader over a folder of JPEGs (the config's data.path, --data-path, or a folder
generated at a realistic size); "both" (default) times every row on synthetic crops, then reference,
+data and fastdino again on real data. The data column is the time a step waits for its batch.

Timing: a timestamp when the batch is in hand and at each phase mark of train_step (CUDA events on
the stream: no host sync; perf_counter on CPU), summed per phase; warm-up steps excluded; --repeats
windows of --steps steps, each between two device synchronizations; the window with the median time
gives images/s and the split. Log steps read the loss as train.py does (every train.log_every steps).

FLOPs are counted analytically per image (patch embedding, qkv/proj/MLP matmuls, attention QK^T and AV,
head MLP and last layer; the iBOT head on the expected masked tokens; registers / storage tokens):
x3 for the student (forward + backward) on 2 global + N local crops, x1 for the teacher forward on the
2 global crops, x1 for a Gram teacher on the 2 Gram crops; recomputation under activation checkpointing is reported
apart (hardware FLOPs), not in MFU. MFU = images/s x FLOPs per image / the device's dense bf16 peak.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import gc
import glob
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/throughput.py` from a checkout
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fastdino.config import REFERENCE, Config, ConfigError, load_config, split_cli_overrides  # noqa: E402
from fastdino.models import arch_spec, extra_tokens  # noqa: E402
from fastdino.models.vision_transformer import ARCH_DIMS  # noqa: E402,F401  (the widths, for tests)

# ------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------
# component -> the keys it switches, with their fast value when the config holds the reference one
COMPONENTS = {
    "loss": {"loss.impl": "auto"},
    "ema_clip": {"optim.ema_impl": "auto", "optim.clip_impl": "auto"},
    "attention": {"model.attn": "auto"},
    "packed": {"model.packed_multicrop": True},
    "fused_head": {"model.fused_head": True, "loss.impl": "auto"},  # the head's last layer inside the fused loss
    "compile": {"model.compile": True},
    "residual_norm": {"model.fused_residual_norm": True},  # the blocks' residual add + norm2 as one op
    "bias_gelu": {"model.fused_bias_gelu": True},  # the MLPs' fc1 bias + GELU as one op (bias grad in its backward)
    "bf16_residual": {"model.residual_dtype": "bf16"},  # the blocks' residual stream in bf16 (DINOv3)
    "cuda_graphs": {"train.cuda_graphs": True},  # the whole step replayed from a CUDA graph (no per-phase split)
    "data": {"data.backend": "auto", "data.photometric_impl": "auto"},  # DALI decoding, fused colour ops
}
# component -> the fields of fastdino.resolve.Resolved that tell what it resolved to
IMPL_KEYS = {"loss": ("loss",), "ema_clip": ("ema", "clip"), "attention": ("attn",), "packed": ("packed",),
             "fused_head": ("fused_head", "loss"), "compile": ("compile",), "residual_norm": ("residual_norm",),
             "bias_gelu": ("bias_gelu",), "bf16_residual": ("residual_dtype",), "cuda_graphs": ("cuda_graphs",),
             "data": ("data", "photometric")}
ROW_NAMES = ("reference",) + tuple(f"+{c}" for c in COMPONENTS) + ("fastdino",)
PHASES = ("data", "teacher_forward", "student_forward", "loss", "backward", "optimizer", "teacher_update")

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched on torch.cuda.get_device_name().
# First match wins, so the specific names come before the general ones.
PEAK_BF16_TFLOPS = (
    (("H100", "PCIE"), 756.0), (("H100", "NVL"), 835.0), (("H100",), 989.4), (("H200",), 989.4),
    (("H800",), 989.4), (("GH200",), 989.4), (("B200",), 2250.0), (("B100",), 1750.0),
    (("A100",), 312.0), (("A800",), 312.0), (("A10G",), 70.0), (("A10",), 125.0), (("L40S",), 362.0),
    (("L40",), 181.0), (("L4",), 121.0), (("RTX 4090",), 165.2), (("RTX 3090",), 71.0),
    (("A6000",), 154.8), (("V100",), 125.0), (("T4",), 65.0),
)

# DINO head: 3 layers (depth and widths of the ViT: model.depth, fastdino.models.ARCH_DIMS; mlp_ratio 4)
HEAD_HIDDEN, HEAD_BOTTLENECK = 2048, 256


class BenchmarkError(ValueError):
    """Bad benchmark input: one line naming the culprit."""


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300]}" if msg else type(e).__name__


def _override(key: str, value) -> str:
    """'section.key=value' as load_config parses it (strings raw, the rest as JSON)."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def _get(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def row_overrides(name: str, cfg: Config) -> dict:
    """The config keys a row sets on top of the user's config (fastdino: none)."""
    if name == "fastdino":
        return {}
    if name == "reference":
        return {"train.reference": True}
    component = name.lstrip("+")
    if component not in COMPONENTS:
        raise BenchmarkError(f"--rows: unknown row '{name}' (rows: {', '.join(ROW_NAMES)})")
    row = dict(REFERENCE)
    for key, fast in COMPONENTS[component].items():
        configured = _get(cfg, key)
        row[key] = configured if configured != REFERENCE[key] else fast
    return row


def plan_rows(names: list[str], data: str) -> list[tuple[str, str]]:
    """(row, data mode) pairs in run order: reference and fastdino first (the headline survives a
    --time-budget or a killed run), then the component rows. 'both': every row on synthetic crops,
    and the rows where the data pipeline matters (reference, fastdino, +data) on real data too."""
    if data in ("synthetic", "real"):
        plan = [(n, data) for n in names]
    else:
        plan = [(n, "synthetic") for n in names if n != "+data"]
        plan += [(n, "real") for n in names if n in ("reference", "+data", "fastdino")]
    headline = [p for p in plan if p[0] in ("reference", "fastdino")]
    return headline + [p for p in plan if p not in headline]


def display_order(row: dict) -> tuple:
    """Table order: synthetic before real, then reference, components, fastdino, official."""
    names = ROW_NAMES + ("official",)
    return (row["data"] != "synthetic", names.index(row["name"]) if row["name"] in names else len(names))


# ------------------------------------------------------------------------------------------------
# FLOPs and peak
# ------------------------------------------------------------------------------------------------
def vit_forward_flops(dim: int, depth: int, patch: int, size: int, mlp_ratio: float = 4.0,
                      extra_tokens: int = 0) -> float:
    """Forward FLOPs of the ViT backbone on one size x size crop (2 per multiply-add), n = tokens
    ([CLS], `extra_tokens` registers / storage tokens, patches): patch embed 2 patches 3p^2 d; per
    block qkv 6 n d^2, proj 2 n d^2, MLP 4 r n d^2, attention QK^T and AV 4 n^2 d. LayerNorm, softmax,
    GELU, RoPE and residuals are elementwise and left out."""
    patches = (size // patch) ** 2
    n = patches + 1 + extra_tokens
    embed = 2.0 * patches * (3 * patch * patch) * dim
    block = (8.0 + 4.0 * mlp_ratio) * n * dim * dim + 4.0 * n * n * dim
    return embed + depth * block


def head_forward_flops(dim: int, out_dim: int, hidden: int = HEAD_HIDDEN, bottleneck: int = HEAD_BOTTLENECK) -> float:
    """DINO head on one [CLS] vector: d->hidden->hidden->bottleneck MLP, then bottleneck->K last layer."""
    return 2.0 * (dim * hidden + hidden * hidden + hidden * bottleneck + bottleneck * out_dim)


def flops_per_image(cfg: Config) -> dict:
    """Model FLOPs per image of one training step (see the module docstring); GFLOP in the keys' units."""
    m, d = cfg.model, cfg.data
    try:
        spec = arch_spec(m.arch, m.depth)
    except ValueError as e:
        raise BenchmarkError(f"no FLOP model: {e}") from None
    dim, depth = spec["embed_dim"], spec["depth"]  # (dinov2 SwiGLU: the same 8 d^2 per token as the MLP)
    extra = extra_tokens(m)  # registers / DINOv3's storage tokens
    head = head_forward_flops(dim, m.out_dim)
    g = vit_forward_flops(dim, depth, m.patch_size, d.global_crop_size, extra_tokens=extra)
    loc = vit_forward_flops(dim, depth, m.patch_size, d.local_crop_size, extra_tokens=extra)
    n_local = d.local_crops_number
    # iBOT: its head on the masked patch tokens of the 2 global crops, student and teacher; the expected
    # count (mask_probability x the mean mask ratio x the patches), not the static upper bound computed
    ibot = 0.0
    if cfg.loss.ibot_weight > 0:
        masked = 2 * d.mask_probability * (sum(d.mask_ratio) / 2) * (d.global_crop_size // m.patch_size) ** 2
        ibot = masked * head_forward_flops(dim, m.ibot_out_dim if m.ibot_head == "separate" else m.out_dim)
    student_backbone = 2 * g + n_local * loc
    student_fwd = student_backbone + (2 + n_local) * head + ibot
    teacher_fwd = 2 * (g + head) + ibot
    # Gram anchoring (DINOv3): the Gram teacher's forward on the 2 Gram crops (while it is on)
    gram_fwd = 0.0
    if cfg.gram.weight > 0:
        gram_fwd = 2 * vit_forward_flops(dim, depth, m.patch_size, d.gram_crop_size, extra_tokens=extra)
    model = 3 * student_fwd + teacher_fwd + gram_fwd
    recompute = student_backbone if m.activation_checkpointing else 0.0
    return {"student_forward_gflop": student_fwd / 1e9, "teacher_forward_gflop": teacher_fwd / 1e9,
            "gram_teacher_forward_gflop": gram_fwd / 1e9, "model_gflop": model / 1e9,
            "hardware_gflop": (model + recompute) / 1e9}


def device_peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it came from) for MFU."""
    if override is not None:
        if not override > 0:
            raise BenchmarkError(f"--peak-tflops must be > 0, got {override}")
        return float(override), f"--peak-tflops {override:g}"
    if device.type != "cuda":
        return None, "no peak for CPU (pass --peak-tflops for MFU)"
    name = torch.cuda.get_device_name(device)
    upper = name.upper()
    for keys, peak in PEAK_BF16_TFLOPS:
        if all(k in upper for k in keys):
            return peak, f"{name}: dense bf16 peak {peak:g} TFLOP/s"
    return None, f"{name}: peak unknown (pass --peak-tflops for MFU)"


# ------------------------------------------------------------------------------------------------
# Building one row: the same objects train.py builds
# ------------------------------------------------------------------------------------------------
def crop_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """Crop dtype on the device, as train.py resolves it (fastdino.resolve.crops_dtype)."""
    from fastdino.resolve import crops_dtype

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[crops_dtype(cfg, device)]


def build_run(cfg: Config, device: torch.device, steps_per_epoch: int):
    """Models, backend, recipe and schedules for one process: fastdino.train.build_run, exactly what
    train.py runs."""
    from fastdino.distributed import DistContext
    from fastdino.train import build_run as engine_build_run

    ctx = DistContext(rank=0, world_size=1, local_rank=device.index or 0, device=device)
    return engine_build_run(cfg, ctx, steps_per_epoch)


def resolved_impls(run, loader_backend: str | None) -> dict:
    """What each component resolved to in this row (the engine's Resolved record)."""
    r = run.resolved
    return {"loss": r.loss, "ema": r.ema, "clip": r.clip, "attn": r.attn, "packed": r.packed_multicrop,
            "fused_head": r.fused_head, "compile": r.compile, "residual_norm": r.residual_norm, "bias_gelu": r.bias_gelu,
            "residual_dtype": r.residual_dtype, "cuda_graphs": r.cuda_graphs, "data": loader_backend or "synthetic",
            "photometric": r.photometric}


def _is_reference(component: str, impls: dict) -> bool:
    """Whether a component resolved to its reference impl (unknown, None, counts as not)."""
    if component == "loss":
        return impls.get("loss") == "reference"
    if component == "ema_clip":
        return impls.get("ema") == "loop" and impls.get("clip") == "loop"
    if component == "attention":
        return impls.get("attn") == "math"
    if component == "packed":
        return impls.get("packed") is False
    if component == "fused_head":  # the fused head is the fused loss with the last layer inside it
        return impls.get("fused_head") is False or impls.get("loss") == "reference"
    if component == "compile":
        return impls.get("compile") == "off"
    if component == "residual_norm":  # off, or the op's torch reference (no GPU): nothing fused to time
        return impls.get("residual_norm") in ("off", "torch")
    if component == "bias_gelu":  # off, or the op's torch reference (no GPU): nothing fused to time
        return impls.get("bias_gelu") in ("off", "torch")
    if component == "bf16_residual":
        return impls.get("residual_dtype") == "fp32"
    if component == "cuda_graphs":
        return impls.get("cuda_graphs") is False
    if component == "data":
        return impls.get("data") == "torch" and impls.get("photometric", "torch") == "torch"
    return False


def same_as_reference(name: str, impls: dict, cfg: Config) -> str | None:
    """Why a component row would time the reference again (its fast impl resolved to the reference
    one on this device, or the engine ignores the key), or None."""
    component = name.lstrip("+")
    if component not in COMPONENTS or not _is_reference(component, impls):
        return None
    asked = ", ".join(f"{k}={_get(cfg, k)}" for k in COMPONENTS[component])
    got = ", ".join(f"{k}={impls.get(k)}" for k in IMPL_KEYS[component])
    return f"{asked} resolves to {got} (the reference) here"


def not_reference(impls: dict) -> list[str]:
    """Components of the reference row that did not resolve to their reference impl (or are unknown)."""
    return [c for c in COMPONENTS if c != "data" and not _is_reference(c, impls)]


def synthetic_batches(cfg: Config, batch: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """One crop-major list of random crops on the device (normal like normalized images, never zeros),
    fed to every step."""
    g = torch.Generator().manual_seed(seed)
    d = cfg.data
    sizes = [d.global_crop_size] * 2 + [d.local_crop_size] * d.local_crops_number
    sizes += [d.gram_crop_size] * 2 if cfg.gram.weight > 0 else []  # Gram anchoring: the Gram teacher's crops
    crops = [torch.randn(batch, 3, s, s, generator=g).to(device=device, dtype=dtype) for s in sizes]
    while True:
        yield crops


def real_batches(loader, start_epoch: int = 0):
    """The loader's batches, epoch after epoch."""
    epoch = start_epoch
    while True:
        n = 0
        for crops in loader.epoch(epoch):
            n += 1
            yield crops
        if n == 0:
            raise BenchmarkError("data loader yielded no batch in an epoch")
        epoch += 1


def with_masks(batches, cfg: Config, batch: int, device: torch.device, from_loader: bool):
    """(crops, iBOT masks or None) per step: a loader built with the config's masking yields both;
    synthetic crops get the masks of a fixed batch of dataset indices (the recipe's statistics)."""
    from fastdino.train import build_masking

    masking = build_masking(cfg)
    if masking is not None and from_loader:
        yield from batches
        return
    masks = None if masking is None else masking(cfg.train.seed, 0, np.arange(batch)).to(device)
    for crops in batches:
        yield crops, masks


def prefetch_depth(loader) -> int:
    """Batches a loader can hold ready before the model asks (torch: workers x prefetch factor)."""
    depth = getattr(loader, "prefetch_depth", None)
    if depth is not None:
        return int(depth)
    dl = getattr(loader, "_loader", None)
    if dl is not None and getattr(dl, "num_workers", 0) > 0:
        return int(dl.num_workers) * int(dl.prefetch_factor or 2)
    return 2


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
class PhaseClock:
    """Timestamps at phase ends: CUDA events recorded on the current stream (no host sync) on a GPU,
    perf_counter on CPU. durations() (after a synchronize) sums the time between consecutive marks
    by the phase that ends at the later mark."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def mark(self, phase: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((phase, event))
        else:
            self.marks.append((phase, time.perf_counter()))

    def durations(self) -> dict[str, float]:
        totals: dict[str, float] = defaultdict(float)
        for (_, a), (phase, b) in zip(self.marks, self.marks[1:]):
            totals[phase] += a.elapsed_time(b) / 1e3 if self.cuda else b - a
        return dict(totals)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(run, batches, n: int, it0: int, epoch: int, spe: int, clock: PhaseClock | None = None) -> int:
    """n training steps as train.py runs them (the loss read on log steps); returns the next step.
    The schedules are read at step epoch * spe + it % spe (`epoch`: a steady-state epoch)."""
    from fastdino.step import BAD_STEPS

    mark = clock.mark if clock is not None else (lambda phase: None)
    log_every = run.cfg.train.log_every
    if run.gram is not None and run.state.gram_teacher is None:  # measure the Gram phase's step
        run.state.gram_teacher = run.gram.before_step(run.gram.start, run.backend.teacher_backbone_state)
    for i in range(n):
        it = it0 + i
        crops, masks = next(batches)
        mark("data")
        run.state.load_hyperparams(run.table, epoch * spe + it % spe)
        out = run.step_fn(run.state, crops, masks, mark=mark)
        if (it + 1) % log_every == 0:  # train.py's only host sync: read the losses and the counters
            float(out["loss"])
            int(run.state.counters[BAD_STEPS].item())
            mark("log")
    return it0 + n


def time_windows(run, batches, device, steps: int, repeats: int, it0: int, epoch: int, spe: int) -> list[dict]:
    """`repeats` timed windows of `steps` steps: wall time between two synchronizations and the per-phase
    split from the clock."""
    windows = []
    it = it0
    for _ in range(repeats):
        clock = PhaseClock(device)
        synchronize(device)
        start = time.perf_counter()
        clock.mark("start")
        it = run_steps(run, batches, steps, it, epoch, spe, clock)
        synchronize(device)
        wall = time.perf_counter() - start
        windows.append({"seconds": wall, "phases": clock.durations()})
    return windows


def summarize(windows: list[dict], batch: int, steps: int) -> dict:
    """The median window (by time): images/s, step ms, per-phase ms per step; all windows' images/s."""
    order = sorted(range(len(windows)), key=lambda i: windows[i]["seconds"])
    w = windows[order[(len(order) - 1) // 2]]
    phases = {p: 1e3 * w["phases"].get(p, 0.0) / steps for p in PHASES}
    step_ms = 1e3 * w["seconds"] / steps
    phases["other"] = max(step_ms - sum(phases.values()), 0.0)  # log-step reads, host gaps at the edges
    return {"images_per_s": batch * steps / w["seconds"], "step_ms": step_ms, "phases_ms": phases,
            "windows_images_per_s": [batch * steps / x["seconds"] for x in windows]}


# ------------------------------------------------------------------------------------------------
# Real data
# ------------------------------------------------------------------------------------------------
def _generate_shard(args) -> None:
    from fastdino.data import generate_demo_dataset

    path, n, size, seed = args
    generate_demo_dataset(path, n, num_classes=8, image_size=size, seed=seed)


def prepare_real_data(num_images: int, size: int, base: str, workers: int | None = None) -> str:
    """A folder of >= num_images procedural JPEGs of size x size (fastdino.data.generate_demo_dataset,
    one shard per process), reused when a large enough one exists under `base`."""
    for path in sorted(glob.glob(os.path.join(base, f"bench_{size}px_*"))):
        try:
            if int(path.rsplit("_", 1)[1]) >= num_images:
                return path
        except ValueError:
            continue
    final = os.path.join(base, f"bench_{size}px_{num_images}")
    os.makedirs(base, exist_ok=True)
    workers = max(1, min(workers or os.cpu_count() or 1, 32, num_images))
    tmp = tempfile.mkdtemp(prefix=f".bench_{size}px.tmp-", dir=base)
    shares = [num_images // workers + (k < num_images % workers) for k in range(workers)]
    jobs = [(os.path.join(tmp, f"shard_{k:02d}"), n, size, k) for k, n in enumerate(shares) if n > 0]
    print(f"generating {num_images} JPEGs of {size}px in {final} ({len(jobs)} processes)...", file=sys.stderr)
    start = time.perf_counter()
    if len(jobs) == 1:
        _generate_shard(jobs[0])
    else:
        with concurrent.futures.ProcessPoolExecutor(len(jobs)) as pool:
            list(pool.map(_generate_shard, jobs))
    try:
        os.rename(tmp, final)
    except OSError:  # another run made it first
        if not os.path.isdir(final):
            raise
    print(f"generated in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    return final


def resolve_data_path(cfg: Config, args, batch: int, real_steps: int) -> str:
    """The JPEG folder of real mode: --data-path, else the config's data.path when it exists or the
    loader generates it (data.generate_demo), else a generated folder large enough that the timed
    steps never cross an epoch boundary (a loader restart is not steady state)."""
    if args.data_path:
        if not os.path.isdir(args.data_path):
            raise BenchmarkError(f"--data-path '{args.data_path}' is not a folder")
        return args.data_path
    if cfg.data.generate_demo or os.path.isdir(cfg.data.path):
        return cfg.data.path
    needed = batch * (real_steps + 2)
    needed = max(512, -(-needed // 512) * 512)  # round up: reusable across nearby step counts
    return prepare_real_data(needed, args.image_size, args.gen_dir)


# ------------------------------------------------------------------------------------------------
# One row
# ------------------------------------------------------------------------------------------------
def run_row(name: str, mode: str, base_cfg: Config, args, device: torch.device, data_path: str | None) -> dict:
    """Build the row's training state (and loader in real mode), warm up, time; never raises."""
    from fastdino.telemetry import GPUSampler

    overrides = row_overrides(name, base_cfg)
    if mode == "real" and data_path:
        overrides = {**overrides, "data.path": data_path}
    row = {"name": name, "data": mode, "overrides": overrides, "status": "ok", "reason": None}
    if name == "+data" and mode == "synthetic":
        return {**row, "status": "n/a", "reason": "synthetic crops: no data pipeline to speed up"}
    required = name in ("reference", "fastdino")  # these must run; a component may be unavailable here
    try:
        cfg = load_config(args.config, args.overrides + [_override(k, v) for k, v in overrides.items()])
    except ConfigError as e:  # a component this config cannot take (+bf16_residual with fp32 precision)
        if required:
            raise
        return {**row, "status": "n/a", "reason": _one_line(e)}
    batch = cfg.optim.batch_size_per_gpu
    t = loader = batches = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.train.seed)
    try:
        # ---- build ----
        try:
            if mode == "real":
                from fastdino.data import build_train_loader

                from fastdino.train import build_masking

                loader = build_train_loader(cfg.data, batch_size=batch, rank=0, world_size=1, seed=cfg.train.seed,
                                            device=device, dtype=crop_dtype(cfg, device), masking=build_masking(cfg))
                spe = loader.steps_per_epoch
                batches = with_masks(real_batches(loader), cfg, batch, device, from_loader=True)
            else:
                spe = args.warmup + args.steps * args.repeats + 1
                batches = with_masks(synthetic_batches(cfg, batch, device, crop_dtype(cfg, device), cfg.train.seed),
                                     cfg, batch, device, from_loader=False)
            t = build_run(cfg, device, spe)
        except Exception as e:
            return {**row, "status": "failed" if required else "n/a", "reason": _one_line(e)}
        row["impls"] = resolved_impls(t, getattr(loader, "backend", None))
        off = not_reference(row["impls"]) if name == "reference" else []
        if off:  # an engine that ignores a reference key: say so next to the numbers
            impls = row["impls"]
            row["note"] = "not the reference impl here: " + "; ".join(
                c + " (" + ", ".join(f"{k}={impls.get(k)}" for k in IMPL_KEYS[c]) + ")" for c in off)
        same = same_as_reference(name, row["impls"], cfg) if not required else None
        if same:
            return {**row, "status": "n/a", "reason": same}
        # ---- warm-up and timed windows ----
        epoch = min(cfg.optim.freeze_last_layer, cfg.optim.epochs - 1)  # steady state: last layer trains
        warmup = args.warmup
        if mode == "real":  # do not time a queue the loader filled during the build
            warmup = max(warmup, prefetch_depth(loader))
        row["warmup_steps"] = warmup
        try:
            start = time.perf_counter()
            it = run_steps(t, batches, warmup, 0, epoch, spe)
            synchronize(device)
            row["warmup_s"] = time.perf_counter() - start
            with GPUSampler(device, interval_s=args.telemetry_interval) as gpu:
                windows = time_windows(t, batches, device, args.steps, args.repeats, it, epoch, spe)
        except Exception as e:  # OOM, a kernel that fails at run time: the row failed
            return {**row, "status": "failed", "reason": _one_line(e)}
        row.update(summarize(windows, batch, args.steps))
        row["windows"] = windows
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
        row["gpu"] = gpu.summary()
        if row["gpu"]["energy_j"]:
            row["images_per_joule"] = batch * args.steps * args.repeats / row["gpu"]["energy_j"]
        return row
    finally:
        close = getattr(loader, "close", None)
        if batches is not None:
            batches.close()
        if callable(close):
            close()
        del t, loader, batches
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# The official code (--baseline-repo)
# ------------------------------------------------------------------------------------------------
def _official_dino_loss_class(repo: str):
    """DINOLoss from the checkout's main_dino.py, without importing the file (it imports torchvision):
    the class's source is compiled alone with the names it uses."""
    import ast

    import numpy as np
    import torch.distributed as dist
    import torch.nn as nn
    import torch.nn.functional as F

    path = os.path.join(repo, "main_dino.py")
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "DINOLoss":
            namespace = {"torch": torch, "nn": nn, "F": F, "np": np, "dist": dist}
            exec(compile(ast.Module([node], type_ignores=[]), path, "exec"), namespace)
            return namespace["DINOLoss"]
    raise BenchmarkError(f"--baseline-repo: no class DINOLoss in {path}")


def run_official(repo: str, base_cfg: Config, args, device: torch.device) -> dict:
    """The official training step (main_dino.py train_one_epoch, one GPU, no DDP wrapper) on the same
    synthetic crops: official ViT, MultiCropWrapper, DINOLoss, per-parameter clipping with .item(),
    per-parameter EMA, loss.item() every step. Autocast in the config's precision (the official code
    uses fp16 with a grad scaler; fp16 here uses one too)."""
    import torch.distributed as dist

    row = {"name": "official", "data": "synthetic", "overrides": {}, "status": "ok", "reason": None,
           "repo": os.path.abspath(repo)}
    cfg, started_pg = base_cfg, False
    added = False
    student = teacher = optimizer = dino_loss = None
    try:
        if cfg.model.depth not in (0, 12):  # the official vit_tiny/small/base fix depth=12: no like-for-like baseline
            return {**row, "status": "failed", "reason": f"model.depth={cfg.model.depth}: the official ViTs have "
                    f"12 blocks; set --model.depth=12 to time the official step"}
        for name in ("main_dino.py", "utils.py", "vision_transformer.py"):
            if not os.path.isfile(os.path.join(repo, name)):
                return {**row, "status": "failed", "reason": f"--baseline-repo '{repo}' has no {name}"}
        if repo not in sys.path:
            sys.path.insert(0, repo)
            added = True
        stale = [m for m in ("utils", "vision_transformer") if m in sys.modules]
        for m in stale:  # another package's `utils` must not shadow the checkout's
            del sys.modules[m]
        import utils as dino_utils
        import vision_transformer as vits

        DINOLoss = _official_dino_loss_class(repo)
        if dist.is_available() and not dist.is_initialized():  # DINOLoss.update_center all-reduces
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
            started_pg = True
        m, d, o = cfg.model, cfg.data, cfg.optim
        batch = o.batch_size_per_gpu
        torch.manual_seed(cfg.train.seed)
        s_backbone = vits.__dict__[m.arch](patch_size=m.patch_size, drop_path_rate=m.drop_path_rate)
        t_backbone = vits.__dict__[m.arch](patch_size=m.patch_size)
        dim = s_backbone.embed_dim
        student = dino_utils.MultiCropWrapper(s_backbone, vits.DINOHead(
            dim, m.out_dim, use_bn=m.use_bn_in_head, norm_last_layer=m.norm_last_layer)).to(device)
        teacher = dino_utils.MultiCropWrapper(t_backbone, vits.DINOHead(dim, m.out_dim, m.use_bn_in_head)).to(device)
        teacher.load_state_dict(student.state_dict())
        for p in teacher.parameters():
            p.requires_grad = False
        dino_loss = DINOLoss(m.out_dim, d.local_crops_number + 2, cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp,
                             cfg.loss.warmup_teacher_temp_epochs, o.epochs).to(device)
        optimizer = torch.optim.AdamW(dino_utils.get_params_groups(student))
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
        scaler = torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" else None
        spe = args.warmup + args.steps * args.repeats + 1
        lr = dino_utils.cosine_scheduler(o.lr * batch / 256.0, o.min_lr, o.epochs, spe, warmup_epochs=o.warmup_epochs)
        wd = dino_utils.cosine_scheduler(o.weight_decay, o.weight_decay_end, o.epochs, spe)
        mom = dino_utils.cosine_scheduler(o.momentum_teacher, 1, o.epochs, spe)
        epoch = min(o.freeze_last_layer, o.epochs - 1)
        batches = synthetic_batches(cfg, batch, device, torch.float32, cfg.train.seed)

        def step(it: int, clock: PhaseClock | None) -> None:
            mark = clock.mark if clock is not None else (lambda phase: None)
            images = next(batches)
            mark("data")
            it = epoch * spe + it % spe
            for i, group in enumerate(optimizer.param_groups):
                group["lr"] = lr[it]
                if i == 0:
                    group["weight_decay"] = wd[it]
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                teacher_output = teacher(images[:2])
                mark("teacher_forward")
                student_output = student(images)
                mark("student_forward")
                loss = dino_loss(student_output, teacher_output, epoch)
                mark("loss")
            if not math.isfinite(loss.item()):
                raise BenchmarkError(f"official: non-finite loss at step {it}")
            optimizer.zero_grad()
            if scaler is None:
                loss.backward()
                mark("backward")
                if o.clip_grad:
                    dino_utils.clip_gradients(student, o.clip_grad)
                dino_utils.cancel_gradients_last_layer(epoch, student, o.freeze_last_layer)
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                mark("backward")
                if o.clip_grad:
                    scaler.unscale_(optimizer)
                    dino_utils.clip_gradients(student, o.clip_grad)
                dino_utils.cancel_gradients_last_layer(epoch, student, o.freeze_last_layer)
                scaler.step(optimizer)
                scaler.update()
            mark("optimizer")
            with torch.no_grad():
                mm = mom[it]
                for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                    param_k.data.mul_(mm).add_((1 - mm) * param_q.detach().data)
            mark("teacher_update")

        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        from fastdino.telemetry import GPUSampler

        for i in range(args.warmup):
            step(i, None)
        windows, it = [], args.warmup
        with GPUSampler(device, interval_s=args.telemetry_interval) as gpu:
            for _ in range(args.repeats):
                clock = PhaseClock(device)
                synchronize(device)
                start = time.perf_counter()
                clock.mark("start")
                for _ in range(args.steps):
                    step(it, clock)
                    it += 1
                synchronize(device)
                windows.append({"seconds": time.perf_counter() - start, "phases": clock.durations()})
        row.update(summarize(windows, batch, args.steps))
        row["windows"] = windows
        row["impls"] = {"loss": "official", "ema": "official loop", "clip": "official loop", "attn": "official",
                        "packed": False, "fused_head": False, "data": "synthetic"}
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
        row["gpu"] = gpu.summary()
        return row
    except Exception as e:
        return {**row, "status": "failed", "reason": _one_line(e)}
    finally:
        if started_pg:
            dist.destroy_process_group()
        if added:
            sys.path.remove(repo)
        del student, teacher, optimizer, dino_loss
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def _fmt(x, spec: str = ".1f", none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def add_derived(result: dict) -> None:
    """Speed-up against the reference of the same data mode, TFLOP/s and MFU."""
    gflop = result["flops_per_image"]["model_gflop"]
    peak = result["peak_tflops"]
    ref = {r["data"]: r["images_per_s"] for r in result["rows"] if r["name"] == "reference" and r["status"] == "ok"}
    for r in result["rows"]:
        if r["status"] != "ok":
            continue
        r["speedup"] = r["images_per_s"] / ref[r["data"]] if r["data"] in ref else None
        r["tflops"] = r["images_per_s"] * gflop / 1e3
        r["mfu"] = r["tflops"] / peak if peak else None


def summary_lines(result: dict) -> list[str]:
    """One line per data mode: fastdino against the reference, and what each component buys alone."""
    out = []
    for mode in ("synthetic", "real"):
        rows = {r["name"]: r for r in result["rows"] if r["data"] == mode and r["status"] == "ok"}
        if "fastdino" not in rows or "reference" not in rows:
            continue
        fast = rows["fastdino"]
        mfu = "" if fast.get("mfu") is None else f", MFU {100 * fast['mfu']:.1f}%"
        parts = [f"{name[1:]} x{r['speedup']:.2f}" for name, r in rows.items() if name.startswith("+")]
        out.append(f"**{mode} data**: fastdino {fast['images_per_s']:.1f} images/s = x{fast['speedup']:.2f} the "
                   f"reference ({rows['reference']['images_per_s']:.1f}){mfu}"
                   + (f"; alone: {', '.join(parts)}" if parts else "") + ".")
    if "official" in {r["name"] for r in result["rows"] if r["status"] == "ok"}:
        off = next(r for r in result["rows"] if r["name"] == "official")
        out.append(f"**official checkout**: {off['images_per_s']:.1f} images/s (synthetic crops).")
    return out


def markdown(result: dict) -> str:
    f = result["flops_per_image"]
    lines = [
        f"## DINO training throughput: {result['config']} on {result['device_name']}",
        "",
        f"{result['arch']}, {result['crops']}, batch {result['batch_size']} per device, precision "
        f"{result['precision']}; torch {result['torch']}; {result['steps']} timed steps x {result['repeats']} "
        f"repeats (median), {result['warmup']} warm-up steps (real data: at least the loader's prefetch depth).",
        f"Model FLOPs per image {f['model_gflop']:.1f} GFLOP (student fwd {f['student_forward_gflop']:.1f} x3, "
        f"teacher fwd {f['teacher_forward_gflop']:.1f}); with recomputation {f['hardware_gflop']:.1f}. "
        f"Peak: {result['peak_source']}.",
        "",
        "| row | data | images/s | x ref | step ms | data | teacher fwd | student fwd+bwd | loss | optim | EMA "
        "| other | TFLOP/s | MFU | peak mem GiB | GPU util % | power W |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    notes = []
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {r['data']} | {r['status']} | | | | | | | | | | | | | | |")
            notes.append(f"- {r['name']} ({r['data']}): {r['status']}: {r['reason']}")
            continue
        p, gpu = r["phases_ms"], r.get("gpu") or {}
        mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        cells = [r["name"], r["data"], _fmt(r["images_per_s"]), _fmt(r.get("speedup"), ".2f"), _fmt(r["step_ms"]),
                 _fmt(p["data"]), _fmt(p["teacher_forward"]), _fmt(p["student_forward"] + p["backward"]),
                 _fmt(p["loss"]), _fmt(p["optimizer"]), _fmt(p["teacher_update"]), _fmt(p["other"]),
                 _fmt(r["tflops"], ".2f"), mfu, _fmt(r.get("peak_mem_gib"), ".2f"),
                 _fmt(gpu.get("gpu_util_pct"), ".0f"), _fmt(gpu.get("power_w"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Times are ms per step; optim includes per-tensor clipping; other = log-step reads and gaps.")
    lines += [""] + summary_lines(result)
    impl_lines = [f"- {r['name']} ({r['data']}): " + ", ".join(f"{k}={v}" for k, v in r["impls"].items())
                  for r in result["rows"] if r["status"] == "ok" and r.get("impls")]
    if impl_lines:
        lines += ["", "Resolved implementations:"] + impl_lines
    if notes:
        lines += ["", "Not timed:"] + notes
    warnings = [f"- {r['name']} ({r['data']}): {r['note']}" for r in result["rows"] if r.get("note")]
    warnings += [f"- {n}" for n in result.get("notes", [])]
    if warnings:
        lines += ["", "Warnings:"] + warnings
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = split_cli_overrides(argv)
    p = argparse.ArgumentParser(description="DINO end-to-end training throughput: fastdino vs its reference mode")
    p.add_argument("--config", default=None, help="JSON config (default: the built-in ViT-S/16 recipe)")
    p.add_argument("--batch-size", type=int, default=None, help="images per device (optim.batch_size_per_gpu)")
    p.add_argument("--data", choices=("synthetic", "real", "both"), default="both",
                   help="synthetic crops on the device, the real loader, or both (see the module doc)")
    p.add_argument("--data-path", default=None, help="JPEG folder for real mode (else the config's, or generated)")
    p.add_argument("--image-size", type=int, default=400, help="side of generated JPEGs (ImageNet's are ~400x350)")
    p.add_argument("--gen-dir", default=os.path.join(ROOT, "data"), help="where generated folders are kept")
    p.add_argument("--rows", default=",".join(ROW_NAMES), help=f"comma-separated subset of {','.join(ROW_NAMES)}")
    p.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 10 on GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 on GPU, 1 on CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed windows per row; median (default 3)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: table by device name)")
    p.add_argument("--baseline-repo", default=None, help="checkout of facebookresearch/dino to time too")
    p.add_argument("--telemetry-interval", type=float, default=0.1, help="NVML sampling period in seconds")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds: rows not started by then are skipped (n/a), so a wall-clock limit keeps a table")
    p.add_argument("--json", default=None, help="write the full results here (also after every row)")
    args = p.parse_args(rest)
    args.overrides = overrides
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise BenchmarkError(f"--batch-size must be >= 1, got {args.batch_size}")
        args.overrides.append(f"optim.batch_size_per_gpu={args.batch_size}")
    for name in ("steps", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise BenchmarkError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup is not None and args.warmup < 0:
        raise BenchmarkError(f"--warmup must be >= 0, got {args.warmup}")
    if args.time_budget is not None and not args.time_budget > 0:
        raise BenchmarkError(f"--time-budget must be > 0 seconds, got {args.time_budget}")
    if args.telemetry_interval <= 0:
        raise BenchmarkError(f"--telemetry-interval must be > 0, got {args.telemetry_interval}")
    if args.baseline_repo and not os.path.isdir(args.baseline_repo):
        raise BenchmarkError(f"--baseline-repo '{args.baseline_repo}' is not a folder")
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for r in args.rows:
        if r not in ROW_NAMES:
            raise BenchmarkError(f"--rows: unknown row '{r}' (rows: {', '.join(ROW_NAMES)})")
    if not args.rows:
        raise BenchmarkError("--rows: no row given")
    return args


def versions() -> dict:
    """Versions of the libraries that decide the numbers (from package metadata: nothing imported)."""
    from importlib import metadata

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for label, dists in (("triton", ("triton",)), ("flash_attn", ("flash-attn", "flash_attn")),
                         ("dali", ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110")),
                         ("deepspeed", ("deepspeed",)), ("nvidia_ml_py", ("nvidia-ml-py", "pynvml"))):
        out[label] = None
        for dist in dists:
            try:
                out[label] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def run(args) -> dict:
    from fastdino.distributed import resolve_device

    cfg = load_config(args.config, args.overrides)
    notes = []
    if cfg.deepspeed.enabled:  # one device: ZeRO shards nothing; time the engine's own step
        notes.append("deepspeed.enabled=true in the config: timed without DeepSpeed (one device, nothing to shard)")
        args.overrides.append("deepspeed.enabled=false")
        cfg = load_config(args.config, args.overrides)
    device = resolve_device(cfg.train.device, 0)
    on_gpu = device.type == "cuda"
    args.steps = args.steps or (10 if on_gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    args.repeats = args.repeats or 3
    peak, peak_source = device_peak_tflops(device, args.peak_tflops)
    batch = cfg.optim.batch_size_per_gpu
    plan = plan_rows(args.rows, args.data)
    data_path = None
    if any(mode == "real" for _, mode in plan):
        real_steps = max(args.warmup, 2 * max(cfg.data.num_workers, 1)) + args.steps * args.repeats
        data_path = resolve_data_path(cfg, args, batch, real_steps)
    result = {
        "config": args.config or "(defaults)", "overrides": args.overrides, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if on_gpu else (platform.processor() or "cpu"),
        "torch": torch.__version__, "arch": f"{cfg.model.arch}/{cfg.model.patch_size}",
        "crops": f"2x{cfg.data.global_crop_size} + {cfg.data.local_crops_number}x{cfg.data.local_crop_size}",
        "batch_size": batch, "precision": cfg.train.precision, "steps": args.steps, "warmup": args.warmup,
        "repeats": args.repeats, "flops_per_image": flops_per_image(cfg), "peak_tflops": peak,
        "peak_source": peak_source, "data_path": data_path, "versions": versions(), "notes": notes, "rows": [],
    }
    start = time.perf_counter()
    jobs = plan + ([("official", "synthetic")] if args.baseline_repo else [])
    for name, mode in jobs:
        spent = time.perf_counter() - start
        if args.time_budget is not None and spent > args.time_budget:
            row = {"name": name, "data": mode, "overrides": {}, "status": "n/a",
                   "reason": f"skipped: --time-budget {args.time_budget:g}s spent ({spent:.0f}s)"}
        else:
            print(f"[{name} / {mode}] ...", file=sys.stderr, flush=True)
            if name == "official":
                row = run_official(args.baseline_repo, cfg, args, device)
            else:
                row = run_row(name, mode, cfg, args, device, data_path)
        msg = f"{row['images_per_s']:.1f} images/s" if row["status"] == "ok" else f"{row['status']}: {row['reason']}"
        print(f"[{name} / {mode}] {msg}", file=sys.stderr, flush=True)
        result["rows"].append(row)
        if args.json:  # after every row: a run killed by a wall-clock limit still leaves its numbers
            add_derived(result)
            write_json(result, args.json, complete=False)
    result["rows"].sort(key=display_order)
    result["seconds"] = time.perf_counter() - start
    add_derived(result)
    return result


def write_json(result: dict, path: str, complete: bool) -> None:
    data = dict(result, complete=complete)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        result = run(args)
    except (BenchmarkError, ConfigError) as e:
        print(f"throughput: error: {e}", file=sys.stderr)
        return 2
    print(markdown(result))
    if args.json:
        write_json(result, args.json, complete=True)
    return 1 if any(r["status"] == "failed" for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
