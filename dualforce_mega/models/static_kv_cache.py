"""A KV cache whose shapes never change as the video grows: preallocated ring buffers.

Same interface as ``KVCache`` (``attend``, ``writing``), so the model runs unchanged; made for the
per-chunk forward being captured once (CUDA graphs) and replayed for every later chunk.

Per attention layer one buffer of keys / values, positions laid out as

    [ sink | R ring slots of ``per_block`` tokens | tail ]

* sink: the K/V of the sink blocks (chunk 0, the reference), written once;
* ring: block j >= sink lives in slot (j - sink) mod R. R = max(window - 1, chunk_blocks) (every
  block a query of the next chunk may see, and a whole chunk without collision); without a window
  R holds every block of the clip (``capacity_blocks``), still preallocated;
* tail: the current chunk's K/V, written at every call.

A block id per position (``PAD_BLOCK`` = empty, never visible) gives the mask, computed on the device
from ``MaskSpec``'s rule, so one dense SDPA call over the whole buffer is exact. With a window the sink
is moved before each query block's window (``attention`` module doc): the call's keys then start with
``chunk_blocks`` copies of the sink, copy j rotated for the chunk's j-th query block and visible to it
alone (static shapes, offsets computed on the device). Committing a chunk (a
writing pass) scatters its K/V and block ids into their ring slots with device-side indices: no host
synchronisation after the buffers exist. The buffers are allocated by the first call of the first
chunk after the sink chunk (eager, before any capture). ``reset`` empties the cache for a new
generation and keeps the buffers, so graphs captured on them stay valid.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from ..timeline import sink_offset_blocks
from .attention import PAD_BLOCK, MaskSpec, block_attention
from .rope import apply_rope


@dataclass
class _Ring:
    k: torch.Tensor          # [B, S + R * per_block + T, H, D]
    v: torch.Tensor
    blocks: torch.Tensor     # [S + R * per_block + T] block id per position
    sink_tokens: int         # S
    per_block: int
    slots: int               # R

    @property
    def tail(self) -> int:
        """First position of the current chunk's keys."""
        return self.sink_tokens + self.slots * self.per_block


@dataclass
class StaticKVCache:
    window: int                 # blocks a query sees besides the sink (0 = unbounded)
    chunk_blocks: int           # blocks per chunk after the sink chunk
    capacity_blocks: int = 0    # blocks of the whole clip (needed without a window)
    sink: int = 1
    writing: bool = False
    rings: dict = field(default_factory=dict)
    sinks: dict = field(default_factory=dict)   # name -> (k, v, blocks) of the sink chunk
    _sink_written: set = field(default_factory=set)  # layers whose sink chunk is stored (host-side state)

    def __post_init__(self) -> None:
        if self.window <= 0 and self.capacity_blocks <= self.sink:
            raise ValueError("StaticKVCache: without a window, capacity_blocks (blocks of the clip) must be given")

    @property
    def ring_slots(self) -> int:
        if self.window > 0:
            return max(self.window - 1, self.chunk_blocks)
        return self.capacity_blocks - self.sink

    # ------------------------------------------------------------------------------------
    def attend(self, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec,
               backend: str) -> torch.Tensor:
        ring = self.rings.get(name)
        if name not in self._sink_written:
            # the sink chunk (chunk 0): nothing cached yet, its own keys only
            if self.writing:
                self._store_sink(name, ring, k, v, spec.k_blocks)
            return block_attention(q, k, v, spec, backend)
        if ring is None:
            ring = self.rings[name] = self._allocate(name, k, spec.k_blocks)
        n = k.shape[1]
        t0 = ring.tail
        if n > ring.k.shape[1] - t0:
            raise ValueError(f"{name}: chunk of {n} keys exceeds the static cache's tail of {ring.k.shape[1] - t0}")
        ring.k[:, t0:t0 + n].copy_(k)
        ring.v[:, t0:t0 + n].copy_(v)
        ring.blocks[t0:t0 + n].copy_(spec.k_blocks)
        end = t0 + n
        keys, values = ring.k[:, :end], ring.v[:, :end]
        allowed = MaskSpec(spec.q_blocks, ring.blocks[:end], spec.window, spec.sink).allowed()
        if spec.moves_sink():
            keys, values, allowed = self._moved_sink(ring, keys, values, allowed, spec)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=allowed)
        if self.writing:
            self._commit(ring, k, v, spec.k_blocks)
        return out.transpose(1, 2)

    def _moved_sink(self, ring: _Ring, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor,
                    spec: MaskSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys ``[sink copy 0 .. sink copy C-1 | ring | tail]``: copy j is the sink rotated for query block
        ``q_blocks[0] + j`` and seen by that block alone (C = chunk_blocks; unused copies stay masked)."""
        s, c = ring.sink_tokens, self.chunk_blocks
        b, _, h, d = keys.shape
        copy_blocks = spec.q_blocks[:1] + torch.arange(c, device=keys.device)                       # [C]
        offsets = sink_offset_blocks(copy_blocks, spec.window, spec.sink).to(spec.sink_step.dtype)
        angles = (offsets[:, None] * spec.sink_step.to(keys.device)[None, :]).repeat_interleave(s, dim=0)
        sink_k = apply_rope(keys[:, :s].repeat(1, c, 1, 1), angles)
        sink_v = values[:, :s].repeat(1, c, 1, 1)
        sees_copy = spec.q_blocks[:, None] == copy_blocks.repeat_interleave(s)[None, :]
        return (torch.cat([sink_k, keys[:, s:]], dim=1), torch.cat([sink_v, values[:, s:]], dim=1),
                torch.cat([sees_copy & allowed[:, :1], allowed[:, s:]], dim=1))

    def _store_sink(self, name: str, ring: Optional[_Ring], k: torch.Tensor, v: torch.Tensor,
                    k_blocks: torch.Tensor) -> None:
        if bool((k_blocks >= self.sink).any()):
            raise ValueError(f"{name}: the static cache needs the sink blocks [0, {self.sink}) alone in the "
                             f"first chunk (chunk 0 = block 0)")
        if ring is None:
            self.sinks[name] = (k.detach().clone(), v.detach().clone(), k_blocks.clone())
        else:  # a later generation reuses the buffers (and any graph captured on them)
            if k.shape[1] != ring.sink_tokens or k.shape[0] != ring.k.shape[0]:
                raise ValueError(f"{name}: sink of {tuple(k.shape[:2])} (batch, tokens) does not fit the static "
                                 f"cache's ({ring.k.shape[0]}, {ring.sink_tokens}); use a new cache")
            ring.k[:, :ring.sink_tokens].copy_(k)
            ring.v[:, :ring.sink_tokens].copy_(v)
            ring.blocks[:ring.sink_tokens].copy_(k_blocks)
        self._sink_written.add(name)

    def reset(self) -> None:
        """Empty the cache for a new generation, keeping its buffers (and graphs captured on them)."""
        for ring in self.rings.values():
            ring.blocks.fill_(PAD_BLOCK)
        self._sink_written.clear()

    def _allocate(self, name: str, k: torch.Tensor, k_blocks: torch.Tensor) -> _Ring:
        """Buffers sized from the first chunk after the sink chunk (eager; one host read of its ids)."""
        ids = k_blocks.cpu()
        per_block = int((ids == ids[0]).sum())
        sink_k, sink_v, sink_ids = self.sinks.pop(name)
        s = sink_k.shape[1]
        b, n, h, d = k.shape
        total = s + self.ring_slots * per_block + n
        kbuf = k.new_zeros(b, total, h, d)
        vbuf = k.new_zeros(b, total, h, d)
        blocks = torch.full((total,), PAD_BLOCK, dtype=torch.long, device=k.device)
        kbuf[:, :s] = sink_k
        vbuf[:, :s] = sink_v
        blocks[:s] = sink_ids
        return _Ring(kbuf, vbuf, blocks, s, per_block, self.ring_slots)

    def _commit(self, ring: _Ring, k: torch.Tensor, v: torch.Tensor, k_blocks: torch.Tensor) -> None:
        """Scatter the chunk's K/V into ring slots ``(block - sink) mod R`` (device-side indices)."""
        first = torch.searchsorted(k_blocks, k_blocks)          # position of each key's block start
        offset = torch.arange(k_blocks.numel(), device=k_blocks.device) - first
        pos = ring.sink_tokens + ((k_blocks - self.sink) % ring.slots) * ring.per_block + offset
        ring.k.index_copy_(1, pos, k.to(ring.k.dtype))
        ring.v.index_copy_(1, pos, v.to(ring.v.dtype))
        ring.blocks.index_copy_(0, pos, k_blocks)

    # ------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        ring = sum(r.k.numel() * r.k.element_size() * 2 for r in self.rings.values())
        return ring + sum(k.numel() * k.element_size() * 2 for k, _, _ in self.sinks.values())

    def num_tokens(self) -> int:
        """Cached key positions (sink + ring capacity): constant once allocated."""
        return sum(r.tail for r in self.rings.values()) + sum(k.shape[1] for k, _, _ in self.sinks.values())

    def clear(self) -> None:
        self.rings.clear()
        self.sinks.clear()
        self._sink_written.clear()
