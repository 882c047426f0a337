"""LatentSync's ResNet block: convolutions per frame, but GroupNorm statistics over the whole clip.

The official ``ResnetBlock3D`` applies ``nn.GroupNorm`` to ``[b, c, f, h, w]``, so each group is
normalised over all frames of the window together (diffusers' 2D block on a frame batch would
normalise each frame alone and give different outputs). Frames ride in the batch dimension here,
``[(b f), c, h, w]``; :class:`ClipGroupNorm` computes the clip-wide statistics from that layout.
Parameter names: ``norm1``, ``conv1``, ``time_emb_proj``, ``norm2``, ``conv2``, ``conv_shortcut``.
"""
from __future__ import annotations

import torch
from diffusers.models.activations import get_activation
from torch import nn


class ClipGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics span the ``num_frames`` frames of each clip in a frame batch."""

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        bf, c, h, w = x.shape
        g = x.reshape(bf // num_frames, num_frames, self.num_groups, c // self.num_groups, h * w).float()
        var, mean = torch.var_mean(g, dim=(1, 3, 4), unbiased=False, keepdim=True)
        y = ((g - mean) * torch.rsqrt(var + self.eps)).reshape(bf, c, h, w).to(x.dtype)
        return y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)


class ResnetBlock3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float,
                 act_fn: str = "silu", output_scale_factor: float = 1.0):
        super().__init__()
        self.norm1 = ClipGroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = ClipGroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.act = get_activation(act_fn)
        self.output_scale_factor = output_scale_factor
        self.conv_shortcut = (nn.Conv2d(in_channels, out_channels, kernel_size=1)
                              if in_channels != out_channels else None)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x [(b f), c, h, w]; temb [(b f), temb_channels] (one row per frame)."""
        h = self.conv1(self.act(self.norm1(x, num_frames)))
        h = h + self.time_emb_proj(self.act(temb))[:, :, None, None]
        h = self.conv2(self.act(self.norm2(h, num_frames)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor
