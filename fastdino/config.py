"""One config tree for the whole engine.

Defaults live here as dataclasses (the official DINO ViT-S/16 recipe), each field with its allowed
values beside it; configs/*.json hold overrides only; the command line overrides both with
`--set section.key=value` (or the short form `--section.key=value`). Unknown keys, wrong types,
values outside a field's choices and impossible combinations are one-line errors that name the key.
What "auto" becomes on this machine is decided once, in fastdino/resolve.py, and written next to
the config (OUTPUT_DIR/config.json, every checkpoint).

`train.reference=true` is the reference mode: every component runs its plain-PyTorch reference
(REFERENCE below). The parity tests and the throughput benchmark's baseline use it.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, get_origin, get_type_hints


class ConfigError(ValueError):
    """A bad config: the message is one line that names the offending key."""


def choice(default, *allowed):
    """A field whose value must be one of `allowed` (checked by load_config)."""
    return field(default=default, metadata={"choices": allowed})


@dataclass
class ModelConfig:
    # vit_*: DINO's ViTs (patch 16 or 8); dinov2_*: DINOv2's (patch 14, LayerScale, registers option;
    # dinov2_vitt14: a ViT-Ti width with those options, no official weights: the CPU demo); dinov3_*: DINOv3's
    # (patch 16, RoPE, 4 storage tokens, masked key bias; dinov3_vitt16: ViT-Ti width, no official weights)
    arch: str = choice("vit_small", "vit_tiny", "vit_small", "vit_base",
                       "dinov2_vitt14", "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14",
                       "dinov3_vitt16", "dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16")
    patch_size: int = choice(16, 16, 8, 14)  # /8 models see 785 tokens at 224 px; dinov2_* need 14
    depth: int = 0  # transformer blocks; 0: the architecture's own (12; dinov2 L 24, g 40). The CPU demo uses 4
    num_register_tokens: int = choice(0, 0, 4)  # dinov2_*: register tokens between [CLS] and the patches
    # dinov2_*: the blocks' FFN; auto: the hub model's (SwiGLU for dinov2_vitg14, else MLP). The official
    # DINOv2 training configs use swiglu ("swiglufused") for ViT-L and ViT-g
    ffn: str = choice("auto", "auto", "mlp", "swiglu")
    drop_path_rate: float = 0.1  # stochastic depth of the student (teacher has none)
    drop_path_uniform: bool = False  # every block at drop_path_rate (DINOv2) instead of linear from 0
    efficient_drop_path: bool = False  # DINOv2's: a block's branch runs on the kept sequences only (same expectation)
    out_dim: int = 65536  # K: dimension of the DINO head output
    norm_last_layer: bool = True  # weight_g fixed to 1: logits are cosines. False helps ViT-B stability
    # the heads' last layer: weight_norm (DINO, DINOv2) or plain (DINOv3: Linear(256, K), no weight norm)
    head_last_layer: str = choice("weight_norm", "weight_norm", "plain")
    use_bn_in_head: bool = False
    # auto: on CUDA the fastest fused kernel for the global-crop shape (timed once), sdpa elsewhere
    attn: str = choice("auto", "auto", "flash_attn", "flash_attn_4", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa",
                       "math")
    packed_multicrop: bool = False  # student: all crops through each block together (varlen attention)
    activation_checkpointing: bool = False  # recompute each block in backward (memory for /8 models)
    compile: bool = False  # torch.compile the backbone blocks and the heads (one static graph per token layout)
    # each residual add (drop path, LayerScale) and the LayerNorm after it as one fused op (Triton on CUDA):
    # attention residual + norm2, MLP residual + the next block's norm1
    fused_residual_norm: bool = False
    # the MLP's fc1 bias and exact GELU as one fused op after a bias-free matmul, its backward fused with the
    # bias gradient (kernels/bias_gelu.py; Triton on CUDA): what model.compile's inductor does, for eager runs
    fused_bias_gelu: bool = False
    # the residual stream's dtype under bf16 autocast: fp32 (the official DINO / DINOv2 code: the fp32
    # [CLS] token and position embedding promote it) or bf16 (DINOv3's mixed precision; half the traffic)
    residual_dtype: str = choice("fp32", "fp32", "bf16")
    # dinov3_*: RoPE coordinate augmentations in training (the student; 0 = off): rescale by a factor in
    # [1/r, r] (the hub models' and the 7B recipe's 2), jitter each axis by a factor in [1/j, j], shift by [-s, s]
    rope_rescale_coords: float = 2.0
    rope_jitter_coords: float = 0.0
    rope_shift_coords: float = 0.0
    fused_head: bool = False  # the student head's last layer (256 -> K) inside the DINO loss: no [n*B, K] logits
    ibot_head: str = choice("separate", "separate", "shared")  # iBOT patch head: its own (DINOv2) or the DINO head
    ibot_out_dim: int = 65536  # K of a separate iBOT head


@dataclass
class LossConfig:
    impl: str = choice("auto", "auto", "fused", "reference")  # auto: fused (Triton) on CUDA, reference elsewhere
    # teacher targets: DINO's centering, or DINOv2's Sinkhorn-Knopp (no center; batch equipartition)
    targets: str = choice("centering", "centering", "sinkhorn_knopp")
    sinkhorn_iterations: int = 3
    dino_weight: float = 1.0  # weight of the DINO [CLS] term
    koleo_weight: float = 0.0  # KoLeo on the student's pre-head [CLS] of each global crop (DINOv2: 0.1)
    # DINOv3's distributed KoLeo: each rank's nearest neighbours are searched among the batches of a group of
    # consecutive ranks (all-gathered, gradients sent back), not its own batch only (dino.koleo_loss_distributed;
    # the 7B high-resolution adaptation: true). One process: the same as false
    koleo_distributed: bool = False
    # images per distributed-KoLeo group: a multiple of optim.batch_size_per_gpu that divides the global batch;
    # 0: the global batch (dino.koleo_distributed_loss_group_size, null; the high-resolution adaptation: 16)
    koleo_group_size: int = 0
    ibot_weight: float = 0.0  # iBOT masked-patch loss on the global crops (DINOv2: 1.0; 0 disables masking)
    warmup_teacher_temp: float = 0.04  # initial teacher temperature
    teacher_temp: float = 0.04  # final teacher temperature; anything above 0.07 is unstable
    warmup_teacher_temp_epochs: int = 0  # linear warmup of the teacher temperature (30 for ViT-B)
    # the warmup's steps: per_epoch (DINO: one value per epoch) or per_iteration (DINOv2: linear per iteration)
    teacher_temp_schedule: str = choice("per_epoch", "per_epoch", "per_iteration")
    student_temp: float = 0.1
    center_momentum: float = 0.9
    # DINOv3's dino.reweight_dino_local_loss: the DINO term's local-crop pairs count w times, w from its
    # local_loss_weight_schedule (linear_warmup_cosine_decay, per iteration): start -> peak over warmup_epochs,
    # a half cosine to end over cosine_epochs (-1: the rest of the run), then end. Defaults: the official
    # 0.5 throughout (the 7B recipe's high-resolution adaptation: the same). Not with model.fused_head
    reweight_local: bool = False
    local_weight_start: float = 0.5
    local_weight_peak: float = 0.5
    local_weight_end: float = 0.5
    local_weight_warmup_epochs: int = 0
    local_weight_cosine_epochs: int = -1


@dataclass
class OptimConfig:
    optimizer: str = choice("adamw", "adamw")  # torch's fused AdamW, lr / wd / skip flags on the device
    epochs: int = 100
    batch_size_per_gpu: int = 64
    lr: float = 0.0005  # peak lr at the reference batch, scaled by optim.lr_scaling
    # DINO: lr*B/256; DINOv2: lr*sqrt(B/1024); DINOv3 (its schedules v2): lr*4*sqrt(B/1024)
    lr_scaling: str = choice("linear_256", "linear_256", "sqrt_1024", "sqrt_1024_x4")
    # cosine: warmup, then a half cosine to min_lr (DINO, DINOv2); constant: warmup, then the peak lr to the end
    # (DINOv3's pretraining and Gram phases: linear_warmup_cosine_decay with peak = end); rise: a half cosine
    # from 0 up to the peak lr over warmup_epochs, then the peak (DINOv3's high-resolution adaptation: start =
    # peak = 0, end = its lr, cosine_epochs)
    lr_schedule: str = choice("cosine", "cosine", "constant", "rise")
    layerwise_decay: float = 1.0  # lr of block i (0-based, of D) times decay^(D - i); embeddings decay^(D+1) (DINOv2: 0.9)
    patch_embed_lr_mult: float = 1.0  # patch embedding lr multiplier on top of the layer-wise one (DINOv2: 0.2)
    min_lr: float = 1e-6  # end of the cosine schedule
    warmup_epochs: int = 10  # linear lr warmup (lr_schedule=rise: the half cosine's length)
    weight_decay: float = 0.04  # cosine from weight_decay to weight_decay_end; none on biases/norms
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0  # gradient norm clip (per optim.clip_grad_mode); 0 disables
    # per_tensor: each parameter's gradient clipped on its own (DINO); per_module: the global norm of each
    # student submodule (backbone, head, ibot_head) clipped, torch's clip_grad_norm_ per module (DINOv2)
    clip_grad_mode: str = choice("per_tensor", "per_tensor", "per_module")
    freeze_last_layer: int = 1  # epochs during which the heads' last layers are frozen
    # skip: no update at all, no Adam moments or step count (DINO); zero_lr: AdamW with lr 0 on them
    # (DINOv2's last_layer_lr_schedule): weights unchanged, moments and step count updated
    freeze_last_layer_mode: str = choice("skip", "skip", "zero_lr")
    momentum_teacher: float = 0.996  # EMA momentum, cosine to momentum_teacher_end over training (per iteration)
    momentum_teacher_end: float = 1.0  # 1 (DINO, DINOv2); = momentum_teacher keeps it constant (DINOv3)
    adamw_beta2: float = 0.999  # AdamW's second-moment decay (torch's default; DINOv3's 7B recipe: 0.99)
    # triton: flat buffers (one kernel); cuda: fastdino._C over parameter lists (DeepSpeed);
    # foreach: torch._foreach_* over parameter lists; loop: the reference, one tensor at a time
    ema_impl: str = choice("auto", "auto", "triton", "cuda", "foreach", "loop")
    clip_impl: str = choice("auto", "auto", "triton", "cuda", "foreach", "loop")


@dataclass
class DataConfig:
    backend: str = choice("auto", "auto", "dali", "torch")  # auto: dali when importable and on a GPU
    path: str = "data/imagenet/train"  # folder of images, nested at any depth; labels optional
    generate_demo: bool = False  # create the procedural demo dataset at `path` if it is missing
    demo_num_images: int = 2000
    demo_num_classes: int = 4
    demo_image_size: int = 96
    global_crops_scale: tuple = (0.4, 1.0)
    local_crops_scale: tuple = (0.05, 0.4)
    local_crops_number: int = 8  # N local crops per image (0 allowed)
    global_crop_size: int = 224
    local_crop_size: int = 96
    # DINOv3 Gram anchoring: > 0 adds 2 Gram-teacher crops of this size (the global crops' boxes, no distortions)
    gram_crop_size: int = 0
    horizontal_flips: bool = True  # random horizontal flips of every crop (p = 0.5); DINOv3's 7B recipe: off
    # several crop sets, one drawn per step with probability p / sum(p), the same on every rank (DINOv3's
    # high-resolution adaptation: crops.global_crops_size / local_crops_size / gram_teacher_crops_size lists and
    # global_local_crop_pairs_ratios), e.g. [{"global": 512, "local": 112, "gram": 768, "p": 0.3}, ...]; "gram"
    # only with Gram anchoring. Replaces data.local_crop_size / gram_crop_size (not used then); data.global_crop_size
    # stays the size of the online k-NN's crops. [] (default): one set of those three sizes. DALI: a pipeline per set
    crop_sets: list = field(default_factory=list)
    mask_probability: float = 0.5  # iBOT: fraction of the global crops that get a block mask
    mask_ratio: tuple = (0.1, 0.5)  # iBOT: masked fraction of a masked crop, stratified over [min, max]
    # iBOT: images per mask stratification group; 0: the rank's batch (official). A divisor of every per-GPU
    # batch you use keeps the masks of an image the same when the global batch is split over other ranks
    mask_group_size: int = 0
    # iterations per epoch, the unit of every epoch-counted schedule and checkpoint; 0: a pass over the data
    # (images // global batch). DINOv2 / DINOv3: 1250 (OFFICIAL_EPOCH_LENGTH), batches running on across passes
    epoch_length: int = 0
    # worker processes per training process: torch backend, DataLoader workers decoding and cropping; dali, the
    # host side (file reads, header checks, draws; 0: a thread of the training process) and DALI's CPU threads
    num_workers: int = 10
    dtype: str = choice("auto", "auto", "fp32", "bf16")  # crops on the device; auto: bf16 when training bf16 on a GPU
    # the colour jitter / grayscale / blur / solarize / normalization of the crops on the device: triton (the fused
    # kernels of kernels/photometric.py, 1 copy + 3 launches per crop size), torch (one batched op at a time, the
    # reference); auto: triton on CUDA
    photometric_impl: str = choice("auto", "auto", "triton", "torch")


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    # a fastdino checkpoint whose EMA teacher (backbone and heads) starts both the student and the teacher;
    # optimizer, schedules and step start fresh (DINOv3's student.resume_from_teacher_chkpt, as its
    # high-resolution adaptation starts). Not read when --resume finds a checkpoint of this run
    init_from: str = ""
    precision: str = choice("bf16", "fp32", "bf16", "fp16")  # fp16 uses a grad scaler; the loss is always fp32
    # fp32 matmuls (and the kernels' fp32 dots) in TF32 on CUDA: torch.backends.cuda.matmul.allow_tf32, set
    # at start-up. The official DINOv2 / DINOv3 train.py set it (their configs: true); DINO's main_dino.py does not
    allow_tf32: bool = False
    device: str = choice("auto", "auto", "cuda", "cpu")
    reference: bool = False  # every component runs its plain-PyTorch reference (config.REFERENCE)
    compile_step: bool = False  # torch.compile the whole step (forward, backward, optimizer, EMA) as one graph
    # capture the whole step in a CUDA graph per crop layout and replay it (fastdino/cuda_graph.py): no Python
    # between the kernels. CUDA, one process, bf16/fp32, no DeepSpeed
    cuda_graphs: bool = False
    log_every: int = 10  # host reads loss and metrics only every N steps (no per-step sync)
    checkpoint_every: int = 0  # also checkpoint every N steps (0: only at the end of each epoch)
    checkpoint_minutes: float = 30.0  # also checkpoint.pth every N minutes (0: off); a stop signal checkpoints too
    saveckp_freq: int = 20  # keep a numbered copy every N epochs
    max_steps: int = 0  # stop after N steps in total (0: train all epochs)
    progress: bool = True  # progress bar with loss, images/s and ETA
    knn_every: int = 0  # online k-NN of the teacher on a labeled holdout of data.path every N epochs (0: off)
    knn_holdout_per_class: int = 50  # images per class in that holdout (the bank; a fifth more are queries)
    # also write metrics.jsonl's scalars as TensorBoard events to OUTPUT_DIR/tensorboard/ (main rank; needs
    # `pip install tensorboard`; watch with `tensorboard --logdir OUTPUT_DIR/tensorboard`)
    tensorboard: bool = False


@dataclass
class GramConfig:
    """DINOv3 Gram anchoring (fastdino/gram.py). Off while weight is 0: no Gram teacher is built."""
    weight: float = 0.0  # the Gram loss weight once its ramp is done (DINOv3's gram anchoring phase: 2.0)
    start_epoch: int = 0  # the Gram term starts here: the Gram teacher is the EMA teacher of this moment
    ramp_epochs: int = 0  # the weight rises from 0 on a half cosine over these epochs, then stays at `weight`
    update_every: int = 0  # epochs between refreshes of the Gram teacher from the EMA teacher (0: never)
    max_updates: int = 0  # at most this many refreshes (0: no limit)
    # a checkpoint whose teacher backbone is the first Gram teacher (fastdino, DeepSpeed consolidated,
    # official DINO or a plain backbone state dict); "" takes the EMA teacher at start_epoch
    teacher_checkpoint: str = ""
    img_level: bool = True  # one Gram matrix per image (True) or over the rank's whole batch of patches
    remove_neg: bool = False  # clamp negative similarities of both Gram matrices to 0
    remove_only_teacher_neg: bool = False  # clamp the teacher's negatives (and the student's where both are)
    # the patch tokens in the Gram matrices: all, or those the student saw masked / unmasked by iBOT (one Gram
    # matrix of the rank's selected tokens: needs img_level=false and iBOT masks, loss.ibot_weight > 0)
    tokens_used: str = choice("all", "all", "masked", "unmasked")


@dataclass
class DeepSpeedConfig:
    enabled: bool = False  # True: deepspeed.initialize with the dict built from this config
    zero_stage: int = choice(0, 0, 1, 2, 3)
    offload_optimizer: bool = False  # ZeRO CPU offload of the optimizer state
    offload_param: bool = False  # ZeRO-3 CPU offload of the parameters
    gradient_accumulation_steps: int = 1
    extra: dict = field(default_factory=dict)  # merged last into the DeepSpeed dict (advanced keys)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gram: GramConfig = field(default_factory=GramConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def get(self, key: str):
        section, name = key.split(".")
        return getattr(getattr(self, section), name)

    def source(self, key: str) -> str:
        """Where a key's value came from: "default", "file" (the JSON config) or "cli"."""
        return getattr(self, "_sources", {}).get(key, "default")


# The reference mode (train.reference=true): what every component runs as its plain reference. The
# throughput benchmark builds its per-component rows from this same table.
REFERENCE = {
    "loss.impl": "reference",  # the double loop over (teacher view, student view) pairs
    "optim.ema_impl": "loop",  # one parameter at a time
    "optim.clip_impl": "loop",
    "model.attn": "math",  # explicit softmax(q k^T) v
    "model.packed_multicrop": False,  # one backbone call per crop resolution
    "model.fused_head": False,
    "model.fused_residual_norm": False,
    "model.fused_bias_gelu": False,
    "model.residual_dtype": "fp32",
    "model.compile": False,
    "train.compile_step": False,
    "train.cuda_graphs": False,
    "data.backend": "torch",  # CPU augmentation
    "data.photometric_impl": "torch",  # the colour ops one batched torch op at a time
}

# Values that were renamed or removed: the old value stops the run with a line naming the new one.
RENAMED = {
    "optim.ema_impl": {"flat_triton": "triton", "multi_tensor": "cuda"},
    "optim.clip_impl": {"flat_triton": "triton", "multi_tensor": "cuda"},
    "optim.optimizer": {"apex_adamw": None},
}


def with_overrides(cfg: Config, values: dict) -> Config:
    """A copy of cfg with {"section.key": value} set (values already of the field's type)."""
    out = copy.deepcopy(cfg)
    for key, value in values.items():
        section, name = key.split(".")
        setattr(getattr(out, section), name, value)
    return out


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a JSON or command-line value to the field's type, or raise ConfigError naming key."""
    if isinstance(value, str) and typ is not str:
        try:  # command-line values arrive as strings: parse them as JSON (1e-3, true, [0.4, 1])
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(f"config key '{key}': cannot parse {value!r} as {getattr(typ, '__name__', typ)}")
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return int(value)
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"config key '{key}': expected a finite number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    if typ is tuple or get_origin(typ) is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"config key '{key}': expected a pair of numbers like [0.4, 1.0], got {value!r}")
        return (float(value[0]), float(value[1]))
    if typ is list or get_origin(typ) is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [copy.deepcopy(v) for v in value]
    if typ is dict or get_origin(typ) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected an object, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {typ}")


def _set(cfg: Config, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    if len(parts) != 2:
        raise ConfigError(f"config key '{key}': expected section.key (e.g. optim.lr)")
    section_name, name = parts
    section = getattr(cfg, section_name, None) if section_name in {f.name for f in dataclasses.fields(cfg)} else None
    if section is None:
        sections = ", ".join(f.name for f in dataclasses.fields(cfg))
        raise ConfigError(f"config key '{key}': unknown section '{section_name}' (sections: {sections})")
    hints = get_type_hints(type(section))
    if name not in hints:
        raise ConfigError(f"config key '{key}': unknown key (known in '{section_name}': {', '.join(hints)})")
    setattr(section, name, _coerce(key, value, hints[name]))
    if not hasattr(cfg, "_sources"):
        cfg._sources = {}
    cfg._sources[key] = source


def _check_choices(cfg: Config) -> None:
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            allowed = f.metadata.get("choices")
            key = f"{section.name}.{f.name}"
            value = cfg.get(key)
            if allowed is None or value in allowed:
                continue
            if value in RENAMED.get(key, {}):
                new = RENAMED[key][value]
                what = f"was renamed {new!r}" if new else "was removed"
                raise ConfigError(f"config key '{key}': {value!r} {what} (choose one of {list(allowed)})")
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(allowed)}")


def _check_crop_sets(cfg: Config, need) -> None:
    """data.crop_sets: a list of {"global", "local", "gram", "p"} sets, sizes multiples of the patch, gram
    sizes >= the set's global size exactly when Gram anchoring is on; it replaces data.local_crop_size and
    data.gram_crop_size (which are then not used: the run logs it)."""
    d, p = cfg.data, cfg.model.patch_size
    if not d.crop_sets:
        return
    gram_on = cfg.gram.weight > 0
    for k, s in enumerate(d.crop_sets):
        where = f"set {k} ({s!r})"
        need(isinstance(s, dict) and {"global", "local", "p"} <= set(s) <= {"global", "local", "gram", "p"},
             "data.crop_sets", f"{where} must be an object with keys global, local, p (and gram with Gram anchoring)")
        for name in ("global", "local") + (("gram",) if gram_on else ()):
            v = s.get(name)
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= p and v % p == 0
            need(ok, "data.crop_sets", f"{where}: {name} must be a multiple of model.patch_size={p}")
        need(isinstance(s["p"], (int, float)) and not isinstance(s["p"], bool) and math.isfinite(s["p"]) and s["p"] > 0,
             "data.crop_sets", f"{where}: p must be a number > 0 (sets are drawn with probability p / sum(p))")
        if gram_on:
            need(s["gram"] >= s["global"], "data.crop_sets",
                 f"{where}: gram must be >= global (the Gram teacher sees the global crops at a higher resolution)")
        else:
            need("gram" not in s, "data.crop_sets", f"{where} has Gram-teacher crops, but Gram anchoring is off "
                 "(gram.weight=0): remove gram or set gram.weight")


def _validate(cfg: Config) -> None:
    _check_choices(cfg)

    def need(cond: bool, key: str, what: str) -> None:
        if not cond:
            raise ConfigError(f"config key '{key}': {what}, got {cfg.get(key)!r}")

    o, d, lo, t, m = cfg.optim, cfg.data, cfg.loss, cfg.train, cfg.model
    need(m.out_dim >= 2, "model.out_dim", "must be >= 2")
    need(0.0 <= m.drop_path_rate < 1.0, "model.drop_path_rate", "must be in [0, 1)")
    need(m.depth >= 0, "model.depth", "must be >= 1 (or 0: the architecture's own depth)")
    need(m.residual_dtype == "fp32" or t.precision == "bf16", "model.residual_dtype",
         "bf16 needs train.precision=bf16 (the stream is cast under bf16 autocast)")
    dinov2 = m.arch.startswith("dinov2_")
    dinov3 = m.arch.startswith("dinov3_")
    if dinov3:
        need(m.patch_size == 16, "model.patch_size", f"{m.arch} takes patch 16")
        need(m.num_register_tokens == 0, "model.num_register_tokens",
             f"{m.arch} has its own 4 storage tokens (leave model.num_register_tokens at 0)")
        need(m.ffn == "auto", "model.ffn", f"{m.arch} takes the hub model's FFN (leave model.ffn at auto)")
        need(not m.fused_residual_norm, "model.fused_residual_norm", f"not built for {m.arch}'s blocks yet")
        for key in ("model.rope_rescale_coords", "model.rope_jitter_coords"):
            need(cfg.get(key) == 0 or cfg.get(key) >= 1, key, "must be 0 (off) or a factor >= 1")
        need(m.rope_shift_coords >= 0, "model.rope_shift_coords", "must be >= 0 (0: off)")
        need(not (m.drop_path_uniform or m.efficient_drop_path), "model.efficient_drop_path",
             f"{m.arch}'s drop path is always uniform over blocks and computed on the kept rows (leave "
             "model.drop_path_uniform and model.efficient_drop_path false)")
    else:
        need(dinov2 == (m.patch_size == 14), "model.patch_size",
             f"{m.arch} takes patch 14" if dinov2 else f"{m.arch} takes patch 16 or 8 (14 is for the dinov2_* models)")
    need(dinov2 or dinov3 or m.num_register_tokens == 0, "model.num_register_tokens",
         "registers need a dinov2_* model.arch")
    need(dinov2 or dinov3 or m.ffn in ("auto", "mlp"), "model.ffn", "SwiGLU needs a dinov2_* model.arch")
    need(o.epochs >= 1, "optim.epochs", "must be >= 1")
    need(o.batch_size_per_gpu >= 1, "optim.batch_size_per_gpu", "must be >= 1")
    need(o.lr > 0, "optim.lr", "must be > 0")
    need(0 <= o.min_lr <= o.lr, "optim.min_lr", "must be in [0, optim.lr]")
    need(0 <= o.warmup_epochs <= o.epochs, "optim.warmup_epochs", "must be in [0, optim.epochs]")
    need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(o.weight_decay_end >= 0, "optim.weight_decay_end", "must be >= 0")
    need(o.clip_grad >= 0, "optim.clip_grad", "must be >= 0 (0 disables clipping)")
    need(o.freeze_last_layer >= 0, "optim.freeze_last_layer", "must be >= 0")
    need(0.0 <= o.momentum_teacher <= 1.0, "optim.momentum_teacher", "must be in [0, 1]")
    need(0.0 <= o.momentum_teacher_end <= 1.0, "optim.momentum_teacher_end", "must be in [0, 1]")
    need(0.0 < o.adamw_beta2 < 1.0, "optim.adamw_beta2", "must be in (0, 1)")
    need(lo.student_temp > 0, "loss.student_temp", "must be > 0")
    need(lo.teacher_temp > 0, "loss.teacher_temp", "must be > 0")
    need(lo.warmup_teacher_temp > 0, "loss.warmup_teacher_temp", "must be > 0")
    need(0 <= lo.warmup_teacher_temp_epochs <= o.epochs, "loss.warmup_teacher_temp_epochs", "must be in [0, optim.epochs]")
    need(0.0 <= lo.center_momentum <= 1.0, "loss.center_momentum", "must be in [0, 1]")
    need(lo.sinkhorn_iterations >= 1, "loss.sinkhorn_iterations", "must be >= 1")
    need(lo.dino_weight > 0, "loss.dino_weight", "must be > 0")
    need(lo.koleo_weight >= 0, "loss.koleo_weight", "must be >= 0 (0 disables KoLeo)")
    need(not lo.koleo_distributed or lo.koleo_weight > 0, "loss.koleo_distributed",
         "distributes the KoLeo term, which is off: set loss.koleo_weight > 0 (DINOv3: 0.1) or leave it false")
    need(lo.koleo_group_size >= 0 and lo.koleo_group_size % o.batch_size_per_gpu == 0, "loss.koleo_group_size",
         f"must be 0 (the global batch) or a multiple of optim.batch_size_per_gpu={o.batch_size_per_gpu}")
    need(lo.koleo_distributed or lo.koleo_group_size == 0, "loss.koleo_group_size",
         "sizes the distributed KoLeo's groups: set loss.koleo_distributed=true or leave it 0")
    need(lo.ibot_weight >= 0, "loss.ibot_weight", "must be >= 0 (0 disables iBOT and masking)")
    need(m.ibot_out_dim >= 1, "model.ibot_out_dim", "must be >= 1")
    need(0 < o.layerwise_decay <= 1, "optim.layerwise_decay", "must be in (0, 1] (1 disables it)")
    need(o.patch_embed_lr_mult > 0, "optim.patch_embed_lr_mult", "must be > 0")
    need(0 <= d.mask_probability <= 1, "data.mask_probability", "must be in [0, 1]")
    need(d.mask_group_size >= 0 and (d.mask_group_size == 0 or o.batch_size_per_gpu % d.mask_group_size == 0),
         "data.mask_group_size", f"must be 0 or a divisor of optim.batch_size_per_gpu={o.batch_size_per_gpu}")
    mr_lo, mr_hi = d.mask_ratio
    need(0 <= mr_lo <= mr_hi <= 1, "data.mask_ratio", "must satisfy 0 <= min <= max <= 1")
    need(lo.ibot_weight == 0 or (d.mask_probability > 0 and mr_hi > 0), "loss.ibot_weight",
         "iBOT needs masked patches: data.mask_probability and max(data.mask_ratio) must be > 0")
    need(lo.ibot_weight == 0 or dinov2 or dinov3, "loss.ibot_weight",
         f"iBOT needs a backbone with a mask token: a dinov2_* or dinov3_* model.arch, not {m.arch}")
    need(lo.ibot_weight == 0 or not m.fused_head, "model.fused_head",
         "the fused head is not built for the iBOT loss yet: set model.fused_head=false with loss.ibot_weight > 0")
    local_weight_keys = [f"loss.local_weight_{k}" for k in ("start", "peak", "end", "warmup_epochs", "cosine_epochs")]
    if lo.reweight_local:  # DINOv3's local-crop reweighting of the DINO term
        need(not m.fused_head, "model.fused_head", "the fused head is not built for the local-crop reweighting yet: "
             "set model.fused_head=false with loss.reweight_local=true")
        need(d.local_crops_number > 0, "loss.reweight_local", "weights the local crops' pairs: needs "
             "data.local_crops_number > 0")
        for key in local_weight_keys[:4]:
            need(cfg.get(key) >= 0, key, "must be >= 0")
        need(lo.local_weight_cosine_epochs >= -1, "loss.local_weight_cosine_epochs",
             "must be >= 0, or -1 (the rest of the run)")
        need(lo.local_weight_warmup_epochs + max(lo.local_weight_cosine_epochs, 0) <= o.epochs,
             f"loss.local_weight_{'cosine' if lo.local_weight_cosine_epochs > 0 else 'warmup'}_epochs",
             f"the warmup and cosine epochs must fit in optim.epochs={o.epochs}")
    else:
        for key in local_weight_keys:
            need(cfg.get(key) == getattr(LossConfig(), key.split(".")[1]), key,
                 "sets the local-crop weight, which is off: set loss.reweight_local=true or leave it at its default")
    for key in ("data.global_crops_scale", "data.local_crops_scale"):
        lo_s, hi_s = cfg.get(key)
        need(0 < lo_s <= hi_s <= 1, key, "must satisfy 0 < min <= max <= 1")
    need(d.local_crops_number >= 0, "data.local_crops_number", "must be >= 0")
    need(d.gram_crop_size == 0 or d.gram_crop_size >= d.global_crop_size, "data.gram_crop_size",
         "must be 0 (off) or >= data.global_crop_size (the Gram teacher sees the global crops at a higher resolution)")
    for key in ("data.global_crop_size", "data.local_crop_size") + (("data.gram_crop_size",) if d.gram_crop_size else ()):
        size = cfg.get(key)
        need(size >= m.patch_size and size % m.patch_size == 0, key,
             f"must be a multiple of model.patch_size={m.patch_size} "
             f"(e.g. {max(size // m.patch_size, 1) * m.patch_size} or {(size // m.patch_size + 1) * m.patch_size})")
    gr = cfg.gram
    _check_crop_sets(cfg, need)
    need(gr.weight >= 0, "gram.weight", "must be >= 0 (0 disables Gram anchoring)")
    for key in ("gram.start_epoch", "gram.ramp_epochs", "gram.update_every", "gram.max_updates"):
        need(cfg.get(key) >= 0, key, "must be >= 0")
    need(not (gr.remove_neg and gr.remove_only_teacher_neg), "gram.remove_only_teacher_neg",
         "cannot be combined with gram.remove_neg (choose one)")
    need(gr.tokens_used == "all" or not gr.img_level, "gram.tokens_used",
         "masked / unmasked make one Gram matrix of the rank's selected tokens: set gram.img_level=false")
    need(gr.tokens_used == "all" or lo.ibot_weight > 0, "gram.tokens_used",
         "masked / unmasked select by the iBOT masks, and loss.ibot_weight=0 makes none: use all")
    need(gr.weight == 0 or d.gram_crop_size > 0 or d.crop_sets, "data.gram_crop_size",
         "Gram anchoring (gram.weight > 0) needs the Gram teacher's crops: set data.gram_crop_size (e.g. 2x the global crop)")
    need(gr.weight > 0 or d.gram_crop_size == 0, "data.gram_crop_size",
         "makes Gram-teacher crops, but Gram anchoring is off (gram.weight=0): set data.gram_crop_size=0 or gram.weight")
    need(gr.weight == 0 or gr.start_epoch < o.epochs, "gram.start_epoch",
         f"must be < optim.epochs={o.epochs} (the Gram term would never start)")
    need(not gr.teacher_checkpoint or os.path.isfile(gr.teacher_checkpoint), "gram.teacher_checkpoint",
         "no such file")
    need(not cfg.train.init_from or os.path.isfile(cfg.train.init_from), "train.init_from", "no such file")
    need(d.epoch_length >= 0, "data.epoch_length", "must be >= 0 (0: an epoch is a pass over the data)")
    need(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    need(bool(d.path), "data.path", "must name a folder of images")
    need(d.demo_num_images >= 1, "data.demo_num_images", "must be >= 1")
    need(d.demo_num_classes >= 1, "data.demo_num_classes", "must be >= 1")
    need(d.demo_image_size >= 8, "data.demo_image_size", "must be >= 8")
    need(t.log_every >= 1, "train.log_every", "must be >= 1")
    need(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
    need(t.checkpoint_minutes >= 0, "train.checkpoint_minutes", "must be >= 0 (0: no checkpoints on the clock)")
    need(t.saveckp_freq >= 1, "train.saveckp_freq", "must be >= 1")
    need(t.max_steps >= 0, "train.max_steps", "must be >= 0")
    need(t.knn_every >= 0, "train.knn_every", "must be >= 0 (0 disables the online k-NN)")
    need(t.knn_holdout_per_class >= 1, "train.knn_holdout_per_class", "must be >= 1")
    need(bool(t.output_dir), "train.output_dir", "must name a folder")
    need(cfg.deepspeed.gradient_accumulation_steps == 1, "deepspeed.gradient_accumulation_steps",
         "only 1 is supported (the DINO center and teacher update are per step)")
    if t.compile_step and t.precision == "fp16":
        raise ConfigError("config key 'train.compile_step': not supported with train.precision=fp16 "
                          "(the grad scaler's bookkeeping is host-side); use bf16 or model.compile")
    if t.cuda_graphs and t.precision == "fp16":
        raise ConfigError("config key 'train.cuda_graphs': not supported with train.precision=fp16 "
                          "(the grad scaler reads its scale on the host); use bf16")
    if t.cuda_graphs and cfg.deepspeed.enabled:
        raise ConfigError("config key 'train.cuda_graphs': not supported with deepspeed.enabled "
                          "(DeepSpeed's engine step synchronizes with the host)")
    if t.compile_step and cfg.deepspeed.enabled:
        raise ConfigError("config key 'train.compile_step': not supported with deepspeed.enabled "
                          "(DeepSpeed's engine step is not traceable); use model.compile")


def merge(cfg: Config, overrides: dict, prefix: str = "", source: str = "file") -> Config:
    """Apply a nested dict of overrides ({"optim": {"lr": 1e-3}}) to cfg, checking every key."""
    for section_name, values in overrides.items():
        if section_name.startswith("_"):  # "_comment" / "_resolved" keys are allowed at the top level
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config key '{prefix}{section_name}': expected a section object, got {values!r}")
        for name, value in values.items():
            _set(cfg, f"{section_name}.{name}", value, source)
    return cfg


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the JSON file at `path`, then `key=value` overrides; validated."""
    cfg = Config()
    if path:
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file '{path}' not found")
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file '{path}': invalid JSON ({e})")
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}': expected a JSON object")
        merge(cfg, data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected section.key=value")
        key, value = item.split("=", 1)
        _set(cfg, key.strip(), value, "cli")
    _validate(cfg)
    return cfg


def split_cli_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--set a.b=v`, `--a.b=v` and `--a.b v` overrides from the other arguments."""
    overrides, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--set" and i + 1 < len(argv):
            overrides.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--set="):
            overrides.append(arg[len("--set="):])
        elif arg.startswith("--") and "." in arg.split("=", 1)[0]:
            if "=" in arg:
                overrides.append(arg[2:])
            elif i + 1 < len(argv):
                overrides.append(f"{arg[2:]}={argv[i + 1]}")
                i += 1
            else:
                raise ConfigError(f"override '{arg}': missing a value")
        else:
            rest.append(arg)
        i += 1
    return overrides, rest
