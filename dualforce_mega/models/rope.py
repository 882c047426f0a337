"""Rotary position embeddings: 3D (t, h, w) for video tokens, 1D for struct tokens and the bridge.

Pairs are interleaved (``x[..., 2i], x[..., 2i+1]``), as in Wan2.1's complex-number RoPE, so
imported attention weights see the rotation they were trained with.
"""
from __future__ import annotations

from functools import lru_cache

import torch


def video_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Wan's split of head_dim over (t, h, w): h = w = 2*(d//6), t gets the rest (128 -> 44/42/42)."""
    hw = 2 * (head_dim // 6)
    t = head_dim - 2 * hw
    if t <= 0 or t % 2 or hw == 0:
        raise ValueError(f"model.heads: head_dim={head_dim} is too small for 3D RoPE (need >= 6, even)")
    return t, hw, hw


@lru_cache(maxsize=64)
def _inv_freq(axis_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim))


def rope_angles(positions: torch.Tensor, axis_dims: tuple[int, ...], theta: float) -> torch.Tensor:
    """positions [L, n_axes] -> rotation angles [L, sum(axis_dims)/2] (fp32)."""
    if positions.dim() == 1:
        positions = positions.unsqueeze(-1)
    if positions.shape[-1] != len(axis_dims):
        raise ValueError(f"rope: {positions.shape[-1]} position axes for {len(axis_dims)} frequency bands")
    parts = [positions[:, i:i + 1].to(torch.float64) * _inv_freq(d, theta).to(positions.device)
             for i, d in enumerate(axis_dims)]
    return torch.cat(parts, dim=-1).float()


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, H, D] by angles [L, D/2] (computed in fp32, cast back)."""
    cos = angles.cos()[None, :, None, :]
    sin = angles.sin()[None, :, None, :]
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def video_positions(frame_ids: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(t, h, w) position of every video token, frame-major: [F*h*w, 3]."""
    f = frame_ids.numel()
    dev = frame_ids.device
    t = frame_ids.view(f, 1, 1).expand(f, h, w)
    hh = torch.arange(h, device=dev).view(1, h, 1).expand(f, h, w)
    ww = torch.arange(w, device=dev).view(1, 1, w).expand(f, h, w)
    return torch.stack([t, hh, ww], dim=-1).reshape(-1, 3)
