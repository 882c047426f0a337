"""SyncNet v2 (joonson/syncnet_python ``SyncNetModel.S``) in the key layout of ``syncnet_v2.model``:
``netcnnaud`` / ``netfcaud`` embed a 13x20 MFCC window (0.2 s), ``netcnnlip`` / ``netfclip`` embed 5 face
crops of 224² (BGR, float 0..255, no normalisation), both into 1024-d. ``width_div`` > 1 divides every
channel count (random smoke models only)."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from torch import nn

from .weights import load_state_dict_strict

EMBED_DIM = 1024
CROP_SIZE = 224
VIDEO_WINDOW = 5      # frames per lip window
MFCC_DIM = 13


def _conv2(cin: int, cout: int, **kw) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, **kw), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _conv3(cin: int, cout: int, **kw) -> list[nn.Module]:
    return [nn.Conv3d(cin, cout, **kw), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]


def _fc(cin: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out))


class SyncNet(nn.Module):
    def __init__(self, width_div: int = 1, embed_dim: int = EMBED_DIM):
        super().__init__()
        c = lambda n: max(1, n // width_div)  # noqa: E731
        k3 = dict(kernel_size=(3, 3), padding=(1, 1))
        self.netcnnaud = nn.Sequential(
            *_conv2(1, c(64), stride=(1, 1), **k3), nn.MaxPool2d(kernel_size=(1, 1), stride=(1, 1)),
            *_conv2(c(64), c(192), stride=(1, 1), **k3), nn.MaxPool2d(kernel_size=(3, 3), stride=(1, 2)),
            *_conv2(c(192), c(384), **k3), *_conv2(c(384), c(256), **k3), *_conv2(c(256), c(256), **k3),
            nn.MaxPool2d(kernel_size=(3, 3), stride=(2, 2)),
            *_conv2(c(256), c(512), kernel_size=(5, 4), padding=(0, 0)))
        self.netfcaud = _fc(c(512), c(512), embed_dim)
        self.netfclip = _fc(c(512), c(512), embed_dim)
        k133 = dict(kernel_size=(1, 3, 3), padding=(0, 1, 1))
        self.netcnnlip = nn.Sequential(
            *_conv3(3, c(96), kernel_size=(5, 7, 7), stride=(1, 2, 2), padding=0),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
            *_conv3(c(96), c(256), kernel_size=(1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            *_conv3(c(256), c(256), **k133), *_conv3(c(256), c(256), **k133), *_conv3(c(256), c(256), **k133),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
            *_conv3(c(256), c(512), kernel_size=(1, 6, 6), padding=0))

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "SyncNet":
        return load_state_dict_strict(cls(), path, "SyncNet v2 (syncnet_v2.model)").eval()

    def forward_aud(self, mfcc: torch.Tensor) -> torch.Tensor:
        """[N, 1, 13, 20] -> [N, embed_dim]."""
        return self.netfcaud(self.netcnnaud(mfcc).flatten(1))

    def forward_lip(self, frames: torch.Tensor) -> torch.Tensor:
        """[N, 3, 5, 224, 224] BGR 0..255 -> [N, embed_dim]."""
        return self.netfclip(self.netcnnlip(frames).flatten(1))
