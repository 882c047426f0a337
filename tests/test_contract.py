"""The training/inference contract: what training shows is what the sampler uses.

Condition dropout and CFG's unconditional branch (one code path), clean / lightly noised history,
the sliding window and the moved sink (no query-key distance beyond a training window), struct sigma
coupling of the ablations, motion normalisation, AdaLN-Zero, the fp32 residual stream, the audio
output without bias where no audio is valid, count-weighted sigma-bucket metrics.
"""
from __future__ import annotations

import math

import pytest
import torch

from dualforce_mega.config import DiffusionConfig, build_config, model_preset
from dualforce_mega.data.normalization import Normalizer
from dualforce_mega.diffusion.noise import draw_sample_noise, struct_sigma_of
from dualforce_mega.diffusion.objective import DiffusionForcingObjective
from dualforce_mega.diffusion.sampler import ARSampler, SampleInputs, frame_noise
from dualforce_mega.models.attention import MaskSpec, block_attention
from dualforce_mega.models.blocks import GATE_ROWS, Attention, DiTBlock
from dualforce_mega.models.dualforce import DualForceModel
from dualforce_mega.models.rope import apply_rope, rope_angles
from dualforce_mega.timeline import Timeline, sink_offset_blocks
from dualforce_mega.training.metrics import MetricAccumulator
from model_utils import randomized_model

pytestmark = pytest.mark.usefixtures("single_thread")
TOL = 1e-5
HW = (4, 4)


def sample_inputs(num_latent: int, seed: int = 1) -> SampleInputs:
    g = torch.Generator().manual_seed(5)
    n = Timeline().video_frames(num_latent)
    return SampleInputs(reference=torch.randn(1, 16, *HW, generator=g), num_latent=num_latent, seeds=[seed],
                        audio=torch.randn(1, 2 * n, 32, generator=g), kp_canonical=torch.randn(1, 63, generator=g),
                        ref_motion=torch.randn(1, 70, generator=g))


# ---------------------------------------------------------------------------------------------
# condition dropout
# ---------------------------------------------------------------------------------------------
def test_dropout_and_history_rates_over_many_seeds() -> None:
    d = DiffusionConfig(audio_drop_prob=0.1, text_drop_prob=0.3, history_prob=0.5, history_sigma_max=0.1)
    n = 3000
    draws = [draw_sample_noise(s, (4, 5, 2, 2), (17, 70), d, 1) for s in range(n)]
    audio = torch.stack([x.audio_drop for x in draws]).double()
    text = torch.stack([x.text_drop for x in draws]).double()
    hist = torch.stack([x.history_blocks for x in draws])

    def within(rate: torch.Tensor, p: float) -> bool:   # 4 standard errors
        return abs(float(rate) - p) < 4 * math.sqrt(p * (1 - p) / n)

    assert within(audio.mean(), 0.1) and within(text.mean(), 0.3)
    assert within((audio * text).mean(), 0.03)          # drawn independently
    assert within((hist > 0).double().mean(), 0.5)
    for x in draws:
        h = int(x.history_blocks)
        assert 0 <= h <= 4                              # the last block always keeps a training sigma
        for s in (x.sigma_video, x.sigma_struct):
            assert s[0] == 0 and bool((s[1:h] <= d.history_sigma_max).all())
    # a seed's draws are its own: the same seed, the same drops
    again = draw_sample_noise(7, (4, 5, 2, 2), (17, 70), d, 1)
    assert bool(again.audio_drop == draws[7].audio_drop) and torch.equal(again.sigma_video, draws[7].sigma_video)


def test_unconditional_branch_is_the_dropped_training_form() -> None:
    """The sampler's unconditional forward is the model's dropped-audio form, and a training batch's
    dropped sample gives exactly the model's output without audio (one code path)."""
    cfg = build_config({}, ["diffusion.audio_drop_prob=0.5", "model.text_dim=0"])
    model = randomized_model(text_dim=0)
    obj = DiffusionForcingObjective(cfg)
    g = torch.Generator().manual_seed(0)
    b, f = 8, 3
    n = Timeline().video_frames(f)
    batch = {"video_latent": torch.randn(b, 16, f, *HW, generator=g), "struct": torch.randn(b, n, 70, generator=g),
             "kp_canonical": torch.randn(b, 63, generator=g), "audio": torch.randn(b, 2 * n, 32, generator=g),
             "flame": torch.randn(b, n, 56, generator=g)}
    inputs, _ = obj.prepare(batch, torch.arange(b))
    drop = inputs["audio_drop"]
    assert 0 < int(drop.sum()) < b
    with torch.no_grad():
        out = model(**inputs)
        no_audio = model(**{k: v for k, v in inputs.items() if k not in ("audio", "audio_drop")})
        all_dropped = model(**{**inputs, "audio_drop": torch.ones(b, dtype=torch.bool)})
    assert torch.equal(out.video[drop], no_audio.video[drop]) and torch.equal(out.struct[drop], no_audio.struct[drop])
    assert torch.equal(all_dropped.video, no_audio.video)
    assert (out.video[~drop] - no_audio.video[~drop]).abs().max() > 1e-4   # kept audio matters
    # the sampler's unconditional rows are exactly that form: audio present, dropped
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw.get("audio_drop")), with_kwargs=True)
    try:
        ARSampler(model, DiffusionConfig(sample_steps=2, cfg_audio=2.0), training_window=3).sample(sample_inputs(3))
    finally:
        hook.remove()
    # batched CFG: every forward of this batch of 1 is [conditional row, dropped-audio row]
    assert calls and all(c.tolist() == [False, True] for c in calls)


# ---------------------------------------------------------------------------------------------
# sliding window, moved sink
# ---------------------------------------------------------------------------------------------
def test_moved_sink_equals_rope_at_the_moved_position() -> None:
    """Rotating cached sink keys by the offset equals encoding the sink at its moved position."""
    g = torch.Generator().manual_seed(0)
    blocks, d, window = 7, 8, 2
    q_raw, k_raw, v = (torch.randn(1, blocks, 2, d, generator=g) for _ in range(3))
    pos = torch.arange(blocks)
    ang = rope_angles(pos, (d,), 10000.0)
    step = rope_angles(torch.tensor([1]), (d,), 10000.0)[0]
    spec = MaskSpec(pos, pos, window=window, sink=1, sink_step=step)
    q, k = apply_rope(q_raw, ang), apply_rope(k_raw, ang)
    for backend in ("sdpa", "flash"):
        out = block_attention(q, k, v, spec, backend)
        for i in range(blocks):
            o = int(sink_offset_blocks(torch.tensor([i]), window))
            keys = [0] + [j for j in range(max(1, i - window + 1), i + 1)]
            kpos = torch.tensor([o] + keys[1:])           # the sink re-encoded at position o
            kk = apply_rope(k_raw[:, keys], rope_angles(kpos, (d,), 10000.0))
            ref = torch.softmax(torch.einsum("hd,khd->hk", q[0, i], kk[0]) / math.sqrt(d), -1)
            ref = torch.einsum("hk,khd->hd", ref, v[0, keys])
            assert (out[0, i] - ref).abs().max() < TOL, (backend, i)


def attended_distances(model: DualForceModel, cfg: DiffusionConfig, inputs: SampleInputs, training_window: int,
                       move_sink: bool = True) -> float:
    """Largest query-key distance, in latent frames, over every block-causal attention call of a
    (recompute-path) generation, read from the RoPE angles the layers get (first band: angle = position)
    with the sink moved as the attention moves it (``move_sink=False``: where it would sit unmoved)."""
    stride = model.cfg.vae_temporal_stride
    worst = [0.0]

    def hook(module, args, kwargs):
        spec, qa, ka = kwargs.get("spec"), kwargs.get("q_angles"), kwargs.get("k_angles")
        if spec is None or qa is None:
            return
        kpos = ka[:, 0].double()[None, :].expand(qa.shape[0], -1)
        if move_sink and spec.moves_sink():
            offset = sink_offset_blocks(spec.q_blocks, spec.window, spec.sink).double()[:, None]
            kpos = kpos + offset * float(spec.sink_step[0]) * (spec.k_blocks < spec.sink)[None, :]
        dist = (qa[:, 0].double()[:, None] - kpos)[spec.allowed()]
        unit = stride if spec.key[:2] == ("struct", "struct") else 1   # struct positions are video frames
        worst[0] = max(worst[0], float(dist.max()) / unit)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules() if isinstance(m, Attention)]
    try:
        ARSampler(model, cfg, use_cache=False, training_window=training_window).sample(inputs)
    finally:
        for h in handles:
            h.remove()
    return worst[0]


@pytest.mark.parametrize("block,train_window,chunk,ar_step", [(1, 3, 1, 0), (1, 4, 2, 1), (2, 5, 1, 0)])
def test_max_attended_distance_within_training_window(block, train_window, chunk, ar_step) -> None:
    model = randomized_model(causal_block_size=block)
    cfg = DiffusionConfig(sample_steps=2, chunk_blocks=chunk, ar_step=ar_step)   # default window: -1
    inputs = sample_inputs(12)
    assert attended_distances(model, cfg, inputs, train_window) <= train_window - 1
    # the bound is not vacuous: the reference sink unmoved would sit much farther back
    assert attended_distances(model, cfg, inputs, train_window, move_sink=False) >= 12 - block - (train_window - 1)


# ---------------------------------------------------------------------------------------------
# history sigma, coupling, KV cache == recompute in every new mode
# ---------------------------------------------------------------------------------------------
def model_calls(model: DualForceModel, cfg: DiffusionConfig, inputs: SampleInputs, cache: bool) -> list[dict]:
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append({"sigma_video": a[1].clone(), **{
        k: kw[k].clone() for k in ("sigma_struct", "struct") if kw.get(k) is not None}}), with_kwargs=True)
    try:
        ARSampler(model, cfg, use_cache=cache, training_window=3).sample(inputs)
    finally:
        hook.remove()
    return calls


def test_history_is_conditioned_at_the_history_sigma() -> None:
    model = randomized_model()
    cfg = DiffusionConfig(sample_steps=2, sample_history_sigma=0.04, history_sigma_max=0.1)
    calls = model_calls(model, cfg, sample_inputs(4), cache=False)
    last = calls[-1]["sigma_video"][0]      # the last chunk sees frames 0..2 as history
    assert last[0] == 0 and torch.allclose(last[1:3], torch.full((2,), 0.04))
    cached = model_calls(model, cfg, sample_inputs(4), cache=True)
    writes = [c["sigma_video"][0] for c in cached if bool((c["sigma_video"][0] == 0.04).all())]
    assert len(writes) == 3                  # the writing passes of chunks 1..3 commit at sigma 0.04


def test_tied_struct_sigma_is_coupled_like_training() -> None:
    model = randomized_model()
    cfg = DiffusionConfig(sample_steps=3, struct_sigma="tied", struct_sigma_k=0.5)
    inputs = sample_inputs(3)
    calls = model_calls(model, cfg, inputs, cache=True)
    for c in calls:
        torch.testing.assert_close(c["sigma_struct"], struct_sigma_of(c["sigma_video"], cfg), rtol=0, atol=0)
    # a chunk starts from sigma 1 in video and k * 1 in struct: struct = k * eps
    first = calls[1]                          # chunk 1's first pass (call 0 commits the known block 0)
    eps = frame_noise(1, "struct", 1, (4, 70))
    torch.testing.assert_close(first["struct"][0], 0.5 * eps)


@pytest.mark.parametrize("overrides", [
    dict(struct_sigma="tied", struct_sigma_k=0.5),
    dict(sample_history_sigma=0.0),
    dict(sample_history_sigma=0.08, history_sigma_max=0.1, chunk_blocks=2, ar_step=1),
    dict(cfg_audio=2.0, chunk_blocks=2),
])
def test_kv_cache_equals_recompute_in_every_new_mode(overrides) -> None:
    """Growing and static (ring-buffer) KV cache against full recomputation."""
    cfg = DiffusionConfig(sample_steps=2, **overrides)        # default window: the training window
    _assert_caches_equal_recompute(randomized_model(), cfg, sample_inputs(9), training_window=3)


def test_kv_cache_equals_recompute_block_size_2_default_window() -> None:
    cfg = DiffusionConfig(sample_steps=2, chunk_blocks=2, ar_step=1)
    _assert_caches_equal_recompute(randomized_model(causal_block_size=2), cfg, sample_inputs(11), training_window=5)


def _assert_caches_equal_recompute(model, cfg: DiffusionConfig, inputs, training_window: int) -> None:
    """Growing and static (ring-buffer) KV cache against full recomputation, video and motion."""
    ref = ARSampler(model, cfg, use_cache=False, training_window=training_window).sample(inputs)
    for static in (False, True):
        a = ARSampler(model, cfg, use_cache=True, static=static, training_window=training_window).sample(inputs)
        assert (a[0] - ref[0]).abs().max() < TOL and (a[1] - ref[1]).abs().max() < TOL, static


# ---------------------------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------------------------
def test_sampler_standardises_motion_inputs_and_inverts_its_output() -> None:
    model = randomized_model()
    g = torch.Generator().manual_seed(3)
    stats = {"struct": {"mean": torch.randn(70, generator=g).tolist(), "std": (torch.rand(70, generator=g) + 0.5).tolist()},
             "kp_canonical": {"mean": torch.randn(63, generator=g).tolist(), "std": (torch.rand(63, generator=g) + 0.5).tolist()}}
    norm = Normalizer.from_stats(stats, ("struct", "kp_canonical"))
    cfg = DiffusionConfig(sample_steps=2)
    raw = sample_inputs(4)
    pre = sample_inputs(4)
    pre.kp_canonical = norm.normalize("kp_canonical", raw.kp_canonical)
    pre.ref_motion = norm.normalize("struct", raw.ref_motion)
    v_raw, s_raw = ARSampler(model, cfg, training_window=3, normalizer=norm).sample(raw)
    v_pre, s_pre = ARSampler(model, cfg, training_window=3).sample(pre)       # identity normaliser
    assert torch.allclose(v_raw, v_pre, atol=1e-5)
    torch.testing.assert_close(s_raw, norm.denormalize("struct", s_pre), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_raw[:, 0], raw.ref_motion, rtol=1e-5, atol=1e-5)   # raw units out
    torch.testing.assert_close(norm.denormalize("struct", norm.normalize("struct", s_raw)), s_raw)


# ---------------------------------------------------------------------------------------------
# model details
# ---------------------------------------------------------------------------------------------
def test_adaln_zero_gates_are_exactly_zero_at_init() -> None:
    torch.manual_seed(0)
    model = DualForceModel(model_preset("tiny"))
    sigma = torch.rand(2, 3)
    for tower in (model.video, model.struct):
        _, e0 = tower.modulation(sigma)
        for block in tower.blocks:
            mod = block.modulation.float().unsqueeze(0) + e0
            assert bool((mod[:, :, list(GATE_ROWS)] == 0).all())
    # so every block is the identity at init
    block: DiTBlock = model.video.blocks[0]
    x = torch.randn(2, 3 * 4, 64)
    from dualforce_mega.models.layers import TokenGroups
    _, e0 = model.video.modulation(sigma)
    spec = MaskSpec(torch.arange(3).repeat_interleave(4), torch.arange(3).repeat_interleave(4))
    ang = torch.zeros(12, 8)
    assert torch.equal(block(x, e0, TokenGroups.uniform(3, 4, x.device), ang, spec), x)


def test_residual_stream_is_fp32_in_a_bf16_model() -> None:
    model = randomized_model(text_dim=0).to(torch.bfloat16)
    dtypes = []
    handles = [b.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype)) for b in model.video.blocks]
    x = torch.randn(1, 16, 2, *HW)
    out = model(x, torch.rand(1, 2), struct=torch.randn(1, 5, 70), audio=torch.randn(1, 10, 32),
                kp_canonical=torch.randn(1, 63))
    for h in handles:
        h.remove()
    assert set(dtypes) == {torch.float32} and out.video.dtype == torch.bfloat16


def test_audio_adds_nothing_where_no_audio_is_valid() -> None:
    """A frame whose audio window lies outside the clip adds exactly 0 (no output-projection bias)."""
    model = randomized_model(text_dim=0)
    attn = model.video.blocks[0].audio_attn
    with torch.no_grad():
        attn.attn.o.bias.fill_(1.0)
    from dualforce_mega.models.audio import AudioContext
    from dualforce_mega.models.layers import TokenGroups
    feats = torch.randn(1, 4, 64)
    index = torch.tensor([[0, 1], [2, 3], [0, 0]])
    valid = torch.tensor([[True, True], [True, False], [False, False]])   # group 2: no audio in range
    x = torch.randn(1, 3 * 2, 64)
    y = attn(x, AudioContext(feats, index, valid, TokenGroups.uniform(3, 2, x.device)))
    assert torch.equal(y[:, 4:], x[:, 4:]) and (y[:, :4] - x[:, :4]).abs().max() > 1e-3


def test_sigma_bucket_metrics_are_weighted_by_frame_counts() -> None:
    acc = MetricAccumulator()
    name, count = "loss_video_sigma_0.00_0.25", "frames_video_sigma_0.00_0.25"
    acc.add({"loss": 1.0, name: 2.0, count: 1}, 0, [0])
    acc.add({"loss": 3.0, name: 4.0, count: 3}, 0, [1])
    out = acc.reduce()
    assert out[name] == pytest.approx((2.0 * 1 + 4.0 * 3) / 4) and out[count] == 4 and out["loss"] == 2.0
