"""Token layout of a forward pass: block ids, per-frame groups, RoPE angles, masks, audio windows.

Everything here is derived from the absolute latent-frame indices of the input and the config,
so training (frames 0..F-1), KV-cache chunks (frames t0..t0+c-1) and the sliding-window
reference all share one definition.

Time alignment (``dualforce_mega.timeline``): latent frame 0 holds video frame 0; latent frame t >= 1
holds video frames ``s*t - s + 1 .. s*t`` (s = VAE temporal stride, 4). The struct stream has one token
per video frame; its block id is the block of the latent frame holding that video frame.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import ModelConfig
from ..timeline import Timeline
from .attention import PAD_BLOCK, MaskSpec
from .audio import audio_windows
from .layers import TokenGroups
from .rope import rope_angles, video_axis_dims, video_positions


@dataclass
class StreamLayout:
    blocks: torch.Tensor          # [L] block id per token
    groups: TokenGroups           # token -> latent frame (sigma / modulation)
    angles: torch.Tensor          # [L, head_dim/2] self-attention RoPE
    bridge_angles: torch.Tensor   # [L, head_dim/2] 1D RoPE over latent-frame time (bridge)
    audio_spans: torch.Tensor     # [G_audio, 2] video-frame span per audio group
    audio_groups: TokenGroups     # token -> audio group
    key: tuple                    # hashable description (mask caches)
    sink_step: torch.Tensor       # [head_dim/2] ``angles`` of one causal block of time (moves the sink)
    bridge_sink_step: torch.Tensor  # [head_dim/2] the same for ``bridge_angles``
    # precomputed (index, valid) audio windows (``audio_window_index``) into the audio the forward
    # receives; None = computed from ``audio_spans`` by the forward (static-shape inference sets them)
    audio_window: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def to(self, device: torch.device) -> "StreamLayout":
        """Every tensor on ``device`` except ``audio_spans``, which the audio windows read on the host."""
        groups = self.groups.to(device)
        audio_groups = groups if self.audio_groups is self.groups else self.audio_groups.to(device)
        return StreamLayout(self.blocks.to(device), groups, self.angles.to(device),
                            self.bridge_angles.to(device), self.audio_spans, audio_groups, self.key,
                            self.sink_step.to(device), self.bridge_sink_step.to(device), self.audio_window)


@dataclass(frozen=True)
class VideoShard:
    """One rank's contiguous slice of the video token sequence under sequence parallelism.

    The ``tokens`` real tokens are padded to ``padded`` (a multiple of ``size``); rank r holds tokens
    ``[start, start + length)`` of the padded sequence, the first ``real`` of them real.
    """
    rank: int
    size: int
    tokens: int

    @property
    def length(self) -> int:
        return -(-self.tokens // self.size)

    @property
    def padded(self) -> int:
        return self.length * self.size

    @property
    def start(self) -> int:
        return self.rank * self.length

    @property
    def real(self) -> int:
        return max(0, min(self.length, self.tokens - self.start))


@dataclass
class Layout:
    frame_ids: torch.Tensor
    video: StreamLayout
    struct: Optional[StreamLayout]
    window: int
    sink: int
    # sequence parallelism (``shard_video``): ``video`` is this rank's shard; the full padded
    # sequence's block ids (padding = PAD_BLOCK) describe gathered video keys
    shard: Optional[VideoShard] = None
    video_full_blocks: Optional[torch.Tensor] = None
    video_full_key: tuple = ()

    def _side(self, name: str, full: bool) -> tuple[torch.Tensor, tuple]:
        if name == "video" and full and self.shard is not None:
            return self.video_full_blocks, self.video_full_key
        stream = getattr(self, name)
        return stream.blocks, stream.key

    def spec(self, q: str, k: str) -> MaskSpec:
        """Mask of attention from stream ``q`` to stream ``k``.

        Under sequence parallelism video keys are always the full padded sequence (all-to-all in
        video self-attention, all-gather in the struct->video bridge); video queries are the local
        shard, except in video self-attention where the all-to-all gives each rank every token.
        """
        qb, qkey = self._side(q, full=(q == k))
        kb, kkey = self._side(k, full=True)
        step = None
        if self.window > 0:
            keys = getattr(self, k)
            step = keys.sink_step if q == k else keys.bridge_sink_step
        return MaskSpec(qb, kb, self.window, self.sink, key=(q, k) + qkey + kkey, sink_step=step)


def shard_video(layout: Layout, rank: int, size: int) -> Layout:
    """The layout of rank ``rank``'s shard of the video tokens (sequence parallelism of ``size``).

    Padding tokens get block id ``PAD_BLOCK`` (no real query ever sees them), zero RoPE angles and
    the last frame's group (their outputs are dropped).
    """
    v = layout.video
    shard = VideoShard(rank, size, v.blocks.numel())
    start, length, pad = shard.start, shard.length, shard.padded - shard.tokens

    def rows(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros((pad,) + t.shape[1:])])[start:start + length]

    full_blocks = torch.cat([v.blocks, v.blocks.new_full((pad,), PAD_BLOCK)])
    groups = v.groups.narrow(start, length)
    video = StreamLayout(
        blocks=full_blocks[start:start + length],
        groups=groups,
        angles=rows(v.angles),
        bridge_angles=rows(v.bridge_angles),
        audio_spans=v.audio_spans,
        audio_groups=groups if v.audio_groups is v.groups else v.audio_groups.narrow(start, length),
        key=v.key + ("sp", rank, size),
        sink_step=v.sink_step,
        bridge_sink_step=v.bridge_sink_step,
    )
    return Layout(layout.frame_ids, video, layout.struct, layout.window, layout.sink, shard=shard,
                  video_full_blocks=full_blocks, video_full_key=v.key + ("padded", shard.padded))


def build_layout(cfg: ModelConfig, frame_ids: torch.Tensor, grid_hw: tuple[int, int], with_struct: bool,
                 window_blocks: int, device: torch.device) -> Layout:
    """The layout of ``frame_ids`` (host tensor), computed on the host and copied to ``device`` once, so
    that building it never waits for the device (its sizes depend on the values); ``frame_ids`` and the
    audio spans stay on the host."""
    ids = frame_ids.to(device="cpu", dtype=torch.long)
    host = torch.device("cpu")
    f = ids.numel()
    h, w = grid_hw
    hw = h * w
    tl = Timeline.of(cfg)
    cbs = cfg.causal_block_size
    hd = cfg.head_dim
    latent_block = tl.block_of(ids)
    spans = tl.spans(ids)
    id_key = tuple(frame_ids.tolist())

    frames = TokenGroups.uniform(f, hw, host)  # one group per latent frame, for sigma and audio alike
    # RoPE angles of one causal block of time: in latent frames for video and both bridge directions,
    # in video frames for the struct self-attention (its positions are video frames)
    block_t = torch.tensor([[cbs, 0, 0]])
    latent_step = rope_angles(torch.tensor([cbs]), (hd,), cfg.rope_theta)[0]
    video = StreamLayout(
        blocks=latent_block.repeat_interleave(hw),
        groups=frames,
        angles=rope_angles(video_positions(ids, h, w), video_axis_dims(hd), cfg.rope_theta),
        bridge_angles=rope_angles(ids.repeat_interleave(hw), (hd,), cfg.rope_theta),
        audio_spans=spans,
        audio_groups=frames,
        key=("v", id_key, hw, cbs),
        sink_step=rope_angles(block_t, video_axis_dims(hd), cfg.rope_theta)[0],
        bridge_sink_step=latent_step,
    )
    struct = None
    if with_struct:
        frame_of_token = tl.latent_of_video_frames(ids)
        vframe = tl.video_frame_ids(ids)
        n = vframe.numel()
        struct = StreamLayout(
            blocks=latent_block[frame_of_token],
            groups=TokenGroups(frame_of_token, f, None),
            angles=rope_angles(vframe, (hd,), cfg.rope_theta),
            bridge_angles=rope_angles(ids[frame_of_token], (hd,), cfg.rope_theta),
            audio_spans=torch.stack([vframe, vframe], dim=-1),
            audio_groups=TokenGroups.uniform(n, 1, host),
            key=("s", id_key, cbs),
            sink_step=rope_angles(torch.tensor([cbs * tl.stride]), (hd,), cfg.rope_theta)[0],
            bridge_sink_step=latent_step,
        ).to(device)
    return Layout(ids, video.to(device), struct, window_blocks, sink=1)


def audio_window_index(cfg: ModelConfig, stream: StreamLayout, num_audio: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    return audio_windows(stream.audio_spans, Timeline.of(cfg).audio_per_video_frame, cfg.audio_context, num_audio)
