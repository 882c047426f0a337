"""The one home of frame arithmetic: latent frames <-> video frames <-> audio frames <-> causal blocks,
and the sliding-window / sink rules of generation.

Time alignment (Wan VAE, temporal stride s = ``model.vae_temporal_stride``): latent frame 0 holds video
frame 0 alone; latent frame t >= 1 holds video frames ``s*t - s + 1 .. s*t``. So F latent frames cover
``N = 1 + s*(F-1)`` video frames, and ``r = audio_rate / fps`` audio feature frames belong to each video
frame (video frame n owns audio frames ``r*n .. r*n + r - 1``; audio is indexed from video frame 0).

Causal blocks: block b holds latent frames ``b*k .. b*k + k - 1`` (k = ``model.causal_block_size``).

Two roundings from video frames to latent frames, named for what they answer:
  ``latent_frames_covering(N)``  the fewest latent frames whose video frames include 0..N-1 (round up):
                                 what a generator must produce to show N frames;
  ``latent_frames_within(N)``    the most latent frames all of whose video frames lie in 0..N-1 (round
                                 down): what can be cut from a clip of N frames.

Sliding-window generation (``window_blocks`` = W): query block i sees the sink (blocks ``0..sink-1``,
the reference) and blocks ``i-W+1 .. i``. The sink's keys are moved in RoPE time to sit right before
the window (``sink_offset_blocks``), so a query never sees a latent-frame distance larger than
``(W + sink) * k - 1`` (``max_latent_distance``), which the default window keeps within a training
window (``training_window_blocks``).

This module depends on nothing in the package but the config, so the data pipeline can use it too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .config import ModelConfig

SINK_BLOCKS = 1    # the reference block (clean latent frame 0) is the attention sink


@dataclass(frozen=True)
class WindowSlices:
    """Rows of one training window of a clip (see ``Timeline.window_slices``)."""
    latent: slice
    video_frames: slice   # struct / FLAME rows
    audio: slice


@dataclass(frozen=True)
class Timeline:
    stride: int = 4           # video frames per latent frame (after frame 0)
    fps: int = 25             # video frames per second
    audio_rate: int = 50      # audio feature frames per second
    block: int = 1            # latent frames per causal block

    def __post_init__(self) -> None:
        if self.stride < 1 or self.block < 1 or self.fps < 1:
            raise ValueError(f"timeline: stride={self.stride}, block={self.block}, fps={self.fps} must be >= 1")
        if self.audio_rate % self.fps:
            raise ValueError(f"timeline: audio_rate={self.audio_rate} must be a multiple of fps={self.fps}")

    @classmethod
    def of(cls, m: ModelConfig) -> "Timeline":
        return cls(stride=m.vae_temporal_stride, fps=m.fps, audio_rate=m.audio_rate, block=m.causal_block_size)

    # ------------------------------------------------------------------ latent <-> video
    def video_frames(self, latent_frames: int) -> int:
        """N = 1 + s*(F-1) video frames held by latent frames 0..F-1 (0 for F = 0)."""
        return 1 + self.stride * (latent_frames - 1) if latent_frames > 0 else 0

    def latent_frames_covering(self, video_frames: int) -> int:
        """Fewest latent frames whose video frames include frames 0..N-1: 1 + ceil((N-1)/s)."""
        if video_frames < 1:
            raise ValueError(f"frames={video_frames}: need at least one video frame")
        return 1 + -(-(video_frames - 1) // self.stride)

    def latent_frames_within(self, video_frames: int) -> int:
        """Most latent frames whose video frames all lie in 0..N-1: 1 + floor((N-1)/s)."""
        if video_frames < 1:
            raise ValueError(f"frames={video_frames}: need at least one video frame")
        return 1 + (video_frames - 1) // self.stride

    def spans(self, frame_ids: torch.Tensor) -> torch.Tensor:
        """Inclusive video-frame span [F, 2] of each latent frame id."""
        end = frame_ids * self.stride
        start = torch.where(frame_ids == 0, torch.zeros_like(end), end - self.stride + 1)
        return torch.stack([start, end], dim=-1)

    def video_counts(self, frame_ids: torch.Tensor) -> torch.Tensor:
        """Video frames [F] held by each latent frame id (1 for frame 0, s otherwise)."""
        spans = self.spans(frame_ids)
        return spans[:, 1] - spans[:, 0] + 1

    def first_video_frame(self, latent_frame: int) -> int:
        return int(self.spans(torch.tensor([latent_frame]))[0, 0])

    def latent_of_video_frames(self, frame_ids: torch.Tensor) -> torch.Tensor:
        """For the video frames of latent frames ``frame_ids`` (in order), the position [N] in
        ``frame_ids`` of the latent frame holding each (struct token -> its latent frame)."""
        return torch.arange(frame_ids.numel(), device=frame_ids.device).repeat_interleave(self.video_counts(frame_ids))

    def video_frame_ids(self, frame_ids: torch.Tensor) -> torch.Tensor:
        """Absolute video-frame index [N] of every video frame of latent frames ``frame_ids``."""
        return torch.cat([torch.arange(int(s), int(e) + 1, device=frame_ids.device)
                          for s, e in self.spans(frame_ids).tolist()])

    # ------------------------------------------------------------------ audio
    @property
    def audio_per_video_frame(self) -> int:
        return self.audio_rate // self.fps

    def audio_frames(self, latent_frames: int) -> int:
        """A = N * r audio frames of latent frames 0..F-1."""
        return self.video_frames(latent_frames) * self.audio_per_video_frame

    # ------------------------------------------------------------------ blocks
    def block_of(self, frame_ids: torch.Tensor) -> torch.Tensor:
        """Causal block id of each latent frame id."""
        return frame_ids // self.block

    def num_blocks(self, latent_frames: int) -> int:
        """Blocks touched by latent frames 0..F-1 (the last one may be partial)."""
        return -(-latent_frames // self.block)

    # ------------------------------------------------------------------ training windows
    def window_slices(self, t0: int, window: int) -> WindowSlices:
        """Rows of the window of ``window`` latent frames starting at latent frame ``t0``.

        The window is re-based so latent frame t0 becomes its frame 0 (the clean reference); that frame
        keeps one video frame, the last of its span (s*t0), so the rows are video frames
        s*t0 .. s*(t0+W-1): exactly ``video_frames(W)`` of them, as the model expects for frame ids
        0..W-1, and their audio."""
        r = self.audio_per_video_frame
        first, last = self.stride * t0, self.stride * (t0 + window - 1)
        return WindowSlices(latent=slice(t0, t0 + window), video_frames=slice(first, last + 1),
                            audio=slice(r * first, r * (last + 1)))

    def reference_video_frame(self, t0: int) -> int:
        """The video frame a window starting at latent frame ``t0`` uses as its reference image."""
        return self.stride * t0

    # ------------------------------------------------------------------ sliding-window generation
    def training_window_blocks(self, window: int) -> int:
        """The default sampling window (blocks besides the sink) for training windows of ``window``
        latent frames: the most W with ``max_latent_distance(W) <= window - 1``."""
        w = window // self.block - SINK_BLOCKS
        if w < 1:
            raise ValueError(f"data.window={window}: a training window must hold the sink block and at least "
                             f"one more block of model.causal_block_size={self.block} latent frames")
        return w

    def max_latent_distance(self, window_blocks: int) -> Optional[int]:
        """Largest query-key latent-frame distance with a window of ``window_blocks`` blocks and the sink
        placed right before it (None = unbounded, ``window_blocks`` 0)."""
        return (window_blocks + SINK_BLOCKS) * self.block - 1 if window_blocks > 0 else None


def sink_offset_blocks(query_blocks: torch.Tensor, window_blocks: int, sink: int = SINK_BLOCKS) -> torch.Tensor:
    """How many blocks the sink keys are moved later in time for queries in ``query_blocks``: the sink
    (blocks 0..sink-1) then sits right before the query's window (blocks i-W+1..i), as the reference
    frame sits before the rest of a training window. 0 while the window still reaches the sink."""
    if window_blocks <= 0:
        return torch.zeros_like(query_blocks)
    return (query_blocks - window_blocks + 1 - sink).clamp_min(0)


def sampling_window_blocks(window_blocks: int, data_window: Optional[int], timeline: Timeline) -> int:
    """Resolve ``diffusion.window_blocks``: -1 follows the training window ``data.window``; 0 is
    unbounded history; W > 0 is explicit."""
    if window_blocks >= 0:
        return window_blocks
    if data_window is None:
        raise ValueError("diffusion.window_blocks=-1 follows the training window: give the training "
                         "config's data.window")
    return timeline.training_window_blocks(data_window)


__all__ = ["Timeline", "WindowSlices", "SINK_BLOCKS", "sink_offset_blocks", "sampling_window_blocks"]
