"""Training curves from metrics.jsonl as one PNG: loss, lr (and wd), teacher entropy (against 0 and
ln K, the two collapse values), KL(teacher||student), online k-NN top-1 and images/s where logged.

    python -m fastdino.plot runs/demo                       # -> runs/demo/curves.png
    python -m fastdino.plot runs/a runs/b --out cmp.png     # several runs on the same axes
    python -m fastdino.plot runs/demo/metrics.jsonl --x epoch

Needs matplotlib (pip install 'fastdino[plot]').
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

PANELS = (  # (title, metric keys, y scale)
    ("loss", ("loss",), "linear"),
    ("learning rate (weight decay dashed, right axis)", ("lr", "wd"), "linear"),
    ("teacher entropy (nats)", ("teacher_entropy",), "linear"),
    ("KL(teacher || student) (nats)", ("kl",), "linear"),
    ("online k-NN top-1 (%)", ("knn_top1",), "linear"),
    ("images / s", ("images_per_s",), "linear"),
)


class PlotError(ValueError):
    pass


def read_metrics(path: str) -> tuple[list[dict], dict | None]:
    """Records of a metrics.jsonl (a run folder or the file) and the run's config.json if present.
    Broken lines (e.g. a run killed mid-write) are skipped."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise PlotError(f"no metrics log at '{path}'")
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                records.append(rec)
    records = latest_per_step(records)
    if not records:
        raise PlotError(f"metrics log '{path}' holds no records")
    config = None
    cfg_path = os.path.join(os.path.dirname(path), "config.json")
    if os.path.isfile(cfg_path):
        try:
            with open(cfg_path) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError):
            config = None
    return records, config


def latest_per_step(records: list[dict]) -> list[dict]:
    """Each step once: a run resumed from a checkpoint logs the steps after it again (the training
    loop also trims the file on resume); a step record that goes back in time drops every earlier
    record from that step on."""
    out, last = [], None
    for rec in records:
        step = rec.get("step")
        if "loss" in rec and isinstance(step, int):
            if last is not None and step <= last:
                out = [r for r in out if not (isinstance(r.get("step"), int) and r["step"] >= step)]
            last = step
        out.append(rec)
    return out


def series(records: list[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(x values, y values) of the records that hold a finite `key`; with x="epoch" the step is
    mapped to fractional epochs using the steps seen per epoch."""
    if x == "epoch":
        first, count = {}, {}
        for r in records:
            if "epoch" in r and "step" in r:
                first.setdefault(r["epoch"], r["step"])
                count[r["epoch"]] = max(count.get(r["epoch"], 0), r["step"] - first[r["epoch"]] + 1)
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or "step" not in r:
            continue
        if x == "epoch":
            if "epoch" not in r:
                continue
            e = r["epoch"]
            xs.append(e + (r["step"] - first[e]) / max(count[e], 1))
        else:
            xs.append(r["step"])
        ys.append(float(v))
    return xs, ys


def plot_runs(paths: list[str], out: str, x: str = "step") -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("fastdino.plot needs matplotlib: pip install matplotlib (or pip install 'fastdino[plot]')")
    runs = [(p, *read_metrics(p)) for p in paths]
    panels = [(t, keys, scale) for t, keys, scale in PANELS
              if any(series(recs, k, x)[0] for _, recs, _ in runs for k in keys)]
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, keys, scale) in zip(axes.flat, panels):
        for path, recs, cfg in runs:
            name = os.path.basename(os.path.normpath(path if os.path.isdir(path) else os.path.dirname(path)))
            for key in keys:
                xs, ys = series(recs, key, x)
                if not xs:
                    continue
                target = ax
                if key == "wd":  # a different scale from lr: its own axis
                    if not hasattr(ax, "_wd_axis"):
                        ax._wd_axis = ax.twinx()
                    target = ax._wd_axis
                target.plot(xs, ys, marker="o" if key == "knn_top1" else None, markersize=3,
                            label=name if len(keys) == 1 else f"{name} {key}", linestyle="--" if key == "wd" else "-")
            out_dim = (cfg or {}).get("model", {}).get("out_dim")
            if keys == ("teacher_entropy",) and isinstance(out_dim, int) and out_dim > 1:
                ax.axhline(math.log(out_dim), color="gray", linestyle=":", linewidth=1)
                ax.text(0.01, math.log(out_dim), f" ln K (K={out_dim})", va="top", ha="left", fontsize=7,
                        color="gray", transform=ax.get_yaxis_transform())
        if keys == ("teacher_entropy",) or keys == ("kl",):
            ax.axhline(0.0, color="gray", linestyle=":", linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.set_yscale(scale)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastdino.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (holding metrics.jsonl) or metrics.jsonl files")
    p.add_argument("--out", default=None, help="PNG path (default: <first run>/curves.png)")
    p.add_argument("--x", default="step", choices=("step", "epoch"))
    args = p.parse_args(argv)
    first = args.runs[0] if os.path.isdir(args.runs[0]) else os.path.dirname(os.path.abspath(args.runs[0]))
    out = args.out or os.path.join(first, "curves.png")
    try:
        print(f"saved {plot_runs(args.runs, out, args.x)}")
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
