"""Fréchet Video Distance with two backbones.

* ``i3d`` (the standard; stylegan-v ``frechet_video_distance.py``): the I3D torchscript
  ``i3d_torchscript.pt`` (Kinetics-400, the TF-hub FVD network) called as stylegan-v calls it:
  uint8 clips [N, 3, 16, H, W], ``rescale=True, resize=True, return_features=True`` — the network maps
  x -> x / 255 * 2 - 1 (range [-1, 1]) and resizes to 224² itself, and returns 400-d features.
* ``r3d18`` (what the seed notes used): torchvision R3D-18, 512-d pooled features (``r3d.py``).

Clips are 16 consecutive frames; a video gives its first clip (``clips_per_video=1``, stylegan-v's
protocol for generated videos) or every non-overlapping clip (``0``).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import r3d
from .weights import WeightFileError

CLIP_FRAMES = 16
I3D_SIZE = 224
I3D_FEATURE_DIM = 400
BACKBONES = ("i3d", "r3d18")


def load_i3d(path: Union[str, Path], device: torch.device) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():  # stylegan-v ships TorchScript; there is no other format
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location=device).eval()
    except Exception as e:  # noqa: BLE001
        raise WeightFileError(f"{path}: not a TorchScript I3D file ({type(e).__name__}: {e})") from e


class TinyI3D(nn.Module):
    """A random stand-in with the I3D torchscript's call convention, for smoke runs and tests."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv = nn.Conv3d(3, width, kernel_size=3, stride=2, padding=1)
        self.fc = nn.Linear(width, I3D_FEATURE_DIM)
        self.size = I3D_SIZE

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        x = x.float()
        if rescale:
            x = x / 255.0 * 2.0 - 1.0
        if resize:
            x = F.interpolate(x, size=(x.shape[2], self.size, self.size), mode="trilinear", align_corners=False)
        feats = self.fc(F.adaptive_avg_pool3d(torch.relu(self.conv(x)), 1).flatten(1))
        return feats if return_features else torch.softmax(feats, dim=1)


def tiny_i3d() -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # the reference network is TorchScript, so the stand-in is too
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(TinyI3D().eval())


def video_clips(frames: np.ndarray, clips_per_video: int = 1, clip_frames: int = CLIP_FRAMES) -> np.ndarray:
    """uint8 [T, H, W, 3] -> [K, clip_frames, H, W, 3]: the first K non-overlapping clips (all when K = 0)."""
    n = len(frames) // clip_frames
    if n == 0:
        raise ValueError(f"video has {len(frames)} frames; FVD needs at least {clip_frames}")
    k = n if clips_per_video == 0 else min(n, clips_per_video)
    return frames[:k * clip_frames].reshape(k, clip_frames, *frames.shape[1:])


class VideoFeatures:
    """One backbone, its input convention and batching: ``__call__(clips uint8 [N, T, H, W, 3])`` ->
    float64 features [N, D]."""

    def __init__(self, backbone: str, net: Callable, device: torch.device, batch: int = 4):
        if backbone not in BACKBONES:
            raise ValueError(f"FVD backbone {backbone!r} is not one of {BACKBONES}")
        self.backbone, self.net, self.device, self.batch = backbone, net, device, batch

    @torch.no_grad()
    def __call__(self, clips: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(clips), self.batch):
            x = torch.from_numpy(np.ascontiguousarray(clips[i:i + self.batch])).to(self.device)
            if self.backbone == "i3d":
                feats = self.net(x.permute(0, 4, 1, 2, 3).contiguous(), rescale=True, resize=True,
                                 return_features=True)
            else:
                feats = self.net(r3d.preprocess(x))
            out.append(feats.double().cpu().numpy())
        return np.concatenate(out)

