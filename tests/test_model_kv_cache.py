"""Model-level KV cache: feeding frames block by block through the cache gives the same outputs as
one block-causal pass over the whole sequence (with and without a rolling window)."""
from __future__ import annotations

import pytest
import torch

from dualforce_mega.models import KVCache
from dualforce_mega.timeline import Timeline
from model_utils import random_inputs, randomize_heads, tiny_model


def _slice_frames(cfg, inputs: dict, f0: int, f1: int) -> dict:
    spans = Timeline.of(cfg).spans(torch.arange(f0, f1))
    s0, s1 = int(spans[0, 0]), int(spans[-1, 1]) + 1
    return dict(video_latent=inputs["video_latent"][:, :, f0:f1], sigma_video=inputs["sigma_video"][:, f0:f1],
                struct=inputs["struct"][:, s0:s1], sigma_struct=inputs["sigma_struct"][:, f0:f1],
                kp_canonical=inputs["kp_canonical"], audio=inputs["audio"], text_emb=inputs["text_emb"],
                frame_ids=torch.arange(f0, f1))


@pytest.mark.parametrize("block_size,chunk_blocks,window", [(1, 1, 0), (1, 2, 0), (3, 1, 0), (1, 1, 3), (2, 1, 2)])
def test_cached_chunks_equal_full_pass(block_size: int, chunk_blocks: int, window: int) -> None:
    model = tiny_model(causal_block_size=block_size)
    randomize_heads(model)
    cfg = model.cfg
    frames = 4 * block_size if block_size > 1 else 7
    inputs = random_inputs(cfg, frames=frames)
    with torch.no_grad():
        full = model(**inputs, window_blocks=window)
        cache = KVCache(window=window, writing=True)
        step = block_size * chunk_blocks
        for f0 in range(0, frames, step):
            f1 = min(f0 + step, frames)
            out = model(**_slice_frames(cfg, inputs, f0, f1), cache=cache)
            spans = Timeline.of(cfg).spans(torch.arange(f0, f1))
            s0, s1 = int(spans[0, 0]), int(spans[-1, 1]) + 1
            assert (out.video - full.video[:, :, f0:f1]).abs().max() < 1e-5
            assert (out.struct - full.struct[:, s0:s1]).abs().max() < 1e-5
    if window:
        kept_blocks = cache.get("video.blocks.0.self_attn").blocks.unique()
        assert kept_blocks.numel() <= window + 1  # sink + window


def test_window_changes_the_result() -> None:
    """The windowed mask is really applied (guards the test above against a no-op window)."""
    model = tiny_model()
    randomize_heads(model)
    inputs = random_inputs(model.cfg, frames=6)
    with torch.no_grad():
        a = model(**inputs).video
        b = model(**inputs, window_blocks=2).video
    assert torch.equal(a[:, :, :2], b[:, :, :2])
    assert not torch.allclose(a[:, :, 3:], b[:, :, 3:])
