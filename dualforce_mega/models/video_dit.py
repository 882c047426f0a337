"""Video tower: Wan2.1 DiT over 16-channel VAE latents, patch (1, 2, 2), 3D RoPE."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import ModelConfig
from .tower import Tower


class VideoDiT(Tower):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, out_dim=cfg.out_channels * math.prod(cfg.patch_size), text=cfg.text_dim > 0)
        self.patch_size = tuple(cfg.patch_size)
        self.patch_embedding = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=self.patch_size,
                                         stride=self.patch_size)
        self.text_embedding = (nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                             nn.Linear(cfg.dim, cfg.dim)) if cfg.text_dim > 0 else None)

    def init_weights(self) -> None:
        super().init_weights()
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        if self.text_embedding is not None:
            for m in self.text_embedding.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)

    def embed(self, latent: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[B, C, F, H, W] -> tokens [B, F*h*w, dim] (frame-major) and the grid (F, h, w)."""
        pt, ph, pw = self.patch_size
        _, c, f, hh, ww = latent.shape
        if c != self.cfg.in_channels or hh % ph or ww % pw:
            raise ValueError(f"video_latent: shape {tuple(latent.shape)} needs {self.cfg.in_channels} channels "
                             f"and H, W divisible by the patch {self.patch_size}")
        x = self.patch_embedding(latent.to(self.patch_embedding.weight.dtype))
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2), grid

    def unembed(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """tokens [B, F*h*w, C*pt*ph*pw] -> [B, C, F*pt, h*ph, w*pw] (Wan's (p, q, r, c) order)."""
        f, h, w = grid
        pt, ph, pw = self.patch_size
        b = tokens.shape[0]
        c = self.cfg.out_channels
        x = tokens.reshape(b, f, h, w, pt, ph, pw, c)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, c, f * pt, h * ph, w * pw)
