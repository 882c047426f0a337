"""Warmup + cosine learning-rate schedule as a torch ``LambdaLR``.

Its state (``last_epoch``) travels in the DeepSpeed checkpoint, so a resumed run continues the exact
same curve. The factor for optimizer step ``s`` (0-based) is:
  warmup:  (s + 1) / warmup_steps                      for s < warmup_steps
  cosine:  min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2,  p = (s - warmup) / (steps - warmup)
"""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..config import TrainConfig


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> LambdaLR:
    warmup, total, ratio = train.warmup_steps, train.steps, train.min_lr_ratio
    return LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, ratio))
