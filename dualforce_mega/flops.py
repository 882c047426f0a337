"""Matmul FLOPs of a DualForce forward pass, derived from the config and the input shapes.

Counted: every linear / patch-conv / einsum (2 * M * K * N) and attention (4 * pairs * dim: q.k^T
and attn.v). Elementwise work (norms, RoPE, modulation, softmax) is not counted, as in the usual
MFU convention. Attention pairs come from the model's own layout (``models.layout``) so the count
follows the real block-causal masks:

  attention="causal"  only the (query, key) pairs the mask allows (what block-causal kernels compute;
                      the figure MFU is reported against)
  attention="dense"   Lq * Lk per masked attention (what the dense-mask reference computes)

The audio cross-attention is dense over each group's window in both modes (that is its kernel's
work). ``training_flops`` = 3 x forward (backward = 2 x forward), the model-FLOPs convention:
activation recomputation is not counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .models.attention import MaskSpec, prefix_plan
from .models.layout import audio_window_index, build_layout
from .timeline import Timeline

# backward pass = this many forward passes of matmul work (dgrad + wgrad)
BACKWARD_OVER_FORWARD = 2.0


@dataclass
class FlopCount:
    linear: float = 0.0      # forward FLOPs of linears, the patch conv and einsums
    attention: float = 0.0   # forward FLOPs of q.k^T and attn.v

    @property
    def forward(self) -> float:
        return self.linear + self.attention

    @property
    def training(self) -> float:
        return (1.0 + BACKWARD_OVER_FORWARD) * self.forward


def _linear(m: int, k: int, n: int) -> float:
    return 2.0 * m * k * n


def _pairs(spec: MaskSpec, attention: str) -> int:
    if attention == "dense":
        return spec.q_blocks.numel() * spec.k_blocks.numel()
    return sum((qe - qs) * sum(e - s for s, e in ranges) for qs, qe, ranges in prefix_plan(spec))


def _attn_proj(m_q: int, m_kv: int, dim: int) -> float:
    """q and o over the queries, k and v over the keys (all dim x dim)."""
    return 2 * _linear(m_q, dim, dim) + 2 * _linear(m_kv, dim, dim)


def forward_flops(cfg: ModelConfig, batch: int, frames: int, latent_hw: tuple[int, int], text_len: int = 0,
                  with_struct: bool = True, with_audio: bool = True, return_aux: bool = True,
                  attention: str = "causal") -> FlopCount:
    """FLOPs of ``DualForceModel(cfg)`` on ``batch`` clips of ``frames`` latent frames of ``latent_hw``.

    Inputs follow docs/INTERFACES.md: struct N = 1 + 4(F-1) tokens, audio A = N * audio_rate / fps
    frames, ``text_len`` text tokens (0 = no text). ``with_struct`` / ``with_audio`` say whether those
    inputs are given (they only count where the model has the matching modules).
    """
    if attention not in ("causal", "dense"):
        raise ValueError(f"attention={attention!r}: expected 'causal' or 'dense'")
    _, ph, pw = cfg.patch_size
    h, w = latent_hw
    if h % ph or w % pw:
        raise ValueError(f"latent_hw={latent_hw}: not divisible by model.patch_size={cfg.patch_size}")
    grid = (h // ph, w // pw)
    use_struct = with_struct and cfg.struct_tower
    layout = build_layout(cfg, torch.arange(frames), grid, use_struct, 0, torch.device("cpu"))
    d, b = cfg.dim, batch
    lv = frames * grid[0] * grid[1]
    tl = Timeline.of(cfg)
    n = tl.video_frames(frames)
    a = tl.audio_frames(frames) if with_audio and cfg.audio else 0
    text = text_len if cfg.text_dim > 0 else 0
    c = FlopCount()

    def tower_common(tokens: int, out_dim: int) -> None:
        c.linear += _linear(b * frames, cfg.freq_dim, d) + _linear(b * frames, d, d)   # time_embedding
        c.linear += _linear(b * frames, d, 6 * d)                                       # time_projection
        if a:
            c.linear += _linear(b * a, cfg.audio_dim, d) + _linear(b * a, d, d)       # audio_projector
        c.linear += _linear(b * tokens, d, out_dim)                                     # head

    def block(tokens: int, self_spec: MaskSpec, i: int, stream) -> None:
        c.linear += _attn_proj(b * tokens, b * tokens, d)
        c.attention += 4.0 * b * d * _pairs(self_spec, attention)
        c.linear += 2 * _linear(b * tokens, d, cfg.ffn_dim)
        if a and i < cfg.audio_layers:
            c.linear += _attn_proj(b * tokens, b * a, d)
            window = audio_window_index(cfg, stream, a)[0].shape[1]
            c.attention += 4.0 * b * tokens * window * d

    # video tower
    c.linear += _linear(b * lv, cfg.in_channels * math.prod(cfg.patch_size), d)       # patch_embedding
    tower_common(lv, cfg.out_channels * math.prod(cfg.patch_size))
    if text:
        c.linear += _linear(b * text, cfg.text_dim, d) + _linear(b * text, d, d)      # text_embedding
    for i in range(cfg.layers):
        block(lv, layout.spec("video", "video"), i, layout.video)
        if text:
            c.linear += _attn_proj(b * lv, b * text, d)
            c.attention += 4.0 * b * lv * text * d
    if not use_struct:
        return c
    # struct tower
    c.linear += _linear(b * n, cfg.motion_dim, d) + _linear(b * n, d, d)              # tokenizer
    c.linear += _linear(b, cfg.kp_dim, d) + _linear(b, d, d)                          # kp_embedding
    tower_common(n, cfg.motion_dim)
    for i in range(cfg.layers):
        block(n, layout.spec("struct", "struct"), i, layout.struct)
    # bridge
    for _ in range(cfg.fusion_depth):
        c.linear += _attn_proj(b * lv, b * n, d)                                       # s2v
        c.attention += 4.0 * b * d * _pairs(layout.spec("video", "struct"), attention)
        if cfg.bridge == "bidirectional":
            c.linear += _attn_proj(b * n, b * lv, d)                                   # v2s
            c.attention += 4.0 * b * d * _pairs(layout.spec("struct", "video"), attention)
    if return_aux:
        c.linear += _linear(b * n, cfg.motion_dim, cfg.flame_dim)                      # flame
        c.linear += _linear(b * frames, n, cfg.kp_dim)                                 # per-frame pooling einsum
        c.linear += _linear(b * frames, cfg.kp_dim, cfg.lipsync_dim) + _linear(b * frames, cfg.lipsync_dim,
                                                                              cfg.lipsync_dim)
        if a:
            c.linear += _linear(b * frames, cfg.audio_dim, cfg.lipsync_dim) + _linear(
                b * frames, cfg.lipsync_dim, cfg.lipsync_dim)
    return c


def training_flops(cfg: ModelConfig, batch: int, frames: int, latent_hw: tuple[int, int], **kw) -> float:
    """Model FLOPs of one training step (forward + backward) on ``batch`` clips."""
    return forward_flops(cfg, batch, frames, latent_hw, **kw).training
