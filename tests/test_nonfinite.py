"""Non-finite data (issue 15 probe: "one shard with NaN latents, or one Inf audio value"): the loader skips
and counts such samples."""
from __future__ import annotations

import io
import json
import tarfile
import zlib
from pathlib import Path

from safetensors.torch import load as st_load, save as st_save

from dualforce_mega.config import build_config, model_preset
from dualforce_mega.data.loader import build_loader
from dualforce_mega.data.schema import CRC_META_KEY
from dualforce_mega.data.synthetic_shards import synthetic_key, write_shards

SHARDS, PER_SHARD, FRAMES, HW = 4, 3, 5, (4, 4)


def poison(shard_dir: Path, key: str, field: str, value: float) -> None:
    """Put ``value`` into one element of ``field`` of sample ``key`` and re-sign it (CRC of the new bytes):
    a sample that was written non-finite by an upstream bug, not one damaged in storage."""
    for shard in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        if not any(m.name == f"{key}.safetensors" for m, _ in members):
            continue
        out = []
        tensors = st_load(next(d for m, d in members if m.name == f"{key}.safetensors"))
        t = tensors[field].clone()
        t.view(-1)[t.numel() // 2] = value
        tensors[field] = t
        blob = st_save(tensors)
        for m, data in members:
            if m.name == f"{key}.safetensors":
                data = blob
            elif m.name == f"{key}.json":
                meta = json.loads(data)
                meta[CRC_META_KEY] = zlib.crc32(blob)
                data = json.dumps(meta, sort_keys=True).encode()
            m.size = len(data)
            out.append((m, data))
        with tarfile.open(shard, "w") as tar:
            for m, data in out:
                tar.addfile(m, io.BytesIO(data))
        return
    raise AssertionError(f"{key} not found in {shard_dir}")


def _epoch_keys(shard_dir: Path) -> tuple[list[str], dict[str, int]]:
    cfg = build_config({}, [f"data.shards={shard_dir}", "data.window=3", "data.shuffle_buffer=4", "data.workers=0",
                            "train.micro_batch=1"])
    loader = build_loader(cfg, 0, 1)
    seen = []
    while True:
        batch = next(loader)
        if loader.stats.get("epochs_started", 0) > 1:
            return seen, loader.stats
        seen += batch["__key__"]


def test_loader_skips_and_counts_non_finite_samples(tmp_path: Path, caplog) -> None:
    write_shards(tmp_path, model_preset("tiny"), clips=SHARDS * PER_SHARD, frames=FRAMES, latent_hw=HW, seed=0,
                 shards=SHARDS)
    clean, clean_stats = _epoch_keys(tmp_path)
    nan_key, inf_key = synthetic_key(0, 1), synthetic_key(0, 7)
    poison(tmp_path, nan_key, "video_latent", float("nan"))
    poison(tmp_path, inf_key, "audio", float("inf"))
    seen, stats = _epoch_keys(tmp_path)
    assert sorted(seen) == sorted(k for k in clean if k not in (nan_key, inf_key))
    # the snapshot is taken at the first batch of epoch 2, which may have met a poisoned sample again
    assert stats["nonfinite_samples"] >= 2 and clean_stats["nonfinite_samples"] == 0
    assert stats["corrupt_samples"] == 0          # re-signed: the CRC matches, only the values are bad
    assert f"{nan_key}: video_latent contains NaN or Inf" in caplog.text
    assert f"{inf_key}: audio contains NaN or Inf" in caplog.text
