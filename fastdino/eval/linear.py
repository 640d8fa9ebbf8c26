"""Linear probe on frozen features (DINO paper, Sec. 4.1 / the official eval_linear.py).

    features = concat of the [CLS] tokens of the last n blocks (after the final norm),
               n = 4 for vit_tiny / vit_small;
               for vit_base: [CLS] of the last block + average of its patch tokens
    classifier = Linear(dim, C), weight ~ N(0, 0.01), bias 0; cross-entropy;
                 SGD (momentum 0.9), lr = base_lr * batch / 256, cosine to 0 over all iterations

Differences from the official script, by design: the features are computed once (center crop) and
cached instead of recomputed each epoch under random-resized-crop/flip augmentation, which makes a
probe a matter of seconds; and several base learning rates are trained side by side in one pass
over the data (the official script is rerun per lr). The best top-1 over epochs and the last top-1
of each lr are reported (as in the official code, "best" is selected on the validation set).

    python -m fastdino.eval.linear --checkpoint runs/demo/checkpoint.pth --data_path data/demo
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdino.eval.common import (EvalError, EvalRun, add_backbone_args, add_data_args, parse_checked, run_cli,
                                  save_report)

DEFAULT_LRS = (0.001, 0.01, 0.1)


def default_feature_layout(arch: str) -> tuple[int, bool]:
    """(n_last_blocks, avgpool_patchtokens) of the official recipe."""
    return (1, True) if arch == "vit_base" else (4, False)


def linear_features(model, x: torch.Tensor, n_last_blocks: int = 4, avgpool: bool = False) -> torch.Tensor:
    """[B, D * (n_last_blocks + avgpool)]: [CLS] of the last n blocks (normed), then optionally the
    mean of the last block's patch tokens."""
    blocks = model.get_intermediate_layers(x, n_last_blocks)
    out = torch.cat([b[:, 0] for b in blocks], dim=-1)
    if avgpool:  # patch tokens only: after [CLS] and the registers (DINOv2)
        first_patch = 1 + getattr(model, "num_register_tokens", 0)
        out = torch.cat([out, blocks[-1][:, first_patch:].mean(dim=1)], dim=-1)
    return out


def train_linear(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, epochs: int = 100, lrs=DEFAULT_LRS, batch_size: int = 256,
                 weight_decay: float = 0.0, momentum: float = 0.9, device=None, seed: int = 0) -> dict:
    """Train one linear classifier per base lr on fixed features, side by side (one shuffle, one
    forward of the batch per head). Returns {"runs": {lr: {"best_top1", "best_epoch", "last_top1",
    "history"}}, "best_lr", "best_top1", "last_top1"}; accuracies in percent."""
    if epochs < 1:
        raise EvalError(f"epochs must be >= 1, got {epochs}")
    if not lrs or min(lrs) <= 0:
        raise EvalError(f"learning rates must be > 0, got {list(lrs)}")
    if train_x.shape[0] != train_y.shape[0] or val_x.shape[0] != val_y.shape[0]:
        raise EvalError("features and labels differ in length")
    device = torch.device(device) if device is not None else train_x.device
    gen = torch.Generator().manual_seed(seed)
    train_x, train_y = train_x.float().to(device), train_y.long().to(device)
    val_x, val_y = val_x.float().to(device), val_y.long().to(device)
    dim, n = train_x.shape[1], train_x.shape[0]
    heads, groups = nn.ModuleList(), []
    for lr in lrs:
        head = nn.Linear(dim, num_classes)
        with torch.no_grad():  # official init
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
            head.bias.zero_()
        heads.append(head)
        groups.append({"params": head.parameters(), "lr": lr * batch_size / 256.0, "base": lr * batch_size / 256.0})
    heads.to(device)
    opt = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(n / batch_size)
    total, step = epochs * steps_per_epoch, 0
    history = [[] for _ in lrs]
    for epoch in range(epochs):
        heads.train()
        perm = torch.randperm(n, generator=gen).to(device)
        for b0 in range(0, n, batch_size):
            idx = perm[b0:b0 + batch_size]
            x, y = train_x[idx], train_y[idx]
            for g in opt.param_groups:  # cosine from base lr to 0, per iteration
                g["lr"] = 0.5 * g["base"] * (1 + math.cos(math.pi * step / total))
            loss = sum(F.cross_entropy(h(x), y) for h in heads)  # heads share nothing: independent grads
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        heads.eval()
        with torch.no_grad():
            for i, h in enumerate(heads):
                correct = 0
                for b0 in range(0, val_x.shape[0], 8192):
                    correct += (h(val_x[b0:b0 + 8192]).argmax(1) == val_y[b0:b0 + 8192]).sum().item()
                history[i].append(100.0 * correct / max(1, val_x.shape[0]))
    runs = {}
    for lr, hist in zip(lrs, history):
        best_epoch = max(range(len(hist)), key=lambda e: hist[e])
        runs[lr] = {"best_top1": hist[best_epoch], "best_epoch": best_epoch + 1, "last_top1": hist[-1],
                    "history": hist}
    best_lr = max(runs, key=lambda lr: (runs[lr]["best_top1"], runs[lr]["last_top1"]))
    return {"runs": runs, "best_lr": best_lr, "best_top1": runs[best_lr]["best_top1"],
            "last_top1": runs[best_lr]["last_top1"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastdino.eval.linear", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backbone_args(p)
    add_data_args(p)
    p.add_argument("--n_last_blocks", type=int, default=None, help="default: 4 (tiny/small), 1 (base)")
    p.add_argument("--avgpool_patchtokens", type=int, choices=(0, 1), default=None,
                   help="append the mean patch token; default: 0 (tiny/small), 1 (base)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, nargs="+", default=list(DEFAULT_LRS),
                   help="base learning rates at batch 256, trained side by side")
    p.add_argument("--train_batch_size", type=int, default=256, help="batch of the classifier's SGD")
    p.add_argument("--weight_decay", type=float, default=0.0)
    return parse_checked(p, argv)


def main(argv=None) -> dict:
    run = EvalRun(parse_args(argv))
    args, train, val, classes, model, device = run.args, run.train, run.val, run.classes, run.model, run.device
    n_blocks, avgpool = default_feature_layout(model.arch)
    n_blocks = args.n_last_blocks or n_blocks
    avgpool = bool(args.avgpool_patchtokens) if args.avgpool_patchtokens is not None else avgpool

    def layout(m, x):
        return linear_features(m, x, n_blocks, avgpool)

    t0 = time.perf_counter()
    (train_x, train), (val_x, val) = (run.features(x, layout, ("linear", n_blocks, avgpool)) for x in (train, val))
    t_feat = time.perf_counter() - t0
    train_y = torch.tensor([s[1] for s in train])
    val_y = torch.tensor([s[1] for s in val])
    t0 = time.perf_counter()
    res = train_linear(train_x, train_y, val_x, val_y, len(classes), args.epochs, args.lr, args.train_batch_size,
                       args.weight_decay, device=device, seed=args.seed)
    t_train = time.perf_counter() - t0

    what = f"random-init {model.arch}/{model.patch_size}" if args.random_init else f"{args.checkpoint} ({args.which})"
    print(f"linear probe on {what}: features {train_x.shape[1]}-d ({n_blocks} block(s) [CLS]"
          f"{' + avg patch' if avgpool else ''}), {len(train)} train / {len(val)} val, {len(classes)} classes, "
          f"{args.epochs} epochs; features {t_feat:.1f}s, training {t_train:.1f}s")
    print("| base lr | best top-1 (%) | epoch | last top-1 (%) |\n|--------:|---------------:|------:|---------------:|")
    for lr, r in res["runs"].items():
        print(f"| {lr:7g} | {r['best_top1']:14.2f} | {r['best_epoch']:5d} | {r['last_top1']:14.2f} |")
    print(f"best lr {res['best_lr']:g}: best top-1 {res['best_top1']:.2f}%, last top-1 {res['last_top1']:.2f}%")
    report = {"checkpoint": None if args.random_init else os.path.abspath(args.checkpoint),
              "which": None if args.random_init else args.which, "random_init": args.random_init,
              "arch": model.arch, "patch_size": model.patch_size, "depth": model.depth, "n_last_blocks": n_blocks,
              "avgpool_patchtokens": avgpool, "epochs": args.epochs,
              "num_train": len(train), "num_val": len(val), "unreadable_images": len(run.unreadable),
              "num_classes": len(classes), "best_lr": res["best_lr"], "best_top1": res["best_top1"],
              "last_top1": res["last_top1"], "runs": {str(lr): r for lr, r in res["runs"].items()}}
    save_report(report, run.out_dir, "linear.json" if not args.random_init else "linear-random.json")
    return report


if __name__ == "__main__":
    sys.exit(run_cli(main))
