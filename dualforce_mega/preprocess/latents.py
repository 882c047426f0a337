"""Step 03: Wan VAE latents of a cropped clip, plus single-image reference encodings.

``video_latent [16, F, h, w]``: the clip (N = 1 + 4(F-1) frames) through ``AutoencoderKLWan``,
normalised with the VAE config's ``latents_mean`` / ``latents_std`` (:class:`WanVAE`).

``ref_latent [R, 16, h, w]`` + ``ref_positions [R]``: at inference the clean reference latent is
the encoding of ONE image, while in a video latent every frame t >= 1 mixes 4 video frames. So for
every allowed window start t0 (every ``ref_every``-th latent frame) the video frame ``4 * t0`` (the
frame a window starting at t0 sees as its first struct row) is encoded alone, as an image. The
loader starts windows only at ``ref_positions`` and puts ``ref_latent[i]`` in place of the window's
first latent frame, so training sees the reference exactly as inference makes it.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from ..encoders.vae import WanVAE

log = logging.getLogger(__name__)


def to_model_range(frames: np.ndarray) -> torch.Tensor:
    """uint8 RGB [T, H, W, 3] -> float [3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def ref_positions(num_latent_frames: int, every: int) -> list[int]:
    """Allowed window starts: 0, every, 2*every, ... below ``num_latent_frames``."""
    if every < 1:
        raise ValueError(f"ref_every: {every} must be >= 1")
    return list(range(0, num_latent_frames, every))


@torch.no_grad()
def encode_clips(vae: WanVAE, clips: Sequence[np.ndarray], ref_every: int, image_batch: int
                 ) -> list[dict[str, torch.Tensor]]:
    """Latents of equally long clips in one batched VAE call, and their reference images in batches.

    Each clip is uint8 RGB [N, H, W, 3] with N = 1 + temporal_stride * k."""
    stride = vae.temporal_stride
    n = clips[0].shape[0]
    if any(c.shape != clips[0].shape for c in clips):
        raise ValueError("encode_clips: clips in one batch must have the same shape")
    if (n - 1) % stride:
        raise ValueError(f"encode_clips: {n} frames is not 1 + {stride} * k")
    video = torch.stack([to_model_range(c) for c in clips])
    latents = vae.encode_video(video).cpu()
    f = latents.shape[2]
    pos = ref_positions(f, ref_every)
    out = []
    for clip, lat in zip(clips, latents):
        images = to_model_range(clip[[stride * t for t in pos]]).permute(1, 0, 2, 3)   # [R, 3, H, W]
        refs = torch.cat([vae.encode_image(images[i:i + image_batch]).cpu()
                          for i in range(0, len(pos), image_batch)])
        out.append({"video_latent": lat.to(torch.bfloat16).contiguous(),
                    "ref_latent": refs.to(torch.bfloat16).contiguous(),
                    "ref_positions": torch.tensor(pos, dtype=torch.int64)})
    return out


__all__ = ["to_model_range", "ref_positions", "encode_clips"]
