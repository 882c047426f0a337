"""Step 06: speech features aligned to video frames, with the SAME encoder code the sampler uses
(:class:`dualforce_mega.encoders.speech.SpeechEncoder`), so training and generation see one feature
definition.

Step API (called by ``data_tools.prepare`` and ``data_tools.extract_audio``)::

    encoder = build_audio_encoder(path, layer=-1, device="auto")            # HuBERT / wav2vec2 folder
    encoder = build_audio_encoder(None, random_models="tiny", random_dim=m.audio_dim)   # smoke runs
    feats = extract_audio_features(encoder, wave, num_video_frames, fps=25, audio_rate=50)
    feats   float32 [num_video_frames * audio_rate / fps, hidden]   (2 rows per 25-fps video frame)

``wave`` is the clip's 16 kHz mono float waveform starting at video frame 0; it is trimmed or
padded with silence to exactly ``num_video_frames / fps`` seconds. HuBERT / wav2vec2 hop 20 ms
(50 Hz); the encoder's frames are linearly resampled in time onto the 2N feature slots so slots
2k, 2k+1 cover video frame k. Long audio is encoded in 30 s segments with 1 s of context on each
side (bounded memory; ``SpeechEncoder``). ``layer`` picks the hidden state (-1 = last; 0 = the
feature projection before the transformer, i = after transformer layer i).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..encoders.speech import AUDIO_SAMPLE_RATE, SpeechEncoder, tiny_audio_encoder
from ..media import fit_length
from .netutil import RANDOM_PRESETS, random_init, resolve_device

log = logging.getLogger(__name__)


def build_audio_encoder(path: Optional[str], *, random_models: Optional[str] = None,
                        random_dim: Optional[int] = None, layer: int = -1, device: str = "auto",
                        dtype: str = "auto") -> SpeechEncoder:
    """HuBERT / wav2vec2 from a local transformers folder, or (no path, ``random_models="tiny"``)
    a tiny random HuBERT with ``random_dim`` hidden size: the same weights in every process."""
    dev = resolve_device(device)
    dt = {"auto": torch.float16 if dev.type == "cuda" else torch.float32, "fp32": torch.float32,
          "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    if path:
        enc = SpeechEncoder.from_pretrained(path, dev, dt, layer=layer)
        log.info("audio: %s from %s (layer %d) on %s", type(enc.model).__name__, path, layer, dev)
        return enc
    if random_models is None:
        raise ValueError("audio features need an audio encoder path (--audio-encoder: a transformers "
                         "HuBERT / wav2vec2 folder) or --random-models tiny")
    if random_models not in RANDOM_PRESETS or random_dim is None:
        raise ValueError(f"random_models={random_models!r} needs one of {RANDOM_PRESETS} and random_dim")
    log.warning("audio: RANDOM tiny HuBERT (hidden %d, no weights) -- smoke runs only", random_dim)
    with random_init():
        model = tiny_audio_encoder(random_dim)
    return SpeechEncoder(model.to(dev, dt), layer=layer)


def extract_audio_features(encoder: SpeechEncoder, wave: torch.Tensor, num_video_frames: int, fps: int,
                           audio_rate: int) -> torch.Tensor:
    """16 kHz mono ``wave`` [S] -> float32 features [num_video_frames * audio_rate / fps, hidden] on the CPU."""
    if wave.ndim != 1:
        raise ValueError(f"wave must be mono [samples], got shape {list(wave.shape)}")
    if audio_rate % fps:
        raise ValueError(f"audio_rate={audio_rate} must be a multiple of fps={fps}")
    if num_video_frames <= 0:
        raise ValueError(f"num_video_frames={num_video_frames} must be positive")
    samples = num_video_frames * AUDIO_SAMPLE_RATE // fps
    feats = encoder.encode(fit_length(wave.float(), samples), num_video_frames, fps, audio_rate // fps)
    return feats.float().cpu()
