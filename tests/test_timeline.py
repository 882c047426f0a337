"""The one home of frame arithmetic (dualforce_mega/timeline.py), against hand-computed values."""
from __future__ import annotations

import pytest
import torch

from dualforce_mega.timeline import Timeline, sampling_window_blocks, sink_offset_blocks

TL = Timeline(stride=4, fps=25, audio_rate=50, block=1)


def test_latent_video_audio_frames() -> None:
    assert [TL.video_frames(f) for f in (0, 1, 2, 3, 9)] == [0, 1, 5, 9, 33]
    assert [TL.audio_frames(f) for f in (1, 3)] == [2, 18]
    # 1..9 video frames: covering rounds up, within rounds down
    assert [TL.latent_frames_covering(n) for n in (1, 2, 5, 6, 9, 10)] == [1, 2, 2, 3, 3, 4]
    assert [TL.latent_frames_within(n) for n in (1, 2, 5, 6, 9, 10)] == [1, 1, 2, 2, 3, 3]
    for n in range(1, 40):
        assert TL.video_frames(TL.latent_frames_covering(n)) >= n >= TL.video_frames(TL.latent_frames_within(n))


def test_spans_tokens_and_blocks() -> None:
    ids = torch.tensor([0, 1, 2])
    assert TL.spans(ids).tolist() == [[0, 0], [1, 4], [5, 8]]
    assert TL.video_counts(ids).tolist() == [1, 4, 4]
    assert TL.latent_of_video_frames(ids).tolist() == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert TL.video_frame_ids(torch.tensor([2, 3])).tolist() == list(range(5, 13))
    assert TL.first_video_frame(3) == 9 and TL.first_video_frame(0) == 0
    k2 = Timeline(block=2)
    assert k2.block_of(torch.arange(5)).tolist() == [0, 0, 1, 1, 2] and k2.num_blocks(5) == 3


def test_window_slices_and_reference_frame() -> None:
    s = TL.window_slices(2, 3)
    # latent frames 2..4; video frames 8 (the last of latent frame 2) .. 16; audio 16..33
    assert (s.latent, s.video_frames, s.audio) == (slice(2, 5), slice(8, 17), slice(16, 34))
    assert TL.reference_video_frame(2) == 8 == s.video_frames.start


def test_sliding_window_rules() -> None:
    # training windows of 3 latent frames, block 1: the sink + 2 blocks, farthest key 2 frames back
    assert TL.training_window_blocks(3) == 2 and TL.max_latent_distance(2) == 2
    k2 = Timeline(block=2)
    assert k2.training_window_blocks(9) == 3 and k2.max_latent_distance(3) == 7 <= 9 - 1
    with pytest.raises(ValueError, match="data.window"):
        k2.training_window_blocks(3)
    assert TL.max_latent_distance(0) is None
    # the sink moves once the window no longer reaches it: query block i sees blocks i-W+1..i
    assert sink_offset_blocks(torch.arange(7), 2).tolist() == [0, 0, 0, 1, 2, 3, 4]
    assert sink_offset_blocks(torch.arange(4), 0).tolist() == [0, 0, 0, 0]
    assert sampling_window_blocks(-1, 9, TL) == 8 and sampling_window_blocks(0, 9, TL) == 0
    assert sampling_window_blocks(5, None, TL) == 5
    with pytest.raises(ValueError, match="data.window"):
        sampling_window_blocks(-1, None, TL)
