"""Autoregressive sampling schedule: which latent frames form each chunk, and which sigma every
block of a chunk carries at every denoising pass.

Shared by the KV-cache and the recompute samplers, so both run exactly the same passes.

Chunks. Block ``b`` holds latent frames ``b*k .. b*k+k-1`` (k = ``causal_block_size``). Chunk 0 is
block 0 alone (it holds the clean reference frame, the attention sink); chunk i >= 1 holds blocks
``1+(i-1)*c .. i*c`` (c = ``chunk_blocks``), the last chunk possibly shorter (and its last block
possibly partial).

Pyramid / asynchronous schedule. With N steps and lag a = ``ar_step``, a chunk of c blocks runs
``N + (c-1)*a`` passes. At pass p block j (0-based inside the chunk) has completed
``level_j = clamp(p - j*a, 0, N)`` Euler steps and sits at ``sigmas[level_j]``; it takes a step in
pass p iff ``0 <= p - j*a < N``. So block j starts from pure noise when block j-1 has already
taken a steps (its predecessor is a levels less noisy); a = 0 is the synchronous schedule
(every block of the chunk on the same sigma).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..timeline import Timeline


@dataclass(frozen=True)
class Chunk:
    index: int
    start: int     # first latent frame (inclusive)
    end: int       # last latent frame + 1

    @property
    def frame_ids(self) -> torch.Tensor:
        return torch.arange(self.start, self.end)


def plan_chunks(num_latent: int, causal_block_size: int, chunk_blocks: int) -> list[Chunk]:
    """Partition latent frames 0..num_latent-1 into chunks (see module doc)."""
    if num_latent < 1:
        raise ValueError(f"num_latent={num_latent}: need at least the reference frame")
    if causal_block_size < 1 or chunk_blocks < 1:
        raise ValueError(f"causal_block_size={causal_block_size}, chunk_blocks={chunk_blocks} must be >= 1")
    k = causal_block_size
    chunks = [Chunk(0, 0, min(k, num_latent))]
    start = chunks[0].end
    while start < num_latent:
        end = min(start + chunk_blocks * k, num_latent)
        chunks.append(Chunk(len(chunks), start, end))
        start = end
    return chunks


@dataclass(frozen=True)
class Pass:
    """One model evaluation inside a chunk: per block, the sigma it is at and the sigma it steps to."""
    sigma: torch.Tensor       # [c] current sigma per block
    sigma_next: torch.Tensor  # [c] after this pass (== sigma for blocks that do not move)
    active: torch.Tensor      # [c] bool, block takes an Euler step in this pass


def pyramid_passes(num_blocks: int, sigmas: torch.Tensor, ar_step: int) -> list[Pass]:
    """The passes of one chunk of ``num_blocks`` blocks over the decreasing grid ``sigmas`` [N+1]."""
    if ar_step < 0:
        raise ValueError(f"diffusion.ar_step={ar_step} must be >= 0")
    steps = sigmas.numel() - 1
    lag = torch.arange(num_blocks) * ar_step
    passes = []
    for p in range(steps + (num_blocks - 1) * ar_step):
        done = (p - lag).clamp(0, steps)
        active = (p - lag >= 0) & (p - lag < steps)
        nxt = torch.where(active, done + 1, done)
        passes.append(Pass(sigmas[done], sigmas[nxt], active))
    return passes


def block_of_frames(frame_ids: torch.Tensor, causal_block_size: int) -> torch.Tensor:
    """Index (0-based inside the chunk) of each frame's block."""
    blocks = Timeline(block=causal_block_size).block_of(frame_ids)
    return blocks - blocks[0]
