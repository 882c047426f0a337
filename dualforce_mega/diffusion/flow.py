"""Rectified-flow (flow matching) conventions shared by training and sampling.

x_s = (1 - s) * x0 + s * eps,  velocity target v = eps - x0,  so x0 = x_s - s * v and an Euler step
from s to s' is x_{s'} = x_s + (s' - s) * v.
"""
from __future__ import annotations

import torch


def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """sigma broadcasts against x0 (callers expand per-frame sigma to x0's layout)."""
    return (1.0 - sigma) * x0 + sigma * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps - x0


def x0_from_velocity(x_s: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x_s - sigma * v


def euler_step(x_s: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    return x_s + (sigma_next - sigma) * v
