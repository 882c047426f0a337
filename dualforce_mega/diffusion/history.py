"""How the autoregressive sampler provides the already generated (clean) frames to the model.

The sampler is one loop; only this object differs between the two ways of running it:

* ``CachedHistory`` — the model sees only the current chunk at its absolute ``frame_ids``; earlier
  blocks come from one per-layer ``KVCache`` per guidance branch (conditional and unconditional
  branches see different hidden states, so they cannot share K/V). After a chunk is finished the
  sampler runs a writing pass (sigma 0 on the clean chunk) that commits its K/V.
* ``RecomputeHistory`` — the reference: every pass re-runs the model over the whole history
  (all clean frames so far at sigma 0, then the current chunk) under the sliding-window
  block-causal mask. Recomputing only the window would not be equivalent: with W blocks of
  attention per layer the receptive field grows by W-1 blocks per layer (DESIGN §4).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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


class CachedHistory:
    needs_writing_pass = True

    def __init__(self, window_blocks: int, branches: tuple[str, ...], caches: Optional[dict] = None):
        """``caches``: one per branch (default a growing ``KVCache`` each; the static sampler passes
        preallocated ``StaticKVCache``s)."""
        self.caches = caches or {b: KVCache(window=window_blocks) for b in branches}

    def cache(self, branch: str) -> Optional[KVCache]:
        return self.caches[branch]

    def assemble(self, video: torch.Tensor, sigma_video: torch.Tensor, struct: Optional[torch.Tensor],
                 sigma_struct: Optional[torch.Tensor], frame_ids: torch.Tensor) -> PassInputs:
        return PassInputs(video, sigma_video, struct, sigma_struct, frame_ids, 0)

    def append(self, video: torch.Tensor, struct: Optional[torch.Tensor]) -> None:
        """Nothing to keep: the writing pass already stored the chunk's K/V."""

    def num_tokens(self) -> int:
        return sum(c.num_tokens() for c in self.caches.values())

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.caches.values())


class RecomputeHistory:
    needs_writing_pass = False

    def __init__(self, window_blocks: int):
        self.window_blocks = window_blocks
        self.video: Optional[torch.Tensor] = None   # [B, C, T, h, w] all clean frames so far
        self.struct: Optional[torch.Tensor] = None  # [B, N_T, motion_dim]

    def cache(self, branch: str) -> Optional[KVCache]:
        return None

    def assemble(self, video: torch.Tensor, sigma_video: torch.Tensor, struct: Optional[torch.Tensor],
                 sigma_struct: Optional[torch.Tensor], frame_ids: torch.Tensor) -> PassInputs:
        if self.video is None:
            return PassInputs(video, sigma_video, struct, sigma_struct, frame_ids, self.window_blocks)
        t = self.video.shape[2]
        if int(frame_ids[0]) != t:
            raise ValueError(f"recompute history holds {t} frames but the chunk starts at frame {int(frame_ids[0])}")
        b = video.shape[0]
        zeros = sigma_video.new_zeros(b, t)
        full_struct = full_sigma_struct = None
        if struct is not None:
            full_struct = torch.cat([self.struct, struct], dim=1)
            full_sigma_struct = torch.cat([zeros, sigma_struct], dim=1)
        return PassInputs(torch.cat([self.video, video], dim=2), torch.cat([zeros, sigma_video], dim=1),
                          full_struct, full_sigma_struct, torch.arange(int(frame_ids[-1]) + 1), self.window_blocks)

    def append(self, video: torch.Tensor, struct: Optional[torch.Tensor]) -> None:
        self.video = video if self.video is None else torch.cat([self.video, video], dim=2)
        if struct is not None:
            self.struct = struct if self.struct is None else torch.cat([self.struct, struct], dim=1)

    def num_tokens(self) -> int:
        return 0 if self.video is None else self.video[0, 0].numel()

    def nbytes(self) -> int:
        tensors = [t for t in (self.video, self.struct) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)
