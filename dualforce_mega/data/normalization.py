"""Per-channel standardisation of the motion-like streams, with the statistics of the shard set.

The shard writer records per-channel mean / std of every field in ``index.json`` (``stats``,
``norm_stats.py``). Training standardises the fields named by ``data.normalize`` (default: struct,
kp_canonical, flame) in exactly one place, the loader (``apply``); the statistics travel into inference
bundles (``stats.json``), and the sampler standardises its motion inputs (reference motion, canonical
keypoints) and inverts its motion output with the same ``Normalizer``, so saved motion is in raw units.

Video latents are not standardised here: shards store them already normalised with the VAE config's
``latents_mean`` / ``latents_std`` (the Wan convention the VAE decoder inverts). Audio features are
used as the encoder produces them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

log = logging.getLogger(__name__)

NORMALIZABLE = ("struct", "kp_canonical", "flame")
# a channel with a smaller std is constant in the data: it is centred but not scaled (dividing by a
# rounding-level std would blow its values up)
MIN_STD = 1e-6


def parse_fields(spec: str) -> tuple[str, ...]:
    """``data.normalize`` ("struct,kp_canonical", "" = none) -> field names, checked."""
    fields = tuple(f.strip() for f in spec.split(",") if f.strip())
    bad = [f for f in fields if f not in NORMALIZABLE]
    if bad:
        from ..config import ConfigError
        raise ConfigError(f"data.normalize: {bad} cannot be normalised (choose from {list(NORMALIZABLE)})")
    return fields


@dataclass
class Normalizer:
    """``x_norm = (x - mean) / std`` over the last (channel) dim of each named field; identity for others."""
    mean: dict[str, torch.Tensor] = field(default_factory=dict)
    std: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_stats(cls, stats: Optional[Mapping[str, Any]], fields: tuple[str, ...], source: str = "stats"
                   ) -> "Normalizer":
        """From the ``stats`` object of ``index.json`` / a bundle's ``stats.json``. A field the statistics do
        not cover (no sample of the shard set has it, e.g. motion in video-only shards) stays unscaled."""
        if not fields:
            return cls()
        if stats is None:
            raise ValueError(f"{source}: data.normalize={','.join(fields)} needs normalisation statistics "
                             "(index.json 'stats' / bundle stats.json), but there are none")
        out = cls()
        for name in fields:
            entry = stats.get(name)
            if entry is None:
                log.warning("%s: no statistics for %r (no sample has it): left unscaled", source, name)
                continue
            if not isinstance(entry, Mapping) or "mean" not in entry or "std" not in entry:
                raise ValueError(f"{source}: statistics of field {name!r} lack mean/std (data.normalize)")
            mean = torch.tensor(entry["mean"], dtype=torch.float32)
            std = torch.tensor(entry["std"], dtype=torch.float32)
            if mean.dim() != 1 or mean.shape != std.shape or not bool(torch.isfinite(mean).all() & torch.isfinite(std).all()):
                raise ValueError(f"{source}: stats of {name!r}: mean/std must be equal-length finite lists")
            out.mean[name] = mean
            out.std[name] = torch.where(std > MIN_STD, std, torch.ones_like(std))
        return out

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self.mean)

    def _params(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self.mean[name], self.std[name]
        if x.shape[-1] != mean.numel():
            raise ValueError(f"{name}: {x.shape[-1]} channels, but the normalisation statistics have {mean.numel()}")
        return mean.to(x.device), std.to(x.device)

    def normalize(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name not in self.mean:
            return x
        mean, std = self._params(name, x)
        return ((x.float() - mean) / std).to(x.dtype)

    def denormalize(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name not in self.mean:
            return x
        mean, std = self._params(name, x)
        return (x.float() * std + mean).to(x.dtype)

    def apply(self, tensors: dict[str, Any]) -> dict[str, Any]:
        """Standardise every named field present in ``tensors`` (a sample or a batch)."""
        return {k: self.normalize(k, v) if k in self.mean and isinstance(v, torch.Tensor) else v
                for k, v in tensors.items()}

    def to_stats(self) -> dict[str, dict[str, list[float]]]:
        return {k: {"mean": self.mean[k].tolist(), "std": self.std[k].tolist()} for k in self.mean}
