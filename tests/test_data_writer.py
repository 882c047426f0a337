"""Shard writer and synthetic shard CLI: rollover, atomicity, index counts and statistics."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load

from data_tools.make_synthetic_shards import main as shards_main
from dualforce_mega.data.synthetic_shards import synthetic_key, write_synthetic_shards
from dualforce_mega.config import ModelConfig, build_config
from dualforce_mega.data.norm_stats import STAT_AXES
from dualforce_mega.data.schema import SchemaError, to_storage
from dualforce_mega.data.shard_writer import INDEX_NAME, ShardWriter
from dualforce_mega.data.synthetic import make_synthetic_clip

FRAMES, HW = 3, (4, 4)


def clips(cfg: ModelConfig, n: int, seed: int = 0) -> list[tuple[str, dict[str, torch.Tensor], dict]]:
    out = []
    for i in range(n):
        t, m = make_synthetic_clip(i, FRAMES, HW, cfg, seed)
        out.append((f"clip_{i:04d}", to_storage(t), {**m, "source_dataset": "synthetic"}))
    return out


def write(out: Path, cfg: ModelConfig, data, **kw) -> dict:
    with ShardWriter(out, cfg, **kw) as w:
        for key, t, m in data:
            w.write(key, t, m)
    return json.loads((out / INDEX_NAME).read_text())


def read_tar(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    with tarfile.open(path) as tar:
        return {m.name.split(".")[0]: st_load(tar.extractfile(m).read())
                for m in tar.getmembers() if m.name.endswith(".safetensors")}


def test_count_rollover_index_and_roundtrip(tmp_path: Path, tiny_cfg: ModelConfig) -> None:
    data = clips(tiny_cfg, 7)
    index = write(tmp_path, tiny_cfg, data, max_shard_samples=3)
    assert [s["samples"] for s in index["shards"]] == [3, 3, 1]
    assert index["total_samples"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == [INDEX_NAME] + [s["name"] for s in index["shards"]]
    read = {}
    for s in index["shards"]:
        assert (tmp_path / s["name"]).stat().st_size == s["bytes"]
        got = read_tar(tmp_path / s["name"])
        assert list(got) == s["keys"]
        read.update(got)
    for key, t, _ in data:
        assert set(read[key]) == set(t) and all(torch.equal(read[key][n], t[n]) for n in t)
    assert index["model_dims"]["audio_dim"] == tiny_cfg.audio_dim


def test_size_rollover_fills_each_shard_to_the_limit(tmp_path: Path, tiny_cfg: ModelConfig) -> None:
    data = clips(tiny_cfg, 6)
    one = write(tmp_path / "one", tiny_cfg, data[:1])["shards"][0]["bytes"]
    limit = 2 * one  # room for a few samples, not all
    index = write(tmp_path / "sized", tiny_cfg, data, max_shard_bytes=limit)
    counts = [s["samples"] for s in index["shards"]]
    assert len(counts) > 1 and sum(counts) == len(data)
    assert all(s["bytes"] <= limit for s in index["shards"])
    # each non-final shard is full: one more sample would have crossed the limit
    first = counts[0]
    bigger = write(tmp_path / "bigger", tiny_cfg, data[:first + 1], max_shard_bytes=None)
    assert bigger["shards"][0]["bytes"] > limit
    # a sample larger than the limit still gets written, alone in its shard
    tiny = write(tmp_path / "tiny", tiny_cfg, data[:2], max_shard_bytes=1)
    assert [s["samples"] for s in tiny["shards"]] == [1, 1]


def test_stats_equal_direct_computation(tmp_path: Path, tiny_cfg: ModelConfig) -> None:
    data = clips(tiny_cfg, 5)
    stats = write(tmp_path, tiny_cfg, data, max_shard_samples=2)["stats"]
    assert set(stats) == set(STAT_AXES)
    for name, axis in STAT_AXES.items():
        x = torch.stack([t[name].double().movedim(axis, 0) for _, t, _ in data], dim=1)
        x = x.reshape(x.shape[0], -1)
        assert stats[name]["count"] == x.shape[1]
        torch.testing.assert_close(torch.tensor(stats[name]["mean"], dtype=torch.float64), x.mean(1),
                                   rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.tensor(stats[name]["std"], dtype=torch.float64), x.std(1, unbiased=False),
                                   rtol=1e-10, atol=1e-12)


def test_crash_leaves_no_half_shard_and_no_index(tmp_path: Path, tiny_cfg: ModelConfig) -> None:
    data = clips(tiny_cfg, 4)
    with pytest.raises(RuntimeError, match="crash"):
        with ShardWriter(tmp_path, tiny_cfg, max_shard_samples=3) as w:
            for key, t, m in data:
                w.write(key, t, m)
            raise RuntimeError("crash")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["shard-000000.tar"]  # the finished shard only: no .tmp, no index
    assert len(read_tar(tmp_path / names[0])) == 3


def test_invalid_sample_duplicate_key_and_existing_set(tmp_path: Path, tiny_cfg: ModelConfig) -> None:
    (key, t, m), = clips(tiny_cfg, 1)
    with ShardWriter(tmp_path, tiny_cfg) as w:
        with pytest.raises(SchemaError) as err:
            w.write(key, {**t, "struct": t["struct"][:2]}, m)
        assert "shard-000000.tar" in str(err.value) and key in str(err.value) and "'struct'" in str(err.value)
        w.write(key, t, m)
        with pytest.raises(ValueError, match="duplicate"):
            w.write(key, t, m)
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        ShardWriter(tmp_path, tiny_cfg)


def test_cli_even_shards_and_size_mode(tmp_path: Path) -> None:
    shards_main(["--out", str(tmp_path / "a"), "--clips", "7", "--frames", "3", "--latent-hw", "4", "4",
                 "--shards", "3", "--seed", "5"])
    index = json.loads((tmp_path / "a" / INDEX_NAME).read_text())
    assert [s["samples"] for s in index["shards"]] == [3, 2, 2]
    assert index["shards"][0]["keys"][0] == synthetic_key(5, 0)
    shards_main(["--out", str(tmp_path / "b"), "--clips", "4", "--frames", "3", "--latent-hw", "4", "4",
                 "--max-shard-bytes", str(index["shards"][1]["bytes"])])
    index_b = json.loads((tmp_path / "b" / INDEX_NAME).read_text())
    assert [s["samples"] for s in index_b["shards"]] == [2, 2]


def test_write_synthetic_shards_from_config_reuses_identical_set(tmp_path: Path) -> None:
    cfg = build_config({}, ["data.synthetic_clips=6", "data.synthetic_frames=3", "data.synthetic_shards=2",
                            "data.latent_height=4", "data.latent_width=4"])
    path = write_synthetic_shards(tmp_path, cfg)
    index = json.loads(path.read_text())
    assert index["total_samples"] == 6 and len(index["shards"]) == 2
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert write_synthetic_shards(tmp_path, cfg) == path
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    cfg.data.synthetic_clips = 4  # different parameters -> rewritten
    assert json.loads(write_synthetic_shards(tmp_path, cfg).read_text())["total_samples"] == 4
