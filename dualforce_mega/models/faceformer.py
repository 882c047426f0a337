"""FaceFormer (Fan et al., CVPR 2022; EvelynFan/FaceFormer) predicting FLAME motion instead of vertex offsets.

wav2vec2 (transformers, fine-tuned; its CNN feature extractor frozen, as the reference) -> features at
``audio_rate`` Hz resampled onto ``audio_rate / fps`` slots per video frame -> linear map to
``feature_dim``. The decoder input at frame t is the motion of frame t-1 (the neutral motion, zeros, at
t = 0) mapped to ``feature_dim`` plus a style (speaker) embedding plus the periodic positional encoding.
``layers`` post-norm decoder layers (the reference's ``nn.TransformerDecoderLayer``: FFN 2 x dim, ReLU,
dropout) with

* biased causal self-attention (the reference's ALiBi-like mask): frame i attends to frames j <= i with
  the bias ``-slope_h * floor((i - j) / period)``, slopes ``2^(-8 (h+1) / heads)`` (1/4 .. 1/256 for 4
  heads); computed for any length (the reference precomputes 600 frames);
* alignment-masked cross-attention: frame i sees audio slots ``r i .. r i + r - 1`` only (r = 2 at
  50 Hz / 25 fps, the reference's BIWI mask).

One decoder (``decode``) serves teacher forcing (``forward``: all frames at once from the ground truth
shifted by one) and autoregressive inference (``generate``: one frame at a time, each layer's inputs of
earlier frames kept in a cache, which is exact because every layer is causal). Batches of clips of
different lengths work: each clip's audio is encoded alone (no padding reaches wav2vec2) and, by
causality and the alignment mask, padded frames never influence real ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..encoders.speech import normalize_wave, to_feature_slots

# the reference's sinusoid base (Vaswani et al.)
_PE_BASE = 10000.0


@dataclass
class FaceFormerModelConfig:
    audio_encoder: str = ""              # transformers wav2vec2 / HuBERT folder, or "random:tiny"
    flame_model: str = ""                # generic_model.pkl, or an .npz with the official array names
    flame_shape_components: int = 300    # identity components before the expression ones in shapedirs
    motion_dim: int = 51                 # 50 expression + 1 jaw
    feature_dim: int = 64
    heads: int = 4
    layers: int = 1
    ffn_mult: int = 2                    # FFN width = ffn_mult x feature_dim (the reference: 2)
    period: int = 30                     # positional-encoding period and bias step (frames)
    dropout: float = 0.1
    audio_per_frame: int = 2             # audio feature slots per video frame (50 Hz features at 25 fps)
    freeze_audio_cnn: bool = True        # the reference freezes wav2vec2's convolutional feature extractor
    vertex_scale: float = 1000.0         # vertex loss in mm^2 (FLAME is in metres)
    subjects: tuple[str, ...] = ()       # style vocabulary: training subjects (filled in from the data)

    @property
    def expr_dims(self) -> int:
        return self.motion_dim - 1


def alibi_slopes(heads: int) -> torch.Tensor:
    """The reference's ``get_slopes``: a geometric series from 2^(-8/n) for a power of two n, and the
    interleaved completion from the next power of two otherwise."""
    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    if math.log2(heads).is_integer():
        return torch.tensor(power_of_two(heads))
    closest = 2 ** math.floor(math.log2(heads))
    return torch.tensor(power_of_two(closest) + alibi_slopes(2 * closest).tolist()[0::2][:heads - closest])


def biased_causal_mask(slopes: torch.Tensor, period: int, queries: torch.Tensor, keys: int) -> torch.Tensor:
    """[heads, len(queries), keys] additive mask: ``-slope * floor((i - j) / period)`` for key j <= query i,
    -inf after it (``queries``: absolute frame indices)."""
    j = torch.arange(keys, device=queries.device)
    dist = queries[:, None] - j[None]
    bias = -slopes.to(queries.device)[:, None, None] * torch.div(dist, period, rounding_mode="floor")
    return bias.masked_fill(dist[None] < 0, float("-inf"))


def alignment_mask(queries: torch.Tensor, slots: int, per_frame: int) -> torch.Tensor:
    """[len(queries), slots] bool, True where frame i may attend: audio slots per_frame*i .. per_frame*i + per_frame - 1."""
    s = torch.arange(slots, device=queries.device)
    return torch.div(s[None], per_frame, rounding_mode="floor") == queries[:, None]


def periodic_encoding(positions: torch.Tensor, dim: int, period: int) -> torch.Tensor:
    """[len(positions), dim]: the sinusoid of position ``p mod period`` (sin on even, cos on odd channels)."""
    phase = (positions % period).float()[:, None]
    div = torch.exp(torch.arange(0, dim, 2, device=positions.device).float() * (-math.log(_PE_BASE) / dim))
    pe = torch.zeros(len(positions), dim, device=positions.device)
    pe[:, 0::2] = torch.sin(phase * div)
    pe[:, 1::2] = torch.cos(phase * div)[:, :dim // 2]
    return pe


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        split = lambda y: y.reshape(b, y.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(ctx)), split(self.v(ctx))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype) if mask.is_floating_point() else mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).reshape(b, t, d))


class DecoderLayer(nn.Module):
    """Post-norm: x = LN(x + SelfAttn(x)); x = LN(x + CrossAttn(x, audio)); x = LN(x + FFN(x))."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = Attention(dim, heads, dropout)
        self.cross_attn = Attention(dim, heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keys: torch.Tensor, audio: torch.Tensor, self_mask: torch.Tensor,
                cross_mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.self_attn(x, keys, self_mask)))
        x = self.norm2(x + self.drop(self.cross_attn(x, audio, cross_mask)))
        return self.norm3(x + self.drop(self.ffn(x)))


class FaceFormer(nn.Module):
    def __init__(self, cfg: FaceFormerModelConfig, audio_encoder: nn.Module, normalize_audio: bool = True):
        super().__init__()
        if not cfg.subjects:
            raise ValueError("model.subjects: empty (the style vocabulary comes from the training records)")
        self.cfg = cfg
        self.normalize_audio = normalize_audio
        self.audio_encoder = audio_encoder
        if cfg.freeze_audio_cnn:
            for p in audio_encoder.feature_extractor.parameters():
                p.requires_grad_(False)
        dim = cfg.feature_dim
        self.audio_map = nn.Linear(audio_encoder.config.hidden_size, dim)
        self.motion_in = nn.Linear(cfg.motion_dim, dim)
        self.style = nn.Embedding(len(cfg.subjects), dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(DecoderLayer(dim, cfg.heads, cfg.ffn_mult * dim, cfg.dropout)
                                    for _ in range(cfg.layers))
        self.motion_out = nn.Linear(dim, cfg.motion_dim)
        nn.init.zeros_(self.motion_out.weight)   # the reference starts from the neutral face
        nn.init.zeros_(self.motion_out.bias)
        self.register_buffer("slopes", alibi_slopes(cfg.heads), persistent=False)

    # ------------------------------------------------------------------ audio
    def encode_audio(self, audio: torch.Tensor, audio_len: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """audio [B, S] at 16 kHz (padded), audio_len [B] samples, frames [B] -> [B, r * max(frames), dim]
        (r = audio slots per frame; zeros past each clip's own slots). Each clip is encoded alone."""
        r, slots = self.cfg.audio_per_frame, self.cfg.audio_per_frame * int(frames.max())
        out = []
        for b in range(audio.shape[0]):
            wave = audio[b, :int(audio_len[b])]
            if self.normalize_audio:
                wave = normalize_wave(wave.float()).to(audio.dtype)
            hidden = self.audio_encoder(wave[None]).last_hidden_state[0]
            feats = to_feature_slots(hidden, r * int(frames[b]))
            out.append(F.pad(feats, (0, 0, 0, slots - feats.shape[0])))
        return self.audio_map(torch.stack(out))

    # ------------------------------------------------------------------ decoder
    def decode(self, audio_feats: torch.Tensor, prev_motion: torch.Tensor, style: torch.Tensor,
               cache: Optional[list[Optional[torch.Tensor]]] = None) -> torch.Tensor:
        """Motion of the frames whose previous motion is ``prev_motion`` [B, T, motion_dim].

        Without ``cache`` these are frames 0..T-1. With ``cache`` (one entry per layer, None at the start)
        they continue after the frames already decoded through it, whose layer inputs it holds."""
        start = 0 if cache is None or cache[0] is None else cache[0].shape[1]
        t = prev_motion.shape[1]
        positions = torch.arange(start, start + t, device=prev_motion.device)
        x = self.motion_in(prev_motion) + self.style(style)[:, None]
        x = self.drop(x + periodic_encoding(positions, x.shape[-1], self.cfg.period).to(x.dtype))
        self_mask = biased_causal_mask(self.slopes, self.cfg.period, positions, start + t)[None]
        cross_mask = alignment_mask(positions, audio_feats.shape[1], self.cfg.audio_per_frame)[None, None]
        for i, layer in enumerate(self.layers):
            keys = x
            if cache is not None:
                keys = x if cache[i] is None else torch.cat([cache[i], x], 1)
                cache[i] = keys
            x = layer(x, keys, audio_feats, self_mask, cross_mask)
        return self.motion_out(x)

    def teacher_forced(self, audio_feats: torch.Tensor, motion: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """Training: frame t is predicted from the ground truth of frames < t."""
        prev = torch.cat([torch.zeros_like(motion[:, :1]), motion[:, :-1]], 1)
        return self.decode(audio_feats, prev, style)

    def forward(self, audio: torch.Tensor, audio_len: torch.Tensor, frames: torch.Tensor, motion: torch.Tensor,
                style: torch.Tensor) -> torch.Tensor:
        """Teacher-forced prediction [B, T, motion_dim] of ``motion`` [B, T, motion_dim] (T = max(frames))."""
        return self.teacher_forced(self.encode_audio(audio, audio_len, frames), motion, style)

    @torch.no_grad()
    def generate(self, audio: torch.Tensor, audio_len: torch.Tensor, frames: torch.Tensor,
                 style: torch.Tensor) -> torch.Tensor:
        """Autoregressive inference: [B, max(frames), motion_dim], each frame fed back as the next input."""
        feats = self.encode_audio(audio, audio_len, frames)
        cache: list[Optional[torch.Tensor]] = [None] * len(self.layers)
        prev = feats.new_zeros(feats.shape[0], 1, self.cfg.motion_dim)
        out = []
        for _ in range(int(frames.max())):
            prev = self.decode(feats, prev, style, cache)
            out.append(prev)
        return torch.cat(out, 1)
