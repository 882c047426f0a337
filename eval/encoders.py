"""Pretrained encoders around the DiT: the Wan VAE (diffusers ``AutoencoderKLWan``) and the speech
encoder (transformers ``HubertModel`` / ``Wav2Vec2Model``), loaded from local paths only.

``tiny_vae`` / ``tiny_audio_encoder`` build small randomly initialised instances of the same
classes for smoke tests (no download, no weights).

Latent convention: the DiT works on VAE latents normalised per channel with the VAE config's
``latents_mean`` / ``latents_std`` (Wan's convention), i.e. ``z_dit = (z - mean) / std``.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
from transformers import AutoConfig, HubertConfig, HubertModel, Wav2Vec2Model

log = logging.getLogger(__name__)

AUDIO_SAMPLE_RATE = 16000
AUDIO_ENCODERS = {"hubert": HubertModel, "wav2vec2": Wav2Vec2Model}


# --------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------
class WanVAE:
    """Reference-image encoding and chunk-by-chunk (streaming) decoding with the Wan VAE."""

    def __init__(self, vae: AutoencoderKLWan):
        self.vae = vae.eval()
        p = next(vae.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.z_dim = vae.config.z_dim
        if self.mean.shape[1] != self.z_dim or self.std.shape[1] != self.z_dim:
            raise ValueError(f"VAE config: latents_mean/latents_std need z_dim={self.z_dim} entries")
        self.spatial_stride = vae.config.scale_factor_spatial
        self.temporal_stride = vae.config.scale_factor_temporal

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], device: torch.device, dtype: torch.dtype) -> "WanVAE":
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{path}: VAE directory not found (diffusers AutoencoderKLWan layout)")
        return cls(AutoencoderKLWan.from_pretrained(str(path), torch_dtype=dtype).to(device))

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """image [B, 3, H, W] in [-1, 1] -> normalised latent [B, z_dim, H/s, W/s] (posterior mode)."""
        x = image.to(self.device, self.dtype).unsqueeze(2)
        z = self.vae.encode(x).latent_dist.mode().float()
        return ((z - self.mean.to(z.device)) / self.std.to(z.device))[:, :, 0]

    def decoder(self) -> "StreamingDecoder":
        return StreamingDecoder(self)


class StreamingDecoder:
    """Decodes latent frames in consecutive pieces with the same result as one ``vae.decode`` call.

    The Wan decoder is causal in time and already runs frame by frame, carrying a cache of the
    last input frames of every causal conv; this object keeps that cache between calls instead of
    clearing it, so each piece costs only its own frames and memory stays constant.
    """

    def __init__(self, vae: WanVAE):
        if vae.vae.config.patch_size is not None:
            raise ValueError("VAE config: patch_size is set (Wan2.2 layout); DualForce uses the Wan2.1 VAE")
        self.wan = vae
        n_convs = sum(1 for m in vae.vae.decoder.modules() if isinstance(m, WanCausalConv3d))
        self.feat_cache: list = [None] * n_convs
        self.first = True

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """normalised latent [B, z_dim, f, h, w] -> video [B, 3, T, H, W] in [-1, 1]
        (T = 1 + 4(f-1) for the first piece, 4f afterwards)."""
        w = self.wan
        z = latent.float() * w.std.to(latent.device) + w.mean.to(latent.device)
        x = w.vae.post_quant_conv(z.to(w.device, w.dtype))
        outs = []
        for i in range(x.shape[2]):
            outs.append(w.vae.decoder(x[:, :, i:i + 1], feat_cache=self.feat_cache, feat_idx=[0],
                                      first_chunk=self.first))
            self.first = False
        return torch.cat(outs, dim=2).float().clamp(-1.0, 1.0)


def tiny_vae(base_dim: int = 8, z_dim: int = 16) -> AutoencoderKLWan:
    """A randomly initialised Wan VAE with Wan2.1's structure (8x spatial, 4x temporal) and few channels."""
    return AutoencoderKLWan(base_dim=base_dim, z_dim=z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                            attn_scales=[], temperal_downsample=[False, True, True],
                            latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)


# --------------------------------------------------------------------------------------
# audio encoder
# --------------------------------------------------------------------------------------
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
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{path}: audio encoder directory not found (transformers layout)")
        kind = AutoConfig.from_pretrained(str(path)).model_type
        if kind not in AUDIO_ENCODERS:
            raise ValueError(f"{path}/config.json: model_type {kind!r} is not one of {sorted(AUDIO_ENCODERS)}")
        model = AUDIO_ENCODERS[kind].from_pretrained(str(path), torch_dtype=dtype).to(device)
        normalize = True
        prep = Path(path) / "preprocessor_config.json"
        if prep.is_file():
            normalize = bool(json.loads(prep.read_text()).get("do_normalize", True))
        return cls(model, layer=layer, normalize=normalize)

    @torch.no_grad()
    def _hidden(self, wave: torch.Tensor) -> torch.Tensor:
        x = wave.to(self.device, torch.float32)
        if self.normalize:  # Wav2Vec2FeatureExtractor's zero-mean unit-variance
            x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
        out = self.model(x[None].to(self.dtype), output_hidden_states=self.layer != -1)
        h = out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]
        return h[0].float()

    @torch.no_grad()
    def encode(self, wave: torch.Tensor, num_video_frames: int, fps: int, per_frame: int) -> torch.Tensor:
        """wave [S] at 16 kHz covering ``num_video_frames / fps`` s -> features [per_frame * frames, dim]."""
        feats = self.hidden_states(wave)
        # [T, D] -> [target, D], linear in time over the clip
        target = per_frame * num_video_frames
        return F.interpolate(feats.t()[None], size=target, mode="linear", align_corners=False)[0].t()

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


def tiny_audio_encoder(hidden_size: int) -> HubertModel:
    """A randomly initialised HuBERT with the real feature extractor geometry (20 ms hop)."""
    heads = 2 if hidden_size % 2 == 0 else 1
    cfg = HubertConfig(hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=heads,
                       intermediate_size=2 * hidden_size, conv_dim=(32,) * 7, num_conv_pos_embeddings=16,
                       num_conv_pos_embedding_groups=math.gcd(4, hidden_size))
    return HubertModel(cfg)
