"""LatentSync's audio features: the Whisper encoder's per-layer embeddings, windowed per video frame.

As the official ``audio2feature.py`` (which runs OpenAI's Whisper code): the log-mel spectrogram of
the whole clip (normalised with the clip's maximum), cut into 30 s segments that are zero-padded in
mel space; per segment the encoder's input embedding and the output of every block *before* the
final LayerNorm -> ``[T50, layers + 1, d]`` at 50 Hz. For video frame ``i`` (at ``fps``) the window is
the 50 Hz frames ``c - 2*a0 .. c + 2*a1 + 1`` around ``c = int(i * 50 / fps)`` (clamped at the ends),
flattened to ``[2*(a0 + a1 + 1) * (layers + 1), d]`` tokens (tiny: 10 x 5 = 50 tokens of 384).

The encoder is transformers' ``WhisperEncoder``, loaded from a transformers folder
(``openai/whisper-tiny`` / ``-small``) or from OpenAI's ``tiny.pt`` / ``small.pt`` (the files
LatentSync's checkpoint folder ships), whose encoder keys are renamed here.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from transformers import WhisperConfig, WhisperModel
from transformers.audio_utils import mel_filter_bank
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from dualforce_mega.encoders.weights import load_strict

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
N_FFT = 400            # Whisper's STFT: 25 ms windows, 10 ms hop -> 100 mel frames / s
HOP = 160
MEL_FMAX = SAMPLE_RATE / 2
LOG_MEL_RANGE = 8.0    # dynamic range kept below the clip's maximum (log10 units)


class WhisperFeatures:
    """Whisper encoder embeddings for LatentSync, and their per-frame windows."""

    def __init__(self, encoder: WhisperEncoder, audio_feat_length: tuple[int, int] = (2, 2)):
        self.encoder = encoder.eval()
        cfg = encoder.config
        self.dim = cfg.d_model
        self.layers = cfg.encoder_layers + 1
        self.n_mels = cfg.num_mel_bins
        stride = encoder.conv1.stride[0] * encoder.conv2.stride[0]
        self.segment = cfg.max_source_positions * stride          # mel frames per encoder call (3000)
        self.rate = SAMPLE_RATE / HOP / stride                     # encoder frames per second (50)
        self.before, self.after = audio_feat_length
        self.filters = torch.from_numpy(mel_filter_bank(
            num_frequency_bins=N_FFT // 2 + 1, num_mel_filters=self.n_mels, min_frequency=0.0,
            max_frequency=MEL_FMAX, sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")).float().T

    @property
    def window_frames(self) -> int:
        """50 Hz frames per video-frame window (10)."""
        return 2 * (self.before + self.after + 1)

    @property
    def tokens(self) -> int:
        return self.window_frames * self.layers

    @classmethod
    def from_path(cls, path: Union[str, Path], device: torch.device, dtype: torch.dtype,
                  audio_feat_length: tuple[int, int] = (2, 2)) -> "WhisperFeatures":
        p = Path(path)
        if p.is_dir():
            model = WhisperModel.from_pretrained(str(p), dtype=dtype)
            encoder = model.get_encoder()
        elif p.is_file():
            encoder = encoder_from_openai(p)
        else:
            raise FileNotFoundError(f"{p}: Whisper not found (a transformers folder or OpenAI's tiny.pt / small.pt)")
        return cls(encoder.to(device=device, dtype=dtype), audio_feat_length)

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """Mono 16 kHz [samples] -> [n_mels, samples // 160], normalised over the whole clip."""
        wave = wave.float()
        spec = torch.stft(wave, N_FFT, HOP, window=torch.hann_window(N_FFT, device=wave.device), return_complex=True)
        power = spec[:, :-1].abs() ** 2
        mel = (self.filters.to(wave.device) @ power).clamp(min=1e-10).log10()
        mel = torch.maximum(mel, mel.max() - LOG_MEL_RANGE)
        return (mel + 4.0) / 4.0

    @torch.no_grad()
    def features(self, wave: torch.Tensor) -> torch.Tensor:
        """Mono 16 kHz [samples] -> [T50, layers + 1, d] (float32, on the encoder's device)."""
        p = next(self.encoder.parameters())
        mel = self.log_mel(wave.to(p.device))
        total = mel.shape[1]
        starts = range(0, total, self.segment)
        segs = torch.stack([F.pad(mel[:, s:s + self.segment], (0, self.segment - min(self.segment, total - s)))
                            for s in starts])
        captured = []
        hook = self.encoder.layers[-1].register_forward_hook(
            lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
        try:
            out = self.encoder(segs.to(p.dtype), output_hidden_states=True)
        finally:
            hook.remove()
        # transformers' last hidden state is after the final LayerNorm; LatentSync uses the raw block output
        hidden = torch.stack(list(out.hidden_states[:-1]) + [captured[0]], dim=2)   # [S, T, layers+1, d]
        keep = [(min(self.segment, total - s)) // 2 for s in starts]                 # 2 mel frames per feature
        return torch.cat([h[:k] for h, k in zip(hidden, keep)]).float()

    def num_video_frames(self, num_features: int, fps: float) -> int:
        """How many video frames the official ``feature2chunks`` makes of ``num_features`` (it keeps
        going until a window's centre passes the end: a frame or two past the audio)."""
        i = 0
        while True:
            centre = math.floor(i * self.rate / fps)
            i += 1
            if centre > num_features:
                return i

    def windows(self, features: torch.Tensor, fps: float, num_frames: int) -> torch.Tensor:
        """[T50, layers + 1, d] -> per video frame [num_frames, tokens, d]."""
        centre = torch.floor(torch.arange(num_frames, dtype=torch.float64) * self.rate / fps).long()
        offsets = torch.arange(-2 * self.before, 2 * (self.after + 1))
        idx = (centre[:, None] + offsets[None]).clamp(0, len(features) - 1)
        return features[idx.to(features.device)].reshape(num_frames, -1, self.dim)


# OpenAI checkpoint (whisper/model.py) -> transformers WhisperEncoder parameter names
OPENAI_ENCODER_KEYS = {"attn.query": "self_attn.q_proj", "attn.key": "self_attn.k_proj",
                       "attn.value": "self_attn.v_proj", "attn.out": "self_attn.out_proj",
                       "attn_ln": "self_attn_layer_norm", "mlp.0": "fc1", "mlp.2": "fc2", "mlp_ln": "final_layer_norm"}


def openai_encoder_config(dims: dict) -> WhisperConfig:
    d = dims["n_audio_state"]
    return WhisperConfig(d_model=d, encoder_layers=dims["n_audio_layer"], encoder_attention_heads=dims["n_audio_head"],
                         encoder_ffn_dim=4 * d, max_source_positions=dims["n_audio_ctx"], num_mel_bins=dims["n_mels"])


def convert_openai_encoder(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI Whisper state dict -> WhisperEncoder state dict (the decoder is dropped)."""
    out = {}
    for k, v in state.items():
        if not k.startswith("encoder."):
            continue
        k = k[len("encoder."):]
        if k == "positional_embedding":
            k = "embed_positions.weight"
        elif k.startswith("ln_post."):
            k = "layer_norm." + k[len("ln_post."):]
        elif k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            for old, new in OPENAI_ENCODER_KEYS.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            k = f"layers.{i}.{rest}"
        out[k] = v
    return out


def encoder_from_openai(path: Path) -> WhisperEncoder:
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch raises many types for a bad file
        raise ValueError(f"{path}: cannot read the Whisper checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise ValueError(f"{path}: not an OpenAI Whisper checkpoint (no 'dims' / 'model_state_dict')")
    encoder = WhisperEncoder(openai_encoder_config(ckpt["dims"]))
    state = convert_openai_encoder(ckpt["model_state_dict"])
    load_strict(encoder, state, path, "Whisper encoder of its dims", shown_prefix="encoder.")
    log.info("loaded Whisper encoder from OpenAI checkpoint %s (d=%d, %d layers)", path,
             encoder.config.d_model, encoder.config.encoder_layers)
    return encoder
