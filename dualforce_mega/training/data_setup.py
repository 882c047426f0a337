"""Training data location: configured shards, or a synthetic shard set written once into the run dir."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch.distributed as dist

from ..config import Config

log = logging.getLogger(__name__)


def synthetic_dir(cfg: Config) -> Path:
    from ..data.synthetic_shards import SYNTHETIC_SUBDIR
    return Path(cfg.data.synthetic_dir or Path(cfg.run.dir) / SYNTHETIC_SUBDIR)


def ensure_data(cfg: Config, rank: int) -> Config:
    """With ``data.shards`` empty, rank 0 writes the synthetic shard set (``data.synthetic_*``) while the
    other ranks wait, and the returned config points at it. A set already there with the same parameters
    is reused (a resumed run reads the same data); its index is written last, so a set left half-written
    by a crash is detected and rewritten. Collective when distributed."""
    if cfg.data.shards:
        return cfg
    out = synthetic_dir(cfg)
    if rank == 0:
        from ..data.synthetic_shards import write_synthetic_shards
        log.info("no data.shards configured: synthetic shards (%d clips, %d shards) in %s",
                 cfg.data.synthetic_clips, cfg.data.synthetic_shards, out)
        write_synthetic_shards(out, cfg)
    if dist.is_initialized():
        dist.barrier()
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=str(out)))
