"""Down / mid / up blocks of LatentSync's 3D UNet.

The attention and resampling layers are diffusers' own 2D building blocks (``Transformer2DModel``,
``Downsample2D``, ``Upsample2D``) applied to every frame: LatentSync's "inflated" 3D layers are
exactly these on ``[(b f), c, h, w]`` and carry the same parameter names. The ResNet blocks
normalise over the whole clip (``resnet.py``); the temporal modules are in ``temporal.py``.
Attribute names (``resnets``, ``attentions``, ``motion_modules``, ``downsamplers``, ``upsamplers``)
are those of the official ``unet_blocks.py``.
"""
from __future__ import annotations

from typing import Optional

import torch
from diffusers.models.resnet import Downsample2D, Upsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from .config import UNetConfig
from .resnet import ResnetBlock3D
from .temporal import VanillaTemporalModule


def _resnet(cfg: UNetConfig, cin: int, cout: int, output_scale_factor: float = 1.0) -> ResnetBlock3D:
    return ResnetBlock3D(cin, cout, cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn,
                         output_scale_factor)


def _transformer(cfg: UNetConfig, channels: int, heads: int) -> Transformer2DModel:
    # spatial self-attention per frame, then (add_audio_layer) cross-attention to the frame's audio window
    return Transformer2DModel(num_attention_heads=heads, attention_head_dim=channels // heads, in_channels=channels,
                              num_layers=1, norm_num_groups=cfg.norm_num_groups,
                              cross_attention_dim=cfg.cross_attention_dim if cfg.add_audio_layer else None,
                              use_linear_projection=cfg.use_linear_projection, upcast_attention=cfg.upcast_attention)


def _motion(cfg: UNetConfig, channels: int, on: bool) -> Optional[VanillaTemporalModule]:
    return VanillaTemporalModule(channels, cfg.motion_module_kwargs) if on else None


class _Block(nn.Module):
    """resnet -> (spatial/audio transformer) -> (temporal module), ``len(resnets)`` times."""

    def _layers(self, h: torch.Tensor, temb: torch.Tensor, audio: Optional[torch.Tensor], num_frames: int, i: int
                ) -> torch.Tensor:
        h = self.resnets[i](h, temb, num_frames)
        if len(self.attentions):
            h = self.attentions[i](h, encoder_hidden_states=audio, return_dict=False)[0]
        if self.motion_modules[i] is not None:
            h = self.motion_modules[i](h, num_frames)
        return h


class DownBlock(_Block):
    """``CrossAttnDownBlock3D`` (cross_attention=True) or ``DownBlock3D``."""

    def __init__(self, cfg: UNetConfig, cin: int, cout: int, heads: int, cross_attention: bool, motion: bool,
                 downsample: bool):
        super().__init__()
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList(_resnet(cfg, cin if i == 0 else cout, cout) for i in range(n))
        self.attentions = nn.ModuleList(_transformer(cfg, cout, heads) for _ in range(n) if cross_attention)
        self.motion_modules = nn.ModuleList(_motion(cfg, cout, motion) for _ in range(n))
        self.downsamplers = nn.ModuleList(
            [Downsample2D(cout, use_conv=True, out_channels=cout, padding=cfg.downsample_padding, name="op")]
        ) if downsample else None

    def forward(self, h, temb, audio, num_frames):
        skips = []
        for i in range(len(self.resnets)):
            h = self._layers(h, temb, audio, num_frames, i)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class MidBlock(_Block):
    """``UNetMidBlock3DCrossAttn``: resnet, then (transformer, temporal module, resnet)."""

    def __init__(self, cfg: UNetConfig, channels: int, heads: int, motion: bool):
        super().__init__()
        scale = cfg.mid_block_scale_factor
        self.resnets = nn.ModuleList(_resnet(cfg, channels, channels, scale) for _ in range(2))
        self.attentions = nn.ModuleList([_transformer(cfg, channels, heads)])
        self.motion_modules = nn.ModuleList([_motion(cfg, channels, motion)])

    def forward(self, h, temb, audio, num_frames):
        h = self.resnets[0](h, temb, num_frames)
        h = self.attentions[0](h, encoder_hidden_states=audio, return_dict=False)[0]
        if self.motion_modules[0] is not None:
            h = self.motion_modules[0](h, num_frames)
        return self.resnets[1](h, temb, num_frames)


class UpBlock(_Block):
    """``CrossAttnUpBlock3D`` (cross_attention=True) or ``UpBlock3D``: each resnet takes the previous
    output concatenated with one skip connection."""

    def __init__(self, cfg: UNetConfig, cin: int, cout: int, prev: int, heads: int, cross_attention: bool,
                 motion: bool, upsample: bool):
        super().__init__()
        n = cfg.layers_per_block + 1
        self.resnets = nn.ModuleList(
            _resnet(cfg, (prev if i == 0 else cout) + (cin if i == n - 1 else cout), cout) for i in range(n))
        self.attentions = nn.ModuleList(_transformer(cfg, cout, heads) for _ in range(n) if cross_attention)
        self.motion_modules = nn.ModuleList(_motion(cfg, cout, motion) for _ in range(n))
        self.upsamplers = nn.ModuleList([Upsample2D(cout, use_conv=True, out_channels=cout)]) if upsample else None

    def forward(self, h, skips, temb, audio, num_frames, upsample_size=None):
        for i in range(len(self.resnets)):
            h = torch.cat([h, skips.pop()], dim=1)
            h = self._layers(h, temb, audio, num_frames, i)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, upsample_size)
        return h
