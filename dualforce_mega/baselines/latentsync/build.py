"""Build the LatentSync pipeline once from user paths (or tiny random networks for smoke runs)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from diffusers import AutoencoderKL

from dualforce_mega.preprocess.face import build_detector
from dualforce_mega.preprocess.netutil import RANDOM_PRESETS, random_init, resolve_device

from .config import load_config
from .pipeline import VAE_SCALING, VAE_SHIFT, LipSyncOptions, LipSyncPipeline
from .tiny import tiny_unet_config, tiny_vae, tiny_whisper
from .unet import LatentSyncUNet, load_unet
from .whisper import WhisperFeatures

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class BuildSpec:
    unet_config_path: str
    inference_ckpt_path: Optional[str] = None
    whisper: Optional[str] = None          # transformers folder or OpenAI tiny.pt / small.pt
    vae: Optional[str] = None              # diffusers AutoencoderKL folder (stabilityai/sd-vae-ft-mse)
    random_models: Optional[str] = None    # "tiny": random tiny networks, no paths
    num_frames: Optional[int] = None       # default: the YAML's data.num_frames
    resolution: Optional[int] = None       # default: the YAML's data.resolution
    steps: int = 20
    dtype: str = "float16"
    device: str = "auto"                   # auto: cuda when available


def _check_paths(spec: BuildSpec) -> None:
    given = {"--inference_ckpt_path": spec.inference_ckpt_path, "--whisper": spec.whisper, "--vae": spec.vae}
    if spec.random_models is not None:
        if spec.random_models not in RANDOM_PRESETS:
            raise ValueError(f"--random-models: {spec.random_models!r} is not one of {RANDOM_PRESETS}")
        extra = [k for k, v in given.items() if v]
        if extra:
            raise ValueError(f"--random-models {spec.random_models} builds its own networks; drop {extra}")
        return
    missing = [k for k, v in given.items() if not v]
    if missing:
        raise ValueError(f"missing {missing} (the official weights; or --random-models tiny for a smoke run)")
    for k, v in given.items():
        if not Path(v).exists():
            raise FileNotFoundError(f"{k} {v}: not found")


def build_lipsync(spec: BuildSpec) -> LipSyncPipeline:
    _check_paths(spec)
    if spec.dtype not in DTYPES:
        raise ValueError(f"--dtype: {spec.dtype!r} is not one of {sorted(DTYPES)}")
    device = resolve_device(spec.device)
    dtype = DTYPES[spec.dtype]
    if device.type == "cpu" and dtype != torch.float32:
        log.info("CPU: running in float32 instead of %s", spec.dtype)
        dtype = torch.float32
    cfg = load_config(spec.unet_config_path)
    options = LipSyncOptions(num_frames=spec.num_frames or cfg.data.num_frames, steps=spec.steps,
                             resolution=spec.resolution or cfg.data.resolution, fps=cfg.data.video_fps)
    if spec.random_models:
        log.warning("=" * 72)
        log.warning("RANDOM TINY NETWORKS (--random-models %s): the UNet, VAE and Whisper are random; "
                    "outputs are noise (the YAML's model section is not used)", spec.random_models)
        log.warning("=" * 72)
        with random_init():      # the same random networks in every run (a resumed batch stays consistent)
            unet = LatentSyncUNet(tiny_unet_config()).to(device, dtype)
            vae = tiny_vae()
            whisper = WhisperFeatures(tiny_whisper().to(device, dtype), cfg.data.audio_feat_length)
    else:
        unet = load_unet(cfg.unet, spec.inference_ckpt_path, device, dtype)
        if not Path(spec.vae).is_dir():
            raise FileNotFoundError(f"--vae {spec.vae}: expected a diffusers AutoencoderKL folder "
                                    f"(config.json + weights)")
        vae = AutoencoderKL.from_pretrained(spec.vae, torch_dtype=dtype)
        whisper = WhisperFeatures.from_path(spec.whisper, device, dtype, cfg.data.audio_feat_length)
    # LatentSync overrides whatever the VAE folder says
    vae.register_to_config(scaling_factor=VAE_SCALING, shift_factor=VAE_SHIFT)
    return LipSyncPipeline(unet, vae.to(device, dtype), whisper, build_detector("haar"), options, device, dtype)
