"""benchmarks/throughput.py and fastdino/telemetry.py: the CPU smoke run of the whole table (every row
runs or says why not), the analytic FLOP count against torch's FLOP counter, the device peak table,
the row definitions, the median-window summary, and the NVML sampler against a fake NVML."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "throughput.py")


def _load(script=SCRIPT):
    spec = importlib.util.spec_from_file_location("fastdino_bench_" + os.path.basename(script)[:-3], script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tp = _load()


# ------------------------------------------------------------------------------------------------
# the whole benchmark on CPU (CI): demo config, every row, real and synthetic data, official stand-in
# ------------------------------------------------------------------------------------------------
def _standin_official_repo(path) -> str:
    """A folder with the official DINO layout and API (main_dino.py DINOLoss, utils.py,
    vision_transformer.py) built on fastdino's modules; main_dino.py imports torchvision,
    which is not installed, so the benchmark must not import that file."""
    os.makedirs(path)
    files = {
        "main_dino.py": '''
            import torchvision  # not importable here: the benchmark must only compile DINOLoss

            class DINOLoss(__import__("fastdino").DINOLoss):
                """fastdino's drop-in: the official interface, numbers and center all-reduce (it needs the
                process group the benchmark starts, as the official code does)."""
        ''',
        "utils.py": '''
            from fastdino.kernels.clip_grad import clip_grad_per_tensor_ref
            from fastdino.models import MultiCropWrapper
            from fastdino.optim import param_groups as get_params_groups
            from fastdino.schedules import cosine_scheduler

            def clip_gradients(model, clip):
                return clip_grad_per_tensor_ref([p.grad for p in model.parameters() if p.grad is not None], clip)

            def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
                if epoch >= freeze_last_layer:
                    return
                for n, p in model.named_parameters():
                    if "last_layer" in n:
                        p.grad = None
        ''',
        "vision_transformer.py": '''
            from fastdino.models import DINOHead, vit_base, vit_small, vit_tiny
        ''',
    }
    for name, text in files.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(textwrap.dedent(text))
    return path


def test_cpu_demo_every_row_runs(tmp_path):
    out = tmp_path / "result.json"
    repo = _standin_official_repo(str(tmp_path / "dino"))
    cmd = [sys.executable, SCRIPT, "--config", os.path.join(ROOT, "configs", "demo.json"), "--steps", "2",
           "--warmup", "1", "--repeats", "2", "--batch-size", "4", "--data", "both", "--json", str(out),
           "--baseline-repo", repo, "--model.depth", "12", "--train.output_dir", str(tmp_path / "runs"),
           "--data.path", str(tmp_path / "demo"), "--data.num_workers", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 shared cores: one thread is faster than two
    env.pop("TRITON_INTERPRET", None)  # what a user runs: no interpreter, so CPU resolves the fast impls to torch
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())

    for key in ("config", "device", "device_name", "torch", "arch", "crops", "batch_size", "precision", "steps",
                "warmup", "repeats", "flops_per_image", "peak_tflops", "peak_source", "rows"):
        assert key in result, key
    assert result["batch_size"] == 4 and result["steps"] == 2 and result["repeats"] == 2
    on_gpu = torch.cuda.is_available()  # the lead runs the same test natively on a GPU
    if not on_gpu:
        assert result["peak_tflops"] is None  # no CPU peak without --peak-tflops
    assert result["flops_per_image"]["model_gflop"] > 0

    rows = {(r["name"], r["data"]): r for r in result["rows"]}
    expected = [(n, "synthetic") for n in tp.ROW_NAMES if n != "+data"]  # --data both: +data on real data only
    expected += [(n, "real") for n in ("reference", "+data", "fastdino")]
    expected.append(("official", "synthetic"))
    assert sorted(rows) == sorted(expected)
    for key, r in rows.items():
        assert r["status"] in ("ok", "n/a"), (key, r["status"], r["reason"])
        if r["status"] == "n/a":
            assert r["reason"], key  # every row that did not run says why
            continue
        assert r["images_per_s"] > 0 and r["step_ms"] > 0, key
        assert len(r["windows_images_per_s"]) == 2, key
        p = r["phases_ms"]
        assert set(p) == set(tp.PHASES) | {"other"}, key
        assert all(v >= 0 for v in p.values()), key
        for phase in ("teacher_forward", "student_forward", "loss", "backward", "optimizer", "teacher_update"):
            assert p[phase] > 0, (key, phase)  # every phase mark was reached and timed
        assert sum(p.values()) == pytest.approx(r["step_ms"], rel=1e-6), key
        assert r["speedup"] is not None and r["tflops"] > 0, key
        if on_gpu:  # memory always; MFU where the device's peak is known; NVML where it opens
            assert r["peak_mem_gib"] > 0, key
            assert (r["mfu"] is None) == (result["peak_tflops"] is None), key
            assert r["gpu"]["available"] or r["gpu"]["reason"], key
        else:
            assert r["mfu"] is None and r["peak_mem_gib"] is None and r["gpu"]["available"] is False, key
    for mode in ("synthetic", "real"):
        for name in ("reference", "fastdino"):
            assert rows[(name, mode)]["status"] == "ok", (name, mode)
        assert rows[("reference", mode)]["speedup"] == pytest.approx(1.0)
    assert rows[("reference", "synthetic")]["impls"]["attn"] == "math"
    assert rows[("reference", "real")]["impls"]["data"] == "torch"
    assert rows[("+attention", "synthetic")]["impls"]["attn"] != "math"
    assert rows[("+packed", "synthetic")]["impls"]["packed"] is True
    assert rows[("official", "synthetic")]["status"] == "ok", rows[("official", "synthetic")]["reason"]

    # the markdown table: one line per row, every row named, reasons listed
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(expected)
    assert "Not timed:" in proc.stdout and "images/s" in table[0]


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    for args, culprit in ((["--rows", "reference,bogus"], "bogus"), (["--steps", "0"], "--steps"),
                          (["--baseline-repo", str(tmp_path / "missing")], "--baseline-repo"),
                          (["--set", "model.attn=nope"], "model.attn"), (["--batch-size", "0"], "--batch-size"),
                          (["--time-budget", "-1"], "--time-budget")):
        assert tp.main(["--config", os.path.join(ROOT, "configs", "demo.json"), *args]) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and culprit in lines[0], (args, lines)


def test_time_budget_skips_the_rows_not_started(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = tp.main(["--config", os.path.join(ROOT, "configs", "demo.json"), "--rows", "reference,fastdino",
                    "--data", "synthetic", "--steps", "1", "--warmup", "0", "--repeats", "1", "--batch-size", "2",
                    "--time-budget", "0.001", "--json", str(out), "--train.output_dir", str(tmp_path / "runs")])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["complete"] is True
    status = {r["name"]: r for r in result["rows"]}
    assert status["reference"]["status"] == "ok"
    assert status["fastdino"]["status"] == "n/a" and "--time-budget" in status["fastdino"]["reason"]
    assert "--time-budget" in capsys.readouterr().out  # listed under "Not timed"


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------
def test_flops_match_torch_flop_counter():
    """The analytic forward count equals torch's FlopCounterMode on fastdino's student and teacher
    (math attention, so QK^T and AV run as counted matmuls), for odd crop sizes and crop counts."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastdino.config import load_config
    from fastdino.resolve import resolve
    from fastdino.train import build_models

    for arch, patch, g, l, n_local, k in (("vit_tiny", 16, 48, 32, 3, 300), ("vit_small", 8, 24, 16, 1, 77)):
        cfg = load_config(None, [f"model.arch={arch}", f"model.patch_size={patch}", f"model.out_dim={k}",
                                 f"data.global_crop_size={g}", f"data.local_crop_size={l}",
                                 f"data.local_crops_number={n_local}", "model.attn=math", "model.drop_path_rate=0.0"])
        student, teacher = build_models(cfg, resolve(cfg, torch.device("cpu")), torch.device("cpu"))
        B = 2
        crops = [torch.randn(B, 3, g, g) for _ in range(2)] + [torch.randn(B, 3, l, l) for _ in range(n_local)]
        with torch.no_grad():
            with FlopCounterMode(display=False) as fc:
                student(crops)
            student_flops = fc.get_total_flops()
            with FlopCounterMode(display=False) as fc:
                teacher(crops[:2])
            teacher_flops = fc.get_total_flops()
        f = tp.flops_per_image(cfg)
        assert f["student_forward_gflop"] * 1e9 * B == pytest.approx(student_flops, rel=1e-9)
        assert f["teacher_forward_gflop"] * 1e9 * B == pytest.approx(teacher_flops, rel=1e-9)
        assert f["model_gflop"] == pytest.approx(3 * f["student_forward_gflop"] + f["teacher_forward_gflop"])
        assert f["hardware_gflop"] == f["model_gflop"]  # no activation checkpointing


def test_flops_of_the_recipes():
    """ViT-S/16 (2x224 + 10x96) and ViT-B/8: the per-image counts behind the issue's MFU targets
    (2,800 im/s ~ 35% and 245 im/s ~ 50% of an H100's 989 TFLOP/s); recomputation counted apart."""
    from fastdino.config import load_config

    s16 = tp.flops_per_image(load_config(os.path.join(ROOT, "configs", "vits16.json"), ["data.local_crops_number=10"]))
    assert 120 < s16["model_gflop"] < 128
    assert 0.33 < 2800 * s16["model_gflop"] / 1e3 / 989.4 < 0.37
    b8 = tp.flops_per_image(load_config(os.path.join(ROOT, "configs", "vitb8.json"),
                                        ["model.activation_checkpointing=true"]))
    assert 1950 < b8["model_gflop"] < 2080
    assert 0.48 < 245 * b8["model_gflop"] / 1e3 / 989.4 < 0.52
    backbone = b8["hardware_gflop"] - b8["model_gflop"]  # activation checkpointing: one more student forward
    assert 0.9 * b8["student_forward_gflop"] < backbone < b8["student_forward_gflop"]
    # model.depth scales the blocks' share only: a 4-block ViT-S/16 is about a third of the 12-block one
    s16_4 = tp.flops_per_image(load_config(os.path.join(ROOT, "configs", "vits16.json"),
                                           ["data.local_crops_number=10", "model.depth=4"]))
    assert 0.3 * s16["model_gflop"] < s16_4["model_gflop"] < 0.4 * s16["model_gflop"]
    # DINOv2: the iBOT head on 2 crops x 0.5 x 0.3 x 256 patches (77 tokens) of a 65,536-prototype head,
    # forward and backward in the student, forward in the teacher; 4 registers join every crop's tokens
    v2 = tp.flops_per_image(load_config(os.path.join(ROOT, "configs", "dinov2_vits14.json")))
    no_ibot = tp.flops_per_image(load_config(os.path.join(ROOT, "configs", "dinov2_vits14.json"),
                                             ["loss.ibot_weight=0"]))
    ibot_head = 2 * 0.5 * 0.3 * 256 * tp.head_forward_flops(384, 65536) / 1e9
    assert v2["model_gflop"] - no_ibot["model_gflop"] == pytest.approx(4 * ibot_head, rel=1e-9)
    reg = tp.flops_per_image(load_config(os.path.join(ROOT, "configs", "dinov2_vits14.json"),
                                         ["model.num_register_tokens=4"]))
    assert reg["model_gflop"] > v2["model_gflop"]
    # DINOv3 Gram phase: one more (teacher) forward of 2 crops at 448 px
    gram = tp.flops_per_image(load_config(os.path.join(ROOT, "configs", "dinov3_vitl16_gram.json")))
    assert gram["gram_teacher_forward_gflop"] == pytest.approx(
        2 * tp.vit_forward_flops(1024, 24, 16, 448, extra_tokens=4) / 1e9)


def test_official_row_refuses_a_non_standard_depth(tmp_path):
    from fastdino.config import load_config

    cfg = load_config(os.path.join(ROOT, "configs", "demo.json"))  # model.depth = 4
    row = tp.run_official(_standin_official_repo(str(tmp_path / "dino")), cfg, None, torch.device("cpu"))
    assert row["status"] == "failed" and "model.depth=4" in row["reason"] and "--model.depth=12" in row["reason"]


def test_arch_dims_match_the_models():
    from fastdino.models import ARCHS, DINOHead

    for arch, (dim, heads) in tp.ARCH_DIMS.items():
        vit = ARCHS[arch](patch_size=16)
        assert (vit.embed_dim, len(vit.blocks), vit.num_heads) == (dim, 12, heads), arch
        assert vit.blocks[0].mlp.fc1.out_features == 4 * dim, arch
    head = DINOHead(384, 1000)
    assert head.mlp[0].out_features == tp.HEAD_HIDDEN and head.last_layer.in_features == tp.HEAD_BOTTLENECK


def test_device_peak_table(monkeypatch):
    cuda = torch.device("cuda", 0)
    for name, peak in (("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
                       ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A10G", 70.0),
                       ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        got, source = tp.device_peak_tflops(cuda, None)
        assert got == peak and name in source, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert tp.device_peak_tflops(cuda, None)[0] is None
    assert tp.device_peak_tflops(cuda, 500.0) == (500.0, "--peak-tflops 500")
    assert tp.device_peak_tflops(torch.device("cpu"), None)[0] is None
    with pytest.raises(tp.BenchmarkError, match="--peak-tflops"):
        tp.device_peak_tflops(cuda, 0.0)


# ------------------------------------------------------------------------------------------------
# rows, timing summary
# ------------------------------------------------------------------------------------------------
def test_rows_switch_one_component_each():
    from fastdino.config import load_config

    cfg = load_config(os.path.join(ROOT, "configs", "vits16.json"), ["model.attn=sdpa_flash", "data.backend=torch"])
    assert tp.row_overrides("reference", cfg) == {"train.reference": True}  # the one switch
    assert tp.row_overrides("fastdino", cfg) == {}
    ref = tp.REFERENCE  # what that switch means, key by key: the component rows start from it
    for component, keys in tp.COMPONENTS.items():
        row = tp.row_overrides("+" + component, cfg)
        changed = {k for k in row if row[k] != ref[k]}
        assert changed == set(keys), component
    assert tp.row_overrides("+attention", cfg)["model.attn"] == "sdpa_flash"  # the configured fast choice
    assert tp.row_overrides("+data", cfg)["data.backend"] == "auto"  # config holds the reference value
    with pytest.raises(tp.BenchmarkError, match="bogus"):
        tp.row_overrides("+bogus", cfg)
    plan = tp.plan_rows(list(tp.ROW_NAMES), "both")  # headline rows first, then the components
    assert plan[:4] == [("reference", "synthetic"), ("fastdino", "synthetic"), ("reference", "real"),
                        ("fastdino", "real")]
    n_fast = len(tp.COMPONENTS) - 1  # the component rows on synthetic crops (+data runs on real data only)
    assert ("+data", "synthetic") not in plan and ("+data", "real") in plan and len(plan) == len(set(plan)) == n_fast + 5
    assert tp.plan_rows(["fastdino", "+loss", "reference"], "real") == [("fastdino", "real"), ("reference", "real"),
                                                                       ("+loss", "real")]
    rows = [{"name": n, "data": m} for n, m in plan] + [{"name": "official", "data": "synthetic"}]
    ordered = [(r["name"], r["data"]) for r in sorted(rows, key=tp.display_order)]
    assert ordered[0] == ("reference", "synthetic")
    assert ordered[n_fast + 1:n_fast + 3] == [("fastdino", "synthetic"), ("official", "synthetic")]
    assert ordered[-3:] == [("reference", "real"), ("+data", "real"), ("fastdino", "real")]


def test_same_as_reference_reasons():
    impls = {"loss": "reference", "ema": "foreach", "clip": None, "attn": "sdpa", "packed": True,
             "fused_head": False, "compile": "off", "residual_norm": "torch", "bias_gelu": "torch", "residual_dtype": "fp32",
             "cuda_graphs": False, "data": "torch"}
    from fastdino.config import load_config

    cfg = load_config(None, ["loss.impl=auto"])
    assert "loss=reference" in tp.same_as_reference("+loss", impls, cfg)
    assert tp.same_as_reference("+attention", impls, cfg) is None
    assert tp.same_as_reference("+ema_clip", impls, cfg) is None  # not (both) loop: it runs
    assert "fused_head=False" in tp.same_as_reference("+fused_head", impls, cfg)
    assert "data=torch" in tp.same_as_reference("+data", impls, cfg)
    assert "residual_norm=torch" in tp.same_as_reference("+residual_norm", impls, cfg)  # CPU: nothing fused
    assert "bias_gelu=torch" in tp.same_as_reference("+bias_gelu", impls, cfg)
    assert "residual_dtype=fp32" in tp.same_as_reference("+bf16_residual", impls, cfg)
    assert "cuda_graphs=False" in tp.same_as_reference("+cuda_graphs", impls, cfg)
    # the reference row flags whatever did not resolve to the reference impl
    assert tp.not_reference(impls) == ["ema_clip", "attention", "packed"]


def test_summary_uses_the_median_window():
    windows = [{"seconds": 3.0, "phases": {"data": 0.3, "loss": 0.3}},
               {"seconds": 1.0, "phases": {"data": 0.1, "loss": 0.1}},
               {"seconds": 2.0, "phases": {"data": 0.2, "teacher_forward": 1.0, "loss": 0.4}}]
    s = tp.summarize(windows, batch=8, steps=4)
    assert s["images_per_s"] == pytest.approx(8 * 4 / 2.0)
    assert s["step_ms"] == pytest.approx(500.0)
    assert s["phases_ms"]["data"] == pytest.approx(50.0) and s["phases_ms"]["teacher_forward"] == pytest.approx(250.0)
    assert s["phases_ms"]["student_forward"] == 0.0
    assert s["phases_ms"]["other"] == pytest.approx(500.0 - 50.0 - 250.0 - 100.0)
    assert sorted(s["windows_images_per_s"]) == pytest.approx([32 / 3, 16.0, 32.0])


def test_phase_clock_attributes_time_to_the_phase_that_ends():
    clock = tp.PhaseClock(torch.device("cpu"))
    clock.mark("start")
    time.sleep(0.02)
    clock.mark("data")
    time.sleep(0.06)
    clock.mark("loss")
    time.sleep(0.02)
    clock.mark("data")
    d = clock.durations()
    assert set(d) == {"data", "loss"}
    assert 0.035 <= d["data"] < d["loss"] and d["loss"] >= 0.055


# ------------------------------------------------------------------------------------------------
# telemetry
# ------------------------------------------------------------------------------------------------
class _NotSupported(Exception):
    pass


def _fake_nvml(power_mw=(100_000, 300_000), energy_mj=(5_000_000, 5_090_000), mem=(2 * 2 ** 30, 6 * 2 ** 30)):
    """A pynvml-like module whose readings alternate between two values; clocks unsupported."""
    state = {"power": 0, "mem": 0, "e": 0}

    def pick(key, pair):  # each metric alternates on its own
        state[key] += 1
        return pair[state[key] % 2]

    def energy(h):
        state["e"] += 1
        return energy_mj[0] if state["e"] == 1 else energy_mj[1]

    def clock(h, kind):
        raise _NotSupported("clock")

    return types.SimpleNamespace(
        NVML_CLOCK_SM=1,
        nvmlDeviceGetHandleByUUID=lambda uuid: "h",
        nvmlDeviceGetHandleByIndex=lambda i: "h",
        nvmlDeviceGetName=lambda h: b"Fake GPU",
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000,
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=90),
        nvmlDeviceGetPowerUsage=lambda h: pick("power", power_mw),
        nvmlDeviceGetClockInfo=clock,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=pick("mem", mem)),
        nvmlDeviceGetTotalEnergyConsumption=energy,
    )


def test_gpu_sampler_with_fake_nvml():
    from fastdino.telemetry import GPUSampler

    with GPUSampler(torch.device("cuda", 0), interval_s=0.005, nvml=_fake_nvml()) as gpu:
        time.sleep(0.1)
    s = gpu.summary()
    assert s["available"] and gpu.name == "Fake GPU" and s["power_limit_w"] == 700.0
    assert s["samples"] >= 3
    assert s["gpu_util_pct"] == 90.0
    assert 100.0 < s["power_w"] < 300.0  # mW -> W, mean of both readings
    assert s["mem_used_gib"] == pytest.approx(6.0)  # bytes -> GiB, the max
    assert s["energy_j"] == pytest.approx(90.0)  # mJ -> J, end minus start
    assert s["sm_clock_mhz"] is None  # unsupported query: None, not a crash


def test_gpu_sampler_unavailable_is_a_noop():
    from fastdino.telemetry import GPUSampler

    gpu = GPUSampler(torch.device("cpu"))
    with gpu:
        pass
    s = gpu.summary()
    assert not s["available"] and "not a CUDA device" in s["reason"]
    assert all(s[k] is None for k in ("gpu_util_pct", "power_w", "sm_clock_mhz", "mem_used_gib", "energy_j"))

    def broken_handle(i):
        raise RuntimeError("NVML_ERROR_NOT_FOUND")

    nvml = _fake_nvml()
    nvml.nvmlDeviceGetHandleByUUID = nvml.nvmlDeviceGetHandleByIndex = broken_handle
    gpu = GPUSampler(torch.device("cuda", 0), nvml=nvml)
    assert not gpu.available and "NVML unavailable" in gpu.reason


def test_record_turns_suite_outputs_into_result_rows(tmp_path):
    """benchmarks/record.py: loss.py and throughput.py JSON plus kernel-benchmark JSONL rows become
    results.jsonl rows, each fast variant with the same metric of its reference as baseline."""
    record = _load(os.path.join(ROOT, "benchmarks", "record.py"))
    out = tmp_path / "suite"
    out.mkdir()
    (out / "versions.json").write_text(json.dumps({"device": "GPU X", "torch": "9.9", "triton": "8.8"}))
    (out / "commands.txt").write_text("loss_sk\tpython benchmarks/loss.py --sk\n")
    (out / "loss_sk.json").write_text(json.dumps([
        {"variant": "sk_reference", "dtype": "bf16", "B": 32, "ms": 0.3, "dev_ms": 0.25, "cpu_us": 1.0},
        {"variant": "sk_fused", "dtype": "bf16", "B": 32, "ms": 1.2, "dev_ms": 0.1, "cpu_us": 9.0},
        {"variant": "sk_fused", "dtype": "fp32", "B": 32, "ms": 1.0, "dev_ms": 0.2}]))  # no fp32 reference
    (out / "throughput_x.json").write_text(json.dumps({
        "config": "configs/x.json", "device_name": "GPU X", "versions": {"torch": "9.9", "triton": "8.8"},
        "rows": [{"name": "reference", "data": "synthetic", "status": "ok", "images_per_s": 100.0},
                 {"name": "fastdino", "data": "synthetic", "status": "ok", "images_per_s": 250.0},
                 {"name": "+compile", "data": "synthetic", "status": "skipped", "images_per_s": None}]}))
    (out / "gram.jsonl").write_text(json.dumps({"variant": "triton", "metric": "ms", "value": 1.0}) + "\n")
    loader = {"photometric": "triton", "crops": "2+10", "batch": 128}
    (out / "data_host.json").write_text(json.dumps({"device": "cuda:0", "results": [
        {**loader, "backend": "torch", "photometric": "torch", "images_per_s": 500.0},
        {**loader, "backend": "dali", "host_workers": 0, "images_per_s": 3000.0, "host_stream_ms": 20.0},
        {**loader, "backend": "dali", "host_workers": 8, "images_per_s": 4200.0, "host_stream_ms": 3.0}]}))
    results = tmp_path / "results.jsonl"
    record.main([str(out), "--date", "2026-01-02", "--results", str(results)])
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    by = {(r["variant"], r.get("config", {}).get("dtype"), r["metric"]): r for r in rows}
    fused = by[("sk_fused", "bf16", "dev_ms")]
    assert fused["value"] == 0.1 and fused["baseline"] == 0.25 and fused["device"] == "GPU X"
    assert fused["command"] == "python benchmarks/loss.py --sk" and fused["date"] == "2026-01-02"
    assert by[("sk_reference", "bf16", "ms")]["baseline"] is None
    assert by[("sk_fused", "fp32", "ms")]["baseline"] is None
    assert not any(r["metric"] == "cpu_us" for r in rows)
    tp = [r for r in rows if r["metric"] == "images_per_s" and "host_workers" not in r.get("config", {})]
    assert [(r["variant"], r["value"], r["baseline"]) for r in tp] == [("reference", 100.0, None), ("fastdino", 250.0, 100.0)]
    assert {"variant": "triton", "metric": "ms", "value": 1.0} in rows
    data = {(r["variant"], r["metric"]): (r["value"], r["baseline"]) for r in rows if "host_workers" in r.get("config", {})}
    assert data[("dali_host_workers8", "images_per_s")] == (4200.0, 3000.0)  # against the host thread
    assert data[("dali_host_workers8", "host_stream_ms")] == (3.0, 20.0)
    assert data[("dali_host_thread", "images_per_s")] == (3000.0, 500.0)  # against the torch backend
    assert data[("torch", "images_per_s")] == (500.0, None)
    with pytest.raises(SystemExit, match="no loss"):
        (tmp_path / "empty").mkdir()
        record.main([str(tmp_path / "empty"), "--results", str(results)])


@pytest.mark.parametrize("part", list("ABCDEFGHI"))
def test_gpu_suite_commands_are_valid(tmp_path, part):
    """benchmarks/gpu_suite.sh PART in its dry mode (GPU_SUITE_DRY=1: the commands, not run): every
    test file, script and config it names exists, and every --rows name is a throughput row, so a
    GPU session does not spend its minutes on a typo."""
    env = {**os.environ, "GPU_SUITE_DRY": "1"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh"), part, str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    commands = [line.split("\t", 1) for line in (tmp_path / "commands.txt").read_text().splitlines()]
    assert commands and all(len(c) == 2 for c in commands)
    for name, cmd in commands:
        words = cmd.split()
        for w in words:
            if w.startswith(("tests/", "benchmarks/", "configs/")):
                assert os.path.exists(os.path.join(ROOT, w)), f"{name}: {w} does not exist"
        if "--rows" in words:
            for row in words[words.index("--rows") + 1].split(","):
                assert row in tp.ROW_NAMES, f"{name}: unknown row {row}"
