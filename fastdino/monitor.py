"""Online monitoring during training: collapse warnings and a cheap k-NN on a labeled holdout.

DINO avoids collapse by balancing centering (pushes the teacher towards uniform outputs) against
sharpening (pushes it towards one dimension). The paper (Sec. 5.3, Fig. 7) watches two signals,
both logged on log steps by train.py:

    H(P_t)          teacher entropy, mean over rows, in nats:  -> 0     one dimension dominates
                                                                -> ln K  uniform output
    KL(P_t || P_s)  = loss - H(P_t):                            -> 0     the student just copies a
                                                                         constant teacher
A healthy run keeps H strictly between the two and KL clearly positive. `CollapseMonitor` flags a
signal that stays at an extreme for `patience` consecutive log steps (single log steps are noisy,
and the first steps of a run sit near ln K while the center settles, hence also `warmup`).

    monitor = CollapseMonitor(cfg.model.out_dim)
    warning = monitor.update(teacher_entropy, kl, step=it)     # on every log step
    if warning: log.warning(warning)                           # and show monitor.flag in the bar

    bank, queries = knn_holdout(cfg.data.path, n_per_class=50)
    top1 = online_knn(teacher.backbone, bank, queries, device, image_size=cfg.data.global_crop_size)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class CollapseMonitor:
    """Watches (teacher entropy, KL) on log steps; see the module docstring.

    out_dim: K, the head's output dimension (ln K is the entropy of the uniform distribution).
    low_entropy / high_entropy: fractions of ln K below / above which the teacher is considered
    collapsed to one dimension / to uniform. min_kl: KL (nats) below which the student output is
    indistinguishable from the teacher's. patience: consecutive log steps a condition must hold.
    warmup: log steps ignored at the start (the center needs ~1/(1-0.9) steps to settle).
    repeat_every: while a collapse persists, the warning is returned again every this many updates.
    targets: "centering" or "sinkhorn_knopp" (loss.targets): what the warnings suggest.
    """

    def __init__(self, out_dim: int, low_entropy: float = 0.05, high_entropy: float = 0.98, min_kl: float = 1e-3,
                 patience: int = 3, warmup: int = 5, repeat_every: int = 25, targets: str = "centering"):
        self.targets = targets
        if out_dim < 2:
            raise ValueError(f"CollapseMonitor: out_dim must be >= 2, got {out_dim}")
        if not 0.0 <= low_entropy < high_entropy <= 1.0:
            raise ValueError(f"CollapseMonitor: need 0 <= low_entropy < high_entropy <= 1, got "
                             f"{low_entropy}, {high_entropy}")
        if patience < 1 or warmup < 0 or repeat_every < 1 or min_kl < 0:
            raise ValueError("CollapseMonitor: patience and repeat_every must be >= 1, warmup and min_kl >= 0")
        self.log_k = math.log(out_dim)
        self.low, self.high = low_entropy * self.log_k, high_entropy * self.log_k
        self.min_kl, self.patience, self.warmup, self.repeat_every = min_kl, patience, warmup, repeat_every
        self.updates = 0
        self.streak = 0  # consecutive updates in the current collapse state
        self.state: str | None = None  # None | "one-dim" | "uniform" | "kl" | "non-finite"
        self.flag: str | None = None  # short text for the progress bar while a collapse is flagged

    def classify(self, teacher_entropy: float, kl: float) -> str | None:
        """The collapse state the two numbers alone suggest (no persistence)."""
        if not (math.isfinite(teacher_entropy) and math.isfinite(kl)):
            return "non-finite"
        if teacher_entropy <= self.low:
            return "one-dim"
        if teacher_entropy >= self.high:
            return "uniform"
        if kl <= self.min_kl:
            return "kl"
        return None

    def update(self, teacher_entropy: float, kl: float, step: int | None = None) -> str | None:
        """Feed one log step. Returns a one-line warning when a collapse state has held for
        `patience` updates (again every `repeat_every` updates while it lasts), else None."""
        teacher_entropy, kl = float(teacher_entropy), float(kl)
        self.updates += 1
        state = self.classify(teacher_entropy, kl)
        if self.updates <= self.warmup and state != "non-finite":
            state = None
        self.streak = self.streak + 1 if (state is not None and state == self.state) else (1 if state else 0)
        self.state = state
        if state is None or self.streak < self.patience:
            self.flag = None
            return None
        self.flag = {"one-dim": "COLLAPSE? H->0", "uniform": "COLLAPSE? H->lnK", "kl": "COLLAPSE? KL->0",
                     "non-finite": "NaN"}[state]
        if (self.streak - self.patience) % self.repeat_every:
            return None
        where = f" at step {step}" if step is not None else ""
        signals = (f"teacher entropy {teacher_entropy:.4g} nats (ln K = {self.log_k:.3f}), "
                   f"KL(teacher||student) {kl:.4g}")
        why = {
            "one-dim": "entropy near 0: one output dimension dominates (sharpening wins over centering; "
                       "check that loss.center_momentum < 1, lower optim.lr)",
            "uniform": ("entropy near ln K: the teacher output is uniform (centering wins over sharpening; "
                        "lower loss.teacher_temp, e.g. 0.04, or lengthen its warmup)" if self.targets == "centering" else
                        "entropy near ln K: the teacher's outputs barely differ between images, and Sinkhorn-Knopp "
                        "spreads equal rows evenly (expected early with LayerScale 1e-5; persistent: lower "
                        "loss.teacher_temp or raise optim.lr)"),
            "kl": "KL near 0: the student matches a constant teacher",
            "non-finite": "non-finite monitor values",
        }[state]
        return (f"collapse warning{where}: {signals} for {self.streak} log steps; {why}")


# ------------------------------------------------------------------------------------------------
# online k-NN on a small labeled holdout
# ------------------------------------------------------------------------------------------------
_IMAGE_CACHE: dict = {}
_IMAGE_CACHE_MAX_BYTES = 1 << 31  # decoded crops kept between calls (uint8), up to 2 GiB


def knn_holdout(root: str, n_per_class: int = 50, seed: int = 0):
    """(bank samples, query samples) for online_knn: at most n_per_class labeled images per class
    of the folder, split half/half per class. Raises EvalError for unlabeled folders."""
    from fastdino.eval.common import holdout_split, labeled_samples

    samples, _ = labeled_samples(root)
    return holdout_split(samples, n_per_class, 0.5, seed)


_UNREADABLE = None  # fastdino.data.folder.Unreadable of the online k-NN (made on first use)


def _images(samples, image_size: int) -> tuple[torch.Tensor, list]:
    """(uint8 [N, 3, S, S] center crops in the eval transform's geometry, the samples they are of),
    cached across calls. Unreadable images are skipped, named once in the log and counted."""
    from fastdino.data.folder import Unreadable
    from fastdino.eval.common import EvalTransform, UnreadableImage, center_crop, load_image, resize_shorter, to_tensor

    global _UNREADABLE
    key = (tuple(p for p, _ in samples), image_size)
    if key in _IMAGE_CACHE:
        return _IMAGE_CACHE[key]
    _UNREADABLE = _UNREADABLE or Unreadable("online k-NN")
    tf = EvalTransform(image_size)
    crops, kept = [], []
    for path, label in samples:
        try:
            img = load_image(path)
        except UnreadableImage as e:
            _UNREADABLE.add(path, str(e).split(": ", 1)[-1])
            continue
        crops.append((to_tensor(center_crop(resize_shorter(img, tf.resize_size), image_size, image_size)) * 255)
                     .round().to(torch.uint8))
        kept.append((path, label))
    if not crops:
        raise ValueError(f"online k-NN: none of the {len(samples)} holdout images could be read")
    out = (torch.stack(crops), kept)
    if out[0].numel() + sum(v[0].numel() for v in _IMAGE_CACHE.values()) <= _IMAGE_CACHE_MAX_BYTES:
        _IMAGE_CACHE[key] = out
    return out


@torch.no_grad()
def _features(backbone, images_u8: torch.Tensor, device, batch_size: int) -> torch.Tensor:
    from fastdino.data.augment import IMAGENET_MEAN, IMAGENET_STD

    device = torch.device(device)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    dtype = next(backbone.parameters()).dtype
    feats = []
    for i in range(0, images_u8.shape[0], batch_size):
        x = (images_u8[i:i + batch_size].to(device).float() / 255 - mean) / std
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats.append(backbone(x.to(dtype)).float())
    return F.normalize(torch.cat(feats), dim=1)


def online_knn(backbone, train_samples, val_samples, device, image_size: int, k: int = 20,
               temperature: float = 0.07, batch_size: int = 64) -> float:
    """Weighted k-NN top-1 (percent) of `backbone`'s [CLS] features on a small labeled holdout:
    train_samples form the bank, val_samples are classified. The backbone's train/eval mode is
    restored afterwards; decoded images are cached between calls. Run it on one rank only."""
    from fastdino.eval.knn import accuracy, knn_scores

    if not train_samples or not val_samples:
        raise ValueError("online_knn: empty bank or query set")
    (bank_images, train_samples), (query_images, val_samples) = (_images(x, image_size)
                                                                 for x in (train_samples, val_samples))
    was_training = backbone.training
    backbone.eval()
    try:
        bank = _features(backbone, bank_images, device, batch_size)
        queries = _features(backbone, query_images, device, batch_size)
    finally:
        backbone.train(was_training)
    bank_labels = torch.tensor([y for _, y in train_samples], device=bank.device)
    query_labels = torch.tensor([y for _, y in val_samples], device=bank.device)
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    scores = knn_scores(bank, bank_labels, queries, (k,), temperature, num_classes)[k]
    return accuracy(scores, query_labels, (1,))[0]
