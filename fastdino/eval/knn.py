"""Weighted k-NN classification on frozen features (DINO paper, Sec. 4.1; Wu et al. 2018).

    f       = [CLS] after the final norm, L2-normalized           (bank: train set, queries: val set)
    s_j     = <f_query, f_j>                                       cosine similarity to bank item j
    score_c = sum over the k most similar j with label c of exp(s_j / T),   T = 0.07
    prediction = argmax_c score_c (top-5: the 5 largest scores; reported only with more than 5
                 classes, where it is not 100% by construction)

`knn_scores_ref` is the brute-force reference (one query at a time, float64, full sort).
`knn_scores` is the batched version: queries in chunks, the bank in chunks with a running top-k
merge (so memory is O(query_chunk x bank_chunk) whatever the bank size: ImageNet's 1.28M-row bank
fits one GPU, and a bank kept on the CPU is streamed chunk by chunk to the compute device). The top
kmax neighbours are found once and every k in {10, 20, 100, 200} reuses their sorted prefix.

    python -m fastdino.eval.knn --checkpoint runs/demo/checkpoint.pth --data_path data/demo
    python -m fastdino.eval.knn --checkpoint dino_vits16.pth --train_path IN/train --val_path IN/val
    python -m fastdino.eval.knn --random_init --arch vit_tiny --data_path data/demo   # baseline
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

from fastdino.eval.common import (EvalError, EvalRun, add_backbone_args, add_data_args, cls_features, parse_checked,
                                  run_cli, save_report)

DEFAULT_KS = (10, 20, 100, 200)


def knn_scores_ref(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                   k: int, temperature: float, num_classes: int) -> torch.Tensor:
    """Brute force: for each query, sort all bank similarities (float64) and add exp(s/T) of the
    top k to their classes. Features are used as given (normalize them first). -> [Nq, C] float64."""
    bank = train_features.double()
    scores = torch.zeros(test_features.shape[0], num_classes, dtype=torch.float64)
    for i, q in enumerate(test_features.double()):
        sims = bank @ q
        order = torch.argsort(sims, descending=True)[:k]
        for j in order.tolist():
            scores[i, int(train_labels[j])] += torch.exp(sims[j] / temperature)
    return scores


@torch.no_grad()
def knn_topk(test_features: torch.Tensor, train_features: torch.Tensor, kmax: int, device=None,
             query_chunk: int = 1024, bank_chunk: int = 262144) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-kmax cosine similarities and bank indices of every query, sorted descending:
    ([Nq, kmax], [Nq, kmax]) on `device`. Bank chunks not already on `device` are copied there
    one at a time (streaming), so the bank itself may stay in CPU memory."""
    device = torch.device(device) if device is not None else train_features.device
    n_bank = train_features.shape[0]
    kmax = min(kmax, n_bank)
    all_vals, all_idx = [], []
    for q0 in range(0, test_features.shape[0], query_chunk):
        q = test_features[q0:q0 + query_chunk].to(device, train_features.dtype, non_blocking=True)
        best_v = best_i = None
        for b0 in range(0, n_bank, bank_chunk):
            bank = train_features[b0:b0 + bank_chunk].to(device, non_blocking=True)
            sims = q @ bank.T  # [q, b]: one matmul per tile; memory bounded by the two chunk sizes
            v, i = sims.float().topk(min(kmax, bank.shape[0]), dim=1)
            i += b0
            if best_v is not None:  # merge with the running top-k of earlier bank chunks
                v, j = torch.cat([best_v, v], 1).topk(min(kmax, best_v.shape[1] + v.shape[1]), dim=1)
                i = torch.cat([best_i, i], 1).gather(1, j)
            best_v, best_i = v, i
        all_vals.append(best_v)
        all_idx.append(best_i)
    return torch.cat(all_vals), torch.cat(all_idx)


def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
               ks=DEFAULT_KS, temperature: float = 0.07, num_classes: int | None = None, device=None,
               query_chunk: int = 1024, bank_chunk: int = 262144) -> dict[int, torch.Tensor]:
    """Class scores [Nq, C] (float32, on `device`) for each k in ks; k is clipped to the bank size."""
    if temperature <= 0:
        raise EvalError(f"temperature must be > 0, got {temperature}")
    if not ks or min(ks) < 1:
        raise EvalError(f"k values must be >= 1, got {list(ks)}")
    if train_features.shape[0] != train_labels.shape[0]:
        raise EvalError(f"{train_features.shape[0]} bank features but {train_labels.shape[0]} labels")
    device = torch.device(device) if device is not None else train_features.device
    num_classes = num_classes or int(train_labels.max()) + 1
    vals, idx = knn_topk(test_features, train_features, max(ks), device, query_chunk, bank_chunk)
    labels = train_labels.to(device)[idx]  # [Nq, kmax]
    weights = (vals / temperature).exp()  # exp(s / T); s <= 1 so at most exp(1/T) ~ 1.6e6 at T=0.07
    out = {}
    for k in ks:
        kk = min(k, idx.shape[1])
        scores = torch.zeros(idx.shape[0], num_classes, device=device)
        out[k] = scores.scatter_add_(1, labels[:, :kk], weights[:, :kk])
    return out


def accuracy(scores: torch.Tensor, labels: torch.Tensor, topk=(1, 5)) -> list[float]:
    """Top-k accuracies in percent; top-k with k > num_classes counts as top-num_classes."""
    labels = labels.to(scores.device)
    pred = scores.topk(min(max(topk), scores.shape[1]), dim=1).indices
    hit = pred == labels[:, None]
    return [100.0 * hit[:, :min(k, pred.shape[1])].any(1).float().mean().item() for k in topk]


def knn_evaluate(train_features, train_labels, test_features, test_labels, ks=DEFAULT_KS, temperature=0.07,
                 num_classes=None, device=None, **chunks) -> dict[int, dict]:
    """{k: {"top1", "top5", "k_used"}} with features L2-normalized here; "top5" only with more than
    5 classes (with 5 or fewer every label is among the top 5)."""
    train_features = F.normalize(train_features.float(), dim=1)
    test_features = F.normalize(test_features.float(), dim=1)
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_scores(train_features, train_labels, test_features, ks, temperature, num_classes, device, **chunks)
    out = {}
    for k, s in scores.items():
        top1, top5 = accuracy(s, test_labels)
        out[k] = {"top1": top1, "top5": top5, "k_used": min(k, train_features.shape[0])}
        if num_classes <= 5:
            del out[k]["top5"]
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastdino.eval.knn", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backbone_args(p)
    add_data_args(p)
    p.add_argument("--nb_knn", type=int, nargs="+", default=list(DEFAULT_KS), help="k values")
    p.add_argument("--temperature", type=float, default=0.07, help="T of the exp(s/T) vote weights")
    p.add_argument("--bank_device", default=None, help="where the bank lives (default: the compute device; "
                                                       "cpu streams it chunk by chunk)")
    p.add_argument("--query_chunk", type=int, default=1024)
    p.add_argument("--bank_chunk", type=int, default=262144)
    return parse_checked(p, argv)


def main(argv=None) -> dict:
    run = EvalRun(parse_args(argv))
    args, train, val, classes, model, device = run.args, run.train, run.val, run.classes, run.model, run.device
    t0 = time.perf_counter()
    (train_feats, train), (val_feats, val) = (run.features(x, cls_features, ("knn-cls",)) for x in (train, val))
    t_feat = time.perf_counter() - t0
    train_labels = torch.tensor([s[1] for s in train])
    val_labels = torch.tensor([s[1] for s in val])
    bank_device = torch.device(args.bank_device) if args.bank_device else device
    t0 = time.perf_counter()
    results = knn_evaluate(train_feats.to(bank_device), train_labels, val_feats, val_labels, args.nb_knn,
                           args.temperature, len(classes), device, query_chunk=args.query_chunk,
                           bank_chunk=args.bank_chunk)
    t_knn = time.perf_counter() - t0

    what = f"random-init {model.arch}/{model.patch_size}" if args.random_init else f"{args.checkpoint} ({args.which})"
    print(f"k-NN on {what}: bank {len(train)} images, {len(val)} queries, {len(classes)} classes, "
          f"T={args.temperature}; features {t_feat:.1f}s, k-NN {t_knn:.2f}s")
    top5 = len(classes) > 5  # with 5 classes or fewer top-5 is 100% by construction: no column
    print("|   k | top-1 (%) |" + (" top-5 (%) |" if top5 else ""))
    print("|----:|----------:|" + ("----------:|" if top5 else ""))
    for k, r in results.items():
        note = f"  (k clipped to {r['k_used']})" if r["k_used"] != k else ""
        print(f"| {k:3d} | {r['top1']:9.2f} |" + (f" {r['top5']:9.2f} |" if top5 else "") + note)
    report = {"checkpoint": None if args.random_init else os.path.abspath(args.checkpoint),
              "which": None if args.random_init else args.which, "random_init": args.random_init,
              "arch": model.arch, "patch_size": model.patch_size, "depth": model.depth, "temperature": args.temperature,
              "image_size": args.image_size,
              "num_train": len(train), "num_val": len(val), "unreadable_images": len(run.unreadable),
              "num_classes": len(classes), "results": {str(k): r for k, r in results.items()}}
    save_report(report, run.out_dir, "knn.json" if not args.random_init else "knn-random.json")
    return report


if __name__ == "__main__":
    sys.exit(run_cli(main))
