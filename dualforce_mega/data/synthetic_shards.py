"""Synthetic shard sets (``make_synthetic_clip`` clips) written through :class:`ShardWriter`.

The trainer calls :func:`write_synthetic_shards` (driven by the ``data.synthetic_*`` keys) on one
rank before building loaders; it is a no-op when an identical set already exists. The CLI is
``python -m data_tools.make_synthetic_shards``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Union

from ..config import Config, ModelConfig
from .schema import ShardSchema, to_storage
from .shard_writer import DEFAULT_MAX_SHARD_BYTES, INDEX_NAME, ShardWriter
from .synthetic import make_synthetic_clip

log = logging.getLogger(__name__)

SYNTHETIC_DATASET = "synthetic"
SYNTHETIC_SUBDIR = "synthetic_shards"


def synthetic_key(seed: int, index: int) -> str:
    return f"{SYNTHETIC_DATASET}_{seed}_{index:08d}"


def write_shards(out_dir: Union[str, Path], model_cfg: ModelConfig, *, clips: int, frames: int,
                 latent_hw: tuple[int, int], seed: int, shards: Optional[int] = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False) -> Path:
    """``clips`` synthetic clips of ``frames`` latent frames; ``shards`` fixes the shard count
    (clip i goes to shard i * shards // clips), otherwise shards roll over at ``max_shard_bytes``."""
    if clips < 1:
        raise ValueError(f"--clips: {clips} must be >= 1")
    if shards is not None and not 1 <= shards <= clips:
        raise ValueError(f"--shards: {shards} must be in [1, --clips={clips}]")
    params = {"generator": "make_synthetic_clip", "clips": clips, "frames": frames, "latent_hw": list(latent_hw),
              "seed": seed, "shards": shards, "max_shard_bytes": None if shards else max_shard_bytes}
    with ShardWriter(out_dir, model_cfg, max_shard_bytes=None if shards else max_shard_bytes,
                     overwrite=overwrite, extra={"synthetic": params}) as writer:
        for i in range(clips):
            if shards and i > 0 and i * shards // clips != (i - 1) * shards // clips:
                writer.next_shard()
            tensors, meta = make_synthetic_clip(i, frames, latent_hw, model_cfg, seed)
            # the generator describes the clip; the shard record names the data set it belongs to
            meta = {**meta, "source_dataset": SYNTHETIC_DATASET}
            writer.write(synthetic_key(seed, i), to_storage(tensors), meta)
    return writer.out_dir / INDEX_NAME


def write_synthetic_shards(out_dir: Union[str, Path], cfg: Config) -> Path:
    """The synthetic shard set for ``cfg`` (``data.synthetic_*``, ``data.latent_*``, ``data.seed``).

    Returns the index path. An existing set written with the same parameters and model dims is
    reused; a different one is replaced. Call it on one rank and barrier before loading.
    """
    d = cfg.data
    out = Path(out_dir)
    hw = (d.latent_height, d.latent_width)
    index_path = out / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            old = index.get("extra", {}).get("synthetic", {})
            same = (old.get("clips"), old.get("frames"), old.get("latent_hw"), old.get("seed"), old.get("shards")) \
                == (d.synthetic_clips, d.synthetic_frames, list(hw), d.seed, d.synthetic_shards)
            if same and index.get("model_dims") == ShardSchema.from_model(cfg.model).model_dims():
                log.info("reusing synthetic shards in %s", out)
                return index_path
        except (OSError, json.JSONDecodeError):
            pass
    return write_shards(out, cfg.model, clips=d.synthetic_clips, frames=d.synthetic_frames, latent_hw=hw,
                        seed=d.seed, shards=d.synthetic_shards, overwrite=True)
