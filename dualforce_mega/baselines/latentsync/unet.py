"""LatentSync's 3D UNet (``latentsync/models/unet.py``, ``UNet3DConditionModel``) with the official
parameter names, so the released ``latentsync_unet.pt`` loads with ``strict=True``.

Input ``[b, 13, f, h, w]``: noisy latents (4) + mouth mask (1) + masked-frame latents (4) +
reference-frame latents (4); output the predicted noise ``[b, 4, f, h, w]``. Audio conditioning is
cross-attention to a window of Whisper features per frame, ``[b*f, tokens, cross_attention_dim]``.
Internally the frames ride in the batch dimension (``[(b f), c, h, w]``); only the temporal
modules look across frames.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from dualforce_mega.encoders.weights import load_strict, read_state_dict

from .blocks import DownBlock, MidBlock, UpBlock
from .config import CROSS_ATTN_DOWN, CROSS_ATTN_UP, UNetConfig
from .resnet import ClipGroupNorm

log = logging.getLogger(__name__)

# the official code hard-codes the up-path resolution label as 2 ** (3 - i) (four levels)
UP_RESOLUTION_TOP = 3


class LatentSyncUNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.block_out_channels
        heads = cfg.heads
        mm = cfg.use_motion_module
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], kernel_size=3, padding=1)
        self.time_proj = Timesteps(ch[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim)

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            motion = mm and 2 ** i in cfg.motion_module_resolutions and not cfg.motion_module_decoder_only
            self.down_blocks.append(DownBlock(cfg, ch[max(i - 1, 0)], ch[i], heads[i], kind == CROSS_ATTN_DOWN,
                                              motion, downsample=i < len(ch) - 1))
        self.mid_block = MidBlock(cfg, ch[-1], heads[-1], mm and cfg.motion_module_mid_block)

        rch, rheads = ch[::-1], heads[::-1]
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.up_block_types):
            motion = mm and 2 ** (UP_RESOLUTION_TOP - i) in cfg.motion_module_resolutions
            self.up_blocks.append(UpBlock(cfg, cin=rch[min(i + 1, len(ch) - 1)], cout=rch[i], prev=rch[max(i - 1, 0)],
                                          heads=rheads[i], cross_attention=kind == CROSS_ATTN_UP, motion=motion,
                                          upsample=i < len(ch) - 1))
        self.num_upsamplers = len(ch) - 1

        self.conv_norm_out = ClipGroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, kernel_size=3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def forward(self, sample: torch.Tensor, timestep: Union[torch.Tensor, float, int],
                encoder_hidden_states: Optional[torch.Tensor] = None) -> torch.Tensor:
        """sample [b, in, f, h, w]; timestep scalar or [b]; encoder_hidden_states [(b f), s, d] or
        [b, f, s, d] -> [b, out, f, h, w]."""
        b, _, f, hh, ww = sample.shape
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t
        emb = self.time_embedding(self.time_proj(t).to(self.dtype))
        emb = emb.repeat_interleave(f, dim=0)                          # one embedding per frame
        audio = encoder_hidden_states
        if audio is not None and audio.dim() == 4:
            audio = audio.flatten(0, 1)
        if audio is not None and audio.shape[0] != b * f:
            raise ValueError(f"encoder_hidden_states: {audio.shape[0]} frames, the sample has {b}x{f}")

        h = self.conv_in(sample.transpose(1, 2).reshape(b * f, -1, hh, ww))
        skips = [h]
        for block in self.down_blocks:
            h, s = block(h, emb, audio, f)
            skips.extend(s)
        h = self.mid_block(h, emb, audio, f)
        # sizes that are not a multiple of the total upsampling get the skip's size forced
        force = any(s % 2 ** self.num_upsamplers for s in (hh, ww))
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            size = skips[-n - 1].shape[-2:] if force and i < len(self.up_blocks) - 1 else None
            h = block(h, skips, emb, audio, f, size)
        h = self.conv_out(self.conv_act(self.conv_norm_out(h, f)))
        return h.reshape(b, f, -1, hh, ww).transpose(1, 2)


def load_unet(cfg: UNetConfig, path: Union[str, Path], device: Union[str, torch.device] = "cpu",
              dtype: torch.dtype = torch.float32) -> LatentSyncUNet:
    """Build the UNet of ``cfg`` and load ``latentsync_unet.pt`` (``{"state_dict": ..., "global_step":
    ...}``, or a bare state dict / safetensors) strictly: any missing, unexpected or mis-shaped key
    is an error naming the file and the keys."""
    sd = read_state_dict(path, "LatentSync UNet")
    with torch.device("meta"):      # no random init of 1.3 B parameters that are overwritten anyway
        unet = LatentSyncUNet(cfg)
    load_strict(unet, {k: v.to(dtype) for k, v in sd.items()}, path, "LatentSync UNet of the config", assign=True)
    log.info("loaded LatentSync UNet from %s (%d tensors, %.0fM parameters)", path, len(sd),
             sum(p.numel() for p in unet.parameters()) / 1e6)
    return unet.to(device).eval()
