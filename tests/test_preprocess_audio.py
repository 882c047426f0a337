"""Step 06 audio features: 2 features per 25-fps video frame, the chosen hidden layer, loading from
a transformers folder, and identical random encoders in every process."""
from __future__ import annotations

import pytest
import torch

from dualforce_mega.encoders.speech import AUDIO_SAMPLE_RATE, SpeechEncoder
from dualforce_mega.preprocess.audio_features import build_audio_encoder, extract_audio_features

pytestmark = pytest.mark.usefixtures("single_thread")
FPS, RATE, DIM = 25, 50, 32


@pytest.fixture(scope="module")
def encoder() -> SpeechEncoder:
    return build_audio_encoder(None, random_models="tiny", random_dim=DIM, device="cpu")


@pytest.mark.parametrize("frames", [1, 7, 26])
@pytest.mark.parametrize("seconds_scale", [1.0, 0.5, 1.3])  # audio exactly as long, shorter, longer
def test_two_features_per_video_frame(encoder, frames, seconds_scale) -> None:
    wave = torch.randn(int(frames * AUDIO_SAMPLE_RATE / FPS * seconds_scale) + 1)
    feats = extract_audio_features(encoder, wave, frames, FPS, RATE)
    assert feats.shape == (2 * frames, DIM) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()


def test_long_audio_in_segments_keeps_the_length(encoder) -> None:
    frames = 60
    wave = torch.randn(frames * AUDIO_SAMPLE_RATE // FPS)
    seg = SpeechEncoder(encoder.model, segment_s=0.5, context_s=0.1)
    feats = extract_audio_features(seg, wave, frames, FPS, RATE)
    assert feats.shape == (2 * frames, DIM)
    # the first segment (with its right context) sees the same samples as the whole-clip run's start:
    # its early rows differ from the unsegmented features only through attention beyond the segment
    whole = extract_audio_features(encoder, wave, frames, FPS, RATE)
    assert torch.nn.functional.cosine_similarity(feats, whole, dim=-1).mean() > 0.5


def test_layer_choice_changes_output(encoder, tmp_path) -> None:
    frames = 10
    wave = torch.randn(frames * AUDIO_SAMPLE_RATE // FPS)
    encoder.model.save_pretrained(tmp_path)
    by_layer = {layer: extract_audio_features(build_audio_encoder(str(tmp_path), layer=layer, device="cpu"),
                                              wave, frames, FPS, RATE) for layer in (0, 1, 2, -1)}
    assert not torch.allclose(by_layer[0], by_layer[1])
    assert not torch.allclose(by_layer[1], by_layer[-1])
    # the tiny HuBERT has 2 transformer layers: hidden state 2 is the last one
    torch.testing.assert_close(by_layer[2], by_layer[-1])
    # loaded from the folder = the in-memory encoder
    torch.testing.assert_close(by_layer[-1], extract_audio_features(encoder, wave, frames, FPS, RATE))


def test_random_encoder_is_the_same_everywhere() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_audio_encoder(None, random_models="tiny", random_dim=DIM, device="cpu")
    after = torch.rand(1)
    b = build_audio_encoder(None, random_models="tiny", random_dim=DIM, device="cpu")
    assert torch.equal(before, after)  # the caller's RNG stream is untouched
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k


def test_bad_calls_are_clear(encoder) -> None:
    with pytest.raises(ValueError, match="audio encoder path"):
        build_audio_encoder(None)
    with pytest.raises(ValueError, match="mono"):
        extract_audio_features(encoder, torch.zeros(2, 100), 1, FPS, RATE)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        build_audio_encoder("no_such_dir")
