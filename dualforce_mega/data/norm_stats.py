"""Per-channel running mean / std, accumulated while shards are written.

Uses the parallel (Chan et al.) merge of (count, mean, M2) in float64 so the result matches a
direct computation over all values even for millions of frames; std is the population std.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# field -> axis that indexes the channel (all other axes are reduced)
STAT_AXES: dict[str, int] = {"video_latent": 0, "struct": -1, "kp_canonical": -1, "audio": -1, "flame": -1}


@dataclass
class RunningStats:
    count: int = 0
    mean: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    m2: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))

    def update(self, x: torch.Tensor, channel_axis: int) -> None:
        x = x.detach().to(torch.float64).movedim(channel_axis, 0).reshape(x.shape[channel_axis], -1)
        n = x.shape[1]
        if n == 0:
            return
        mean = x.mean(dim=1)
        m2 = ((x - mean[:, None]) ** 2).sum(dim=1)
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        if mean.shape != self.mean.shape:
            raise ValueError(f"channel count changed from {self.mean.numel()} to {mean.numel()}")
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * n / total)
        self.count = total

    def to_json(self) -> dict[str, Any]:
        std = (self.m2 / max(self.count, 1)).sqrt()
        return {"count": self.count, "mean": self.mean.tolist(), "std": std.tolist()}


class FieldStats:
    """Running stats for every field in STAT_AXES."""

    def __init__(self) -> None:
        self.stats = {name: RunningStats() for name in STAT_AXES}

    def update(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, axis in STAT_AXES.items():
            if name in tensors:
                self.stats[name].update(tensors[name], axis)

    def to_json(self) -> dict[str, Any]:
        return {name: s.to_json() for name, s in self.stats.items() if s.count > 0}
