"""DeepSpeed backend (fastdino/ds.py) of the one training step vs the local backend.

One 2-process launch (torch.distributed.run, gloo, DeepSpeed's CPU accelerator) runs, one after
another in the same processes: the plain engine under DDP, then ZeRO-0, 1, 2 and 3 for STEPS steps of
a tiny ViT on the demo data, and for ZeRO-2 and ZeRO-3 a run stopped at step RESUME_AT then resumed
to STEPS. Each run's consolidated student/teacher weights are compared with
  - the single-process engine (same seed, global batch 2B vs 2 ranks x B): equal up to the order of
    the gradient sums, which Adam turns into differences of a fraction of one step's lr (TOL_SINGLE);
  - the DDP run (same ranks and batches): DeepSpeed reduces and clips in another order (ZeRO
    partitions, per-fragment norms), which shows only where Adam amplifies float noise: the
    attention's key bias has an analytically zero gradient (softmax is shift invariant), so its
    update is ~lr*noise/eps (TOL_ZERO, 5% of one step's lr; elsewhere the runs agree to ~1e-6, and
    clipping, the frozen layer or the EMA change the weights by far more).
Resuming ZeRO-2/3 is compared with the uninterrupted run (TOL_ZERO; ZeRO-3 is bit-identical).
The runs cross an epoch boundary, so the frozen last layer and its release are covered; clip_grad is
small enough that per-tensor clipping acts on every step (a single-process run without clipping is
checked to differ by far more than TOL_SINGLE). The first ever DeepSpeed launch on a machine builds
its CPU shared-memory comm op (~2-4 min, cached in TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions).

Also runs on a GPU machine (the reference then runs on CPU too: everything here is device=cpu).
    python -m pytest -x -q tests/test_deepspeed.py
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from fastdino.config import ConfigError, load_config  # noqa: E402

STEPS, RESUME_AT, B = 4, 3, 2  # 8 images / global batch 4 = 2 steps per epoch: epoch 1 starts at step 2
LR = 0.05  # peak lr at batch 256: 0.05 * 4 / 256 = 7.8e-4 per step here


# the DINOv2 recipe on the same data: 2-block dinov2_vitt14 with 4 registers on 42 / 14 px crops (3x3 and
# 1x1 patches of 14), DINO + iBOT (separate head, masks on every global crop) + KoLeo, Sinkhorn-Knopp
# targets, layer-wise lr decay, and the official DINOv2 loop rules (per-module clipping, per-iteration
# teacher temperature, lr-0 frozen last layers). KoLeo is per rank, so these runs are compared with the
# DDP run of the same ranks (and not with one process).
DINOV2 = [
    "model.arch=dinov2_vitt14", "model.patch_size=14", "model.depth=2", "model.num_register_tokens=4",
    "model.ibot_out_dim=128", "model.norm_last_layer=false", "loss.targets=sinkhorn_knopp", "loss.koleo_weight=0.1",
    "loss.ibot_weight=1.0", "loss.warmup_teacher_temp=0.04", "loss.teacher_temp=0.07",
    "loss.warmup_teacher_temp_epochs=1", "loss.teacher_temp_schedule=per_iteration", "optim.clip_grad_mode=per_module",
    "optim.freeze_last_layer_mode=zero_lr", "optim.layerwise_decay=0.9", "optim.patch_embed_lr_mult=0.2",
    "data.global_crop_size=42", "data.local_crop_size=14", "data.demo_image_size=42", "data.mask_probability=1.0",
]


DINOV2_GRAM = ["data.gram_crop_size=84", "gram.weight=1.0", "gram.start_epoch=1"]


def tiny_overrides(data: str, out: str, batch: int, ds_stage: int | None, max_steps: int = STEPS,
                   clip: float = 0.05, dinov2: bool = False) -> list[str]:
    o = [
        "model.arch=vit_tiny", "model.patch_size=16", "model.out_dim=256", "model.drop_path_rate=0",
        "model.attn=math", "loss.impl=reference", "loss.warmup_teacher_temp_epochs=0",
        "optim.epochs=2", f"optim.batch_size_per_gpu={batch}", f"optim.lr={LR}", "optim.warmup_epochs=0",
        f"optim.clip_grad={clip}", "optim.freeze_last_layer=1", "optim.momentum_teacher=0.9",
        "data.backend=torch", f"data.path={data}", "data.generate_demo=true", "data.demo_num_images=8",
        "data.demo_image_size=32", "data.global_crop_size=32", "data.local_crop_size=16",
        "data.local_crops_number=1", "data.num_workers=0", "data.dtype=fp32",
        "train.precision=fp32", "train.device=cpu", "train.log_every=3", "train.progress=false",
        f"train.max_steps={max_steps}", f"train.output_dir={out}",
    ]
    if ds_stage is not None:
        o += ["deepspeed.enabled=true", f"deepspeed.zero_stage={ds_stage}"]
    return o + (DINOV2 if dinov2 else [])


# ----------------------------------------------------------------------------------------------
# the 2-process worker: `python -m torch.distributed.run --nproc_per_node 2 tests/test_deepspeed.py --worker SPEC`
# ----------------------------------------------------------------------------------------------
def worker(spec_path: str) -> None:
    import argparse
    import logging

    import torch.distributed as dist

    import fastdino.train
    from fastdino.distributed import init_distributed
    from fastdino.train import _train

    if ".write-test\"" in open(fastdino.train.__file__).read():  # ranks race on one probe file name
        check = fastdino.train.check_output_dir
        fastdino.train.check_output_dir = lambda path: (os.makedirs(path, exist_ok=True), dist.barrier(),
                                                        check(path) if dist.get_rank() == 0 else None)

    logging.basicConfig(level=logging.WARNING)
    with open(spec_path) as f:
        spec = json.load(f)
    ctx = init_distributed("cpu")
    for run in spec["runs"]:  # all runs share one process group (DeepSpeed caches its groups)
        cfg = load_config(None, run["overrides"])
        _train(cfg, argparse.Namespace(resume=run["resume"], local_rank=None, config=None), ctx)


# ----------------------------------------------------------------------------------------------
# fixtures: the reference runs in this process, the DeepSpeed runs in one 2-process launch
# ----------------------------------------------------------------------------------------------
def _single(tmp, name: str, **kw) -> dict:
    import argparse

    from fastdino.train import train

    out = str(tmp / name)
    cfg = load_config(None, tiny_overrides(str(tmp / "demo"), out, 2 * B, None, **kw))
    train(cfg, argparse.Namespace(resume=None, local_rank=None, config=None))
    return torch.load(os.path.join(out, "checkpoint.pth"), map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("deepspeed")
    tmp = tmp_path_factory.mktemp("ds")
    data = str(tmp / "demo")
    ref = _single(tmp, "single")
    ref_noclip = _single(tmp, "single_noclip", clip=0.0)

    spec = {"runs": [{"overrides": tiny_overrides(data, str(tmp / "ddp"), B, None), "resume": None}]}
    for stage in (0, 1, 2, 3):
        spec["runs"].append({"overrides": tiny_overrides(data, str(tmp / f"zero{stage}"), B, stage), "resume": None})
    for stage in (2, 3):
        out = str(tmp / f"zero{stage}_resumed")
        spec["runs"].append({"overrides": tiny_overrides(data, out, B, stage, max_steps=RESUME_AT), "resume": None})
        spec["runs"].append({"overrides": tiny_overrides(data, out, B, stage), "resume": "auto"})
    v2_data = str(tmp / "demo42")  # the DINOv2 runs' 42 px images
    spec["runs"].append({"overrides": tiny_overrides(v2_data, str(tmp / "v2_ddp"), B, None, dinov2=True), "resume": None})
    for stage in (0, 2, 3):
        spec["runs"].append({"overrides": tiny_overrides(v2_data, str(tmp / f"v2_zero{stage}"), B, stage, dinov2=True),
                             "resume": None})
    gram = DINOV2_GRAM  # + DINOv3 Gram anchoring from epoch 1 (step 2)
    spec["runs"].append({"overrides": tiny_overrides(v2_data, str(tmp / "gram_ddp"), B, None, dinov2=True) + gram,
                         "resume": None})
    for stage in (0, 3):
        spec["runs"].append({"overrides": tiny_overrides(v2_data, str(tmp / f"gram_zero{stage}"), B, stage,
                                                         dinov2=True) + gram, "resume": None})
    out = str(tmp / "v2_zero2_resumed")
    spec["runs"].append({"overrides": tiny_overrides(v2_data, out, B, 2, max_steps=RESUME_AT, dinov2=True), "resume": None})
    spec["runs"].append({"overrides": tiny_overrides(v2_data, out, B, 2, dinov2=True), "resume": "auto"})
    spec_path = tmp / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.abspath(__file__), "--worker", str(spec_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"2-process DeepSpeed run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")

    def load(name):
        return torch.load(str(tmp / name / "consolidated.pth"), map_location="cpu", weights_only=False)

    ddp = torch.load(str(tmp / "ddp" / "checkpoint.pth"), map_location="cpu", weights_only=False)
    v2_ddp = torch.load(str(tmp / "v2_ddp" / "checkpoint.pth"), map_location="cpu", weights_only=False)
    gram_ddp = torch.load(str(tmp / "gram_ddp" / "checkpoint.pth"), map_location="cpu", weights_only=False)
    return {"ref": ref, "ref_noclip": ref_noclip, "ddp": ddp, "v2_ddp": v2_ddp, "gram_ddp": gram_ddp, "tmp": tmp,
            "load": load}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


TOL_SINGLE = 0.25 * LR * 2 * B / 256  # a quarter of one step's lr: Adam's sign-like steps on ~0 gradients
TOL_ZERO = 0.05 * LR * 2 * B / 256  # ZeRO-1/2/3: float noise of zero-gradient entries through Adam


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_matches_single_process_and_ddp(runs, stage):
    ds = runs["load"](f"zero{stage}")
    assert ds["step"] == STEPS
    for which in ("student", "teacher"):
        err = max_diff(ds[which], runs["ref"][which])
        assert err < TOL_SINGLE, f"ZeRO-{stage} {which} vs single process: max |diff| {err:.2e}"
        err = max_diff(ds[which], runs["ddp"][which])
        assert err < TOL_ZERO, f"ZeRO-{stage} {which} vs DDP: max |diff| {err:.2e}"


def test_tolerance_detects_clipping_and_training(runs):
    """The tolerances are far below what clipping changes, so the comparisons can fail."""
    ref, noclip = runs["ref"], runs["ref_noclip"]
    assert max_diff(ref["student"], noclip["student"]) > 4 * TOL_SINGLE
    ds0 = runs["load"]("zero0")
    assert max_diff(ds0["teacher"], ds0["student"]) > 4 * TOL_SINGLE  # the teacher lags: EMA applied


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_matches_uninterrupted(runs, stage):
    resumed, full = runs["load"](f"zero{stage}_resumed"), runs["load"](f"zero{stage}")
    assert resumed["step"] == STEPS
    for which in ("student", "teacher"):
        err = max_diff(resumed[which], full[which])
        assert err < TOL_ZERO, f"ZeRO-{stage} resumed {which}: max |diff| {err:.2e}"


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_dinov2_recipe_zero_stage_matches_ddp(runs, stage):
    """DINO + iBOT + KoLeo with Sinkhorn-Knopp targets and the DINOv2 loop rules: ZeRO-0/2/3 equal
    DDP on the same ranks (per-module clipping's norms span ZeRO groups and ranks), the iBOT head
    and the mask token trained, the iBOT state checkpointed."""
    ds, ddp = runs["load"](f"v2_zero{stage}"), runs["v2_ddp"]
    assert ds["step"] == STEPS and "ibot_head.last_layer.weight_v" in ds["student"]
    init = torch.zeros_like(ds["student"]["backbone.mask_token"])
    assert not torch.equal(ds["student"]["backbone.mask_token"], init)  # iBOT's gradient reached the mask token
    for which in ("student", "teacher"):
        err = max_diff(ds[which], ddp[which])
        assert err < TOL_ZERO, f"DINOv2 ZeRO-{stage} {which} vs DDP: max |diff| {err:.2e}"
    assert max_diff(ddp["student"], runs["load"]("v2_zero0")["teacher"]) > 4 * TOL_ZERO  # the comparison can fail


@pytest.mark.parametrize("stage", [0, 3])
def test_gram_anchoring_zero_stage_matches_ddp(runs, stage):
    """The DINOv2 recipe plus Gram anchoring from step 2 (the Gram teacher taken from the EMA teacher,
    under ZeRO-3 gathered from its shards): ZeRO-0/3 equal DDP; the Gram term ran."""
    ds, ddp = runs["load"](f"gram_zero{stage}"), runs["gram_ddp"]
    assert ds["step"] == STEPS and "gram_teacher" in ddp
    for which in ("student", "teacher"):
        err = max_diff(ds[which], ddp[which])
        assert err < TOL_ZERO, f"Gram ZeRO-{stage} {which} vs DDP: max |diff| {err:.2e}"
    assert max_diff(ddp["student"], runs["v2_ddp"]["student"]) > 4 * TOL_ZERO  # the Gram term changed the run
    records = [json.loads(x) for x in open(runs["tmp"] / f"gram_zero{stage}" / "metrics.jsonl") if '"gram"' in x]
    assert records and all(r["step"] >= 2 and r["gram"] > 0 for r in records)  # log steps from step 2 on


def test_dinov2_recipe_zero2_resume_matches_uninterrupted(runs):
    resumed, full = runs["load"]("v2_zero2_resumed"), runs["load"]("v2_zero2")
    assert resumed["step"] == STEPS
    for which in ("student", "teacher"):
        err = max_diff(resumed[which], full[which])
        assert err < TOL_ZERO, f"DINOv2 ZeRO-2 resumed {which}: max |diff| {err:.2e}"


def test_exported_backbone_has_standard_vit_keys(runs):
    sd = torch.load(str(runs["tmp"] / "zero3" / "teacher_backbone.pth"), map_location="cpu", weights_only=True)
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "norm.weight"} <= sd.keys()
    assert not any(k.startswith(("head.", "backbone.")) for k in sd)
    full = runs["load"]("zero3")["teacher"]
    assert torch.equal(sd["blocks.0.attn.qkv.weight"], full["backbone.blocks.0.attn.qkv.weight"])


def test_resume_with_other_stage_fails_clearly(runs):
    """A ZeRO-2 checkpoint resumed as ZeRO-3: one-line CheckpointError naming both (checked by the
    stage/world-size record alone, no process group needed)."""
    from fastdino.checkpoint import CheckpointError
    from fastdino.ds import DeepSpeedBackend

    folder = runs["tmp"] / "zero2_resumed"
    backend = DeepSpeedBackend.__new__(DeepSpeedBackend)  # the fields resume() reads before touching DeepSpeed
    backend.stage = 3
    backend.ctx = type("Ctx", (), {"world_size": 2, "rank": 0, "is_main": True})()
    with pytest.raises(CheckpointError, match=r"ZeRO-2 on 2 ranks; this run is ZeRO-3 on 2 ranks"):
        backend.resume("auto", str(folder))


# ----------------------------------------------------------------------------------------------
# fast unit tests (no process group)
# ----------------------------------------------------------------------------------------------
def test_deepspeed_dict_from_config():
    from fastdino.ds import deepspeed_config

    cfg = load_config(None, ["optim.batch_size_per_gpu=24", "train.precision=bf16", "deepspeed.enabled=true",
                             "deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true",
                             "deepspeed.offload_param=true",
                             'deepspeed.extra={"zero_optimization": {"overlap_comm": true}, "steps_per_print": 5}'])
    d = deepspeed_config(cfg)
    assert d["train_micro_batch_size_per_gpu"] == 24 and d["gradient_accumulation_steps"] == 1
    assert d["bf16"]["enabled"] and not d["fp16"]["enabled"] and d["gradient_clipping"] == 0.0
    z = d["zero_optimization"]
    assert z["stage"] == 3 and z["overlap_comm"] and z["offload_optimizer"]["device"] == "cpu"
    assert z["offload_param"]["device"] == "cpu" and d["steps_per_print"] == 5
    assert "optimizer" not in d and "scheduler" not in d and "train_batch_size" not in d


@pytest.mark.parametrize("extra, key", [
    ('{"train_micro_batch_size_per_gpu": 8}', "train_micro_batch_size_per_gpu"),
    ('{"optimizer": {"type": "Adam"}}', "optimizer"),
    ('{"gradient_clipping": 1.0}', "gradient_clipping"),
    ('{"bf16": {"enabled": true}}', "bf16"),
])
def test_deepspeed_dict_refuses_duplicated_settings(extra, key):
    from fastdino.ds import deepspeed_config

    cfg = load_config(None, ["deepspeed.enabled=true", f"deepspeed.extra={extra}"])
    with pytest.raises(ConfigError, match=f"deepspeed.extra.{key}"):
        deepspeed_config(cfg)


@pytest.mark.parametrize("overrides, key", [
    (["deepspeed.zero_stage=0", "deepspeed.offload_optimizer=true"], "deepspeed.offload_optimizer"),
    (["deepspeed.zero_stage=2", "deepspeed.offload_param=true"], "deepspeed.offload_param"),
])
def test_deepspeed_dict_refuses_impossible_offload(overrides, key):
    from fastdino.ds import deepspeed_config

    with pytest.raises(ConfigError, match=key):
        deepspeed_config(load_config(None, ["deepspeed.enabled=true"] + overrides))


def test_param_groups_isolate_last_layer():
    from fastdino.optim import param_groups
    from fastdino.resolve import resolve
    from fastdino.train import build_models

    cfg = load_config(None, ["model.arch=vit_tiny", "model.out_dim=64", "model.norm_last_layer=false"])
    student, _ = build_models(cfg, resolve(cfg, torch.device("cpu")), torch.device("cpu"))
    groups = param_groups(student)
    last = {id(p) for p in student.head.last_layer.parameters()}
    for g in groups:
        assert all((id(p) in last) == g["last_layer"] for p in g["params"])
    # the official decay rule: no decay on biases and 1-d parameters (norms, cls_token is 3-d)
    decayed = {id(p) for n, p in student.named_parameters() if not n.endswith(".bias") and p.ndim > 1}
    assert {id(p) for g in groups if g["regularized"] for p in g["params"]} == decayed
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in student.parameters())
    # weight_v and weight_g (K, 1) are both 2-d: decayed, as official; the last layer has no bias
    assert [(g["last_layer"], g["regularized"]) for g in groups] == [(False, True), (False, False), (True, True)]


def test_zero_adamw_stage0_matches_reference():
    """ZeroAdamW on whole tensors (ZeRO-0): per-tensor clipping + AdamW, last layer frozen, and a
    non-finite flag skipping the update, against the reference clip + torch AdamW."""
    from fastdino.ds import ZeroAdamW
    from fastdino.kernels.clip_grad import clip_grad_per_tensor_ref

    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (33, 3), (4, 9)]
    make = lambda: [torch.nn.Parameter(torch.randn(s)) for s in shapes]  # noqa: E731
    ps, rs = make(), make()
    for p, r in zip(ps, rs):
        r.data.copy_(p.data)
    groups = lambda q: [{"params": [q[0], q[2]], "regularized": True, "last_layer": False},  # noqa: E731
                        {"params": [q[1]], "regularized": False, "last_layer": False, "weight_decay": 0.0},
                        {"params": [q[3]], "regularized": True, "last_layer": True}]
    opt = ZeroAdamW(groups(ps), clip=0.5)
    ref = torch.optim.AdamW([{k: v for k, v in g.items() if k not in ("regularized", "last_layer")}
                             for g in groups(rs)], lr=0.1, weight_decay=0.05, foreach=False)
    scalar = torch.tensor
    for step in range(4):
        freeze = step < 2
        grads = [torch.randn(s) * 3 for s in shapes]
        for p, r, g in zip(ps, rs, grads):
            p.grad, r.grad = g.clone(), g.clone()
        if step == 3:  # a non-finite gradient: nothing moves, the flag is raised
            ps[1].grad[0] = float("nan")
            before = [p.detach().clone() for p in ps]
        opt.set_inputs(scalar(0.1), scalar(0.05), scalar(0.0), scalar(float(freeze)))
        opt.grads_bad = None
        opt.step()
        if step == 3:
            assert opt.grads_bad.item() == 1.0
            assert all(torch.equal(p, b) for p, b in zip(ps, before))
            break
        assert opt.grads_bad.item() == 0.0
        if freeze:
            rs[3].grad = None
        clip_grad_per_tensor_ref([r.grad for r in rs if r.grad is not None], 0.5)
        ref.step()
        for p, r in zip(ps, rs):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
    assert opt.state[ps[3]]["step"].item() == 1  # the frozen tensor counted only its one update


# ----------------------------------------------------------------------------------------------
# bf16 under DeepSpeed: the student's weights are bf16 and DeepSpeed's engine forward turns an
# enclosing autocast off; packed multi-crop + activation checkpointing + drop path (fp32 scales)
# made the residual stream fp32 before a bf16 LayerNorm (the ViT-B/8 ZeRO-2 crash)
# ----------------------------------------------------------------------------------------------
BF16_OVERRIDES = ["model.arch=vit_tiny", "model.patch_size=16", "model.out_dim=96", "model.drop_path_rate=0.3",
                  "model.attn=math", "model.packed_multicrop=true", "model.activation_checkpointing=true",
                  "loss.impl=reference", "optim.batch_size_per_gpu=2", "data.global_crop_size=32",
                  "data.local_crop_size=16", "data.local_crops_number=2", "train.precision=bf16"]


def _crops(device, dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    crops = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(2)] + [torch.randn(2, 3, 16, 16, generator=g)
                                                                          for _ in range(2)]
    return [c.to(device, dtype) for c in crops]


def _student_pass(model, crops, seed: int, deepspeed_like: bool):
    """Output and parameter gradients of one packed, checkpointed student pass (same drop-path
    masks for every call with the same seed); deepspeed_like: inside an autocast-off region, as
    DeepSpeed's engine forward runs the module."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    if deepspeed_like:
        with torch.autocast(crops[0].device.type, enabled=False):
            out = model(crops)
    else:
        out = model(crops)
    (out.float() * torch.linspace(-1, 1, out.shape[-1], device=out.device)).sum().backward()
    return out.float(), [p.grad.float() for p in model.parameters() if p.requires_grad]


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_bf16_student_forward_under_deepspeed_matches_amp_reference():
    """A bf16-cast student (DeepSpeed's bf16 weights), packed multi-crop, activation checkpointing,
    drop path, run where autocast is off (DeepSpeed's engine forward): without the hooks it runs in
    plain bf16 (it failed on the H100 before the residual adds kept the stream's dtype); with
    autocast_forward its output and gradients are as close to
    the fp32 reference as the single-process engine's bf16 autocast with fp32 weights."""
    from fastdino.ds import autocast_forward
    from fastdino.resolve import resolve
    from fastdino.train import build_models

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(None, BF16_OVERRIDES)
    torch.manual_seed(0)
    student, teacher = build_models(cfg, resolve(cfg, device), device)
    with torch.no_grad():  # weights exactly representable in bf16: the three runs share them
        for p in student.parameters():
            p.copy_(p.bfloat16().float() + 0.02 * torch.randn_like(p).bfloat16().float())
    student.train()
    ds_student = copy.deepcopy(student).to(torch.bfloat16)
    crops32, crops16 = _crops(device, torch.float32, 1), _crops(device, torch.bfloat16, 1)
    with torch.no_grad():
        t_ref = teacher(crops32[:2])

    # the failure reported on the H100 (an fp32 residual, promoted by the fp32 drop-path scales, met a
    # bf16 LayerNorm) is gone: the residual adds keep the stream's dtype. Without the hooks the pass
    # runs all in bf16 (LayerNorm included); the hooks below give autocast's accuracy
    out16, grads16 = _student_pass(ds_student, crops16, 7, deepspeed_like=True)
    assert torch.isfinite(out16).all() and all(torch.isfinite(g).all() for g in grads16)
    ref32, grads32 = _student_pass(student, crops32, 7, deepspeed_like=False)
    with torch.autocast(device.type, dtype=torch.bfloat16):  # the single-process engine's bf16
        ref, grads_ref = _student_pass(student, crops16, 7, deepspeed_like=False)
    hooks = autocast_forward(ds_student, device.type, torch.bfloat16)
    try:
        for crops in (crops16, crops32):  # the loader's bf16 crops, or fp32 ones
            out, grads = _student_pass(ds_student, crops, 7, deepspeed_like=True)
            assert not torch.is_autocast_enabled(device.type)  # the hooks restored the caller's state
            assert torch.isfinite(out).all() and out.shape == ref32.shape
            assert _rel(out, ref32) <= 2 * _rel(ref, ref32) + 1e-3, (_rel(out, ref32), _rel(ref, ref32))
            err = _rel(torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in grads32]))
            err_ref = _rel(torch.cat([g.flatten() for g in grads_ref]), torch.cat([g.flatten() for g in grads32]))
            assert err <= 2 * err_ref + 1e-3, (err, err_ref)
            assert all(torch.isfinite(g).all() for g in grads)
        # the fp32 teacher gets the bf16 crops inside an autocast-off region too (ZeRO-3 teacher engine)
        hooks += autocast_forward(teacher, device.type, torch.bfloat16)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            t_out = teacher(crops16[:2])
        assert t_out.dtype == torch.bfloat16 and _rel(t_out.float(), t_ref) < 0.05, _rel(t_out.float(), t_ref)
        with pytest.raises(ValueError, match="expected images"):  # a raising forward leaves autocast as it was
            ds_student([crops16[0][0]])
        assert not torch.is_autocast_enabled(device.type)
    finally:
        for h in hooks:
            h.remove()


def bf16_worker(out_path: str) -> None:
    """Two DeepSpeed ZeRO-2 bf16 steps (fp32 crops, then bf16 crops) through train_step, one process."""
    from fastdino.distributed import cleanup, init_distributed
    from fastdino.step import BAD_STEPS, train_step
    from fastdino.train import build_run

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = load_config(None, BF16_OVERRIDES + [f"train.device={device}", "deepspeed.enabled=true",
                                              "deepspeed.zero_stage=2", "optim.freeze_last_layer=0",
                                              "optim.warmup_epochs=0"])
    ctx = init_distributed(cfg.train.device)
    seen = []  # autocast state inside each checkpointed block call (forward and recompute)
    try:
        run = build_run(cfg, ctx, steps_per_epoch=4)
        student, teacher = run.backend.student_module, run.backend.teacher_module
        for blk in student.backbone.blocks:
            blk.register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled(ctx.device.type)))
        teacher0 = [p.detach().clone() for p in teacher.parameters()]
        student0 = [p.detach().float().clone() for p in student.parameters()]
        losses = []
        for it, dtype in enumerate((torch.float32, torch.bfloat16)):
            run.state.load_hyperparams(run.table, it)
            losses.append(train_step(run.state, _crops(ctx.device, dtype, it))["loss"])
        result = {
            "losses": [float(x) for x in losses], "loss_dtypes": [str(x.dtype) for x in losses],
            "student_dtypes": sorted({str(p.dtype) for p in student.parameters()}),
            "teacher_dtypes": sorted({str(p.dtype) for p in teacher.parameters()}),
            "student_moved": max((p.float() - q).abs().max().item() for p, q in zip(student.parameters(), student0)),
            "teacher_moved": max((p - q).abs().max().item() for p, q in zip(teacher.parameters(), teacher0)),
            "bad_steps": int(run.state.counters[BAD_STEPS]), "autocast_in_blocks": seen,
        }
    finally:
        run = student = teacher = None  # the engines go before their process group (cleanup)
        cleanup()
    with open(out_path, "w") as f:
        json.dump(result, f)


def test_deepspeed_bf16_step_packed_checkpointed(tmp_path):
    """The reported configuration in miniature (ZeRO-2, bf16, packed multi-crop, activation
    checkpointing, drop path): two steps run, the loss is fp32 and finite, both models move."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "bf16.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    if not torch.cuda.is_available():
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--bf16-worker", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"DeepSpeed bf16 step failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    r = json.loads(out.read_text())
    assert r["student_dtypes"] == ["torch.bfloat16"] and r["teacher_dtypes"] == ["torch.float32"]
    assert r["loss_dtypes"] == ["torch.float32"] * 2 and all(4.0 < x < 5.0 for x in r["losses"]), r["losses"]
    assert r["bad_steps"] == 0 and r["student_moved"] > 0 and r["teacher_moved"] > 0
    # every student block call, forward and checkpoint recompute (2 steps x 2 x 12 blocks), ran under autocast
    assert len(r["autocast_in_blocks"]) == 2 * 2 * 12 and all(r["autocast_in_blocks"])


if __name__ == "__main__" and "--worker" in sys.argv:
    worker(sys.argv[sys.argv.index("--worker") + 1])
if __name__ == "__main__" and "--bf16-worker" in sys.argv:
    bf16_worker(sys.argv[sys.argv.index("--bf16-worker") + 1])
