"""Per-layer key/value cache for autoregressive inference.

Each attention layer that sees block-causal history (self-attention of both towers, both bridge
directions) stores the K/V of finished (clean) blocks under its own name. A rolling window keeps
the sink blocks (the reference frame) and the last ``window`` blocks; older entries can never be
seen again by a later query, so they are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .attention import MaskSpec, block_attention


@dataclass
class CacheEntry:
    k: torch.Tensor       # [B, L, H, D] (after norm and RoPE)
    v: torch.Tensor
    blocks: torch.Tensor  # [L] block id of each cached key


@dataclass
class KVCache:
    window: int = 0       # blocks of history kept besides the sink; 0 = keep everything
    sink: int = 1
    writing: bool = False  # True during the pass that commits a finished chunk's clean K/V
    entries: dict = field(default_factory=dict)

    def attend(self, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec,
               backend: str) -> torch.Tensor:
        """Attention of layer ``name``'s queries over its cached keys and the current ones; a writing
        pass first stores the current K/V."""
        prev = self.get(name)
        if self.writing:
            self.put(name, k, v, spec.k_blocks)
        if prev is not None:
            k = torch.cat([prev.k, k], dim=1)
            v = torch.cat([prev.v, v], dim=1)
            spec = spec.with_prefix_keys(prev.blocks, ("cache", prev.k.shape[1]))
        # the key length changes every chunk: a compiled flex kernel would recompile each time, while
        # the merged backend's dense pieces need no mask and no compilation
        return block_attention(q, k, v, spec, "merged" if backend == "auto" else backend)

    def get(self, name: str) -> Optional[CacheEntry]:
        return self.entries.get(name)

    def put(self, name: str, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor) -> None:
        old = self.entries.get(name)
        if old is not None:
            k = torch.cat([old.k, k], dim=1)
            v = torch.cat([old.v, v], dim=1)
            blocks = torch.cat([old.blocks, blocks])
        if self.window > 0:
            # the next query block is newest+1; it sees keys with block > newest+1-window
            newest = int(blocks.max())
            keep = (blocks > newest + 1 - self.window) | (blocks < self.sink)
            if not bool(keep.all()):
                idx = keep.nonzero().squeeze(1).to(k.device)
                k, v, blocks = k.index_select(1, idx), v.index_select(1, idx), blocks[keep]
        self.entries[name] = CacheEntry(k.detach(), v.detach(), blocks)

    def num_tokens(self) -> int:
        return sum(e.k.shape[1] for e in self.entries.values())

    def nbytes(self) -> int:
        return sum(e.k.numel() * e.k.element_size() + e.v.numel() * e.v.element_size()
                   for e in self.entries.values())

    def clear(self) -> None:
        self.entries.clear()
