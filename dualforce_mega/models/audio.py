"""Audio conditioning: a projector and tanh-gated, frame-local cross-attention.

Audio features arrive at ``audio_rate`` Hz (50 for HuBERT / wav2vec2), ``audio_rate / fps`` frames
per video frame. Each query group (a latent frame in the video tower, a video frame in the struct
tower) attends only to the audio of its own time span widened by ``audio_context`` video frames
on each side, so a frame never sees audio beyond that window.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..config import ModelConfig
from .blocks import Attention, sample_mask
from .layers import FP32LayerNorm, TokenGroups


class AudioProjector(nn.Sequential):
    def __init__(self, audio_dim: int, dim: int, eps: float):
        super().__init__(nn.Linear(audio_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim),
                         FP32LayerNorm(dim, eps=eps))


@dataclass
class AudioContext:
    """Projected audio [B, A, dim] and, for each query group, its window of audio frames.

    ``keep`` [B] bool (None = all): a sample with keep False is the dropped form (its audio branch adds
    nothing) — training's audio dropout and CFG's unconditional branch both run it."""
    feats: torch.Tensor
    index: torch.Tensor   # [G, Wa] audio frame per window slot (clamped into range)
    valid: torch.Tensor   # [G, Wa] slot inside the window and inside the clip
    groups: TokenGroups   # query token -> group
    keep: Optional[torch.Tensor] = None


def audio_windows(spans: torch.Tensor, ratio: int, context: int, num_audio: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """spans [G, 2] inclusive video-frame ranges -> (index [G, Wa], valid [G, Wa])."""
    starts = (spans[:, 0] - context) * ratio
    ends = (spans[:, 1] + 1 + context) * ratio
    width = int((ends - starts).max())
    idx = starts[:, None] + torch.arange(width, device=spans.device)[None, :]
    valid = (idx < ends[:, None]) & (idx >= 0) & (idx < num_audio)
    return idx.clamp(0, max(num_audio - 1, 0)), valid


class AudioCrossAttention(nn.Module):
    """x + tanh(gate) * CrossAttn(norm(x), audio window); gate = 0 at init, so audio starts inert."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = FP32LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.qk_norm, cfg.eps)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, audio: AudioContext) -> torch.Tensor:
        q = self.attn.project_q(self.norm(x).to(self.gate.dtype))  # [B, L, H, D]
        k, v = self.attn.project_kv(audio.feats)                 # [B, A, H, D]
        idx = audio.index.to(x.device)
        valid = audio.valid.to(x.device)
        any_valid = valid.any(-1)                                # [G]
        # a group with no audio in range attends nothing: unmask it to avoid NaN, zero it below
        valid = valid | ~any_valid[:, None]
        kw, vw = k[:, idx], v[:, idx]                            # [B, G, Wa, H, D]
        b, l, h, d = q.shape
        g, wa = idx.shape
        groups = audio.groups
        lead = 0
        if groups.per_group is not None:
            # whole groups of per_group tokens; a slice of them (sequence-parallel shard) is padded
            # to whole groups first, so each group's tokens share one window (<= 2 extra groups)
            pg = groups.per_group
            first, lead = divmod(groups.start, pg)
            n = -(-(lead + l) // pg)
            sel = torch.arange(first, first + n, device=x.device).clamp_max(g - 1)
            if n != g or first != 0:
                kw, vw, valid, any_valid = kw[:, sel], vw[:, sel], valid[sel], any_valid[sel]
            if lead or n * pg != l:
                q = torch.nn.functional.pad(q, (0, 0, 0, 0, lead, n * pg - lead - l))
            qg = q.reshape(b * n, pg, h, d)
            kg, vg = kw.reshape(b * n, wa, h, d), vw.reshape(b * n, wa, h, d)
            mask = valid[None, :, None, None, :].expand(b, n, 1, 1, wa).reshape(b * n, 1, 1, wa)
            keep = any_valid[None, :, None].expand(b, n, pg).reshape(b, n * pg)
        else:  # non-uniform groups: one window per token
            tok = groups.group.to(x.device)
            qg = q.reshape(b * l, 1, h, d)
            kg, vg = kw[:, tok].reshape(b * l, wa, h, d), vw[:, tok].reshape(b * l, wa, h, d)
            mask = valid[tok][None].expand(b, l, wa).reshape(b * l, 1, 1, wa)
            keep = any_valid[tok][None].expand(b, l)
        out = torch.nn.functional.scaled_dot_product_attention(
            qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2), attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, -1, h * d)
        # groups without audio in range add nothing at all (not even the output projection's bias)
        y = self.attn.o(out) * keep.unsqueeze(-1).to(out.dtype)
        y = sample_mask(audio.keep, y[:, lead:lead + l])
        return (x.float() + torch.tanh(self.gate.float()) * y.float()).to(x.dtype)
