"""EMOCA's coarse FLAME regressors (radekd91/emoca ``gdl/models/DECA.py`` ``ExpDECA``,
``DecaEncoder.py``, ``ResNet.py``), loaded from a path with real key names and safe loading.

Two image encoders, each a ResNet-50 (torchvision layout, no ``fc``; 224x224 RGB in [0, 1], global
average pool -> 2048) followed by ``layers`` = Linear(2048, 1024), ReLU, Linear(1024, out):

* ``E_flame`` (DECA's coarse encoder): out = shape 100 | tex 50 | exp 50 | pose 6 | cam 3 | light 27;
* ``E_expression`` (EMOCA): out = exp 50 (+ jaw pose 3 when trained with ``exp_deca_jaw_pose``, the
  released setting; + 3 more with ``exp_deca_global_pose``). Final EMOCA clones the backbone
  (``deca_clone``: its own ``encoder``); the ``deca_parallel`` variant shares E_flame's backbone
  (keys ``E_expression.resnet.*``) and adds a second head.

EMOCA's expression replaces DECA's; its jaw pose (when predicted) replaces ``posecode[:, 3:6]``.
Output = EMOCA's ``expcode [B, 50]`` and ``posecode [B, 6]`` (global rotation 3 | jaw 3).

Weights: the Lightning checkpoint's ``state_dict`` entries ``deca.E_flame.*`` and
``deca.E_expression.*`` (other entries, e.g. the detail branch, are ignored), from ``.safetensors``
or a torch file readable with ``weights_only=True``. A raw Lightning ``.ckpt`` pickles config
objects and is refused: extract the state dict once in EMOCA's own environment (the error says how).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn

from .weights import load_strict, read_state_dict

log = logging.getLogger(__name__)

INPUT_SIZE = 224
BOTTLENECK_EXPANSION = 4
STEM_KERNEL, STEM_STRIDE, STEM_CHANNELS = 7, 2, 64
POOL_KERNEL, POOL_STRIDE = 3, 2
PREFIX = "deca."
PARTS = ("E_flame", "E_expression")
CKPT_HINT = ("a Lightning .ckpt pickles config objects: extract the tensors once in EMOCA's environment, "
             "torch.save({k: v for k, v in torch.load(CKPT, map_location='cpu')['state_dict'].items() "
             "if k.startswith(('deca.E_flame.', 'deca.E_expression.'))}, 'emoca_coarse.pt')")


@dataclass(frozen=True)
class EmocaConfig:
    n_shape: int = 100
    n_tex: int = 50
    n_exp: int = 50
    n_pose: int = 6
    n_cam: int = 3
    n_light: int = 27
    exp_jaw_pose: bool = True       # E_expression also predicts the jaw pose (released EMOCA)
    exp_global_pose: bool = False
    parallel: bool = False          # deca_parallel: E_expression shares E_flame's backbone
    blocks: tuple[int, ...] = (3, 4, 6, 3)   # ResNet-50
    stem_channels: int = STEM_CHANNELS
    hidden: int = 1024

    @property
    def n_param(self) -> int:
        return self.n_shape + self.n_tex + self.n_exp + self.n_pose + self.n_cam + self.n_light

    @property
    def n_exp_param(self) -> int:
        pose_dims = self.n_pose // 2
        return self.n_exp + pose_dims * (int(self.exp_jaw_pose) + int(self.exp_global_pose))

    @property
    def feature_size(self) -> int:
        return self.stem_channels * 2 ** (len(self.blocks) - 1) * BOTTLENECK_EXPANSION

    @classmethod
    def tiny(cls) -> "EmocaConfig":
        return cls(blocks=(1, 1, 1, 1), stem_channels=8, hidden=32)


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * BOTTLENECK_EXPANSION
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """Bottleneck ResNet (torchvision names) returning the globally pooled features."""

    def __init__(self, blocks: tuple[int, ...], stem: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, STEM_KERNEL, stride=STEM_STRIDE, padding=STEM_KERNEL // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(POOL_KERNEL, stride=POOL_STRIDE, padding=POOL_KERNEL // 2)
        inplanes = stem
        for i, n in enumerate(blocks):
            planes = stem * 2 ** i
            layer = []
            for j in range(n):
                layer.append(Bottleneck(inplanes, planes, stride=2 if (i > 0 and j == 0) else 1))
                inplanes = planes * BOTTLENECK_EXPANSION
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.num_layers = len(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_layers):
            x = getattr(self, f"layer{i + 1}")(x)
        return x.mean(dim=(-2, -1))  # = AvgPool2d(7) at 224 x 224 input


def _regressor(cfg: EmocaConfig, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cfg.feature_size, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, out))


class ResnetEncoder(nn.Module):
    def __init__(self, cfg: EmocaConfig, out: int):
        super().__init__()
        self.encoder = ResNet(cfg.blocks, cfg.stem_channels)
        self.layers = _regressor(cfg, out)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encoder(x)
        return self.layers(f), f


class SecondHead(nn.Module):
    """``deca_parallel``: a second regressor on E_flame's features (E_flame is not duplicated here;
    its checkpoint copy under ``E_expression.resnet`` must equal E_flame and is checked on load)."""

    def __init__(self, cfg: EmocaConfig, out: int):
        super().__init__()
        self.layers = _regressor(cfg, out)


class EmocaEncoder(nn.Module):
    """224x224 RGB [B, 3, H, W] in [0, 1] -> (expcode [B, n_exp], posecode [B, 6])."""

    def __init__(self, cfg: EmocaConfig = EmocaConfig()):
        super().__init__()
        self.cfg = cfg
        self.E_flame = ResnetEncoder(cfg, cfg.n_param)
        self.E_expression = SecondHead(cfg, cfg.n_exp_param) if cfg.parallel else ResnetEncoder(cfg, cfg.n_exp_param)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        code, features = self.E_flame(images)
        start = c.n_shape + c.n_tex + c.n_exp
        pose = code[:, start:start + c.n_pose]
        exp_code = (self.E_expression.layers(features) if c.parallel else self.E_expression(images)[0])
        half = c.n_pose // 2
        extra = exp_code[:, c.n_exp:]
        glob, jaw = pose[:, :half], pose[:, half:]
        if c.exp_global_pose:
            glob, extra = extra[:, :half], extra[:, half:]
        if c.exp_jaw_pose:
            jaw = extra[:, :half]
        return exp_code[:, :c.n_exp], torch.cat([glob, jaw], dim=1)

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], cfg: EmocaConfig = EmocaConfig()) -> "EmocaEncoder":
        state = read_state_dict(path, "EMOCA", hint=CKPT_HINT)
        parts = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(tuple(PREFIX + p + "." for p in PARTS))}
        if not parts:
            raise ValueError(f"{path}: no {PREFIX}E_flame.* / {PREFIX}E_expression.* entries (not an EMOCA state dict)")
        parallel = any(k.startswith("E_expression.resnet.") for k in parts)
        head = parts.get("E_expression.layers.2.weight")
        if head is None:
            raise ValueError(f"{path}: missing key {PREFIX}E_expression.layers.2.weight")
        extra = head.shape[0] - cfg.n_exp
        pose_dims = cfg.n_pose // 2
        if extra not in (0, pose_dims, 2 * pose_dims):
            raise ValueError(f"{path}: E_expression predicts {head.shape[0]} values; expected {cfg.n_exp} "
                             f"(+{pose_dims} jaw, +{2 * pose_dims} jaw and global pose)")
        cfg = EmocaConfig(**{**cfg.__dict__, "parallel": parallel, "exp_jaw_pose": extra > 0,
                             "exp_global_pose": extra == 2 * pose_dims})
        if parallel:  # the shared backbone is stored twice; both copies must agree
            shared = {k[len("E_expression.resnet."):]: v for k, v in parts.items() if k.startswith("E_expression.resnet.")}
            for k, v in shared.items():
                twin = parts.get("E_flame." + k)
                if k.startswith("encoder.") and twin is not None and not torch.equal(v, twin):
                    raise ValueError(f"{path}: deca_parallel checkpoint: E_expression.resnet.{k} differs from E_flame.{k}")
            parts = {k: v for k, v in parts.items() if not k.startswith("E_expression.resnet.")}
        return load_strict(cls(cfg), parts, path, "EMOCA encoder", shown_prefix=PREFIX).eval()

