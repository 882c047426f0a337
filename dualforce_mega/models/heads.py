"""Auxiliary heads trained with the struct tower: FLAME regression and the lip-sync embeddings.

They run inside the model's forward (``return_aux=True``) so that ZeRO-3 gathers their weights
like any other layer.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..timeline import Timeline
from .audio import audio_windows


def _mlp(din: int, dout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(din, dout), nn.GELU(approximate="tanh"), nn.Linear(dout, dout))


class AuxHeads(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # LivePortrait's expression block is one 3-d offset per canonical keypoint: the first kp_dim dims
        self.expr_dims = cfg.kp_dim
        self.flame = nn.Linear(cfg.motion_dim, cfg.flame_dim)
        self.lip_struct = _mlp(self.expr_dims, cfg.lipsync_dim)
        self.lip_audio = _mlp(cfg.audio_dim, cfg.lipsync_dim)

    def fill(self, out, struct_noisy: torch.Tensor, sigma_struct: torch.Tensor, layout,
             audio: Optional[torch.Tensor]) -> None:
        """Adds flame / lip-sync outputs computed from the struct x0 estimate x_s - s * v."""
        groups = layout.struct.groups
        sig = groups.expand(sigma_struct.float()).unsqueeze(-1)            # [B, N, 1]
        x0 = struct_noisy.float() - sig * out.struct.float()
        dtype = self.flame.weight.dtype
        out.flame = self.flame(x0.to(dtype))
        f = groups.num_groups
        member = nn.functional.one_hot(groups.group.to(x0.device), f).to(x0.dtype)  # [N, F]
        member = member / member.sum(0, keepdim=True).clamp_min(1)
        per_frame = torch.einsum("bnd,nf->bfd", x0[..., :self.expr_dims], member)
        out.lip_struct = self.lip_struct(per_frame.to(dtype))
        if audio is not None:
            idx, valid = audio_windows(layout.video.audio_spans, Timeline.of(self.cfg).audio_per_video_frame, 0,
                                       audio.shape[1])
            idx, valid = idx.to(audio.device), valid.to(audio.device)
            win = audio[:, idx].float() * valid[None, :, :, None]            # [B, F, Wa, Da]
            pooled = win.sum(2) / valid.sum(-1).clamp_min(1)[None, :, None]
            out.lip_audio = self.lip_audio(pooled.to(dtype))
