"""Building FaceFormer and its FLAME model from the config: real weights from local paths, or
``model.audio_encoder=random:tiny`` (a tiny random wav2vec2 of the same class, for smoke runs)."""
from __future__ import annotations

import logging

import torch.nn as nn

from ...config import ConfigError
from ...encoders.speech import load_speech_model, tiny_audio_encoder
from ...models.faceformer import FaceFormer, FaceFormerModelConfig
from ...models.flame import FlameModel, FlameModelError
from .config import RANDOM_AUDIO_ENCODER

TINY_AUDIO_DIM = 32
TINY_DETERMINISTIC = dict(layerdrop=0.0, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                          feat_proj_dropout=0.0, mask_time_prob=0.0)

log = logging.getLogger(__name__)


def build_audio_encoder(spec: str) -> tuple[nn.Module, bool]:
    """(wav2vec2 / HuBERT module, whether it normalises the waveform). ``layerdrop`` is turned off: every
    rank must run the same layers (ZeRO-3 gathers parameters per layer, collectively)."""
    if spec == RANDOM_AUDIO_ENCODER:
        log.warning("model.audio_encoder=%s: a RANDOM tiny wav2vec2 (hidden %d, no pretrained weights) -- smoke "
                    "runs and tests only", spec, TINY_AUDIO_DIM)
        # no dropout and no time masking: smoke runs are deterministic, whatever the number of ranks
        return tiny_audio_encoder(TINY_AUDIO_DIM, kind="wav2vec2", **TINY_DETERMINISTIC), True
    if not spec:
        raise ConfigError(f"model.audio_encoder: empty (a transformers wav2vec2 folder such as "
                          f"facebook/wav2vec2-base-960h, or {RANDOM_AUDIO_ENCODER})")
    try:
        model, normalize = load_speech_model(spec, layerdrop=0.0)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.audio_encoder: {e}") from e
    log.info("audio encoder: %s from %s (normalize=%s)", type(model).__name__, spec, normalize)
    return model, normalize


def build_model(cfg: FaceFormerModelConfig) -> FaceFormer:
    encoder, normalize = build_audio_encoder(cfg.audio_encoder)
    return FaceFormer(cfg, encoder, normalize_audio=normalize)


def build_flame(cfg: FaceFormerModelConfig) -> FlameModel:
    if not cfg.flame_model:
        raise ConfigError("model.flame_model: empty (FLAME's generic_model.pkl, or an .npz with its array names)")
    try:
        return FlameModel.from_file(cfg.flame_model, cfg.flame_shape_components, cfg.expr_dims)
    except FlameModelError as e:
        raise ConfigError(f"model.flame_model: {e}") from e
