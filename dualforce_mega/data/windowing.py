"""Training windows: W latent frames and the struct / FLAME / audio rows that belong to them.

A window starting at latent frame t0 re-bases time so its first latent frame becomes frame 0
(the clean reference). That frame keeps a single video frame, the *last* of its original span
(4*t0), so the window's rows are video frames 4*t0 .. 4*(t0+W-1) — exactly N_w = 1 + 4(W-1) of
them, matching what the model expects for frame_ids 0..W-1 — and audio frames
r*4*t0 .. r*(4*(t0+W-1)+1) - 1 with r audio frames per video frame (docs/INTERFACES.md).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .schema import ShardSchema


@dataclass(frozen=True)
class WindowSlices:
    latent: slice
    video_frames: slice   # struct / flame rows
    audio: slice


def window_slices(t0: int, window: int, schema: ShardSchema) -> WindowSlices:
    stride, r = schema.stride, schema.audio_per_video_frame
    first, last = stride * t0, stride * (t0 + window - 1)
    return WindowSlices(latent=slice(t0, t0 + window), video_frames=slice(first, last + 1),
                        audio=slice(r * first, r * (last + 1)))


def window_start(seed: int, epoch: int, key: str, latent_frames: int, window: int) -> int:
    """Window start for one clip in one epoch: a pure function of (seed, epoch, key).

    Keying on the sample (not on its position in the stream) keeps the choice identical however
    the stream is replayed or fast-forwarded; random.Random seeds strings through SHA-512, so it
    is stable across processes and Python hash randomisation.
    """
    if latent_frames < window:
        raise ValueError(f"sample {key!r}: {latent_frames} latent frames < window {window}")
    return random.Random(f"window:{seed}:{epoch}:{key}").randrange(latent_frames - window + 1)


def slice_window(tensors: dict[str, torch.Tensor], t0: int, window: int, schema: ShardSchema,
                 keep_text: bool) -> dict[str, torch.Tensor]:
    """Cut one window out of a full clip; every tensor comes back float32 and contiguous."""
    s = window_slices(t0, window, schema)
    out = {"video_latent": tensors["video_latent"][:, s.latent]}
    if "struct" in tensors:      # talking-head clip (video-only clips carry the video stream alone)
        out.update(struct=tensors["struct"][s.video_frames], kp_canonical=tensors["kp_canonical"],
                   audio=tensors["audio"][s.audio])
        # a clip without FLAME stacks with the others as zeros that flame_valid = 0 masks out of L_flame
        has_flame = "flame" in tensors
        out["flame"] = tensors["flame"][s.video_frames] if has_flame else \
            torch.zeros(out["struct"].shape[0], schema.dims["Q"])
        out["flame_valid"] = torch.tensor(float(has_flame))
    if keep_text and "text_emb" in tensors:
        out["text_emb"] = tensors["text_emb"]
    return {k: v.to(torch.float32).contiguous() for k, v in out.items()}
