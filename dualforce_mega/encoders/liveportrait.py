"""The LivePortrait motion extractor (KwaiVGI/LivePortrait ``src/modules/motion_extractor.py`` +
``convnextv2.py``), loaded STRICTLY from the official ``motion_extractor.pth`` key layout.

A ConvNeXt-V2 backbone (tiny: depths 3,3,9,3; dims 96,192,384,768) over a 256x256 RGB image in
[0, 1], global average pooling, a LayerNorm, and seven linear heads: canonical keypoints ``kp``
(3*num_kp), expression offsets ``exp`` (3*num_kp), ``pitch`` / ``yaw`` / ``roll`` as ``num_bins``-way
classifiers, translation ``t`` (3) and ``scale`` (1). The official model uses num_kp = 21
(``models.yaml``; the code default is 24) and 66 bins of 3 degrees.

State-dict keys (``MotionExtractor`` wraps the backbone as ``detector``)::

    detector.downsample_layers.0.{0: Conv2d 4x4/4, 1: channels-first LayerNorm}
    detector.downsample_layers.{1,2,3}.{0: channels-first LayerNorm, 1: Conv2d 2x2/2}
    detector.stages.{i}.{j}.{dwconv, norm, pwconv1, grn.gamma, grn.beta, pwconv2}
    detector.norm, detector.fc_{kp, scale, pitch, yaw, roll, t, exp}
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .weights import load_strict, read_state_dict

log = logging.getLogger(__name__)

INPUT_SIZE = 256            # the extractor's input resolution (square)
BIN_DEGREES = 3.0           # width of one head-pose bin
STEM_STRIDE = 4             # patchify stem
DOWNSAMPLE_STRIDE = 2       # between stages
DWCONV_KERNEL = 7
MLP_RATIO = 4
NORM_EPS = 1e-6
GRN_EPS = 1e-6
TRANSLATION_DIMS = 3
SCALE_DIMS = 1
POINT_DIMS = 3              # x, y, z per keypoint


@dataclass(frozen=True)
class MotionExtractorConfig:
    depths: tuple[int, ...] = (3, 3, 9, 3)
    dims: tuple[int, ...] = (96, 192, 384, 768)
    num_kp: int = 21
    num_bins: int = 66
    in_chans: int = 3

    @classmethod
    def tiny(cls) -> "MotionExtractorConfig":
        """A few channels and one block per stage: random smoke-test instances (same heads)."""
        return cls(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channel axis of [B, C, H, W] (parameters ``weight`` / ``bias`` like LivePortrait's)."""

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global response normalisation of ConvNeXt-V2 on channels-last [B, H, W, C]."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + GRN_EPS)
        return self.gamma * (x * nx) + self.beta + x


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=DWCONV_KERNEL, padding=DWCONV_KERNEL // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS)
        self.pwconv1 = nn.Linear(dim, MLP_RATIO * dim)
        self.act = nn.GELU()
        self.grn = GRN(MLP_RATIO * dim)
        self.pwconv2 = nn.Linear(MLP_RATIO * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.grn(self.act(self.pwconv1(self.norm(y)))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtV2Heads(nn.Module):
    """The backbone + the seven heads (LivePortrait's ``ConvNeXtV2`` with its output semantics)."""

    def __init__(self, cfg: MotionExtractorConfig):
        super().__init__()
        if len(cfg.depths) != len(cfg.dims):
            raise ValueError(f"depths {cfg.depths} and dims {cfg.dims} need the same length")
        d = cfg.dims
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(cfg.in_chans, d[0], kernel_size=STEM_STRIDE, stride=STEM_STRIDE), ChannelsFirstLayerNorm(d[0]))])
        for i in range(len(d) - 1):
            self.downsample_layers.append(nn.Sequential(
                ChannelsFirstLayerNorm(d[i]),
                nn.Conv2d(d[i], d[i + 1], kernel_size=DOWNSAMPLE_STRIDE, stride=DOWNSAMPLE_STRIDE)))
        self.stages = nn.ModuleList([nn.Sequential(*[Block(dim) for _ in range(depth)])
                                     for dim, depth in zip(d, cfg.depths)])
        self.norm = nn.LayerNorm(d[-1], eps=NORM_EPS)
        kp_out = POINT_DIMS * cfg.num_kp
        self.fc_kp = nn.Linear(d[-1], kp_out)
        self.fc_scale = nn.Linear(d[-1], SCALE_DIMS)
        self.fc_pitch = nn.Linear(d[-1], cfg.num_bins)
        self.fc_yaw = nn.Linear(d[-1], cfg.num_bins)
        self.fc_roll = nn.Linear(d[-1], cfg.num_bins)
        self.fc_t = nn.Linear(d[-1], TRANSLATION_DIMS)
        self.fc_exp = nn.Linear(d[-1], kp_out)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        f = self.norm(x.mean(dim=(-2, -1)))
        return {"kp": self.fc_kp(f), "exp": self.fc_exp(f), "pitch": self.fc_pitch(f), "yaw": self.fc_yaw(f),
                "roll": self.fc_roll(f), "t": self.fc_t(f), "scale": self.fc_scale(f)}


class LivePortraitMotionExtractor(nn.Module):
    """RGB [B, 3, 256, 256] in [0, 1] -> raw head outputs (``kp``, ``exp``, pose logits, ``t``, ``scale``)."""

    def __init__(self, cfg: MotionExtractorConfig = MotionExtractorConfig()):
        super().__init__()
        self.cfg = cfg
        self.detector = ConvNeXtV2Heads(cfg)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.detector(x)

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], cfg: MotionExtractorConfig = MotionExtractorConfig()
                        ) -> "LivePortraitMotionExtractor":
        """Loads ``motion_extractor.pth`` (a plain state dict, read with ``weights_only=True``) or a
        ``.safetensors`` with the same keys; every key must match (strict)."""
        state = read_state_dict(path, "LivePortrait motion extractor")
        return load_strict(cls(cfg), state, path, "LivePortrait motion extractor").eval()


def bins_to_degrees(logits: torch.Tensor) -> torch.Tensor:
    """[..., num_bins] pose logits -> [...] degrees: the softmax expectation of the bin index,
    times the bin width, centred (66 bins: sum(softmax * idx) * 3 - 97.5)."""
    n = logits.shape[-1]
    idx = torch.arange(n, device=logits.device, dtype=torch.float32)
    expected = (logits.float().softmax(dim=-1) * idx).sum(dim=-1)
    return expected * BIN_DEGREES - BIN_DEGREES * (n - 1) / 2
