"""The one training step (fastdino/step.py) on its own: bad-step and fp16 overflow semantics, and the
step as torch.compile and CUDA graphs need it (compiled blocks, the whole step as one graph, CUDA-
graph capture, no host synchronization)."""
import os

import pytest
import torch

from fastdino.config import load_config
from fastdino.distributed import DistContext
from fastdino.step import BAD_STEPS, FIRST_BAD_STEP, SKIPPED_UPDATES, STEP, train_step
from fastdino.train import build_run

CUDA = torch.cuda.is_available()
LR_STEP = 1e-4
# Weights of two runs that agree to float rounding: AdamW turns a gradient that is ~0 (noise) into a
# step of up to +-lr, so weights are compared to half a step; the losses, which are not amplified, to 1e-5.
WEIGHT_TOL = 0.5 * LR_STEP
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def tiny_cfg(*extra, device="cpu"):
    """A 2-block ViT-tiny/16 on 32 px globals and 16 px locals, K = 96, batch 2, clipping that acts,
    peak lr 0.0128 * 2 / 256 = 1e-4 per step (LR_STEP)."""
    return load_config(None, [
        "model.arch=vit_tiny", "model.depth=2", "model.out_dim=96", "model.drop_path_rate=0.0",
        "optim.batch_size_per_gpu=2", "optim.epochs=2", "optim.lr=0.0128", "optim.warmup_epochs=0",
        "optim.freeze_last_layer=0", "optim.clip_grad=0.3", "optim.momentum_teacher=0.9",
        "data.global_crop_size=32", "data.local_crop_size=16", "data.local_crops_number=2",
        f"train.device={device}", "train.precision=fp32", *extra])


def make_run(cfg, device="cpu"):
    return build_run(cfg, DistContext(device=torch.device(device)), steps_per_epoch=4)


def make_crops(seed, device="cpu", B=2):
    g = torch.Generator().manual_seed(seed)
    crops = [torch.randn(B, 3, 32, 32, generator=g) for _ in range(2)]
    crops += [torch.randn(B, 3, 16, 16, generator=g) for _ in range(2)]
    return [c.to(device) for c in crops]


def snapshot(run) -> dict:
    b = run.backend
    return {"student": {k: v.clone() for k, v in b.student_module.state_dict().items()},
            "teacher": {k: v.clone() for k, v in b.teacher_module.state_dict().items()},
            "center": run.state.targets.center.clone()}


def changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def step(run, crops, it, fn=None):
    run.state.load_hyperparams(run.table, it)
    return (fn or run.step_fn)(run.state, crops)


# ------------------------------------------------------------------------------------------------
# bad steps
# ------------------------------------------------------------------------------------------------
def test_nonfinite_loss_skips_everything_and_is_counted():
    run = make_run(tiny_cfg())
    step(run, make_crops(0), 0)
    before = snapshot(run)
    bad = make_crops(1)
    bad[3][0, 0, 0, 0] = float("nan")  # one local crop: the student's loss goes NaN, the teacher stays finite
    out = step(run, bad, 1)
    after = snapshot(run)
    assert not torch.isfinite(out["loss"])
    assert not changed(before["student"], after["student"]) and not changed(before["teacher"], after["teacher"])
    assert torch.equal(before["center"], after["center"])
    c = run.state.counters.tolist()
    assert (c[STEP], c[BAD_STEPS], c[FIRST_BAD_STEP], c[SKIPPED_UPDATES]) == (2, 1, 1, 0)


def test_fp16_overflow_skips_only_the_optimizer_step():
    """The official fp16 loop: a grad scaler overflow (loss finite, scaled gradients not) skips the
    optimizer step and backs the scale off; the teacher EMA and the center update still run; it is
    not a bad step, and the next step with a sane scale updates the student."""
    from fastdino.train import MetricsLog, _log_pending
    from fastdino.monitor import CollapseMonitor

    run = make_run(tiny_cfg("train.precision=fp16"))
    step(run, make_crops(0), 0)  # a normal step first: the teacher now differs from the student
    run.backend.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120)  # every gradient overflows
    before = snapshot(run)
    out = step(run, make_crops(1), 1)
    after = snapshot(run)
    assert torch.isfinite(out["loss"])
    assert not changed(before["student"], after["student"]), "the optimizer must skip an overflowed step"
    assert changed(before["teacher"], after["teacher"]), "the teacher EMA still runs"
    assert not torch.equal(before["center"], after["center"]), "the center update still runs"
    assert run.backend.scaler.get_scale() == 2.0 ** 119  # backed off once
    c = run.state.counters.tolist()
    assert (c[BAD_STEPS], c[SKIPPED_UPDATES]) == (0, 1)
    # the log step reads it as an overflow, not a bad step: the run goes on
    losses, last = _log_pending(run, [(1, 0, out)], MetricsLog(None), CollapseMonitor(96), 1.0, 0)
    assert losses == [pytest.approx(float(out["loss"]))]
    run.backend.scaler.update(new_scale=1024.0)
    step(run, make_crops(2), 2)
    assert changed(after["student"], snapshot(run)["student"])


# ------------------------------------------------------------------------------------------------
# torch.compile on CPU (inductor): no graph break, no recompile, equal to eager
# ------------------------------------------------------------------------------------------------
def _compare_runs(eager, compiled, steps=3):
    """Run both for `steps` steps on the same crops; return the max weight difference."""
    from torch._dynamo.utils import counters

    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile raises
        for it in range(steps):
            crops = make_crops(it)
            a, b = step(eager, crops, it), step(compiled, crops, it)
            torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-5, atol=1e-5)
    assert not counters["graph_break"], dict(counters["graph_break"])
    sa, sb = snapshot(eager), snapshot(compiled)
    for which in ("student", "teacher"):
        for k in sa[which]:
            torch.testing.assert_close(sb[which][k], sa[which][k], rtol=0, atol=WEIGHT_TOL, msg=f"{which}.{k}")
    torch.testing.assert_close(sb["center"], sa["center"], rtol=1e-5, atol=1e-6)
    return counters


@pytest.mark.parametrize("packed", [False, True])
def test_compiled_blocks_equal_eager_without_recompiles(packed):
    """model.compile: blocks and heads compiled (one static graph per token layout), 3 steps of the
    eager step function: the compiled student forward+backward equals eager, no break, no recompile."""
    torch._dynamo.reset()
    extra = [f"model.packed_multicrop={str(packed).lower()}"]
    eager, compiled = make_run(tiny_cfg(*extra)), make_run(tiny_cfg(*extra, "model.compile=true"))
    assert compiled.resolved.compile == "blocks"
    counters = _compare_runs(eager, compiled)
    # teacher blocks (no grad), student blocks per crop resolution (or packed), and the two heads
    assert counters["stats"]["unique_graphs"] == (2 if packed else 3) + 2


@pytest.mark.parametrize("fast", [False, True], ids=["reference-ops", "triton-ops"])
def test_compiled_whole_step_equals_eager_without_recompiles(fast):
    """train.compile_step: forward, backward, clipping, AdamW, EMA and center in one graph (fullgraph:
    a break would raise), 3 steps with new hyper-parameters each step, equal to eager; with the
    Triton ops (custom ops, opaque to Dynamo) or the plain-PyTorch references."""
    if fast and not (CUDA or INTERPRET):
        pytest.skip("Triton ops need CUDA or TRITON_INTERPRET=1")
    torch._dynamo.reset()
    extra = ["loss.impl=fused", "optim.ema_impl=triton", "optim.clip_impl=triton"] if fast else []
    eager, compiled = make_run(tiny_cfg(*extra)), make_run(tiny_cfg(*extra, "train.compile_step=true"))
    assert compiled.resolved.compile == "step"
    counters = _compare_runs(eager, compiled)
    assert counters["stats"]["unique_graphs"] == 1
    compiled.backend.student_flat.check()  # the parameters and gradients are still views of the flat buffers
    compiled.backend.teacher_flat.check()


# ------------------------------------------------------------------------------------------------
# CUDA: graph capture and host synchronizations (run by benchmarks/gpu_suite.sh)
# ------------------------------------------------------------------------------------------------
def _cuda_cfg(*extra):
    return tiny_cfg("train.precision=bf16", "loss.impl=fused", "optim.ema_impl=triton", "optim.clip_impl=triton",
                    *extra, device="cuda")


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_whole_step_captured_in_a_cuda_graph_equals_eager():
    torch.manual_seed(0)
    graphed, eager = make_run(_cuda_cfg(), "cuda"), make_run(_cuda_cfg(), "cuda")
    static = make_crops(0, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: Triton compiles, autograd and the optimizer make their state
        for it in range(2):
            step(graphed, make_crops(it, "cuda"), it)
            step(eager, make_crops(it, "cuda"), it)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = train_step(graphed.state, static)
    for it in range(2, 5):  # capture does not run the step: the replays are steps 2, 3, 4
        crops = make_crops(it, "cuda")
        for s, c in zip(static, crops):
            s.copy_(c)
        graphed.state.load_hyperparams(graphed.table, it)
        graph.replay()
        ref = step(eager, crops, it)
        torch.testing.assert_close(out["loss"], ref["loss"], rtol=1e-5, atol=1e-5)
    a, b = snapshot(eager), snapshot(graphed)
    for which in ("student", "teacher"):
        for k in a[which]:
            torch.testing.assert_close(b[which][k], a[which][k], rtol=0, atol=WEIGHT_TOL, msg=f"{which}.{k}")
    torch.testing.assert_close(b["center"], a["center"])
    assert graphed.state.counters.tolist()[STEP] == 5


@pytest.mark.skipif(not CUDA, reason="host synchronizations are a CUDA matter")
def test_no_host_synchronization_per_step():
    run = make_run(_cuda_cfg("model.packed_multicrop=true"), "cuda")
    for it in range(2):  # warm-up outside the check: Triton compiles, first-call caches
        step(run, make_crops(it, "cuda"), it)
    crops = [make_crops(it, "cuda") for it in range(2, 5)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for it, c in enumerate(crops, start=2):
            step(run, c, it)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# train.cuda_graphs: the step replayed from CUDA graphs (fastdino/cuda_graph.py)
# ------------------------------------------------------------------------------------------------
def test_cuda_graphs_refusals_are_one_line():
    """train.cuda_graphs is refused, naming the key, where it cannot run: no CUDA, several processes,
    fp16 (the grad scaler), DeepSpeed."""
    from fastdino.config import ConfigError
    from fastdino.resolve import resolve

    cases = [(lambda: resolve(tiny_cfg("train.cuda_graphs=true"), torch.device("cpu")), "needs a CUDA device"),
             (lambda: tiny_cfg("train.cuda_graphs=true", "train.precision=fp16"), "fp16"),
             (lambda: tiny_cfg("train.cuda_graphs=true", "deepspeed.enabled=true"), "deepspeed")]
    if CUDA:
        cases.append((lambda: resolve(tiny_cfg("train.cuda_graphs=true", device="cuda"), torch.device("cuda"), 2),
                      "one process"))
    for make, what in cases:
        with pytest.raises(ConfigError, match="'train.cuda_graphs'") as e:
            make()
        assert what in str(e.value) and "\n" not in str(e.value)


def _layout_crops(seed, size, device):
    g = torch.Generator().manual_seed(seed)
    crops = [torch.randn(2, 3, size, size, generator=g) for _ in range(2)]
    crops += [torch.randn(2, 3, size // 2, size // 2, generator=g) for _ in range(2)]
    return [c.to(device) for c in crops]


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("extra", [(), ("loss.targets=sinkhorn_knopp", "loss.koleo_weight=0.1"),
                                   ("model.packed_multicrop=true", "model.drop_path_rate=0.1")])
def test_graphed_step_equals_eager_across_layouts(extra):
    """GraphedStep: two eager warm-up steps per layout, then one graph per layout replayed; two crop
    layouts interleaved (as data.crop_sets makes them) give the eager run's losses and weights; the
    returned outputs are copies (an earlier step's loss survives later replays); the DINOv2 targets
    (Sinkhorn-Knopp) and KoLeo too. With drop path the random draws differ from eager, so only
    finiteness and progress are checked there."""
    from fastdino.cuda_graph import GraphedStep

    cfg = _cuda_cfg(*extra)
    torch.manual_seed(0)
    graphed, eager = make_run(cfg, "cuda"), make_run(cfg, "cuda")
    fn = GraphedStep(train_step)
    outs, refs = [], []
    for it in range(8):
        crops = _layout_crops(it, 32 if it % 2 == 0 else 48, "cuda")
        outs.append(step(graphed, crops, it, fn))
        refs.append(step(eager, crops, it))
    assert len(fn.graphs) == 2 and all(v == 2 for v in fn.eager_steps.values())
    losses = torch.stack([o["loss"] for o in outs])
    assert torch.isfinite(losses).all() and len(set(losses.tolist())) == len(outs)
    assert graphed.state.counters.tolist()[STEP] == 8
    if "model.drop_path_rate=0.1" not in extra:
        torch.testing.assert_close(losses, torch.stack([r["loss"] for r in refs]), rtol=1e-5, atol=1e-5)
        a, b = snapshot(eager), snapshot(graphed)
        for which in ("student", "teacher"):
            for k in a[which]:
                torch.testing.assert_close(b[which][k], a[which][k], rtol=0, atol=WEIGHT_TOL, msg=f"{which}.{k}")
