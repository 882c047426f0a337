"""Sigma schedules: the timestep shift used by Wan-style flow matching, and the inference grid."""
from __future__ import annotations

import torch


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan / SD3 shift: s' = shift*s / (1 + (shift-1)*s); shift > 1 spends more steps at high noise."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def inference_sigmas(steps: int, shift: float, device=None) -> torch.Tensor:
    """steps+1 decreasing sigmas from 1 to 0 (uniform grid, then shifted)."""
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device)
    return shift_sigma(grid, shift).float()
