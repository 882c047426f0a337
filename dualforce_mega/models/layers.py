"""Small building blocks shared by both towers: norms, sigma embedding, FFN, per-frame modulation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (Wan's QK norm: over the full model dim, before the head split)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in fp32 and cast back (modulation math is fp32 throughout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan-style sinusoidal embedding ``[cos | sin]`` of (any-shaped) timesteps, in fp32 (float64 math)."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.to(torch.float64).unsqueeze(-1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).float()


class FeedForward(nn.Sequential):
    """Linear -> GELU(tanh) -> Linear; indices 0 and 2 match Wan's ``ffn.0`` / ``ffn.2`` keys."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))


def embed_sigma(time_embedding: nn.Module, time_projection: nn.Module, sigma: torch.Tensor,
                freq_dim: int, timestep_scale: float, extra: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame sigma [B, G] -> (e [B, G, dim], e0 [B, G, n_mod, dim]), both fp32.

    Wan's path: sinusoid of the timestep (sigma * 1000) -> ``time_embedding`` MLP -> SiLU ->
    ``time_projection`` to n_mod * dim. ``extra`` [B, dim] is a global conditioning vector added
    to every frame's embedding before the projection.
    """
    emb = sinusoidal_embedding(sigma * timestep_scale, freq_dim)
    dtype = time_embedding[0].weight.dtype
    e = time_embedding(emb.to(dtype)).float()
    if extra is not None:
        e = e + extra.float().unsqueeze(1)
    e0 = time_projection(e.to(dtype)).float()
    return e, e0.unflatten(-1, (-1, e.shape[-1]))


def sigma_embedding_modules(dim: int, freq_dim: int, n_mod: int = 6) -> tuple[nn.Sequential, nn.Sequential]:
    """(time_embedding, time_projection) with Wan's layout (keys ``.0``/``.2`` and ``.1``)."""
    return (nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim)),
            nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * n_mod)))


@dataclass
class TokenGroups:
    """How a token sequence maps onto per-frame quantities (sigma, modulation, audio windows).

    ``group`` [L] is each token's group (frame) index into a per-frame tensor. When every group
    owns ``per_group`` consecutive tokens, per-frame tensors broadcast without a gather.
    ``start`` > 0 (or fewer tokens than ``num_groups * per_group``) marks a contiguous slice of such a
    uniform sequence beginning at token ``start`` (a sequence-parallel shard): modulation and the
    audio cross-attention pad such a slice to whole groups, ``expand`` gathers per token.
    """
    group: torch.Tensor
    num_groups: int
    per_group: Optional[int] = None
    start: int = 0

    @staticmethod
    def uniform(num_groups: int, per_group: int, device: torch.device) -> "TokenGroups":
        idx = torch.arange(num_groups, device=device).repeat_interleave(per_group)
        return TokenGroups(idx, num_groups, per_group)

    def to(self, device: torch.device) -> "TokenGroups":
        return TokenGroups(self.group.to(device), self.num_groups, self.per_group, self.start)

    def expand(self, per_frame: torch.Tensor) -> torch.Tensor:
        """[B, G, ...] -> [B, L, ...] (a view when groups are uniform)."""
        if self.is_uniform(self.group.numel()):
            b, g = per_frame.shape[:2]
            rest = per_frame.shape[2:]
            return per_frame.unsqueeze(2).expand(b, g, self.per_group, *rest).reshape(b, g * self.per_group, *rest)
        return per_frame[:, self.group]

    def is_uniform(self, num_tokens: int) -> bool:
        """True when ``num_tokens`` tokens are exactly ``num_groups`` whole groups of ``per_group``."""
        return self.per_group is not None and self.start == 0 and num_tokens == self.num_groups * self.per_group

    def _per_frame_op(self, x: torch.Tensor, per_frame: tuple[torch.Tensor, ...], fn) -> torch.Tensor:
        """``fn(x, *per_frame)`` with per-frame tensors [B, G, D] broadcast over x [B, L, D].

        Uniform groups broadcast as views; a slice of uniform groups (sequence-parallel shard) is
        zero-padded to whole groups so it broadcasts too (no [B, L, D] gather of per-frame tensors);
        other groupings gather per token.
        """
        n_tok = x.shape[1]
        if self.is_uniform(n_tok):
            out = fn(x.unflatten(1, (self.num_groups, self.per_group)), *(p.unsqueeze(2) for p in per_frame))
            return out.flatten(1, 2)
        if self.per_group is not None:
            pg = self.per_group
            first, lead = divmod(self.start, pg)
            n = -(-(lead + n_tok) // pg)
            idx = torch.arange(first, first + n, device=x.device).clamp_max(self.num_groups - 1)
            xp = F.pad(x, (0, 0, lead, n * pg - lead - n_tok))
            out = fn(xp.unflatten(1, (n, pg)), *(p[:, idx].unsqueeze(2) for p in per_frame))
            return out.flatten(1, 2)[:, lead:lead + n_tok]
        return fn(x, *(p[:, self.group] for p in per_frame))

    def modulate(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """fp32 ``x * (1 + scale) + shift`` with per-frame shift/scale [B, G, D] -> [B, L, D]."""
        return self._per_frame_op(x, (shift, scale), lambda xv, sh, sc: xv.float() * (1.0 + sc) + sh)

    def gated_add(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Residual ``x + y * gate`` with a per-frame gate [B, G, D], computed in fp32."""
        out = self._per_frame_op(y, (gate,), lambda yv, g: yv.float() * g)
        return (x.float() + out).to(x.dtype)

    def narrow(self, start: int, length: int) -> "TokenGroups":
        """The groups of the contiguous token slice ``[start, start + length)`` (sequence-parallel shards).

        Tokens past the end (padding of the last shard) belong to the last group.
        """
        total = self.group.numel()
        idx = torch.arange(start, start + length, device=self.group.device).clamp_max(max(total - 1, 0))
        if self.per_group is not None and self.start == 0 and total == self.num_groups * self.per_group:
            return TokenGroups(self.group[idx], self.num_groups, self.per_group, start)
        return TokenGroups(self.group[idx], self.num_groups, None)


def init_linear(m: nn.Module) -> None:
    """Xavier-uniform weights, zero biases — Wan's initialisation for its linears."""
    for mod in m.modules():
        if isinstance(mod, nn.Linear):
            nn.init.xavier_uniform_(mod.weight)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)

