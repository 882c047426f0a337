"""Static-shape streaming: the ring-buffer KV cache + static per-chunk forward equals recomputation,
keeps its buffers across generations, and holds memory flat as the video grows."""
from __future__ import annotations

import pytest
import torch

from dualforce_mega.config import DiffusionConfig
from dualforce_mega.diffusion.sampler import ARSampler
from dualforce_mega.timeline import Timeline
from model_utils import randomized_model
from test_sampler import TOL, inputs, retained_bytes_per_chunk

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    return randomized_model()


def _sample(model, cfg: DiffusionConfig, inp, **kw):
    sampler = ARSampler(model, cfg, **kw)
    video, struct = sampler.sample(inp)
    return video, struct, sampler


@pytest.mark.parametrize("chunk,window,ar_step,cfg_audio", [
    (1, 2, 0, 1.0), (1, 1, 0, 1.0), (1, 0, 0, 1.0), (2, 3, 1, 2.5), (3, 2, 0, 1.0)])
def test_static_cache_equals_recompute(model, chunk, window, ar_step, cfg_audio):
    """8 latent frames: with chunk 2 / 3 the last chunk is shorter (eager, same cache)."""
    cfg = DiffusionConfig(sample_steps=2, chunk_blocks=chunk, window_blocks=window, ar_step=ar_step,
                          cfg_audio=cfg_audio)
    inp = inputs(8)
    v_ref, s_ref, _ = _sample(model, cfg, inp, use_cache=False)
    v, s, sampler = _sample(model, cfg, inp, static=True)
    assert (v - v_ref).abs().max() < TOL and (s - s_ref).abs().max() < TOL


@pytest.mark.parametrize("overrides,struct", [(dict(causal_block_size=2), True),
                                              (dict(struct_tower=False, audio=False), False)])
def test_static_cache_equals_recompute_variants(overrides, struct):
    model = randomized_model(**overrides)
    cfg = DiffusionConfig(sample_steps=2, window_blocks=2)
    inp = inputs(7, audio=struct)
    v_ref, s_ref, _ = _sample(model, cfg, inp, use_cache=False)
    v, s, _ = _sample(model, cfg, inp, static=True)
    assert (v - v_ref).abs().max() < TOL
    assert s is None if not struct else (s - s_ref).abs().max() < TOL


def test_second_generation_reuses_the_buffers(model):
    """A sampler kept for a second clip (another length and seed) resets and reuses its ring
    buffers -- what keeps captured graphs valid -- and still equals a fresh run."""
    cfg = DiffusionConfig(sample_steps=2, window_blocks=2)
    sampler = ARSampler(model, cfg, static=True)
    sampler.sample(inputs(5, seed=3))
    pointers = {n: r.k.data_ptr() for n, r in sampler._caches["cond"].rings.items()}
    video, struct = sampler.sample(inputs(7, seed=4))
    assert {n: r.k.data_ptr() for n, r in sampler._caches["cond"].rings.items()} == pointers
    v_ref, s_ref, _ = _sample(model, cfg, inputs(7, seed=4), use_cache=False)
    assert (video - v_ref).abs().max() < TOL and (struct - s_ref).abs().max() < TOL


def test_memory_flat_as_the_video_grows(model):
    """With a window, every chunk after the first leaves exactly the same live tensor bytes, for 65
    and for 129 video frames: the cache is allocated once and never grows."""
    cfg = DiffusionConfig(sample_steps=1, window_blocks=3)
    motion = torch.zeros(1, 70)
    retained_bytes_per_chunk(model, cfg, inputs(3, ref_motion=motion), static=True)  # lazily built module caches
    short = retained_bytes_per_chunk(model, cfg, inputs(Timeline().latent_frames_covering(65), ref_motion=motion), static=True)
    long = retained_bytes_per_chunk(model, cfg, inputs(Timeline().latent_frames_covering(129), ref_motion=motion), static=True)
    assert len(set(long[1:])) == 1 and set(short[1:]) == set(long[1:])
    stats = ARSampler(model, cfg, static=True)
    stats.sample(inputs(Timeline().latent_frames_covering(65), ref_motion=motion))
    assert len(set(stats.stats.history_bytes[1:])) == 1


def test_batched_cfg_shares_one_static_cache(model):
    """Batched audio CFG keeps one ring cache (and one static forward) of batch 2B; two-call CFG one of
    batch B per branch, of the same total size."""
    cfg = DiffusionConfig(sample_steps=1, window_blocks=2, cfg_audio=2.0)
    batched = ARSampler(model, cfg, static=True)
    batched.sample(inputs(5))
    two = ARSampler(model, DiffusionConfig(sample_steps=1, window_blocks=2, cfg_audio=2.0, cfg_batched=False),
                    static=True)
    two.sample(inputs(5))
    assert set(batched._caches) == set(batched._forwards) == {"cond+uncond"}
    assert set(two._caches) == {"cond", "uncond"}
    assert {r.k.shape[0] for r in batched._caches["cond+uncond"].rings.values()} == {2}
    assert batched.stats.history_bytes == two.stats.history_bytes


@pytest.mark.gpu
@pytest.mark.parametrize("cfg_audio", [1.0, 2.0])
def test_static_graphs_match_eager_cache_cuda(cfg_audio):
    """On CUDA the chunk forward is captured once and replayed (with audio CFG: one graph set of batch
    2B); it matches the eager KV cache."""
    model = randomized_model().cuda()
    cfg = DiffusionConfig(sample_steps=2, window_blocks=2, cfg_audio=cfg_audio)
    inp = inputs(8)
    v_ref, s_ref, _ = _sample(model, cfg, inp)
    v, s, sampler = _sample(model, cfg, inp, static=True)
    assert len(sampler._forwards) == 1 and next(iter(sampler._forwards.values())).replays > 0
    assert (v - v_ref).abs().max() < 1e-4 and (s - s_ref).abs().max() < 1e-4
