"""FaceFormer's model: the reference's masks and encoding (recomputed here the reference's way), causality,
autoregressive inference == teacher forcing, batches of mixed lengths, and sequences past 600 frames."""
from __future__ import annotations

import math

import pytest
import torch

from dualforce_mega.baselines.faceformer.build import build_audio_encoder
from dualforce_mega.models.faceformer import (FaceFormer, FaceFormerModelConfig, alibi_slopes, alignment_mask,
                                              biased_causal_mask, periodic_encoding)

pytestmark = pytest.mark.usefixtures("single_thread")

SAMPLES_PER_FRAME = 640   # 16 kHz / 25 fps


def reference_biased_mask(n_head: int, max_seq_len: int, period: int) -> torch.Tensor:
    """EvelynFan/FaceFormer ``init_biased_mask`` (its construction, for power-of-two head counts)."""
    start = 2 ** (-2 ** -(math.log2(n_head) - 3))
    slopes = torch.tensor([start * start ** i for i in range(n_head)])
    bias = torch.arange(start=0, end=max_seq_len, step=period).unsqueeze(1).repeat(1, period).view(-1) // period
    bias = -torch.flip(bias, dims=[0])
    alibi = torch.zeros(max_seq_len, max_seq_len)
    for i in range(max_seq_len):
        alibi[i, :i + 1] = bias[-(i + 1):]
    alibi = slopes.unsqueeze(1).unsqueeze(1) * alibi.unsqueeze(0)
    mask = (torch.triu(torch.ones(max_seq_len, max_seq_len)) == 1).transpose(0, 1)
    mask = mask.float().masked_fill(mask == 0, float("-inf")).masked_fill(mask == 1, 0.0)
    return mask.unsqueeze(0) + alibi


def test_biased_mask_matches_the_reference_and_extends_past_600() -> None:
    assert alibi_slopes(4).tolist() == [1 / 4, 1 / 16, 1 / 64, 1 / 256]
    assert alibi_slopes(6).tolist() == [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8]   # interleaved completion
    ours = biased_causal_mask(alibi_slopes(4), 30, torch.arange(600), 600)
    torch.testing.assert_close(ours, reference_biased_mask(4, 600, 30), rtol=0, atol=0)
    late = biased_causal_mask(alibi_slopes(4), 30, torch.tensor([700]), 702)[:, 0]
    assert late[0, 640].item() == -0.5 and late[3, 640].item() == -2 / 256      # floor(60 / 30) = 2
    assert late[0, 670].item() == -0.25 and late[0, 671].item() == 0.0          # floor(30 / 30), floor(29 / 30)
    assert late[:, 701].eq(float("-inf")).all()


def test_alignment_mask_and_periodic_encoding_match_the_reference() -> None:
    t, s = 7, 14
    ref = torch.ones(t, s)            # enc_dec_mask(BIWI): True = hidden
    for i in range(t):
        ref[i, i * 2:i * 2 + 2] = 0
    assert torch.equal(alignment_mask(torch.arange(t), s, 2), ref == 0)
    d, period = 8, 30
    pe = periodic_encoding(torch.arange(3 * period + 5), d, period)
    div = torch.exp(torch.arange(0, d, 2).float() * (-math.log(10000.0) / d))
    pos = torch.arange(period).float()[:, None]
    torch.testing.assert_close(pe[:period, 0::2], torch.sin(pos * div))
    torch.testing.assert_close(pe[:period, 1::2], torch.cos(pos * div))
    torch.testing.assert_close(pe[2 * period:3 * period], pe[:period], rtol=0, atol=0)


@pytest.fixture(scope="module")
def model() -> FaceFormer:
    torch.manual_seed(0)
    cfg = FaceFormerModelConfig(audio_encoder="random:tiny", subjects=("a", "b", "c"), layers=2)
    encoder, normalize = build_audio_encoder(cfg.audio_encoder)
    m = FaceFormer(cfg, encoder, normalize)
    torch.nn.init.normal_(m.motion_out.weight, std=0.3)   # zero-initialised: make outputs depend on inputs
    return m.eval()


def test_causality_frame_t_ignores_later_audio_and_motion(model) -> None:
    g = torch.Generator().manual_seed(1)
    T, t = 24, 10
    feats = torch.randn(1, 2 * T, model.cfg.feature_dim, generator=g)
    motion = torch.randn(1, T, model.cfg.motion_dim, generator=g)
    style = torch.tensor([1])
    with torch.no_grad():
        base = model.teacher_forced(feats, motion, style)
        feats2, motion2 = feats.clone(), motion.clone()
        feats2[:, 2 * (t + 1):] += 5.0        # audio after frame t
        motion2[:, t:] += 5.0                 # motion from frame t on (frame t's output sees frames < t)
        moved = model.teacher_forced(feats2, motion2, style)
    torch.testing.assert_close(moved[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-6)
    assert (moved[:, t + 1:] - base[:, t + 1:]).abs().amax(-1).min() > 1e-3     # later frames do change
    with torch.no_grad():     # and frame t does see its own two audio slots and the previous motion
        f3 = feats.clone()
        f3[:, 2 * t + 1] += 5.0
        m3 = motion.clone()
        m3[:, t - 1] += 5.0
        assert (model.teacher_forced(f3, motion, style)[:, t] - base[:, t]).abs().max() > 1e-3
        assert (model.teacher_forced(feats, m3, style)[:, t] - base[:, t]).abs().max() > 1e-3


def clips(lengths: list[int], seed: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    frames = torch.tensor(lengths)
    audio = torch.zeros(len(lengths), max(lengths) * SAMPLES_PER_FRAME)
    for i, n in enumerate(lengths):
        audio[i, :n * SAMPLES_PER_FRAME] = torch.randn(n * SAMPLES_PER_FRAME, generator=g)
    return audio, frames * SAMPLES_PER_FRAME, frames


def test_generation_equals_teacher_forcing_on_its_own_output_and_batches_mix_lengths(model) -> None:
    audio, audio_len, frames = clips([30, 17, 23])
    style = torch.tensor([0, 2, 1])
    gen = model.generate(audio, audio_len, frames, style)
    with torch.no_grad():
        tf = model(audio, audio_len, frames, gen, style)
    for i, n in enumerate(frames.tolist()):
        torch.testing.assert_close(tf[i, :n], gen[i, :n], rtol=0, atol=2e-5)
    for i, n in enumerate(frames.tolist()):   # each clip alone == in the batch (padding never leaks in)
        alone = model.generate(audio[i:i + 1, :n * SAMPLES_PER_FRAME], audio_len[i:i + 1], frames[i:i + 1],
                               style[i:i + 1])
        torch.testing.assert_close(alone[0], gen[i, :n], rtol=0, atol=2e-5)
    assert gen[0].std(0).min() > 0 and (gen[1, :17] - gen[2, :17]).abs().max() > 1e-3


def test_sequences_longer_than_the_reference_mask(model) -> None:
    n = 650
    audio, audio_len, frames = clips([n], seed=3)
    style = torch.tensor([0])
    gen = model.generate(audio, audio_len, frames, style)
    assert gen.shape == (1, n, model.cfg.motion_dim) and torch.isfinite(gen).all()
    with torch.no_grad():
        tf = model(audio, audio_len, frames, gen, style)
    torch.testing.assert_close(tf, gen, rtol=0, atol=2e-5)


def test_training_mode_grads_reach_the_transformer_not_the_frozen_cnn(model) -> None:
    model.train()
    try:
        audio, audio_len, frames = clips([20, 12])
        motion = torch.randn(2, 20, model.cfg.motion_dim)
        model(audio, audio_len, frames, motion, torch.tensor([0, 1])).square().mean().backward()
        cnn = list(model.audio_encoder.feature_extractor.parameters())
        assert cnn and all(not p.requires_grad and p.grad is None for p in cnn)
        layer = model.audio_encoder.encoder.layers[0].attention.q_proj.weight
        assert layer.requires_grad and layer.grad is not None and layer.grad.abs().sum() > 0
        assert model.style.weight.grad[2].abs().sum() == 0 and model.style.weight.grad[:2].abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
