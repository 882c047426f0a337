"""torchvision's R3D-18 (Kinetics-400) in the key layout of ``r3d_18-b3b3357e.pth``, used as an FVD
backbone by the seed notes: 512-d features after the global average pool (the fc layer stays in the
file but is not applied), with torchvision's Kinetics preprocessing (``R3D_18_Weights.KINETICS400_V1``:
/255, bilinear resize to 128x171, centre crop 112, mean/std normalisation). ``width_div`` > 1 divides
every channel count (random smoke models only).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .weights import load_state_dict_strict

RESIZE = (128, 171)
CROP = 112
MEAN = (0.43216, 0.394666, 0.37645)
STD = (0.22803, 0.22145, 0.216989)
NUM_CLASSES = 400
STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))   # (planes, stride) of layer1..layer4
BLOCKS_PER_STAGE = 2


def _conv3(cin: int, cout: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Sequential(_conv3(cin, planes, stride), nn.BatchNorm3d(planes), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(_conv3(planes, planes), nn.BatchNorm3d(planes))
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv3d(cin, planes, kernel_size=1, stride=stride, bias=False),
                                            nn.BatchNorm3d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(self.conv2(self.conv1(x)) + residual)


class R3D18(nn.Module):
    """``forward(clips)``: [N, C=3, T, 112, 112] normalised -> [N, 512 / width_div] pooled features."""

    def __init__(self, width_div: int = 1):
        super().__init__()
        c0 = STAGES[0][0] // width_div
        self.stem = nn.Sequential(nn.Conv3d(3, c0, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3),
                                            bias=False), nn.BatchNorm3d(c0), nn.ReLU(inplace=True))
        cin = c0
        for i, (planes, stride) in enumerate(STAGES, 1):
            planes //= width_div
            blocks = [BasicBlock(cin, planes, stride)] + [BasicBlock(planes, planes, 1)
                                                          for _ in range(BLOCKS_PER_STAGE - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = planes
        self.feature_dim = cin
        self.fc = nn.Linear(cin, NUM_CLASSES)  # in the weight file; unused for features

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "R3D18":
        return load_state_dict_strict(cls(), path, "R3D-18 (torchvision r3d_18 Kinetics-400)").eval()

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        x = self.stem(clips)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return F.adaptive_avg_pool3d(x, 1).flatten(1)


def preprocess(clips: torch.Tensor) -> torch.Tensor:
    """uint8 [N, T, H, W, 3] -> float [N, 3, T, 112, 112] as torchvision's Kinetics transform."""
    n, t, h, w, _ = clips.shape
    x = clips.permute(0, 1, 4, 2, 3).reshape(n * t, 3, h, w).float() / 255.0
    x = F.interpolate(x, size=RESIZE, mode="bilinear", align_corners=False, antialias=True)
    top, left = round((RESIZE[0] - CROP) / 2), round((RESIZE[1] - CROP) / 2)  # torchvision center_crop
    x = x[:, :, top:top + CROP, left:left + CROP]
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.reshape(n, t, 3, CROP, CROP).permute(0, 2, 1, 3, 4)
