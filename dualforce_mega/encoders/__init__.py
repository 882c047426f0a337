"""Pretrained encoders around the DiT, loaded from local paths only (tiny random instances of the
same classes for smoke tests): the Wan VAE (``vae``), the speech encoder (``speech``)."""
from .speech import AUDIO_ENCODERS, AUDIO_SAMPLE_RATE, SpeechEncoder, tiny_audio_encoder
from .vae import StreamingDecoder, WanVAE, tiny_vae

__all__ = ["AUDIO_ENCODERS", "AUDIO_SAMPLE_RATE", "SpeechEncoder", "StreamingDecoder", "WanVAE",
           "tiny_audio_encoder", "tiny_vae"]
