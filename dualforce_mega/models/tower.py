"""What both towers share: the sigma -> modulation embedding, the block stack, the head, audio."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..config import ModelConfig
from .audio import AudioProjector
from .blocks import GATE_ROWS, DiTBlock, Head
from .layers import embed_sigma, init_linear, sigma_embedding_modules


class Tower(nn.Module):
    def __init__(self, cfg: ModelConfig, out_dim: int, text: bool):
        super().__init__()
        self.cfg = cfg
        self.time_embedding, self.time_projection = sigma_embedding_modules(cfg.dim, cfg.freq_dim)
        self.audio_projector = AudioProjector(cfg.audio_dim, cfg.dim, cfg.eps) if cfg.audio else None
        self.blocks = nn.ModuleList(
            DiTBlock(cfg, text=text, audio=cfg.audio and i < cfg.audio_layers) for i in range(cfg.layers))
        self.head = Head(cfg.dim, out_dim, cfg.eps)

    def init_weights(self) -> None:
        """Wan's scheme: xavier linears, N(0, 0.02) sigma MLP; the head stays zero; AdaLN-Zero: the
        projection rows that produce the residual gates are zero, so every gate is exactly 0 at init."""
        init_linear(self)
        for m in self.time_embedding.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        proj = self.time_projection[1]
        dim = self.cfg.dim
        with torch.no_grad():
            for row in GATE_ROWS:
                proj.weight[row * dim:(row + 1) * dim].zero_()
                proj.bias[row * dim:(row + 1) * dim].zero_()
        nn.init.zeros_(self.head.head.weight)
        nn.init.zeros_(self.head.head.bias)

    def modulation(self, sigma: torch.Tensor, extra: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        return embed_sigma(self.time_embedding, self.time_projection, sigma, self.cfg.freq_dim,
                           self.cfg.timestep_scale, extra)
