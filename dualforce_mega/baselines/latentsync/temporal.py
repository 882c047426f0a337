"""The temporal ("motion") module of LatentSync's UNet: AnimateDiff's Vanilla temporal transformer,
attention over the frames of a window at every spatial position.

Parameter names follow the official ``motion_module.py`` (``temporal_transformer.norm``,
``proj_in``, ``transformer_blocks.N.attention_blocks.M.to_q`` / ``pos_encoder.pe``, ``norms.M``,
``ff``, ``ff_norm``, ``proj_out``) so ``latentsync_unet.pt`` loads strictly. Hidden states are the
UNet's frame batch ``[(b f), c, h, w]``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from torch import nn

from .config import MotionModuleConfig

TEMPORAL_SELF = "Temporal_Self"


class SinusoidalPositions(nn.Module):
    """Fixed sin/cos frame-position table added to the tokens (a state-dict buffer ``pe``)."""

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        pos = torch.arange(max_len, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        pe = torch.zeros(1, max_len, dim)
        pe[0, :, 0::2] = torch.sin(pos * freq)
        pe[0, :, 1::2] = torch.cos(pos * freq)
        self.register_buffer("pe", pe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, f, dim]."""
        if x.shape[1] > self.pe.shape[1]:
            raise ValueError(f"temporal attention: {x.shape[1]} frames exceed the position table "
                             f"({self.pe.shape[1]}, temporal_position_encoding_max_len)")
        return x + self.pe[:, :x.shape[1]].to(x.dtype)


class TemporalAttention(nn.Module):
    """Self-attention over frames; tokens [N = b*h*w, f, dim]."""

    def __init__(self, dim: int, heads: int, dim_head: int, max_len: int, position_encoding: bool):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.pos_encoder = SinusoidalPositions(dim, max_len) if position_encoding else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_encoder is not None:
            x = self.pos_encoder(x)
        n, f, _ = x.shape
        q, k, v = (proj(x).view(n, f, self.heads, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, f, -1)
        return self.to_out[1](self.to_out[0](out))


class TemporalTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, cfg: MotionModuleConfig):
        super().__init__()
        for kind in cfg.attention_block_types:
            if kind != TEMPORAL_SELF:
                raise ValueError(f"motion_module_kwargs.attention_block_types: {kind!r} is not supported "
                                 f"(only {TEMPORAL_SELF}, as in the released configs)")
        n = len(cfg.attention_block_types)
        self.attention_blocks = nn.ModuleList(
            TemporalAttention(dim, heads, dim_head, cfg.temporal_position_encoding_max_len,
                              cfg.temporal_position_encoding) for _ in range(n))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(n))
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, norm in zip(self.attention_blocks, self.norms):
            x = attn(norm(x)) + x
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer3D(nn.Module):
    def __init__(self, channels: int, cfg: MotionModuleConfig):
        super().__init__()
        heads = cfg.num_attention_heads
        dim_head = channels // heads // cfg.temporal_attention_dim_div
        inner = heads * dim_head
        self.norm = nn.GroupNorm(cfg.norm_num_groups, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            TemporalTransformerBlock(inner, heads, dim_head, cfg) for _ in range(cfg.num_transformer_block))
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x [(b f), c, h, w] -> same shape."""
        bf, c, h, w = x.shape
        b = bf // num_frames
        tokens = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(bf, h * w, c))
        # [(b f), s, d] -> [(b s), f, d]: attention runs over frames at each position
        tokens = tokens.view(b, num_frames, h * w, -1).transpose(1, 2).reshape(b * h * w, num_frames, -1)
        for block in self.transformer_blocks:
            tokens = block(tokens)
        tokens = tokens.view(b, h * w, num_frames, -1).transpose(1, 2).reshape(bf, h * w, -1)
        out = self.proj_out(tokens).view(bf, h, w, c).permute(0, 3, 1, 2)
        return out + x


class VanillaTemporalModule(nn.Module):
    def __init__(self, channels: int, cfg: MotionModuleConfig):
        super().__init__()
        self.temporal_transformer = TemporalTransformer3D(channels, cfg)
        if cfg.zero_initialize:     # a new module starts as the identity
            nn.init.zeros_(self.temporal_transformer.proj_out.weight)
            nn.init.zeros_(self.temporal_transformer.proj_out.bias)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        return self.temporal_transformer(x, num_frames)
