"""The Wan VAE (diffusers ``AutoencoderKLWan``), loaded from a local path only: reference-image
encoding and chunk-by-chunk (streaming) decoding. ``tiny_vae`` builds a small randomly initialised
instance of the same class for smoke tests (no download, no weights).

Latent convention: the DiT works on VAE latents normalised per channel with the VAE config's
``latents_mean`` / ``latents_std`` (Wan's convention), i.e. ``z_dit = (z - mean) / std``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d


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

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1], T = 1 + 4k -> normalised latent [B, z_dim, 1 + k, H/s, W/s]
        (posterior mode; the first latent frame holds video frame 0 alone)."""
        z = self.vae.encode(video.to(self.device, self.dtype)).latent_dist.mode().float()
        return (z - self.mean.to(z.device)) / self.std.to(z.device)

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
