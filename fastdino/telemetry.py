"""GPU telemetry through NVML (pynvml, from the nvidia-ml-py package): utilization, power, SM clock,
memory and energy, sampled by a background thread while timed work runs. Optional: without pynvml,
without CUDA, or on a device NVML cannot open (a MIG slice), the sampler is a no-op whose `reason`
says why, and every metric is None.

    with GPUSampler(torch.device("cuda", 0)) as gpu:
        ... timed training steps ...
    gpu.summary()  # {"gpu_util_pct": mean, "power_w": mean, "sm_clock_mhz": mean, "mem_used_gib": max,
                   #  "energy_j": total over the window, "power_limit_w": ..., "samples": n}

Units: NVML reports power in mW, energy in mJ, memory in bytes; summary() converts to W, J, GiB.
`utilization.gpu` is the share of NVML's sampling period (1/6 s to 1 s, by GPU) during which any
kernel ran: a coarse busy flag, not SM occupancy, so 100% does not mean full use of the tensor cores.
Sampling costs no GPU time (NVML reads driver counters) and never synchronizes the CUDA stream.
"""
from __future__ import annotations

import os
import threading
import time

GIB = 1024 ** 3


def load_nvml():
    """The pynvml module, initialized; raises ImportError or pynvml.NVMLError when unusable."""
    import pynvml

    pynvml.nvmlInit()
    return pynvml


def nvml_handle(nvml, device_index: int):
    """NVML handle of torch's CUDA device `device_index`. torch numbers devices after
    CUDA_VISIBLE_DEVICES; NVML numbers all of them: match by UUID when torch exposes it, else map the
    index through CUDA_VISIBLE_DEVICES (integers), else use it as is."""
    try:
        import torch

        uuid = str(torch.cuda.get_device_properties(device_index).uuid)
        for name in (f"GPU-{uuid}", uuid):
            try:
                return nvml.nvmlDeviceGetHandleByUUID(name)
            except Exception:  # NVMLError_NotFound / InvalidArgument: try the next form
                continue
    except Exception:  # old torch without .uuid, or no CUDA at all
        pass
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible and device_index < len(visible) and visible[device_index].isdigit():
        device_index = int(visible[device_index])
    return nvml.nvmlDeviceGetHandleByIndex(device_index)


class GPUSampler:
    """Background NVML sampler for one CUDA device; a context manager (start on enter, stop on exit).

    device: a torch.device (or index). interval_s: seconds between samples. nvml: a pynvml-like module
    (tests inject a fake one); by default pynvml is imported and initialized here."""

    METRICS = ("gpu_util_pct", "power_w", "sm_clock_mhz", "mem_used_gib")

    def __init__(self, device=None, interval_s: float = 0.1, nvml=None):
        self.interval_s = float(interval_s)
        self.samples: dict[str, list[float]] = {k: [] for k in self.METRICS}
        self.available, self.reason = False, ""
        self.name, self.power_limit_w = None, None
        self._energy0 = self._energy1 = None
        self._thread, self._stop = None, threading.Event()
        self.handle = None
        index = getattr(device, "index", device)
        if getattr(device, "type", "cuda") != "cuda":
            self.reason = f"device {device} is not a CUDA device"
            return
        try:
            self.nvml = nvml if nvml is not None else load_nvml()
            self.handle = nvml_handle(self.nvml, int(index or 0))
        except ImportError:
            self.reason = "pynvml is not installed (pip install nvidia-ml-py)"
            return
        except Exception as e:  # NVMLError (no driver, MIG slice, permissions)
            self.reason = f"NVML unavailable: {_one_line(e)}"
            return
        self.available = True
        self.name = self._read(lambda h: _text(self.nvml.nvmlDeviceGetName(h)))
        limit = self._read(self.nvml.nvmlDeviceGetEnforcedPowerLimit)
        self.power_limit_w = None if limit is None else limit / 1000.0

    # ---- reading ----------------------------------------------------------------------------------
    def _read(self, fn):
        """fn(handle), or None when this GPU does not support the query (NVMLError_NotSupported)."""
        try:
            return fn(self.handle)
        except Exception:
            return None

    def sample(self) -> None:
        """Take one sample of every metric the device supports."""
        util = self._read(self.nvml.nvmlDeviceGetUtilizationRates)
        power = self._read(self.nvml.nvmlDeviceGetPowerUsage)
        clock = self._read(lambda h: self.nvml.nvmlDeviceGetClockInfo(h, self.nvml.NVML_CLOCK_SM))
        mem = self._read(self.nvml.nvmlDeviceGetMemoryInfo)
        for key, value in (("gpu_util_pct", None if util is None else float(util.gpu)),
                           ("power_w", None if power is None else power / 1000.0),
                           ("sm_clock_mhz", None if clock is None else float(clock)),
                           ("mem_used_gib", None if mem is None else mem.used / GIB)):
            if value is not None:
                self.samples[key].append(value)

    def _energy_mj(self):
        return self._read(self.nvml.nvmlDeviceGetTotalEnergyConsumption)  # mJ since driver load (Volta+)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    # ---- start / stop -----------------------------------------------------------------------------
    def start(self) -> "GPUSampler":
        if not self.available or self._thread is not None:
            return self
        self._energy0 = self._energy_mj()
        self.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fastdino-gpu-sampler", daemon=True)
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def stop(self) -> "GPUSampler":
        if self._thread is None:
            return self
        self._stop.set()
        self._thread.join()
        self._thread = None
        self.sample()
        self._energy1 = self._energy_mj()
        self.seconds = time.perf_counter() - self._t0
        return self

    def __enter__(self) -> "GPUSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def summary(self) -> dict:
        """Means of utilization, power and SM clock; max of memory used; energy over start..stop.
        A metric the device does not report (or any metric when unavailable) is None."""
        s = self.samples

        def mean(k):
            return sum(s[k]) / len(s[k]) if s[k] else None

        energy = None
        if self._energy0 is not None and self._energy1 is not None:
            energy = (self._energy1 - self._energy0) / 1000.0
        return {
            "gpu_util_pct": mean("gpu_util_pct"),
            "power_w": mean("power_w"),
            "sm_clock_mhz": mean("sm_clock_mhz"),
            "mem_used_gib": max(s["mem_used_gib"]) if s["mem_used_gib"] else None,
            "energy_j": energy,
            "power_limit_w": self.power_limit_w,
            "samples": max((len(v) for v in s.values()), default=0),
            "available": self.available,
            "reason": self.reason or None,
        }


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__
