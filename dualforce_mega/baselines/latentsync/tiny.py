"""Tiny randomly initialised instances of LatentSync's networks (same classes as the real ones) for
smoke runs and tests: ``--random-models tiny``. Their outputs are noise; nothing is downloaded."""
from __future__ import annotations

import logging

from diffusers import AutoencoderKL
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from .config import CROSS_ATTN_DOWN, CROSS_ATTN_UP, DOWN, UP, MotionModuleConfig, UNetConfig

log = logging.getLogger(__name__)

TINY_AUDIO_DIM = 32
TINY_WHISPER_SEGMENT_S = 2     # encoder context (30 s in the real model), short so tests cross segments
LATENT_CHANNELS = 4            # SD-VAE: in_channels 13 = 4 noisy + 1 mask + 4 masked + 4 reference


def tiny_whisper() -> WhisperEncoder:
    rate = 50    # encoder frames per second (as the real model)
    # the decoder is never built (WhisperEncoder alone); its sizes only keep the config valid
    cfg = WhisperConfig(d_model=TINY_AUDIO_DIM, encoder_layers=2, encoder_attention_heads=2,
                        encoder_ffn_dim=4 * TINY_AUDIO_DIM, decoder_layers=1, decoder_attention_heads=2,
                        decoder_ffn_dim=64, num_mel_bins=80,
                        max_source_positions=TINY_WHISPER_SEGMENT_S * rate)
    return WhisperEncoder(cfg).eval()


def tiny_vae() -> AutoencoderKL:
    """Three levels (8x downsampling in SD-VAE, 4x here), 4 latent channels, SD scaling 0.18215."""
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=LATENT_CHANNELS,
                         norm_num_groups=8, sample_size=64).eval()


def tiny_unet_config() -> UNetConfig:
    """Two levels, one layer each, motion modules on; channels stay multiples of 32 (the temporal
    module's fixed group count)."""
    return UNetConfig(in_channels=3 * LATENT_CHANNELS + 1, out_channels=LATENT_CHANNELS, block_out_channels=(32, 64),
                      layers_per_block=1, down_block_types=(CROSS_ATTN_DOWN, DOWN), up_block_types=(UP, CROSS_ATTN_UP),
                      attention_head_dim=2, cross_attention_dim=TINY_AUDIO_DIM,
                      motion_module_kwargs=MotionModuleConfig(num_attention_heads=2))
