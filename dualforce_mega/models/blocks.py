"""Attention layer, the Wan2.1-style DiT block and the modulated output head.

Parameter names follow Wan2.1 (``self_attn.q``, ``norm_q``, ``cross_attn``, ``norm3``, ``ffn.0``,
``modulation``, ``head.head``) so pretrained weights import key-for-key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch
import torch.nn as nn

from ..config import ModelConfig
from .attention import MaskSpec, block_attention, dense_attention
from .kv_cache import KVCache
from .layers import FeedForward, FP32LayerNorm, RMSNorm, TokenGroups
from .rope import apply_rope


# rows of the 6-row AdaLN modulation (shift, scale, gate for attention; shift, scale, gate for the FFN)
# that gate a residual branch: zero at initialisation (AdaLN-Zero), so every block starts as identity
GATE_ROWS = (2, 5)
MODULATION_ROWS = 6


@dataclass
class TextContext:
    """Text embeddings [B, L, dim] and which samples keep them ([B] bool; None = all). A dropped sample
    skips the text cross-attention: the form training's text dropout and text-free generation share."""
    emb: torch.Tensor
    keep: Optional[torch.Tensor] = None


def sample_mask(keep: Optional[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """``y`` [B, ...] with the rows of dropped samples (``keep`` False) zeroed; ``y`` when keep is None."""
    if keep is None:
        return y
    return y * keep.to(device=y.device, dtype=y.dtype).view(-1, *([1] * (y.dim() - 1)))


class SequenceParallelAttend(Protocol):
    """Hook for a block-causal attention whose video tokens are sharded over a sequence-parallel
    group (``dualforce_mega.parallel.sequence_parallel`` installs implementations)."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec,
                 backend: str) -> torch.Tensor: ...


class Attention(nn.Module):
    """Multi-head attention with QK RMSNorm and optional RoPE on either side.

    Self-attention when ``context`` is None, cross-attention otherwise. With a ``MaskSpec`` it is
    block-causal; with a ``KVCache`` the keys of finished blocks are read from (and, in a writing
    pass, appended to) the cache under ``cache_name``. ``sequence_parallel`` (None = off) replaces
    the block-causal call by one that communicates across the sequence-parallel group.
    """

    def __init__(self, dim: int, heads: int, qk_norm: bool = True, eps: float = 1e-6,
                 backend: str = "auto", context_dim: Optional[int] = None):
        super().__init__()
        kv_dim = context_dim or dim
        self.heads = heads
        self.backend = backend
        self.cache_name = ""  # set by the model; unique per layer
        self.sequence_parallel: Optional[SequenceParallelAttend] = None
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_q(self.q(x)).unflatten(-1, (self.heads, -1))

    def project_kv(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.norm_k(self.k(ctx)).unflatten(-1, (self.heads, -1))
        v = self.v(ctx).unflatten(-1, (self.heads, -1))
        return k, v

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                q_angles: Optional[torch.Tensor] = None, k_angles: Optional[torch.Tensor] = None,
                spec: Optional[MaskSpec] = None, cache: Optional[KVCache] = None) -> torch.Tensor:
        q = self.project_q(x)
        k, v = self.project_kv(x if context is None else context)
        if q_angles is not None:
            q = apply_rope(q, q_angles)
        if k_angles is not None:
            k = apply_rope(k, k_angles)
        return self.o(self.attend(q, k, v, spec, cache).flatten(-2))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: Optional[MaskSpec],
               cache: Optional[KVCache]) -> torch.Tensor:
        if spec is None:
            return dense_attention(q, k, v)
        if self.sequence_parallel is not None:
            if cache is not None:
                raise ValueError(f"{self.cache_name}: KV-cache inference does not run sequence-parallel")
            return self.sequence_parallel(q, k, v, spec, self.backend)
        if cache is not None:
            return cache.attend(self.cache_name, q, k, v, spec, self.backend)
        return block_attention(q, k, v, spec, self.backend)


class DiTBlock(nn.Module):
    """norm1 -> self-attn (AdaLN-gated); norm3 -> text cross-attn; gated audio cross-attn;
    norm2 -> GELU(tanh) FFN (AdaLN-gated). Modulation: learned (1,6,dim) table + per-frame e0, fp32.

    The residual stream ``x`` is fp32 (as in Wan); each branch computes in the parameters' dtype."""

    def __init__(self, cfg: ModelConfig, text: bool, audio: bool):
        super().__init__()
        from .audio import AudioCrossAttention  # local: audio imports Attention from here

        dim = cfg.dim
        self.norm1 = FP32LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = Attention(dim, cfg.heads, cfg.qk_norm, cfg.eps, cfg.attn_backend)
        if text:
            self.norm3 = FP32LayerNorm(dim, eps=cfg.eps, elementwise_affine=True)
            self.cross_attn = Attention(dim, cfg.heads, cfg.qk_norm, cfg.eps)
        else:
            self.norm3 = self.cross_attn = None
        self.audio_attn = AudioCrossAttention(cfg) if audio else None
        self.norm2 = FP32LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = FeedForward(dim, cfg.ffn_dim)
        table = torch.randn(1, MODULATION_ROWS, dim) / dim ** 0.5
        table[:, list(GATE_ROWS)] = 0.0
        self.modulation = nn.Parameter(table)
        self.activation_checkpointing = False   # recompute in the backward (set by parallel.parallelize)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, groups: TokenGroups, angles: torch.Tensor,
                spec: MaskSpec, text: Optional[TextContext] = None, audio=None,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        """x [B, L, dim] fp32 residual stream; e0 [B, G, 6, dim] per-frame modulation."""
        mod = self.modulation.float().unsqueeze(0) + e0  # [B, G, 6, dim]
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mod.unbind(2)
        dtype = self.modulation.dtype
        h = groups.modulate(self.norm1(x), shift_a, scale_a).to(dtype)
        x = groups.gated_add(x, self.self_attn(h, q_angles=angles, k_angles=angles, spec=spec, cache=cache),
                             gate_a)
        if self.cross_attn is not None and text is not None:
            y = self.cross_attn(self.norm3(x).to(dtype), context=text.emb)
            x = x + sample_mask(text.keep, y).float()
        if self.audio_attn is not None and audio is not None:
            x = self.audio_attn(x, audio)
        h = groups.modulate(self.norm2(x), shift_f, scale_f).to(dtype)
        return groups.gated_add(x, self.ffn(h), gate_f)


class Head(nn.Module):
    """Wan's output head: LayerNorm -> per-frame (shift, scale) -> Linear. Zero-initialised."""

    def __init__(self, dim: int, out_dim: int, eps: float):
        super().__init__()
        self.norm = FP32LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, e: torch.Tensor, groups: TokenGroups) -> torch.Tensor:
        mod = self.modulation.float().unsqueeze(0) + e.unsqueeze(2)  # [B, G, 2, dim]
        shift, scale = mod.unbind(2)
        return self.head(groups.modulate(self.norm(x), shift, scale).to(self.modulation.dtype))
