"""The speech encoder (transformers ``HubertModel`` / ``Wav2Vec2Model``), loaded from a local path
only, producing features aligned to video frames. ``tiny_audio_encoder`` builds a small randomly
initialised instance of the same class for smoke tests (no download, no weights).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from transformers import AutoConfig, HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2Model

log = logging.getLogger(__name__)

AUDIO_SAMPLE_RATE = 16000
AUDIO_ENCODERS = {"hubert": HubertModel, "wav2vec2": Wav2Vec2Model}


class SpeechEncoder:
    """16 kHz mono speech -> hidden states aligned to ``per_frame`` features per video frame.

    HuBERT / wav2vec2 emit one frame per 20 ms (50 Hz) minus a boundary frame; the features are
    linearly resampled in time to exactly ``per_frame * num_video_frames`` frames so feature
    ``2k, 2k+1`` belong to video frame k (at 25 fps). Long audio is encoded in segments of
    ``segment_s`` seconds with ``context_s`` seconds of overlap on each side (attention cost is
    quadratic in length); the overlap is discarded.
    """

    def __init__(self, model: Union[HubertModel, Wav2Vec2Model], layer: int = -1, normalize: bool = True,
                 segment_s: float = 30.0, context_s: float = 1.0):
        self.model = model.eval()
        self.layer = layer
        self.normalize = normalize
        self.segment = int(segment_s * AUDIO_SAMPLE_RATE)
        self.context = int(context_s * AUDIO_SAMPLE_RATE)
        self.stride = math.prod(model.config.conv_stride)  # samples per feature frame (320)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], device: torch.device, dtype: torch.dtype,
                        layer: int = -1) -> "SpeechEncoder":
        model, normalize = load_speech_model(path, dtype)
        return cls(model.to(device), layer=layer, normalize=normalize)

    @torch.no_grad()
    def _hidden(self, wave: torch.Tensor) -> torch.Tensor:
        x = wave.to(self.device, torch.float32)
        if self.normalize:
            x = normalize_wave(x)
        out = self.model(x[None].to(self.dtype), output_hidden_states=self.layer != -1)
        h = out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]
        return h[0].float()

    @torch.no_grad()
    def encode(self, wave: torch.Tensor, num_video_frames: int, fps: int, per_frame: int) -> torch.Tensor:
        """wave [S] at 16 kHz covering ``num_video_frames / fps`` s -> features [per_frame * frames, dim]."""
        feats = self.hidden_states(wave)
        return to_feature_slots(feats, per_frame * num_video_frames)

    @torch.no_grad()
    def hidden_states(self, wave: torch.Tensor) -> torch.Tensor:
        """wave [S] -> encoder frames [T, dim] at the encoder's hop, segment by segment."""
        pieces = []
        for start in range(0, max(wave.numel(), 1), self.segment):
            lo = max(start - self.context, 0)
            hi = min(start + self.segment + self.context, wave.numel())
            h = self._hidden(wave[lo:hi])
            a = (start - lo) // self.stride
            b = a + -(-(min(start + self.segment, wave.numel()) - start) // self.stride)
            pieces.append(h[a:min(b, h.shape[0])])
        return torch.cat(pieces)


def normalize_wave(x: torch.Tensor) -> torch.Tensor:
    """Wav2Vec2FeatureExtractor's ``do_normalize``: zero mean, unit variance over the clip."""
    return (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)


def to_feature_slots(feats: torch.Tensor, target: int) -> torch.Tensor:
    """Encoder frames [T, D] -> [target, D], linear in time over the clip (slot i at the same relative
    time as in the encoder's frames), so ``per_frame`` slots line up with each video frame."""
    return F.interpolate(feats.t()[None], size=target, mode="linear", align_corners=False)[0].t()


def load_speech_model(path: Union[str, Path], dtype: torch.dtype = torch.float32,
                      **config_overrides) -> tuple[Union[HubertModel, Wav2Vec2Model], bool]:
    """A HuBERT / wav2vec2 transformers folder -> (the model, whether its feature extractor normalises
    the waveform: ``preprocessor_config.json``'s ``do_normalize``, default True). ``config_overrides``
    replace config.json values (e.g. ``layerdrop=0.0``)."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: audio encoder directory not found (transformers layout)")
    kind = AutoConfig.from_pretrained(str(path)).model_type
    if kind not in AUDIO_ENCODERS:
        raise ValueError(f"{path}/config.json: model_type {kind!r} is not one of {sorted(AUDIO_ENCODERS)}")
    model = AUDIO_ENCODERS[kind].from_pretrained(str(path), dtype=dtype, **config_overrides)
    normalize = True
    prep = Path(path) / "preprocessor_config.json"
    if prep.is_file():
        normalize = bool(json.loads(prep.read_text()).get("do_normalize", True))
    return model, normalize


def tiny_audio_encoder(hidden_size: int, kind: str = "hubert", **config_overrides) -> Union[HubertModel, Wav2Vec2Model]:
    """A randomly initialised HuBERT (or wav2vec2) with the real feature extractor geometry (20 ms hop)."""
    heads = 2 if hidden_size % 2 == 0 else 1
    config_class = {"hubert": HubertConfig, "wav2vec2": Wav2Vec2Config}[kind]
    cfg = config_class(hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=heads,
                       intermediate_size=2 * hidden_size, conv_dim=(32,) * 7, num_conv_pos_embeddings=16,
                       num_conv_pos_embedding_groups=math.gcd(4, hidden_size), **config_overrides)
    return AUDIO_ENCODERS[kind](cfg)
