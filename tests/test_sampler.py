"""Autoregressive sampler: KV-cache == full recomputation, schedule properties, memory bound, CFG."""
from __future__ import annotations

import gc
import warnings

import pytest
import torch

from dualforce_mega.config import DiffusionConfig
from dualforce_mega.diffusion.ar_schedule import plan_chunks, pyramid_passes
from dualforce_mega.diffusion.sampler import ARSampler, SampleInputs
from dualforce_mega.diffusion.schedules import inference_sigmas
from dualforce_mega.models.dualforce import DualForceModel
from dualforce_mega.timeline import Timeline
from model_utils import randomized_model

TOL = 1e-5
LATENT_HW = (4, 4)
TRAIN_WINDOW = 3          # data.window of the (notional) training run: default sampling window 2 blocks
num_latent_frames = Timeline().latent_frames_covering
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model() -> DualForceModel:
    return randomized_model()


def inputs(num_latent: int, seed: int = 1, audio: bool = True, **kw) -> SampleInputs:
    g = torch.Generator().manual_seed(123)
    n_video = 1 + 4 * (num_latent - 1)
    reference = torch.randn(1, 16, *LATENT_HW, generator=g)
    feats = torch.randn(1, 2 * n_video, 32, generator=g)
    return SampleInputs(reference=reference, num_latent=num_latent, seeds=[seed], audio=feats if audio else None,
                        kp_canonical=torch.randn(1, 63, generator=g), **kw)


def run(model, cfg: DiffusionConfig, inp: SampleInputs, cache: bool):
    sampler = ARSampler(model, cfg, use_cache=cache, training_window=TRAIN_WINDOW)
    video, struct = sampler.sample(inp)
    return video, struct, sampler.stats


@pytest.mark.parametrize("chunk,window,ar_step,cfg_audio", [
    (1, 0, 0, 1.0), (3, 0, 0, 1.0), (1, 2, 0, 1.0), (3, 2, 0, 1.0),
    (3, 0, 1, 1.0), (3, 2, 2, 1.0), (2, 3, 1, 2.5)])
def test_kv_cache_equals_recompute(model, chunk, window, ar_step, cfg_audio):
    cfg = DiffusionConfig(sample_steps=3, chunk_blocks=chunk, window_blocks=window, ar_step=ar_step,
                          cfg_audio=cfg_audio)
    inp = inputs(8)
    v_c, s_c, stats_c = run(model, cfg, inp, cache=True)
    v_r, s_r, stats_r = run(model, cfg, inp, cache=False)
    assert v_c.shape == (1, 16, 8, *LATENT_HW) and s_c.shape == (1, 1 + 4 * 7, 70)
    assert (v_c - v_r).abs().max() < TOL
    assert (s_c - s_r).abs().max() < TOL
    assert v_c.abs().mean() > 0.1  # a real signal, not zeros
    # the cached path never feeds history to the model; the reference feeds all of it
    assert stats_c.max_pass_frames == chunk and stats_r.max_pass_frames == 8


def test_kv_cache_equals_recompute_block_size_2():
    model = randomized_model(causal_block_size=2)
    cfg = DiffusionConfig(sample_steps=2, chunk_blocks=2, window_blocks=2, ar_step=1)
    inp = inputs(8)  # blocks {0,1} {2,3} {4,5} {6,7}: block 0 = reference + one generated frame
    v_c, s_c, _ = run(model, cfg, inp, cache=True)
    v_r, s_r, _ = run(model, cfg, inp, cache=False)
    assert (v_c - v_r).abs().max() < TOL and (s_c - s_r).abs().max() < TOL
    assert torch.equal(v_c[:, :, 0], inp.reference)


def test_kv_cache_equals_recompute_prefix_backend():
    """The "flash" backend (per-block prefix attention; torch SDPA kernels on CPU) with cached keys."""
    model = randomized_model(attn_backend="flash")
    cfg = DiffusionConfig(sample_steps=2, chunk_blocks=3, window_blocks=2, ar_step=1)
    v_c, s_c, _ = run(model, cfg, inputs(8), cache=True)
    v_r, s_r, _ = run(model, cfg, inputs(8), cache=False)
    assert (v_c - v_r).abs().max() < TOL and (s_c - s_r).abs().max() < TOL


def test_kv_cache_equals_recompute_video_only():
    model = randomized_model(struct_tower=False)
    cfg = DiffusionConfig(sample_steps=2, chunk_blocks=2, window_blocks=2)
    v_c, s_c, _ = run(model, cfg, inputs(6), cache=True)
    v_r, s_r, _ = run(model, cfg, inputs(6), cache=False)
    assert s_c is None and s_r is None
    assert (v_c - v_r).abs().max() < TOL


def test_window_changes_generation(model):
    """The rolling window is not a no-op: with history beyond the window the result differs."""
    base = dict(sample_steps=2, chunk_blocks=1)
    v_full, _, _ = run(model, DiffusionConfig(**base, window_blocks=0), inputs(6), cache=True)
    v_win, _, _ = run(model, DiffusionConfig(**base, window_blocks=2), inputs(6), cache=True)
    assert torch.equal(v_full[:, :, :3], v_win[:, :, :3])  # frames whose history fits in the window
    assert (v_full[:, :, 3:] - v_win[:, :, 3:]).abs().max() > 1e-3


def test_reference_and_motion_pinned(model):
    ref_motion = torch.randn(1, 70)
    inp = inputs(4, ref_motion=ref_motion)
    video, struct, stats = run(model, DiffusionConfig(sample_steps=2), inp, cache=True)
    assert torch.equal(video[:, :, 0], inp.reference)
    assert torch.equal(struct[:, 0], ref_motion)
    # block 0 fully known: only its writing pass; then 3 chunks x (2 steps + 1 writing pass)
    assert stats.model_calls == 1 + 3 * 3


def test_deterministic_by_seed(model):
    cfg = DiffusionConfig(sample_steps=2, chunk_blocks=2)
    a = run(model, cfg, inputs(5, seed=7), cache=True)
    b = run(model, cfg, inputs(5, seed=7), cache=True)
    c = run(model, cfg, inputs(5, seed=8), cache=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (a[0][:, :, 1:] - c[0][:, :, 1:]).abs().max() > 1e-2


def test_batch_equals_single_samples(model):
    """A batch of two samples (own seeds, own audio) equals generating each alone."""
    cfg = DiffusionConfig(sample_steps=2, chunk_blocks=2, window_blocks=2, cfg_audio=1.5)
    one, two = inputs(5, seed=3), inputs(5, seed=4)
    two.audio = two.audio.flip(1)
    both = SampleInputs(torch.cat([one.reference, two.reference]), 5, [3, 4],
                        audio=torch.cat([one.audio, two.audio]),
                        kp_canonical=torch.cat([one.kp_canonical, two.kp_canonical]))
    v, s, _ = run(model, cfg, both, cache=True)
    for i, single in enumerate((one, two)):
        v1, s1, _ = run(model, cfg, single, cache=True)
        assert (v[i:i + 1] - v1).abs().max() < TOL and (s[i:i + 1] - s1).abs().max() < TOL


def forward_batches(model, cfg: DiffusionConfig, inp: SampleInputs, **sampler_kw) -> tuple[list[int], tuple]:
    """The batch size of every model forward of one generation, and its (video, struct)."""
    sizes = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: sizes.append((a[0] if a else kw["video_latent"]).shape[0]), with_kwargs=True)
    try:
        out = ARSampler(model, cfg, training_window=TRAIN_WINDOW, **sampler_kw).sample(inp)
    finally:
        hook.remove()
    return sizes, out


@pytest.mark.parametrize("batched", [True, False])
def test_cfg(model, batched):
    steps = 2
    base = dict(sample_steps=steps, chunk_blocks=1, cfg_batched=batched)
    sizes1, (v1, s1) = forward_batches(model, DiffusionConfig(**base, cfg_audio=1.0), inputs(4))
    # scale 1: the conditional branch alone, batch B (no unconditional rows at all); block 0 is known
    # (reference + pinned motion): its writing pass, then 3 chunks x (steps + writing pass)
    assert sizes1 == [1] * (1 + 3 * (steps + 1))
    # scale 0: exactly the unconditional model, i.e. generation without audio; this only holds
    # if the branches' K/V stay apart (rows of one cache, or two caches)
    sizes0, (v0, s0) = forward_batches(model, DiffusionConfig(**base, cfg_audio=0.0), inputs(4))
    vn, sn, _ = run(model, DiffusionConfig(**base), inputs(4, audio=False), cache=True)
    # batched: one forward of batch 2B per pass; two-call: two forwards of batch B
    assert sizes0 == ([2] * len(sizes1) if batched else [1] * (2 * len(sizes1)))
    assert (v0 - vn).abs().max() < TOL and (s0 - sn).abs().max() < TOL
    assert (v0 - v1).abs().max() > 1e-3  # audio matters in this model


@pytest.mark.parametrize("path", [dict(use_cache=True), dict(use_cache=False), dict(static=True)],
                         ids=["cache", "recompute", "static"])
def test_batched_cfg_equals_two_calls(model, path):
    """Both guidance branches as one forward of batch 2B (one cache) == two forwards of batch B (a
    cache each), for a whole generation of a batch of 2 (own seeds, own audio) on every history path."""
    one, two = inputs(7, seed=3), inputs(7, seed=4)
    both = SampleInputs(torch.cat([one.reference, two.reference]), 7, [3, 4],
                        audio=torch.cat([one.audio, two.audio.flip(1)]),
                        kp_canonical=torch.cat([one.kp_canonical, two.kp_canonical]))
    base = dict(sample_steps=2, chunk_blocks=2, window_blocks=2, ar_step=1, cfg_audio=2.5)
    sizes_b, (v_b, s_b) = forward_batches(model, DiffusionConfig(**base), both, **path)
    sizes_t, (v_t, s_t) = forward_batches(model, DiffusionConfig(**base, cfg_batched=False), both, **path)
    assert sizes_b == [4] * len(sizes_b) and sizes_t == [2] * (2 * len(sizes_b))
    assert (v_b - v_t).abs().max() < TOL and (s_b - s_t).abs().max() < TOL
    assert (v_b[0] - v_b[1]).abs().max() > 1e-2   # the two samples really differ


def live_tensor_bytes(exclude: set) -> int:
    """Bytes of all live tensor storages not in ``exclude`` (storage pointers)."""
    seen, total = set(exclude), 0
    for obj in live_tensors():
        st = obj.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def _has_real_storage(t: torch.Tensor) -> bool:
    """False for tensors without data (fake/functional tensors other tests' compiles leave behind)."""
    try:
        t.untyped_storage().data_ptr()
    except RuntimeError:
        return False
    return True


def live_tensors() -> list[torch.Tensor]:
    with warnings.catch_warnings():  # isinstance() touches deprecated lazy module attributes
        warnings.simplefilter("ignore", FutureWarning)
        return [o for o in gc.get_objects()
                if isinstance(o, torch.Tensor) and o.device.type == "cpu" and _has_real_storage(o)]


def retained_bytes_per_chunk(model, cfg: DiffusionConfig, inp: SampleInputs, **sampler_kw) -> list[int]:
    """What the sampler keeps alive between chunks (history, caches, state), chunk by chunk,
    with the caller dropping every yielded chunk (streaming)."""
    gc.collect()
    before = {o.untyped_storage().data_ptr() for o in live_tensors()}
    sizes = []
    for chunk in ARSampler(model, cfg, use_cache=True, training_window=TRAIN_WINDOW, **sampler_kw).generate(inp):
        del chunk
        sizes.append(live_tensor_bytes(before))
    return sizes


def test_retained_memory_plateaus(model):
    """Live tensor bytes held by a streaming generation stop growing once the window is full,
    and are the same for 65 and 129 video frames; without a window they keep growing."""
    cfg = DiffusionConfig(sample_steps=1, chunk_blocks=1, window_blocks=3)
    ref_motion = torch.zeros(1, 70)
    retained_bytes_per_chunk(model, cfg, inputs(3, ref_motion=ref_motion))  # lazily built module caches
    short = retained_bytes_per_chunk(model, cfg, inputs(num_latent_frames(65), ref_motion=ref_motion))
    long = retained_bytes_per_chunk(model, cfg, inputs(num_latent_frames(129), ref_motion=ref_motion))
    full = cfg.window_blocks + 1
    assert max(long[full:]) == min(long[full:]) == max(short[full:])
    assert max(long) == max(short)
    grow = retained_bytes_per_chunk(model, DiffusionConfig(sample_steps=1, chunk_blocks=1, window_blocks=0),
                                    inputs(num_latent_frames(65), ref_motion=ref_motion))
    assert grow[-1] > 2 * max(long)


def test_memory_bounded_by_window(model):
    """65 vs 129 video frames (17 vs 33 latent frames) with a window: the KV cache plateaus."""
    cfg = DiffusionConfig(sample_steps=1, chunk_blocks=1, window_blocks=3)
    sizes = {}
    for frames in (65, 129):
        stats = run(model, cfg, inputs(num_latent_frames(frames)), cache=True)[2]
        sizes[frames] = stats
        # after the window fills, every further chunk leaves the cache exactly as large
        assert len(set(stats.history_bytes[cfg.window_blocks + 1:])) == 1
        assert stats.max_pass_frames == 1
    assert max(sizes[65].history_bytes) == max(sizes[129].history_bytes)
    assert max(sizes[65].history_tokens) == max(sizes[129].history_tokens)
    # without a window the cache grows with the length
    grow = run(model, DiffusionConfig(sample_steps=1, window_blocks=0),
               inputs(num_latent_frames(65), ref_motion=torch.zeros(1, 70)),
               cache=True)[2]
    assert grow.history_bytes[-1] > 2 * max(sizes[129].history_bytes)


@pytest.mark.parametrize("n_latent,block,chunk", [(1, 1, 1), (8, 1, 3), (8, 2, 2), (9, 3, 1)])
def test_plan_chunks_partition(n_latent, block, chunk):
    chunks = plan_chunks(n_latent, block, chunk)
    ids = torch.cat([c.frame_ids for c in chunks])
    assert torch.equal(ids, torch.arange(n_latent))
    assert chunks[0].end == min(block, n_latent)  # chunk 0 is block 0
    assert all(c.end - c.start <= block * chunk for c in chunks[1:])


@pytest.mark.parametrize("blocks,ar_step", [(1, 0), (3, 0), (3, 1), (4, 3)])
def test_pyramid_passes(blocks, ar_step):
    steps = 4
    sigmas = inference_sigmas(steps, 3.0)
    passes = pyramid_passes(blocks, sigmas, ar_step)
    assert len(passes) == steps + (blocks - 1) * ar_step
    active = torch.stack([p.active for p in passes]).long()
    assert torch.equal(active.sum(0), torch.full((blocks,), steps))  # N Euler steps per block
    first = active.argmax(0)
    assert torch.equal(first, torch.arange(blocks) * ar_step)       # block j starts a steps after j-1
    for p in passes:
        assert torch.all(p.sigma[1:] >= p.sigma[:-1])                # later blocks never less noisy
        assert torch.equal(p.sigma_next[~p.active], p.sigma[~p.active])
    assert torch.all(passes[-1].sigma_next == 0)
    assert torch.equal(passes[0].sigma, torch.ones(blocks))


def test_num_latent_frames():
    assert [num_latent_frames(n) for n in (1, 2, 5, 6, 65, 129)] == [1, 2, 2, 3, 17, 33]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "flex", "flash"])
def test_kv_cache_equals_recompute_cuda(backend):
    """Same equality on the GPU through each attention backend (fp32, TF32 off)."""
    if backend == "flex":
        pytest.importorskip("torch.nn.attention.flex_attention")
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        model = randomized_model(attn_backend=backend).cuda()
        cfg = DiffusionConfig(sample_steps=2, chunk_blocks=3, window_blocks=2, ar_step=1, cfg_audio=2.0)
        v_c, s_c, _ = run(model, cfg, inputs(8), cache=True)
        v_r, s_r, _ = run(model, cfg, inputs(8), cache=False)
        assert v_c.is_cuda
        assert (v_c - v_r).abs().max() < TOL and (s_c - s_r).abs().max() < TOL
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
