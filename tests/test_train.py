"""The training loop end to end on a tiny model: metrics and checkpoints, 1-process vs 2-process DDP,
kill-and-resume (bit-identical on CPU), and bad input (one-line errors, corrupt images, NaN loss)."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastdino.train import main, parse_args, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "fastdino", "train.py")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from fastdino.data import generate_demo_dataset

    root = str(tmp_path_factory.mktemp("data") / "demo")
    generate_demo_dataset(root, num_images=48, num_classes=3, image_size=40, seed=0)
    return root


def tiny(data_dir, out, *extra):
    """A 4-block ViT-tiny/16 run small enough for tests: 32 px globals, 2 locals of 16 px, K = 128, the
    recipe's lr (5e-4) and teacher temperature (0.04) rather than the demo's sharper, faster settings."""
    return ["--config", os.path.join(ROOT, "configs", "demo.json"), "--model.depth=4", "--optim.lr=0.0005",
            "--loss.teacher_temp=0.04", "--loss.warmup_teacher_temp=0.04",
            f"--data.path={data_dir}", "--data.generate_demo=false", "--data.global_crop_size=32",
            "--data.local_crop_size=16", "--data.local_crops_number=2", "--data.num_workers=0",
            "--model.out_dim=128", "--model.drop_path_rate=0.1", "--optim.batch_size_per_gpu=8",
            "--optim.epochs=3", "--optim.warmup_epochs=1", "--loss.impl=reference",
            f"--train.output_dir={out}", "--train.progress=false", "--train.log_every=2", *extra]


def run_in_process(argv):
    cfg, args = parse_args(argv)
    return train(cfg, args)


def load(out):
    return torch.load(os.path.join(out, "checkpoint.pth"), map_location="cpu", weights_only=False)


def assert_states_equal(a, b, exact=True, atol=0.0):
    for name in ("student", "teacher"):
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            if exact:
                assert torch.equal(a[name][k], b[name][k]), f"{name}.{k} differs"
            else:
                torch.testing.assert_close(a[name][k], b[name][k], rtol=0, atol=atol, msg=f"{name}.{k}")
    if exact:  # the targets' state: the center (none under Sinkhorn-Knopp), iBOT's center
        for entry in ("dino_loss", "ibot_patch_loss"):
            assert a.get(entry, {}).keys() == b.get(entry, {}).keys()
            assert all(torch.equal(a[entry][k], b[entry][k]) for k in a.get(entry, {}))


def test_demo_steps_write_metrics_and_checkpoint(data_dir, tmp_path):
    out = str(tmp_path / "run")
    summary = run_in_process(tiny(data_dir, out, "--train.max_steps=4"))
    assert summary["steps"] == 4
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in lines] == [0, 1, 2, 3]  # one line per step, written on log steps
    for key in ("loss", "lr", "wd", "momentum", "teacher_temp"):
        assert all(key in r for r in lines)
    assert {"teacher_entropy", "kl", "images_per_s"} <= lines[-1].keys()
    # loss starts near the uniform level: ln K scaled by the pair count's cross-entropy
    assert 0.5 * torch.log(torch.tensor(128.0)) < lines[0]["loss"] < 3 * torch.log(torch.tensor(128.0))
    ckpt = load(out)
    assert {"student", "teacher", "optimizer", "dino_loss", "epoch", "step", "rng", "config"} <= ckpt.keys()
    assert ckpt["step"] == 4 and ckpt["config"]["model"]["out_dim"] == 128
    written = json.load(open(os.path.join(out, "config.json")))
    assert written["data"]["path"] == data_dir
    # what every "auto" became: next to the config and in every checkpoint, the same record
    assert written["_resolved"] == ckpt["resolved"]
    assert ckpt["resolved"]["loss"] == "reference" and ckpt["resolved"]["backend"] == "local"
    # the teacher moved away from its initial copy of the student, and differs from the student
    assert any(not torch.equal(ckpt["student"][k], ckpt["teacher"][k]) for k in ckpt["student"])


@pytest.mark.parametrize("targets", ["centering", "sinkhorn_knopp"])
def test_ddp_two_processes_match_one_process(data_dir, tmp_path, targets):
    """Global batch 8 on one process = 2 ranks x 4: the all-reduced gradients, center statistics and
    (Sinkhorn-Knopp) column maxima and prototype sums make the two runs one computation."""
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    common = ["--train.max_steps=3", "--model.drop_path_rate=0.0", f"--loss.targets={targets}"]  # drop path: per rank
    run_in_process(tiny(data_dir, single, *common))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531", TRAIN,
           *tiny(data_dir, ddp, *common, "--optim.batch_size_per_gpu=4", "--train.device=cpu")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load(single), load(ddp)
    assert a["step"] == b["step"] == 3
    assert_states_equal(a, b, exact=False, atol=2e-5)
    if targets == "centering":
        torch.testing.assert_close(a["dino_loss"]["center"], b["dino_loss"]["center"], rtol=0, atol=1e-5)
    else:
        assert a["dino_loss"] == b["dino_loss"] == {}  # Sinkhorn-Knopp keeps no state


def test_ddp_stop_and_resume_is_bit_identical(data_dir, tmp_path):
    """2-process DDP with drop path: a run stopped at step 3 and resumed to step 6 ends bit for bit
    where the uninterrupted run does (each rank's RNG state is saved and restored)."""
    full, stopped = str(tmp_path / "full"), str(tmp_path / "stopped")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)

    def launch(out, port, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", TRAIN,
               *tiny(data_dir, out, "--optim.batch_size_per_gpu=4", "--train.device=cpu", "--model.drop_path_rate=0.3",
                     "--train.checkpoint_every=3", *extra)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch(full, 29532, "--train.max_steps=6")
    launch(stopped, 29533, "--train.max_steps=3")
    assert load(stopped)["step"] == 3 and len(load(stopped)["rng_per_rank"]) == 2
    launch(stopped, 29534, "--train.max_steps=6", "--resume")
    a, b = load(full), load(stopped)
    assert a["step"] == b["step"] == 6
    assert_states_equal(a, b, exact=True)


def test_kill_and_resume_is_bit_identical(data_dir, tmp_path):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    common = ["--train.max_steps=14", "--train.checkpoint_every=2", "--train.log_every=1"]
    run_in_process(tiny(data_dir, full, *common))

    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, TRAIN, *tiny(data_dir, killed, *common)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = os.path.join(killed, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 7:  # mid-way, past a checkpoint
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run was not killed mid-way"
    step_at_kill = load(killed)["step"]
    assert 2 <= step_at_kill < 14
    run_in_process(tiny(data_dir, killed, *common, "--resume"))
    a, b = load(full), load(killed)
    assert a["step"] == b["step"] == 14
    assert_states_equal(a, b, exact=True)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def _one_line_error(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_input_gives_one_line_errors(data_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    err = _one_line_error(tiny(data_dir, out, "--optim.lrr=1"), capsys)
    assert "optim.lrr" in err
    missing = str(tmp_path / "no-such-folder")
    err = _one_line_error(tiny(missing, out), capsys)
    assert "no-such-folder" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _one_line_error(tiny(str(empty), out), capsys)
    assert str(empty) in err
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    err = _one_line_error(tiny(data_dir, str(blocker / "out")), capsys)
    assert "output folder" in err and "a-file" in err
    err = _one_line_error(tiny(data_dir, out, "--resume", str(tmp_path / "nope.pth")), capsys)
    assert "nope.pth" in err


def test_corrupt_image_is_skipped_and_counted(tmp_path, caplog):
    """In training and in the online k-NN of the teacher: skipped, named once each, the run ends normally."""
    from fastdino.data import generate_demo_dataset

    root = str(tmp_path / "data")
    generate_demo_dataset(root, num_images=15, num_classes=3, image_size=40, seed=1)
    with open(os.path.join(root, sorted(os.listdir(root))[0], "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
    out = str(tmp_path / "run")
    with caplog.at_level("WARNING", logger="fastdino"):
        summary = run_in_process(tiny(root, out, "--optim.epochs=1", "--optim.warmup_epochs=0",
                                      "--train.knn_every=1", "--train.knn_holdout_per_class=10"))
    assert summary["steps"] == 2 and summary["corrupt_images"] == 1
    records = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert records[-2]["corrupt_images"] == 1 and "knn_top1" in records[-1]
    named = [m for m in caplog.messages if "broken.jpg" in m]
    assert named == [m for m in named if "skipped unreadable image" in m] and 1 <= len(named) <= 2, named
    assert any(m.startswith("online k-NN:") for m in named)  # the holdout met it too, and said so


def test_unexpected_error_with_loader_workers_exits(data_dir, tmp_path):
    """An exception nobody expected, raised in the step while persistent DataLoader workers run (they
    ignore SIGTERM), ends the process with its traceback instead of hanging in the exit's join."""
    out = str(tmp_path / "run")
    code = ("import sys, fastdino.models.multicrop as m\n"
            "def boom(self, *a, **k): raise RuntimeError('boom in the step')\n"
            "m.MultiCropWrapper.forward = boom\n"
            "from fastdino.train import main\n"
            f"sys.exit(main({tiny(data_dir, out, '--data.num_workers=2')!r}))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "RuntimeError: boom in the step" in proc.stderr, proc.stderr[-3000:]


def test_nonfinite_loss_skips_updates_and_stops_with_step(data_dir, tmp_path, monkeypatch, capsys):
    """A NaN loss at step 2: optimizer, teacher and center are untouched by that step, and the run
    stops with the step number at the next log step."""
    import fastdino.train as train_mod
    from fastdino.losses import DINOTerm

    out = str(tmp_path / "run")
    calls = {"n": 0}
    real_forward = DINOTerm.forward
    snapshots = {}

    def forward(self, student, targets):
        calls["n"] += 1
        if calls["n"] == 3:  # step 2: the student's logits go bad
            student = {"cls": student["cls"] * float("nan")}
        return real_forward(self, student, targets)

    real_step = train_mod.train_step

    def snapshot(s, when):
        snapshots[f"teacher_{when}"] = {k: v.clone() for k, v in s.backend.teacher_module.state_dict().items()}
        snapshots[f"student_{when}"] = {k: v.clone() for k, v in s.backend.student_module.state_dict().items()}
        snapshots[f"center_{when}"] = s.targets.center.clone()

    def step(s, crops, *args, **kw):
        if calls["n"] == 2:
            snapshot(s, "before")
        result = real_step(s, crops, *args, **kw)
        if calls["n"] == 3:
            snapshot(s, "after")
        return result

    monkeypatch.setattr(DINOTerm, "forward", forward)
    monkeypatch.setattr(train_mod, "train_step", step)
    err = _one_line_error(tiny(data_dir, out, "--train.log_every=4", "--train.max_steps=8",
                               "--train.checkpoint_every=2"), capsys)
    assert "non-finite loss at step 2" in err
    for which in ("teacher", "student"):
        for k, v in snapshots[f"{which}_before"].items():
            assert torch.equal(v, snapshots[f"{which}_after"][k]), f"{which} {k} changed on a NaN step"
    assert torch.equal(snapshots["center_before"], snapshots["center_after"])
    assert load(out)["step"] == 2  # the last checkpoint before the bad step is intact


@pytest.mark.parametrize("fast", [
    ["--loss.impl=fused", "--optim.ema_impl=triton", "--optim.clip_impl=triton", "--model.attn=sdpa",
     "--model.packed_multicrop=true"],
    ["--loss.impl=fused", "--model.fused_head=true", "--optim.ema_impl=foreach", "--optim.clip_impl=foreach"],
    ["--loss.impl=fused", "--loss.targets=sinkhorn_knopp", "--loss.koleo_weight=0.1"],
], ids=["fused-loss+triton+packed", "fused-head", "sinkhorn-knopp+koleo"])
def test_fast_paths_follow_reference_trajectory(data_dir, tmp_path, fast):
    """9 steps of the tiny model with fast paths on and off (Triton under the interpreter on
    CPU): same loss trace and same final teacher, including the frozen-last-layer epoch. The recipe
    keys of the fast run (targets, KoLeo) apply to the reference run too."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("fused kernels need CUDA or TRITON_INTERPRET=1")
    recipe = [a for a in fast if a.split("=")[0] in ("--loss.targets", "--loss.koleo_weight")]
    common = ["--train.max_steps=9", "--train.log_every=3", "--model.drop_path_rate=0.0",
              "--optim.freeze_last_layer=1", "--train.precision=fp32", *recipe]
    ref, fst = str(tmp_path / "ref"), str(tmp_path / "fast")
    run_in_process(tiny(data_dir, ref, *common, "--train.reference=true"))
    run_in_process(tiny(data_dir, fst, *common, *fast))
    assert load(ref)["resolved"]["loss"] == "reference" and load(fst)["resolved"]["loss"] == "fused"
    trace = lambda out: [json.loads(x)["loss"] for x in open(os.path.join(out, "metrics.jsonl"))]
    ra, fa = trace(ref), trace(fst)
    assert len(ra) == len(fa) == 9  # 6 steps with the last layer frozen, 3 without
    torch.testing.assert_close(torch.tensor(fa), torch.tensor(ra), rtol=1e-4, atol=1e-5)
    assert_states_equal(load(ref), load(fst), exact=False, atol=5e-5)
    if recipe:  # the extra term is logged on its own
        last = [json.loads(x) for x in open(os.path.join(fst, "metrics.jsonl"))][-1]
        assert last["koleo"] > 0 and last["dino"] < last["loss"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps(data_dir, tmp_path, precision):
    """bf16 autocast, and fp16 autocast with a grad scaler (its state saved in the checkpoint):
    finite losses and a teacher that moved."""
    out = str(tmp_path / precision)
    summary = run_in_process(tiny(data_dir, out, "--train.max_steps=3", f"--train.precision={precision}",
                                  "--train.log_every=1"))
    losses = [json.loads(x)["loss"] for x in open(os.path.join(out, "metrics.jsonl"))]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    ckpt = load(out)
    assert (ckpt["scaler"] is not None) == (precision == "fp16")
    assert summary["steps"] == 3


# ------------------------------------------------------------------------------------------------
# safe to leave running: signals, resume, data path, mismatched checkpoints
# ------------------------------------------------------------------------------------------------
def _start(argv, tmp_path, env_extra=None, **kw):
    """A training subprocess; the same thread count as this process unless env_extra says otherwise
    (runs compared bit for bit must reduce in the same order)."""
    env = dict(os.environ, PYTHONPATH=ROOT, **(env_extra or {}))
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for_steps(proc, metrics, n, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run did not reach {n} logged steps (rc {proc.poll()}): {proc.stderr.read()[-2000:]}")


def _steps_logged(out):
    return [json.loads(x)["step"] for x in open(os.path.join(out, "metrics.jsonl")) if "loss" in json.loads(x)]


def test_sigterm_checkpoints_and_resume_matches_uninterrupted(data_dir, tmp_path):
    """SIGTERM to the whole process group (as SLURM does; a DataLoader worker included): the run
    stops at a step boundary with a checkpoint, one line and exit 143; --resume then ends bit for bit
    where the uninterrupted run does, and metrics.jsonl holds every step once."""
    full, stopped = str(tmp_path / "full"), str(tmp_path / "stopped")
    common = ["--train.max_steps=14", "--train.log_every=1", "--data.num_workers=1"]
    run_in_process(tiny(data_dir, full, *common))
    proc = _start([sys.executable, TRAIN, *tiny(data_dir, stopped, *common)], tmp_path, start_new_session=True)
    _wait_for_steps(proc, os.path.join(stopped, "metrics.jsonl"), 5)
    os.killpg(proc.pid, signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, err[-2000:]
    last = err.strip().splitlines()[-1]
    step = load(stopped)["step"]
    assert 5 <= step < 14
    assert last == f"fastdino: interrupted by SIGTERM at step {step}: checkpoint written to " \
                   f"{os.path.join(stopped, 'checkpoint.pth')}; resume with --resume", last
    assert "Traceback" not in err
    run_in_process(tiny(data_dir, stopped, *common, "--resume"))
    assert_states_equal(load(full), load(stopped), exact=True)
    assert _steps_logged(stopped) == list(range(14))  # each step once, though steps were redone


def test_ddp_sigterm_checkpoints_and_resume_matches_uninterrupted(data_dir, tmp_path):
    """2-process DDP: torchrun passes SIGTERM on; both ranks stop at the same step (one gloo
    all-reduce per step), rank 0 checkpoints, and the resumed run equals the uninterrupted one."""
    full, stopped = str(tmp_path / "full"), str(tmp_path / "stopped")
    common = ["--train.max_steps=10", "--train.log_every=1", "--optim.batch_size_per_gpu=4", "--train.device=cpu"]

    def cmd(out, port, *extra):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", TRAIN,
                *tiny(data_dir, out, *common, *extra)]

    one_thread = {"OMP_NUM_THREADS": "1"}
    proc = _start(cmd(full, 29541), tmp_path, one_thread)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    proc = _start(cmd(stopped, 29542), tmp_path, one_thread)
    _wait_for_steps(proc, os.path.join(stopped, "metrics.jsonl"), 4)
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert "interrupted by SIGTERM at step" in err, err[-3000:]
    assert 4 <= load(stopped)["step"] < 10
    proc = _start(cmd(stopped, 29543, "--resume"), tmp_path, one_thread)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    assert_states_equal(load(full), load(stopped), exact=True)
    assert _steps_logged(stopped) == list(range(10))


def test_second_signal_aborts_and_the_last_checkpoint_stays_loadable(data_dir, tmp_path):
    from fastdino.checkpoint import load_checkpoint

    out = str(tmp_path / "run")
    proc = _start([sys.executable, TRAIN, *tiny(data_dir, out, "--train.max_steps=40", "--train.log_every=1",
                                               "--train.checkpoint_every=1")], tmp_path)
    _wait_for_steps(proc, os.path.join(out, "metrics.jsonl"), 3)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGINT, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("fastdino: ")  # one line: aborted, or stopped at the boundary
    ckpt = load_checkpoint(os.path.join(out, "checkpoint.pth"))  # complete: it loads
    assert ckpt["step"] >= 3
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]  # no half-written file left behind


def test_interrupt_inside_a_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    """torch.save's writer turns an interrupt into its own RuntimeError ("unexpected pos"): the
    interrupt itself comes out, the temporary file is gone and the previous checkpoint loads."""
    from fastdino.checkpoint import atomic_save, load_checkpoint
    from fastdino.preemption import Abort

    path = str(tmp_path / "checkpoint.pth")
    atomic_save({"step": 1}, path)

    def interrupted_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        try:
            raise Abort(signal.SIGTERM)
        except Abort:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(Abort):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path) == {"step": 1} and os.listdir(tmp_path) == ["checkpoint.pth"]


def test_demo_data_is_generated_only_where_asked(tmp_path, capsys):
    """configs/demo.json generates its own data/demo; another missing data.path is an error, unless
    data.generate_demo is given with it on the command line."""
    missing = str(tmp_path / "some" / "missing")
    out = str(tmp_path / "run")
    err = _one_line_error(["--config", os.path.join(ROOT, "configs", "demo.json"), f"--data.path={missing}",
                           f"--train.output_dir={out}"], capsys)
    assert missing in err and "--data.generate_demo=true" in err and not os.path.exists(missing)
    run_in_process(tiny(missing, out, "--data.generate_demo=true", "--data.demo_num_images=16",
                        "--data.demo_image_size=32", "--train.max_steps=1"))
    assert len([f for _, _, fs in os.walk(missing) for f in fs]) == 16


def test_mismatched_checkpoint_names_the_key_and_shapes(data_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    run_in_process(tiny(data_dir, out, "--train.max_steps=1"))
    err = _one_line_error(tiny(data_dir, out, "--model.out_dim=64", "--resume"), capsys)
    assert err == (f"fastdino: error: checkpoint '{os.path.join(out, 'checkpoint.pth')}' does not match this config: "
                   "student 'head.last_layer.weight_v' is (128, 256) in the checkpoint, (64, 256) in this model"), err
    err = _one_line_error(tiny(data_dir, out, "--model.depth=3", "--resume"), capsys)
    assert "student 'backbone.blocks.3.norm1.weight' (192,) is in the checkpoint but not in this model" in err, err


def test_resume_with_another_epoch_length_is_refused(data_dir, tmp_path):
    """A checkpoint saved mid-run resumed with another data.epoch_length: one CheckpointError line naming
    the key, before any step (the schedules and batches would be out of step); the same length resumes."""
    from fastdino.checkpoint import CheckpointError

    out = str(tmp_path / "run")
    run_in_process(tiny(data_dir, out, "--train.max_steps=3", "--train.checkpoint_every=3", "--data.epoch_length=2"))
    before = load(out)
    assert (before["epoch"], before["step_in_epoch"], before["step"]) == (1, 1, 3)
    with pytest.raises(CheckpointError, match=r"data.epoch_length=5 now, 2 in the checkpoint") as e:
        run_in_process(tiny(data_dir, out, "--train.max_steps=4", "--data.epoch_length=5", "--resume"))
    assert "\n" not in str(e.value)
    assert load(out)["step"] == 3  # nothing written
    assert run_in_process(tiny(data_dir, out, "--train.max_steps=4", "--data.epoch_length=2", "--resume"))["steps"] == 4


def test_bare_resume_without_checkpoint_starts_fresh(data_dir, tmp_path, caplog):
    out = str(tmp_path / "run")
    with caplog.at_level("WARNING", logger="fastdino"):
        summary = run_in_process(tiny(data_dir, out, "--train.max_steps=1", "--resume"))
    assert summary["steps"] == 1
    assert any(m.startswith("--resume: nothing to resume") for m in caplog.messages), caplog.messages


def test_init_from_starts_both_models_as_a_checkpoints_teacher(data_dir, tmp_path, capsys):
    """train.init_from (DINOv3's student.resume_from_teacher_chkpt, how its high-resolution adaptation starts):
    student and teacher begin as the checkpoint's EMA teacher, with a fresh optimizer and step 0; --resume
    of that run continues it (equal to running it uninterrupted: the init is not applied again); a foreign
    file, another architecture and a missing file are one line naming the key."""
    from fastdino.distributed import DistContext
    from fastdino.train import build_run, resumes

    first = str(tmp_path / "first")
    run_in_process(tiny(data_dir, first, "--train.max_steps=3"))
    source = load(first)["teacher"]
    assert any(not torch.equal(source[k], load(first)["student"][k]) for k in source)  # they differ after training
    init = ["--train.init_from", os.path.join(first, "checkpoint.pth")]
    cfg, args = parse_args(tiny(data_dir, str(tmp_path / "probe"), *init))
    run = build_run(cfg, DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), 6,
                    init_from=cfg.train.init_from)
    for module in (run.backend.student_module, run.backend.teacher_module):
        state = module.state_dict()
        assert state.keys() == source.keys() and all(torch.equal(state[k], source[k]) for k in source)
    moments = [v for st in run.backend.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    assert all(torch.count_nonzero(v) == 0 for v in moments)  # zero moments and steps: the optimizer starts fresh
    second, straight = str(tmp_path / "second"), str(tmp_path / "straight")
    assert run_in_process(tiny(data_dir, second, *init, "--train.max_steps=2"))["steps"] == 2
    assert load(second)["step"] == 2
    cfg, args = parse_args(tiny(data_dir, second, *init, "--resume"))
    assert resumes(args, cfg, run.resolved)
    assert run_in_process(tiny(data_dir, second, *init, "--train.max_steps=4", "--resume"))["steps"] == 4
    run_in_process(tiny(data_dir, straight, *init, "--train.max_steps=4"))
    assert_states_equal(load(second), load(straight))
    bad = tmp_path / "not-a-checkpoint.pth"
    bad.write_text("hello")
    err = _one_line_error(tiny(data_dir, str(tmp_path / "x"), "--train.init_from", str(bad)), capsys)
    assert "'train.init_from'" in err and "not-a-checkpoint.pth" in err, err
    err = _one_line_error(tiny(data_dir, str(tmp_path / "y"), *init, "--model.out_dim=64"), capsys)
    assert "'train.init_from'" in err and "(128, 256) in the checkpoint, (64, 256) in this model" in err, err
    err = _one_line_error(tiny(data_dir, str(tmp_path / "z"), "--train.init_from", str(tmp_path / "none.pth")), capsys)
    assert "'train.init_from': no such file" in err and "none.pth" in err, err


# ------------------------------------------------------------------------------------------------
# DINOv2 pieces through the same step: backbones with registers, Sinkhorn-Knopp targets, KoLeo
# ------------------------------------------------------------------------------------------------
DINOV2_TINY = ["--model.arch=dinov2_vits14", "--model.patch_size=14", "--model.depth=2", "--model.num_register_tokens=4",
               "--data.global_crop_size=28", "--data.local_crop_size=14", "--loss.targets=sinkhorn_knopp",
               "--loss.koleo_weight=0.1", "--train.max_steps=3", "--train.log_every=1"]


def test_dinov2_backbone_with_sinkhorn_knopp_and_koleo_trains(data_dir, tmp_path):
    """One process and 2-process DDP: the losses are finite and logged per term, the mask token (only
    iBOT trains it) stays as initialized, and the checkpoint evaluates as a DINOv2 backbone."""
    from fastdino.eval.common import load_backbone

    out, ddp = str(tmp_path / "run"), str(tmp_path / "ddp")
    run_in_process(tiny(data_dir, out, *DINOV2_TINY))
    records = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)
    last = records[-1]  # each term logged unweighted; the loss is their weighted sum
    assert last["koleo"] != 0 and last["loss"] == pytest.approx(last["dino"] + 0.1 * last["koleo"], rel=1e-5)
    ckpt = load(out)
    assert ckpt["student"]["backbone.register_tokens"].shape == (1, 4, 384)
    assert torch.equal(ckpt["student"]["backbone.mask_token"], torch.zeros(1, 384))
    assert ckpt["dino_loss"] == {} and ckpt["resolved"]["loss"] == "reference"
    model = load_backbone(os.path.join(out, "checkpoint.pth"))
    assert (model.arch, model.num_register_tokens) == ("dinov2_vits14", 4)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29535", TRAIN,
           *tiny(data_dir, ddp, *DINOV2_TINY, "--optim.batch_size_per_gpu=4", "--train.device=cpu")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load(ddp)["step"] == 3


DINOV2_IBOT = ["--model.arch=dinov2_vits14", "--model.patch_size=14", "--model.depth=2", "--model.drop_path_rate=0.0",
               "--model.ibot_out_dim=64", "--data.global_crop_size=42", "--data.local_crop_size=14",
               "--loss.targets=sinkhorn_knopp", "--loss.koleo_weight=0.1", "--loss.ibot_weight=1.0",
               "--data.mask_group_size=4", "--train.log_every=1"]


def test_dinov2_ibot_ddp_equals_one_process_and_resume_is_exact(data_dir, tmp_path):
    """The DINOv2 objective (DINO + KoLeo + iBOT, Sinkhorn-Knopp over the global rows) trains: global
    batch 8 on one process = 2 ranks x 4 (the masks of an image do not depend on the split with
    data.mask_group_size=4; the iBOT targets' sums span the ranks); stopped at step 2 and resumed to
    step 3 it ends bit for bit where the uninterrupted run does; the mask token trains."""
    single, stopped, ddp = (str(tmp_path / n) for n in ("single", "stopped", "ddp"))
    run_in_process(tiny(data_dir, single, *DINOV2_IBOT, "--train.max_steps=3"))
    records = [json.loads(x) for x in open(os.path.join(single, "metrics.jsonl"))]
    last = records[-1]
    assert all(math.isfinite(r["loss"]) for r in records) and last["ibot"] > 0
    assert last["loss"] == pytest.approx(last["dino"] + 0.1 * last["koleo"] + last["ibot"], rel=1e-5)
    a = load(single)
    assert not torch.equal(a["student"]["backbone.mask_token"], torch.zeros(1, 384))
    assert a["student"]["ibot_head.last_layer.weight_v"].shape[0] == 64 and "ibot_patch_loss" in a
    from fastdino.eval.common import load_backbone

    assert load_backbone(os.path.join(single, "checkpoint.pth")).arch == "dinov2_vits14"  # heads dropped

    run_in_process(tiny(data_dir, stopped, *DINOV2_IBOT, "--train.max_steps=2", "--train.checkpoint_every=2"))
    run_in_process(tiny(data_dir, stopped, *DINOV2_IBOT, "--train.max_steps=3", "--resume"))
    assert_states_equal(a, load(stopped), exact=True)

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29536", TRAIN,
           *tiny(data_dir, ddp, *DINOV2_IBOT, "--train.max_steps=3", "--optim.batch_size_per_gpu=4",
                 "--train.device=cpu")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    b = load(ddp)
    assert a["step"] == b["step"] == 3
    assert_states_equal(a, b, exact=False, atol=2e-5)


def _tensorboard_scalars(logdir):
    """{(tag, step): value} as TensorBoard shows them (its purge rules applied across event files)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={SCALARS: 0})  # 0: keep every event
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def test_tensorboard_scalars_equal_metrics_jsonl_across_a_resume(tmp_path):
    """train.tensorboard=true: every numeric field of every metrics.jsonl record (online k-NN included)
    is a TensorBoard scalar at the record's step, with its value. A resume from the epoch-0 checkpoint
    (step 2) with another lr logs step 2 again: metrics.jsonl keeps the new record, and so does
    TensorBoard (a second event file; the first run's steps >= 2 are purged)."""
    from fastdino.data import generate_demo_dataset

    data = str(tmp_path / "data")
    generate_demo_dataset(data, num_images=16, num_classes=3, image_size=40, seed=0)  # 2 steps per epoch
    out, logdir = str(tmp_path / "run"), str(tmp_path / "run" / "tensorboard")
    common = ["--train.tensorboard=true", "--train.max_steps=3", "--train.saveckp_freq=1", "--train.knn_every=1",
              "--train.knn_holdout_per_class=4", "--optim.warmup_epochs=2"]
    run_in_process(tiny(data, out, *common))
    first = _tensorboard_scalars(logdir)
    run_in_process(tiny(data, out, *common, "--optim.lr=0.002", "--resume", os.path.join(out, "checkpoint0000.pth")))
    assert len([f for f in os.listdir(logdir) if f.startswith("events.out.tfevents")]) == 2
    expected = {}
    for record in map(json.loads, open(os.path.join(out, "metrics.jsonl"))):
        for tag, value in record.items():
            if tag != "step":
                assert expected.get((tag, record["step"]), value) == value, (tag, record["step"])  # once
                expected[(tag, record["step"])] = value
    got = _tensorboard_scalars(logdir)
    assert got.keys() == expected.keys()
    assert {"loss", "lr", "wd", "momentum", "teacher_temp", "teacher_entropy", "kl", "images_per_s",
            "knn_top1", "epoch"} <= {tag for tag, _ in got}
    assert sorted(s for t, s in got if t == "loss") == [0, 1, 2] and ("knn_top1", 1) in got
    for key, value in expected.items():  # TensorBoard stores float32
        assert got[key] == pytest.approx(value, rel=2 ** -23, abs=1e-38), key
    assert got[("lr", 2)] == pytest.approx(4 * first[("lr", 2)], rel=1e-6)  # the resumed run's value (lr x 4)
    assert got[("lr", 1)] == first[("lr", 1)] and ("knn_top1", 1) in first


def test_tensorboard_missing_stops_at_startup(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    out = tmp_path / "run"
    err = _one_line_error(tiny(data_dir, str(out), "--train.tensorboard=true"), capsys)
    assert "train.tensorboard" in err and "pip install tensorboard" in err
    assert not (out / "config.json").exists() and not (out / "metrics.jsonl").exists()  # before any work
