"""Data loading throughput: WebDataset shards (our loader) vs one .safetensors file per clip.

The reference is the seed notes' layout — a directory of per-clip safetensors files plus one
metadata JSON — read by a map-style Dataset through torch's DataLoader (random order, same
window rule, same micro-batch, same workers). Both read the same synthetic clips, written in
this run; the timed part is iterating batches after a warm-up (page cache warm for both).

    python benchmarks/bench_loader.py                      # ~30 s on 2 CPU cores
    python benchmarks/bench_loader.py --clips 512 --frames 21 --latent-hw 60 104 --workers 8
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from common import device_name, dump_json, markdown_table  # noqa: I100
from dualforce_mega.data.synthetic_shards import synthetic_key, write_shards
from dualforce_mega.config import Config, build_config
from dualforce_mega.data.loader import build_loader
from dualforce_mega.data.schema import ShardSchema, to_storage
from dualforce_mega.data.synthetic import make_synthetic_clip
from dualforce_mega.data.windowing import slice_window, window_start, window_starts

log = logging.getLogger("bench_loader")
METADATA_NAME = "metadata.json"
SHARDS, SHARDS_NO_CRC, PER_CLIP = ("webdataset shards (ours)", "webdataset shards, data.verify_checksums=false",
                                   "per-clip safetensors (seed layout)")


def write_per_clip(out: Path, cfg: Config, clips: int, frames: int, hw: tuple[int, int], seed: int) -> None:
    """The seed layout: <key>.safetensors per clip + metadata.json listing every clip."""
    out.mkdir(parents=True, exist_ok=True)
    metas = {}
    for i in range(clips):
        tensors, meta = make_synthetic_clip(i, frames, hw, cfg.model, seed)
        key = synthetic_key(seed, i)
        save_file(to_storage(tensors), str(out / f"{key}.safetensors"))
        metas[key] = meta
    (out / METADATA_NAME).write_text(json.dumps(metas))


class PerClipDataset(Dataset):
    """Reference reader: one file per clip, windows by the same rule as the shard loader."""

    def __init__(self, root: Path, cfg: Config):
        self.root = root
        self.keys = sorted(json.loads((root / METADATA_NAME).read_text()))
        self.schema = ShardSchema.from_model(cfg.model)
        self.window, self.seed, self.keep_text = cfg.data.window, cfg.data.seed, cfg.model.text_dim > 0

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict[str, Any]:
        key = self.keys[i]
        tensors = load_file(str(self.root / f"{key}.safetensors"))
        frames = tensors["video_latent"].shape[1]
        t0 = window_start(self.seed, 0, key, window_starts(frames, self.window, tensors.get("ref_positions")))
        return slice_window(tensors, t0, self.window, self.schema, self.keep_text)


def interleaved_throughput(streams: dict[str, Iterator[dict[str, Any]]], warmup: int, rounds: int,
                           batches_per_round: int) -> dict[str, float]:
    """Median samples/s per stream, timing the streams in alternating rounds of batches.

    Alternating makes a co-tenant's load (shared CPUs) hit every loader alike instead of
    whichever happened to run while it was busy.
    """
    for it in streams.values():
        for _ in range(warmup):
            next(it)
    rates: dict[str, list[float]] = {name: [] for name in streams}
    for _ in range(rounds):
        for name, it in streams.items():
            n, t0 = 0, time.perf_counter()
            for _ in range(batches_per_round):
                n += next(it)["video_latent"].shape[0]
            rates[name].append(n / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}


def endless(loader: DataLoader):
    while True:
        yield from loader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=96)
    ap.add_argument("--frames", type=int, default=9, help="latent frames per clip")
    ap.add_argument("--latent-hw", type=int, nargs=2, default=(32, 32), metavar=("H", "W"))
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--batches", type=int, default=30, help="timed batches per loader per round")
    ap.add_argument("--rounds", type=int, default=7, help="alternating timing rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--dir", default="", help="working directory (default: a temporary one)")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # the work is spread over dataloader workers, as in training

    with tempfile.TemporaryDirectory(dir=args.dir or None) as tmp:
        root = Path(tmp)
        cfg = build_config({"model": {"preset": args.preset}}, [
            f"data.shards={root / 'shards'}", f"data.window={args.window}", f"data.workers={args.workers}",
            f"data.synthetic_frames={args.frames}", f"train.micro_batch={args.micro_batch}",
            f"train.global_batch={args.micro_batch}"])
        t = time.perf_counter()
        write_shards(root / "shards", cfg.model, clips=args.clips, frames=args.frames,
                     latent_hw=tuple(args.latent_hw), seed=0, shards=args.shards)
        write_per_clip(root / "per_clip", cfg, args.clips, args.frames, tuple(args.latent_hw), seed=0)
        log.info("wrote %d clips in both layouts in %.1f s", args.clips, time.perf_counter() - t)

        unchecked = copy.deepcopy(cfg)
        unchecked.data.verify_checksums = False
        ref = DataLoader(PerClipDataset(root / "per_clip", cfg), batch_size=args.micro_batch, shuffle=True,
                         num_workers=args.workers, drop_last=True, generator=torch.Generator().manual_seed(0))
        loaders = {SHARDS: build_loader(cfg, 0, 1), SHARDS_NO_CRC: build_loader(unchecked, 0, 1),
                   PER_CLIP: endless(ref)}
        sps = interleaved_throughput(loaders, args.warmup, args.rounds, args.batches)
        for loader in loaders.values():
            close = getattr(loader, "close", None)
            if close is not None:
                close()

    rows = [[name, f"{rate:.1f}", f"{rate / sps[PER_CLIP]:.2f}"] for name, rate in sps.items()]
    print(f"# data loader throughput — {device_name(torch.device('cpu'))}")
    print(f"clips={args.clips} frames={args.frames} latent={args.latent_hw[0]}x{args.latent_hw[1]} "
          f"window={args.window} micro_batch={args.micro_batch} workers={args.workers} "
          f"timed: {args.rounds} rounds x {args.batches} batches each, median")
    print(markdown_table(["loader", "samples/s", "ratio vs per-clip"], rows))
    dump_json(args.json, {"args": vars(args), "samples_per_s": sps,
                          "ratio_vs_per_clip": {k: v / sps[PER_CLIP] for k, v in sps.items()}})


if __name__ == "__main__":
    main()
