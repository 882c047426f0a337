"""Datasheet figures of the accelerators the project plans for (dense tensor-core peaks, no sparsity).

Used as leads only: the trainer also measures the achievable matmul peak on its device (MFU is logged
on both bases), and the FP8 layer rule compares the two GEMM rates with the memory bandwidth.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

TERA = 1e12


@dataclass(frozen=True)
class Accelerator:
    name: str
    bf16_tflops: float          # dense bf16 tensor-core peak
    fp8_tflops: float           # dense FP8 peak (0 = no FP8 tensor cores)
    bandwidth_tbs: float        # device memory bandwidth, TB/s


# matched against torch.cuda.get_device_name() by substring, first match wins
DATASHEETS = (
    Accelerator("H200", 989.0, 1979.0, 4.8),
    Accelerator("H100 PCIe", 756.0, 1513.0, 2.0),
    Accelerator("H100", 989.0, 1979.0, 3.35),        # SXM
    Accelerator("A100", 312.0, 0.0, 2.0),
    Accelerator("L40S", 362.0, 733.0, 0.864),
)
# the planner's default target when no device is at hand
H100 = next(a for a in DATASHEETS if a.name == "H100")


def datasheet(device_name: str) -> Optional[Accelerator]:
    """The datasheet entry whose name occurs in ``device_name`` (e.g. "NVIDIA H100 80GB HBM3"), or None."""
    for acc in DATASHEETS:
        if acc.name in device_name:
            return acc
    return None
