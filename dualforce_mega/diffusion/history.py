"""How the autoregressive sampler provides the already generated frames to the model.

The sampler is one loop; only this object differs between the two ways of running it:

* ``CachedHistory`` — the model sees only the current chunk at its absolute ``frame_ids``; earlier
  blocks come from one per-layer ``KVCache`` per model forward of a pass (conditional and unconditional
  branches see different hidden states, so their K/V are separate rows: batched CFG keeps one cache of
  batch 2B, two-call CFG one cache per branch). After a chunk is finished the sampler runs a writing
  pass on the chunk's history form (below) that commits its K/V.
* ``RecomputeHistory`` — the reference: every pass re-runs the model over the whole history
  (every committed frame in its history form, then the current chunk) under the sliding-window
  block-causal mask. Recomputing only the window would not be equivalent: with W blocks of
  attention per layer the receptive field grows by W-1 blocks per layer (DESIGN §4).

History form: a finished chunk is committed as the model will see it from then on — its frames at
the sampler's history sigma (``diffusion.sample_history_sigma``, noised with seeded noise), pinned
frames (the reference) at sigma 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..models.kv_cache import KVCache


@dataclass
class PassInputs:
    video: torch.Tensor                 # [B, C, F, h, w] history (if any) + current chunk
    sigma_video: torch.Tensor           # [B, F]
    struct: Optional[torch.Tensor]      # [B, N, motion_dim]
    sigma_struct: Optional[torch.Tensor]
    frame_ids: torch.Tensor             # [F] absolute latent-frame ids (CPU long)
    window_blocks: int                  # mask window for the recompute path (the cache carries its own)


@dataclass
class Committed:
    """A finished chunk in its history form."""
    video: torch.Tensor                 # [B, C, f, h, w]
    sigma_video: torch.Tensor           # [B, f]
    struct: Optional[torch.Tensor]      # [B, n, motion_dim]
    sigma_struct: Optional[torch.Tensor]  # [B, f]


class CachedHistory:
    needs_writing_pass = True

    def __init__(self, window_blocks: int, keys: Sequence[str], caches: Optional[dict] = None):
        """``keys``: one per model forward of a pass; ``caches``: one per key (default a growing ``KVCache``
        each; the static sampler passes preallocated ``StaticKVCache``s)."""
        self.caches = caches or {k: KVCache(window=window_blocks) for k in keys}

    def cache(self, key: str) -> Optional[KVCache]:
        return self.caches[key]

    def assemble(self, video: torch.Tensor, sigma_video: torch.Tensor, struct: Optional[torch.Tensor],
                 sigma_struct: Optional[torch.Tensor], frame_ids: torch.Tensor) -> PassInputs:
        return PassInputs(video, sigma_video, struct, sigma_struct, frame_ids, 0)

    def append(self, committed: Committed) -> None:
        """Nothing to keep: the writing pass already stored the chunk's K/V."""

    def num_tokens(self) -> int:
        return sum(c.num_tokens() for c in self.caches.values())

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.caches.values())


class RecomputeHistory:
    needs_writing_pass = False

    def __init__(self, window_blocks: int):
        self.window_blocks = window_blocks
        self.past: Optional[Committed] = None    # every committed frame so far, concatenated

    def cache(self, key: str) -> Optional[KVCache]:
        return None

    def assemble(self, video: torch.Tensor, sigma_video: torch.Tensor, struct: Optional[torch.Tensor],
                 sigma_struct: Optional[torch.Tensor], frame_ids: torch.Tensor) -> PassInputs:
        p = self.past
        if p is None:
            return PassInputs(video, sigma_video, struct, sigma_struct, frame_ids, self.window_blocks)
        t = p.video.shape[2]
        if int(frame_ids[0]) != t:
            raise ValueError(f"recompute history holds {t} frames but the chunk starts at frame {int(frame_ids[0])}")
        full_struct = full_sigma_struct = None
        if struct is not None:
            full_struct = torch.cat([p.struct, struct], dim=1)
            full_sigma_struct = torch.cat([p.sigma_struct.to(sigma_struct), sigma_struct], dim=1)
        return PassInputs(torch.cat([p.video, video], dim=2),
                          torch.cat([p.sigma_video.to(sigma_video), sigma_video], dim=1),
                          full_struct, full_sigma_struct, torch.arange(int(frame_ids[-1]) + 1), self.window_blocks)

    def append(self, c: Committed) -> None:
        p = self.past
        if p is None:
            self.past = c
            return
        cat = (lambda a, b, d: None if a is None else torch.cat([a, b], dim=d))
        self.past = Committed(torch.cat([p.video, c.video], dim=2), torch.cat([p.sigma_video, c.sigma_video], dim=1),
                              cat(p.struct, c.struct, 1), cat(p.sigma_struct, c.sigma_struct, 1))

    def num_tokens(self) -> int:
        return 0 if self.past is None else self.past.video[0, 0].numel()

    def nbytes(self) -> int:
        tensors = [] if self.past is None else [t for t in (self.past.video, self.past.struct) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)
