"""Shallow fusion bridge: cross-attention between the towers in the first ``fusion_depth`` layers.

``s2v``: video queries read struct keys; ``v2s``: struct queries read video keys (absent in the
``struct_to_video`` ablation). Both directions are block-causal and use 1D RoPE over the shared
latent-frame time axis. Output projections start at zero, so the towers start independent.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..config import ModelConfig
from .attention import MaskSpec
from .blocks import Attention
from .kv_cache import KVCache
from .layers import FP32LayerNorm


class BridgeLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_video = FP32LayerNorm(cfg.dim, eps=cfg.eps)
        self.norm_struct = FP32LayerNorm(cfg.dim, eps=cfg.eps)
        self.s2v = Attention(cfg.dim, cfg.heads, cfg.qk_norm, cfg.eps, cfg.attn_backend)
        self.v2s = (Attention(cfg.dim, cfg.heads, cfg.qk_norm, cfg.eps, cfg.attn_backend)
                    if cfg.bridge == "bidirectional" else None)
        self.activation_checkpointing = False   # recompute in the backward (set by parallel.parallelize)

    def zero_init(self) -> None:
        for attn in (self.s2v, self.v2s):
            if attn is not None:
                nn.init.zeros_(attn.o.weight)
                nn.init.zeros_(attn.o.bias)

    def forward(self, xv: torch.Tensor, xs: torch.Tensor, ang_v: torch.Tensor, ang_s: torch.Tensor,
                spec_vs: MaskSpec, spec_sv: MaskSpec, cache: Optional[KVCache] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.norm_video.weight.dtype
        nv, ns = self.norm_video(xv).to(dtype), self.norm_struct(xs).to(dtype)
        dv = self.s2v(nv, context=ns, q_angles=ang_v, k_angles=ang_s, spec=spec_vs, cache=cache)
        if self.v2s is not None:
            ds = self.v2s(ns, context=nv, q_angles=ang_s, k_angles=ang_v, spec=spec_sv, cache=cache)
            xs = xs + ds.float()
        return xv + dv.float(), xs
