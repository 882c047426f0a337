"""Resource telemetry for the metrics record: memory, GPU power/utilisation/temperature, peak FLOP/s, MFU."""
from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from typing import Any, Iterator, Optional

import torch

from ..hardware import TERA, datasheet

log = logging.getLogger(__name__)

_MB = 1024 * 1024


def memory_mb(device: torch.device) -> float:
    """GPU: peak allocated by torch on this device; CPU: resident set size of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / _MB
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / _MB
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class GpuMonitor:
    """Power, utilisation and temperature of this rank's GPU via NVML (nvidia-ml-py); silent if absent."""

    def __init__(self, device: torch.device):
        self.handle: Any = None
        if device.type != "cuda":
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            props = torch.cuda.get_device_properties(device)
            # NVML ignores CUDA_VISIBLE_DEVICES: find our GPU by its PCI address, not its index.
            bus_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
            self.handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
            self.nvml = pynvml
        except Exception as e:  # noqa: BLE001 - telemetry must never stop training
            log.warning("GPU telemetry disabled (pynvml / NVML unavailable: %s)", e)
            self.handle = None

    def read(self) -> dict[str, float]:
        if self.handle is None:
            return {}
        try:
            nv = self.nvml
            return {
                "gpu_power_w": nv.nvmlDeviceGetPowerUsage(self.handle) / 1000.0,
                "gpu_util_pct": float(nv.nvmlDeviceGetUtilizationRates(self.handle).gpu),
                "gpu_temp_c": float(nv.nvmlDeviceGetTemperature(self.handle, nv.NVML_TEMPERATURE_GPU)),
            }
        except Exception as e:  # noqa: BLE001
            log.warning("GPU telemetry read failed, disabling: %s", e)
            self.handle = None
            return {}


def measure_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 8192, iters: int = 10,
                       warmup: int = 1) -> float:
    """Achievable dense matmul FLOP/s in the training dtype (the MFU denominator): median of ``iters``
    timed ``size``^3 matmuls after ``warmup`` untimed ones (cuBLAS heuristics)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        torch.matmul(a, b)
    times = []
    for _ in range(max(1, iters)):
        sync()
        start = time.perf_counter()
        torch.matmul(a, b)
        sync()
        times.append(time.perf_counter() - start)
    del a, b
    return 2.0 * size ** 3 / statistics.median(times)


def datasheet_peak_flops(device: torch.device, dtype: torch.dtype) -> Optional[float]:
    """The datasheet's dense bf16 tensor-core FLOP/s of ``device`` (bf16 training only), or None."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    acc = datasheet(torch.cuda.get_device_name(device))
    return acc.bf16_tflops * TERA if acc is not None else None


class StepClock:
    """Seconds per optimizer step, and the part of it the host spent blocked on the data loader, averaged
    over the steps since the last ``read``. Only ``read`` synchronizes the device (at log steps)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._sync()
        self.start = time.perf_counter()
        self.steps = 0
        self.wait = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.wait += time.perf_counter() - t0

    def tick(self) -> None:
        self.steps += 1

    def read(self) -> dict[str, float]:
        """{"step_time_s", "data_wait_s"} per step since the last read; starts the next interval."""
        self._sync()
        now = time.perf_counter()
        steps = max(self.steps, 1)
        out = {"step_time_s": (now - self.start) / steps, "data_wait_s": self.wait / steps}
        self.start, self.steps, self.wait = now, 0, 0.0
        return out


def mfu(flops_per_sample: Optional[float], samples: int, step_time_s: float, world_size: int,
        peak_flops: Optional[float]) -> Optional[float]:
    if not flops_per_sample or not peak_flops or step_time_s <= 0:
        return None
    return flops_per_sample * samples / step_time_s / world_size / peak_flops
