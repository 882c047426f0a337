"""Write a synthetic WebDataset shard set (``make_synthetic_clip`` clips) plus its index.json.

    python -m data_tools.make_synthetic_shards --out DIR --clips N --frames F --latent-hw H W \
        [--shards S | --max-shard-bytes B] [--preset tiny] [--seed K] [--overwrite]

The trainer calls :func:`write_synthetic_shards` (driven by the ``data.synthetic_*`` keys) on
one rank before building loaders; it is a no-op when an identical set already exists.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Optional, Union

from dualforce_mega.config import Config, ModelConfig, model_preset
from dualforce_mega.data.schema import ShardSchema, to_storage
from dualforce_mega.data.shard_writer import DEFAULT_MAX_SHARD_BYTES, INDEX_NAME, ShardWriter
from dualforce_mega.data.synthetic import make_synthetic_clip

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


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory (shards + index.json)")
    ap.add_argument("--clips", type=int, required=True)
    ap.add_argument("--frames", type=int, required=True, help="latent frames per clip")
    ap.add_argument("--latent-hw", type=int, nargs=2, metavar=("H", "W"), required=True)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--shards", type=int, help="number of shards (clips spread evenly)")
    size.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES)
    ap.add_argument("--preset", default="tiny", help="model preset that fixes the feature dims")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing shard set in --out")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    index_path = write_shards(args.out, model_preset(args.preset), clips=args.clips, frames=args.frames,
                              latent_hw=tuple(args.latent_hw), seed=args.seed, shards=args.shards,
                              max_shard_bytes=args.max_shard_bytes, overwrite=args.overwrite)
    index = json.loads(index_path.read_text())
    print(f"{index['total_samples']} clips in {len(index['shards'])} shards "
          f"({index['total_bytes'] / 1e6:.2f} MB) -> {index_path}")


if __name__ == "__main__":
    main()
