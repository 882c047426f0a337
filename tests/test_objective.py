"""Diffusion Forcing objective: sigma sampling, per-sample noise, loss terms, switches, Phase 2."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dualforce_mega.config import ConfigError, build_config
from dualforce_mega.diffusion.flow import x0_from_velocity
from dualforce_mega.diffusion.losses import (info_nce, masked_mse_sum_count, mean_from_sum_count,
                                             per_frame_mse, sigma_bucket_stats)
from dualforce_mega.diffusion.noise import (block_sigmas, draw_sample_noise, mix_seed, sample_seeds)
from dualforce_mega.diffusion.objective import DiffusionForcingObjective
from dualforce_mega.diffusion.schedules import shift_sigma
from dualforce_mega.models import DualForceModel, DualForceOutput
from dualforce_mega.timeline import Timeline

FRAMES, HW, BATCH = 4, (4, 4), 4


def make_cfg(*overrides: str):
    return build_config({}, [f"data.window={FRAMES}", *overrides])


def make_batch(cfg, batch: int = BATCH, frames: int = FRAMES, seed: int = 0) -> dict:
    m = cfg.model
    g = torch.Generator().manual_seed(seed)
    n = Timeline.of(m).video_frames(frames)
    out = {
        "video_latent": torch.randn(batch, m.in_channels, frames, *HW, generator=g),
        "struct": torch.randn(batch, n, m.motion_dim, generator=g),
        "kp_canonical": torch.randn(batch, m.kp_dim, generator=g),
        "audio": torch.randn(batch, n * m.audio_rate // m.fps, m.audio_dim, generator=g),
        "flame": torch.randn(batch, n, m.flame_dim, generator=g),
        "text_emb": torch.randn(batch, 3, m.text_dim, generator=g),
        "__key__": [f"k{i}" for i in range(batch)],
        "__index__": torch.arange(batch),
    }
    return out


def fake_output(cfg, inputs: dict, seed: int = 1) -> DualForceOutput:
    """Random 'predictions' with the model's output shapes."""
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    b, _, f = inputs["video_latent"].shape[:3]
    n = inputs["struct"].shape[1]
    return DualForceOutput(
        video=torch.randn(inputs["video_latent"].shape, generator=g),
        struct=torch.randn(b, n, m.motion_dim, generator=g),
        flame=torch.randn(b, n, m.flame_dim, generator=g),
        lip_struct=torch.randn(b, f, m.lipsync_dim, generator=g),
        lip_audio=torch.randn(b, f, m.lipsync_dim, generator=g))


# ---------------------------------------------------------------------------------------------
# sigma sampling
# ---------------------------------------------------------------------------------------------
def test_sigma_distributions():
    n = 20000
    g = torch.Generator().manual_seed(0)
    d = make_cfg("diffusion.sigma_sampler=uniform").diffusion
    u = block_sigmas(n, d, g)
    assert 0.0 <= float(u.min()) and float(u.max()) <= 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005

    d = make_cfg("diffusion.sigma_sampler=logit_normal", "diffusion.logit_mean=0.5",
                 "diffusion.logit_std=0.8").diffusion
    s = block_sigmas(n, d, g).double()
    logit = torch.log(s / (1 - s))
    assert abs(float(logit.mean()) - 0.5) < 0.03 and abs(float(logit.std()) - 0.8) < 0.03

    d = make_cfg("diffusion.sigma_sampler=shifted", "diffusion.shift=3.0").diffusion
    s = block_sigmas(n, d, g)
    assert 0.0 <= float(s.min()) and float(s.max()) <= 1.0
    # P(shift(u) <= x) = P(u <= x / (shift - (shift - 1) x))
    for x in (0.25, 0.5, 0.75, 0.9):
        expected = x / (3.0 - 2.0 * x)
        assert abs(float((s <= x).float().mean()) - expected) < 0.015, x


@pytest.mark.parametrize("block", [1, 2])
@pytest.mark.parametrize("sampler", ["uniform", "logit_normal", "shifted"])
def test_monotonic_reference_and_block_sharing(block, sampler):
    d = make_cfg(f"diffusion.sigma_sampler={sampler}", "diffusion.monotonic=true").diffusion
    frames = 7
    for seed in range(50):
        nz = draw_sample_noise(seed, (16, frames, 2, 2), (1 + 4 * (frames - 1), 70), d, block)
        for s in (nz.sigma_video, nz.sigma_struct):
            assert s[0] == 0.0                                   # clean reference
            assert bool((s[1:] > 0).all() and (s <= 1).all())
            assert bool((s[1:] >= s[:-1]).all()), s              # non-decreasing in time
            for f in range(2, frames):                           # frames of a block share a sigma
                if f // block == (f - 1) // block:
                    assert s[f] == s[f - 1]
    # without monotonic, the order is not always increasing
    d = make_cfg(f"diffusion.sigma_sampler={sampler}").diffusion
    orders = [bool((draw_sample_noise(seed, (16, frames, 2, 2), None, d, 1).sigma_video[1:].diff() >= 0).all())
              for seed in range(50)]
    assert not all(orders)


@pytest.mark.parametrize("k", [0.5, 1.0, 2.0])
def test_tied_struct_sigma(k):
    d = make_cfg("diffusion.struct_sigma=tied", f"diffusion.struct_sigma_k={k}").diffusion
    for seed in range(20):
        nz = draw_sample_noise(seed, (16, 5, 2, 2), (17, 70), d, 1)
        torch.testing.assert_close(nz.sigma_struct, (k * nz.sigma_video).clamp(0, 1), rtol=0, atol=0)
    d_ind = make_cfg().diffusion
    nz = draw_sample_noise(3, (16, 5, 2, 2), (17, 70), d_ind, 1)
    assert not torch.equal(nz.sigma_struct, nz.sigma_video)
    # the video noise does not depend on how the struct sigma is drawn
    nz_tied = draw_sample_noise(3, (16, 5, 2, 2), (17, 70), d, 1)
    assert torch.equal(nz.sigma_video, nz_tied.sigma_video) and torch.equal(nz.eps_video, nz_tied.eps_video)


def test_seeds():
    s = sample_seeds(0, 5, torch.arange(100))
    assert s.dtype == torch.long and len(set(s.tolist())) == 100 and bool((s >= 0).all())
    assert torch.equal(s, sample_seeds(0, 5, torch.arange(100)))
    assert not torch.equal(s, sample_seeds(0, 6, torch.arange(100)))
    assert not torch.equal(s, sample_seeds(1, 5, torch.arange(100)))
    assert mix_seed(1, 2) != mix_seed(2, 1)


# ---------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------
def test_same_seed_same_noise_whatever_the_split():
    cfg = make_cfg()
    obj = DiffusionForcingObjective(cfg)
    batch = make_batch(cfg)
    seeds = sample_seeds(cfg.train.seed, 7, batch["__index__"])
    full_in, full_t = obj.prepare(batch, seeds)
    parts = [[0], [1, 2], [3]]
    for idx in parts:
        sub = {k: (v[idx] if isinstance(v, torch.Tensor) else [v[i] for i in idx]) for k, v in batch.items()}
        sub_in, sub_t = obj.prepare(sub, seeds[idx])
        for key, val in sub_in.items():
            assert torch.equal(val, full_in[key][idx]), key
        assert torch.equal(sub_t.video, full_t.video[idx]) and torch.equal(sub_t.struct, full_t.struct[idx])
    # a different seed gives different noise
    other_in, _ = obj.prepare(batch, seeds + 1)
    assert not torch.equal(other_in["video_latent"][:, :, 1:], full_in["video_latent"][:, :, 1:])


def test_prepare_noising_and_reference():
    cfg = make_cfg("model.causal_block_size=2")
    obj = DiffusionForcingObjective(cfg)
    batch = make_batch(cfg)
    inputs, t = obj.prepare(batch, torch.arange(BATCH))
    assert set(inputs) == {"video_latent", "sigma_video", "struct", "sigma_struct", "kp_canonical", "audio",
                           "text_emb", "audio_drop", "text_drop"}
    # reference frame and its struct frame are exactly clean
    assert bool((inputs["sigma_video"][:, 0] == 0).all()) and bool((inputs["sigma_struct"][:, 0] == 0).all())
    assert torch.equal(inputs["video_latent"][:, :, 0], batch["video_latent"][:, :, 0])
    assert torch.equal(inputs["struct"][:, 0], batch["struct"][:, 0])
    # x0 = x_s - s * v recovers the clean data from the velocity target
    sv = inputs["sigma_video"][:, None, :, None, None]
    torch.testing.assert_close(x0_from_velocity(inputs["video_latent"], t.video, sv), batch["video_latent"])
    tok = Timeline.of(cfg.model).latent_of_video_frames(torch.arange(FRAMES))
    ss = inputs["sigma_struct"][:, tok, None]
    torch.testing.assert_close(x0_from_velocity(inputs["struct"], t.struct, ss), batch["struct"])
    assert t.frame_valid.tolist() == [False] + [True] * (FRAMES - 1)
    assert t.struct_valid.tolist() == [False] + [True] * (tok.numel() - 1)


def test_missing_batch_key_is_named():
    cfg = make_cfg()
    batch = make_batch(cfg)
    del batch["flame"]
    with pytest.raises(KeyError, match="flame"):
        DiffusionForcingObjective(cfg).prepare(batch, torch.arange(BATCH))
    # with the FLAME loss off, flame is not needed
    DiffusionForcingObjective(make_cfg("diffusion.loss_flame=0")).prepare(batch, torch.arange(BATCH))


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="diffusion.loss_struct"):
        DiffusionForcingObjective(make_cfg("diffusion.loss_struct=-1"))
    with pytest.raises(ConfigError, match="diffusion.loss_video"):
        DiffusionForcingObjective(make_cfg("train.phase=2", "diffusion.loss_video=0"))


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
def test_losses_match_direct_computation_and_exclude_reference():
    cfg = make_cfg()
    obj = DiffusionForcingObjective(cfg)
    inputs, t = obj.prepare(make_batch(cfg), torch.arange(BATCH))
    out = fake_output(cfg, inputs)
    loss, metrics = obj.losses(out, t)
    v = F.mse_loss(out.video[:, :, 1:], t.video[:, :, 1:])
    s = F.mse_loss(out.struct[:, 1:], t.struct[:, 1:])
    fl = F.mse_loss(out.flame[:, 1:], t.flame[:, 1:])
    lip = info_nce(out.lip_audio, out.lip_struct, t.frame_valid, cfg.diffusion.lipsync_temperature)
    assert metrics["loss_video"] == pytest.approx(float(v), rel=1e-6)
    assert metrics["loss_struct"] == pytest.approx(float(s), rel=1e-6)
    assert metrics["loss_flame"] == pytest.approx(float(fl), rel=1e-6)
    assert metrics["loss_lipsync"] == pytest.approx(float(lip), rel=1e-6)
    d = cfg.diffusion
    expected = d.loss_video * v + d.loss_struct * s + d.loss_flame * fl + d.loss_lipsync * lip
    assert float(loss) == pytest.approx(float(expected), rel=1e-6) and metrics["loss"] == pytest.approx(float(loss))
    # the reference frame (and its struct / FLAME frame, and its lip-sync frame) never enters the loss
    out.video[:, :, 0] += 100.0
    out.struct[:, 0] += 100.0
    out.flame[:, 0] += 100.0
    out.lip_audio[:, 0] = torch.randn_like(out.lip_audio[:, 0])
    loss2, _ = obj.losses(out, t)
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6)


@pytest.mark.parametrize("off", ["video", "struct", "flame", "lipsync"])
def test_zero_weight_switches_a_loss_off(off):
    cfg = make_cfg(f"diffusion.loss_{off}=0")
    obj = DiffusionForcingObjective(cfg)
    inputs, t = obj.prepare(make_batch(cfg), torch.arange(BATCH))
    out = fake_output(cfg, inputs)
    # a non-tensor output for the switched-off term raises if anything touches it
    setattr(out, {"lipsync": "lip_audio"}.get(off, off), "must not be used")
    loss, metrics = obj.losses(out, t)
    assert f"loss_{off}" not in metrics
    rest = [k for k in ("video", "struct", "flame", "lipsync") if k != off]
    assert all(f"loss_{k}" in metrics for k in rest)
    weighted = sum(getattr(cfg.diffusion, f"loss_{k}") * metrics[f"loss_{k}"] for k in rest)
    assert metrics["loss"] == pytest.approx(weighted, rel=1e-6)
    assert any(k.startswith("loss_video_sigma") for k in metrics) == (off != "video")


def test_info_nce_matches_reference():
    g = torch.Generator().manual_seed(0)
    b, f, d, temp = 3, 4, 8, 0.1
    a = torch.randn(b, f, d, generator=g)
    s = torch.randn(b, f, d, generator=g)
    valid = torch.tensor([False, True, True, True])
    pairs = [(i, j) for i in range(b) for j in range(f) if valid[j]]

    def sim(x, y):
        return float(torch.dot(x / x.norm(), y / y.norm())) / temp

    def direction(q, k):  # mean over positives of -log softmax over every valid (clip, frame) candidate
        tot = 0.0
        for (i, j) in pairs:
            logits = [sim(q[i, j], k[i2, j2]) for (i2, j2) in pairs]
            tot += -(sim(q[i, j], k[i, j]) - math.log(sum(math.exp(x) for x in logits)))
        return tot / len(pairs)

    expected = 0.5 * (direction(a, s) + direction(s, a))
    got = float(info_nce(a, s, valid, temp))
    assert got == pytest.approx(expected, rel=1e-5)
    # perfectly aligned, well separated embeddings give a near-zero loss
    e = torch.eye(b * f, d * 2)[: b * f].reshape(b, f, 2 * d)
    assert float(info_nce(e, e, valid, 0.01)) < 1e-6


def test_sigma_buckets_partition_the_frames():
    cfg = make_cfg("diffusion.sigma_buckets=3", "diffusion.sigma_sampler=uniform")
    obj = DiffusionForcingObjective(cfg)
    batch = make_batch(cfg, batch=8)
    inputs, t = obj.prepare(batch, torch.arange(8))
    out = fake_output(cfg, inputs)
    _, metrics = obj.losses(out, t)
    stats = sigma_bucket_stats(per_frame_mse(out.video, t.video), t.sigma_video, t.frame_valid, 3)
    assert sum(c for _, c in stats.values()) == 8 * (FRAMES - 1)
    assert set(stats) <= {"loss_video_sigma_0.00_0.33", "loss_video_sigma_0.33_0.67", "loss_video_sigma_0.67_1.00"}
    assert len(stats) >= 2
    for name, (mean, _) in stats.items():
        assert metrics[name] == pytest.approx(mean)
    weighted = sum(mean * c for mean, c in stats.values()) / sum(c for _, c in stats.values())
    assert weighted == pytest.approx(metrics["loss_video"], rel=1e-5)
    # each bucket is the mean over exactly the frames whose sigma lies in it
    pf = per_frame_mse(out.video, t.video)[:, 1:]
    sig = t.sigma_video[:, 1:]
    sel = (sig >= 1 / 3) & (sig < 2 / 3)
    if sel.any():
        assert stats["loss_video_sigma_0.33_0.67"][0] == pytest.approx(float(pf[sel].mean()), rel=1e-5)


def test_sum_count_reduces_over_token_shards():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 10, 6, generator=g), torch.randn(2, 10, 6, generator=g)
    mask = (torch.arange(10) > 0)[None, :, None]
    full = mean_from_sum_count(*masked_mse_sum_count(pred, target, mask))
    pieces = [masked_mse_sum_count(pred[:, sl], target[:, sl], mask[:, sl])
              for sl in (slice(0, 3), slice(3, 7), slice(7, 10))]
    sharded = sum(p[0] for p in pieces) / sum(p[1] for p in pieces)
    torch.testing.assert_close(sharded, full)
    torch.testing.assert_close(full, F.mse_loss(pred[:, 1:], target[:, 1:]))


# ---------------------------------------------------------------------------------------------
# with the real model
# ---------------------------------------------------------------------------------------------
def test_phase2_video_only():
    cfg = make_cfg("train.phase=2", "model.struct_tower=false", "model.audio=false")
    obj = DiffusionForcingObjective(cfg)
    inputs, t = obj.prepare(make_batch(cfg), torch.arange(BATCH))
    assert set(inputs) == {"video_latent", "sigma_video", "text_emb", "text_drop"}
    assert t.struct is None and t.flame is None
    torch.manual_seed(0)
    model = DualForceModel(cfg.model)
    loss, metrics = obj.losses(model(**inputs, return_aux=True), t)
    assert {k for k in metrics if not k.startswith(("loss_video_sigma", "frames_video_sigma"))} == {"loss", "loss_video"}
    assert metrics["loss"] == pytest.approx(metrics["loss_video"])
    loss.backward()
    # phase 2 keeps the video-only path even if the config still has a struct tower
    inputs2, _ = DiffusionForcingObjective(make_cfg("train.phase=2")).prepare(make_batch(cfg), torch.arange(BATCH))
    assert set(inputs2) == {"video_latent", "sigma_video", "text_emb", "text_drop"}


def test_full_model_all_losses_and_gradients():
    cfg = make_cfg()
    obj = DiffusionForcingObjective(cfg)
    inputs, t = obj.prepare(make_batch(cfg, batch=2), torch.arange(2))
    torch.manual_seed(0)
    model = DualForceModel(cfg.model)
    loss, metrics = obj.losses(model(**inputs, return_aux=True), t)
    assert {"loss", "loss_video", "loss_struct", "loss_flame", "loss_lipsync"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    loss.backward()
    for name in ("aux.flame.weight", "aux.lip_audio.0.weight", "aux.lip_struct.0.weight", "video.head.head.weight",
                 "struct.head.head.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and float(grad.abs().sum()) > 0, name


def test_no_struct_stream_ablation_trains_video_with_audio():
    """model.struct_tower=false in phase 4: audio still conditions the video; only the video loss exists."""
    cfg = make_cfg("model.struct_tower=false")
    obj = DiffusionForcingObjective(cfg)
    inputs, t = obj.prepare(make_batch(cfg, batch=2), torch.arange(2))
    assert set(inputs) == {"video_latent", "sigma_video", "audio", "text_emb", "audio_drop", "text_drop"}
    torch.manual_seed(0)
    loss, metrics = obj.losses(DualForceModel(cfg.model)(**inputs, return_aux=True), t)
    assert {k for k in metrics if not k.startswith(("loss_video_sigma", "frames_video_sigma"))} == {"loss", "loss_video"}
