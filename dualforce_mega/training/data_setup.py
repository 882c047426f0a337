"""Training data location: configured shards, or a synthetic shard set written once into the run dir."""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from ..config import Config

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"


def synthetic_dir(cfg: Config) -> Path:
    return Path(cfg.data.synthetic_dir or Path(cfg.run.dir) / "synthetic_shards")


def ensure_data(cfg: Config, rank: int) -> Config:
    """With ``data.shards`` empty, rank 0 writes synthetic shards (others wait) and the returned config
    points at them. The set is written into a temporary directory and renamed, so a crash never leaves
    a half-written set that a later run would trust. Collective when distributed."""
    if cfg.data.shards:
        return cfg
    out = synthetic_dir(cfg)
    if rank == 0 and not (out / INDEX_NAME).is_file():
        from data_tools.make_synthetic_shards import write_synthetic_shards
        tmp = out.with_name(f".tmp-{out.name}.{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        log.info("no data.shards configured: writing %d synthetic clips into %s",
                 cfg.data.synthetic_clips, out)
        write_synthetic_shards(tmp, cfg)
        if out.exists():       # an earlier incomplete set (no index): replace it
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, out)
    if dist.is_initialized():
        dist.barrier()
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=str(out)))
