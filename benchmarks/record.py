"""Append the measurements of one GPU suite run (`bash benchmarks/gpu_suite.sh PART OUTDIR`) to
benchmarks/results.jsonl, one row per (variant, metric):

    {"date", "device", "torch", "triton", "command", "config", "variant", "metric", "value", "baseline"}

`baseline` is the same metric of the reference variant of the same configuration (null for the
reference itself). Sources in OUTDIR: *.jsonl (benchmarks/gram.py, residual_norm.py: rows already in
this form), loss*.json (benchmarks/loss.py --json), throughput*.json (benchmarks/throughput.py
--json) and data*.json (benchmarks/data.py --json). The suite writes OUTDIR/versions.json (torch, triton,
device) and OUTDIR/commands.txt (`NAME<TAB>command` per step); the loss rows take their versions and
commands from there.

    python benchmarks/record.py OUTDIR [--date 2026-11-29] [--results benchmarks/results.jsonl]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

LOSS_METRICS = ("ms", "dev_ms", "floor_frac", "dev_GBps", "peak_extra_MB")
LOSS_CONFIG_SKIP = set(LOSS_METRICS) | {"variant", "GBps", "cpu_us", "speedup", "dev_speedup", "mem_vs_ref",
                                        "device", "loss", "entropy", "fwd_ms", "bwd_ms", "fwd_dev_ms",
                                        "bwd_dev_ms", "tflops", "TFLOPs"}
THROUGHPUT_METRICS = ("images_per_s", "step_ms", "mfu", "peak_mem_gib")
DATA_METRICS = ("images_per_s", "ms_per_batch", "loop_host_read_ms", "host_stream_ms", "host_stream_gil_busy_ms")


def _is_reference(variant: str) -> bool:
    return variant == "reference" or variant.endswith("_reference") or variant.startswith("reference")


def loss_rows(rows: list[dict], common: dict) -> list[dict]:
    """benchmarks/loss.py --json: a list of variant rows; the baseline is the reference row with the
    same non-metric fields (dtype, B, K, ...)."""
    out, refs = [], {}
    keyed = []
    for r in rows:
        config = {k: v for k, v in r.items() if k not in LOSS_CONFIG_SKIP}
        key = json.dumps(config, sort_keys=True)
        keyed.append((r, config, key))
        if _is_reference(r["variant"]):
            refs[key] = r
    for r, config, key in keyed:
        ref = None if _is_reference(r["variant"]) else refs.get(key)
        for m in LOSS_METRICS:
            if r.get(m) is not None:
                out.append({**common, "config": config, "variant": r["variant"], "metric": m, "value": r[m],
                            "baseline": None if ref is None else ref.get(m)})
    return out


def throughput_rows(d: dict, common: dict) -> list[dict]:
    """benchmarks/throughput.py --json: one row per (row name, data source) and metric; the baseline
    is the reference row on the same data."""
    common = {**common, "device": d.get("device_name", common.get("device")),
              "torch": d.get("versions", {}).get("torch", common.get("torch")),
              "triton": d.get("versions", {}).get("triton", common.get("triton"))}
    config = {"config": d["config"], "overrides": d.get("overrides", []), "arch": d.get("arch"),
              "crops": d.get("crops"), "batch_size": d.get("batch_size"), "precision": d.get("precision")}
    refs = {r["data"]: r for r in d["rows"] if r["name"] == "reference" and r.get("status") == "ok"}
    out = []
    for r in d["rows"]:
        if r.get("status") != "ok":
            continue
        ref = None if r["name"] == "reference" else refs.get(r["data"])
        for m in THROUGHPUT_METRICS:
            if r.get(m) is not None:
                out.append({**common, "config": {**config, "data": r["data"], "impls": r.get("impls")},
                            "variant": r["name"], "metric": m, "value": r[m],
                            "baseline": None if ref is None else ref.get(m)})
    return out


def data_rows(d: dict, common: dict) -> list[dict]:
    """benchmarks/data.py --json: one row per loader (backend, host workers, photometric impl, crops, batch) and
    metric. Baseline: a DALI loader with host worker processes against the same loader with the host side in
    a thread (host workers 0); any other DALI loader against the torch backend's row of the same crops and batch."""
    common = {**common, "device": d.get("device", common.get("device"))}
    out = []

    def key(r, **kw):
        r = {**r, **kw}
        return (r["backend"], r.get("host_workers"), r["photometric"], r["crops"], r["batch"])

    rows = {key(r): r for r in d["results"]}
    torch_rows = {(r["crops"], r["batch"]): r for r in d["results"] if r["backend"] == "torch"}
    for r in d["results"]:
        hosts = r.get("host_workers")
        if r["backend"] != "dali":
            ref, variant = None, "torch"
        elif hosts:
            ref, variant = rows.get(key(r, host_workers=0)), f"dali_host_workers{hosts}"
        else:
            ref, variant = torch_rows.get((r["crops"], r["batch"])), "dali" if hosts is None else "dali_host_thread"
        config = {"crops": r["crops"], "batch": r["batch"], "photometric": r["photometric"],
                  "cpu_cores": r.get("cpu_cores"), "workers_or_threads": r.get("workers_or_threads"),
                  "host_workers": hosts}
        for m in DATA_METRICS:
            if r.get(m) is not None:
                out.append({**common, "config": config, "variant": variant, "metric": m, "value": r[m],
                            "baseline": None if ref is None else ref.get(m)})
    return out


def collect(outdir: str, date: str) -> list[dict]:
    meta = {}
    if os.path.exists(os.path.join(outdir, "versions.json")):
        with open(os.path.join(outdir, "versions.json")) as f:
            meta = json.load(f)
    commands = {}
    if os.path.exists(os.path.join(outdir, "commands.txt")):
        with open(os.path.join(outdir, "commands.txt")) as f:
            commands = dict(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)
    rows = []
    for name in sorted(os.listdir(outdir)):
        path, stem = os.path.join(outdir, name), name.rsplit(".", 1)[0]
        common = {"date": date, "device": meta.get("device"), "torch": meta.get("torch"),
                  "triton": meta.get("triton"), "command": commands.get(stem)}
        if name.endswith(".jsonl"):
            with open(path) as f:
                rows += [json.loads(line) for line in f if line.strip()]
        elif name.endswith(".json") and name.startswith("loss"):
            with open(path) as f:
                rows += loss_rows(json.load(f), common)
        elif name.endswith(".json") and name.startswith("throughput"):
            with open(path) as f:
                rows += throughput_rows(json.load(f), common)
        elif name.endswith(".json") and name.startswith("data"):
            with open(path) as f:
                rows += data_rows(json.load(f), common)
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outdir")
    p.add_argument("--date", default=datetime.date.today().isoformat())
    p.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.jsonl"))
    args = p.parse_args(argv)
    if not os.path.isdir(args.outdir):
        sys.exit(f"record.py: error: {args.outdir}: not a directory")
    rows = collect(args.outdir, args.date)
    if not rows:
        sys.exit(f"record.py: error: {args.outdir}: no loss*.json, throughput*.json, data*.json or *.jsonl results")
    with open(args.results, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"record.py: {len(rows)} rows from {args.outdir} appended to {args.results}")
    return rows


if __name__ == "__main__":
    main()
