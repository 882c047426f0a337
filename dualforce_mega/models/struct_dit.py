"""Struct tower: one token per video frame from its 70-d LivePortrait motion, 1D RoPE over time,
globally conditioned on the 63-d canonical keypoints."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig
from .tower import Tower


class StructDiT(Tower):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, out_dim=cfg.motion_dim, text=False)
        self.tokenizer = nn.Sequential(nn.Linear(cfg.motion_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                       nn.Linear(cfg.dim, cfg.dim))
        self.kp_embedding = nn.Sequential(nn.Linear(cfg.kp_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))

    def embed(self, motion: torch.Tensor) -> torch.Tensor:
        if motion.shape[-1] != self.cfg.motion_dim:
            raise ValueError(f"struct: last dim {motion.shape[-1]} != model.motion_dim={self.cfg.motion_dim}")
        return self.tokenizer(motion.to(self.tokenizer[0].weight.dtype))

    def keypoint_condition(self, kp: torch.Tensor) -> torch.Tensor:
        if kp.shape[-1] != self.cfg.kp_dim:
            raise ValueError(f"kp_canonical: last dim {kp.shape[-1]} != model.kp_dim={self.cfg.kp_dim}")
        return self.kp_embedding(kp.to(self.kp_embedding[0].weight.dtype))
