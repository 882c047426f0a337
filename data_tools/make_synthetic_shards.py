"""Write a synthetic WebDataset shard set (``make_synthetic_clip`` clips) plus its index.json.

    python -m data_tools.make_synthetic_shards --out DIR --clips N --frames F --latent-hw H W \
        [--shards S | --max-shard-bytes B] [--preset tiny] [--seed K] [--overwrite]

The library side is :mod:`dualforce_mega.data.synthetic_shards`.
"""
from __future__ import annotations

import argparse
import json
import logging
from typing import Optional

from dualforce_mega.cli import run_main
from dualforce_mega.config import model_preset
from dualforce_mega.data.shard_writer import DEFAULT_MAX_SHARD_BYTES
from dualforce_mega.data.synthetic_shards import write_shards


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
    raise SystemExit(run_main(main))
