"""WebDataset loader: exact resume, rank splitting, corruption handling, window slicing."""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch

from dualforce_mega.data.synthetic_shards import write_shards
from dualforce_mega.config import Config, build_config, model_preset
from dualforce_mega.data.loader import ShardLoader, build_loader
from dualforce_mega.data.schema import ShardSchema, to_storage
from dualforce_mega.data.shard_source import ShardSetError
from dualforce_mega.data.shard_writer import INDEX_NAME, ShardWriter
from dualforce_mega.data.synthetic import make_synthetic_clip

SHARDS, PER_SHARD, FRAMES, HW = 8, 3, 5, (4, 4)
CLIPS = SHARDS * PER_SHARD


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(out, model_preset("tiny"), clips=CLIPS, frames=FRAMES, latent_hw=HW, seed=0, shards=SHARDS)
    return out


def config(shards: Path, **data: Any) -> Config:
    sets = [f"data.shards={shards}", "data.window=3", "data.shuffle_buffer=4", "data.workers=0",
            "train.micro_batch=1"] + [f"{k}={v}" for k, v in data.items()]
    return build_config({}, sets)


def take(loader: ShardLoader, n: int) -> list[dict[str, Any]]:
    return [next(loader) for _ in range(n)]


def assert_same_batches(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["__key__"] == y["__key__"]
        assert set(x) == set(y)
        for name, v in x.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, y[name]), name


def keys(batches: list[dict[str, Any]]) -> list[str]:
    return [k for b in batches for k in b["__key__"]]


def test_resume_is_exact_with_two_ranks_and_two_workers(shard_dir: Path) -> None:
    # per rank: 4 shards x 3 clips = 12 samples per epoch = 6 batches of 2; 9 batches cross an epoch
    cfg = config(shard_dir, **{"data.workers": 2, "train.micro_batch": 2})
    total, cuts = 9, (3, 6)  # 3 is odd: the next batch is due from worker stream 1, not 0
    for rank in range(2):
        ref = build_loader(cfg, rank, 2)
        full = take(ref, total)
        seen, state, done = [], None, 0
        for stop in cuts + (total,):  # two restarts, each into a NEW loader
            loader = build_loader(cfg, rank, 2)
            if state is not None:
                loader.load_state_dict(state)
            seen += take(loader, stop - done)
            state = json.loads(json.dumps(loader.state_dict()))  # must survive a JSON round trip
            done = stop
            loader.close()
        assert_same_batches(full, seen)
        assert ref.stats == loader.stats
        assert [i for b in full for i in b["__index__"].tolist()] == [rank + 2 * i for i in range(2 * total)]
        ref.close()


def test_same_rank_identical_and_ranks_disjoint_per_epoch(shard_dir: Path) -> None:
    cfg = config(shard_dir, **{"data.workers": 2})
    per_rank_epoch = CLIPS // 2
    a, b = build_loader(cfg, 0, 2), build_loader(cfg, 0, 2)
    rank0 = take(a, 2 * per_rank_epoch)
    assert_same_batches(rank0, take(b, 2 * per_rank_epoch))
    rank1 = take(build_loader(cfg, 1, 2), 2 * per_rank_epoch)
    all_keys = {f"synthetic_0_{i:08d}" for i in range(CLIPS)}
    for epoch in range(2):
        window = slice(epoch * per_rank_epoch, (epoch + 1) * per_rank_epoch)
        k0, k1 = keys(rank0[window]), keys(rank1[window])
        assert len(set(k0)) == len(k0) == per_rank_epoch and len(set(k1)) == len(k1)
        assert set(k0).isdisjoint(k1) and set(k0) | set(k1) == all_keys
    assert keys(rank0[:per_rank_epoch]) != keys(rank0[per_rank_epoch:])  # reshuffled per epoch
    assert a.stats["epochs_started"] == 2 * 2 and a.stats["corrupt_samples"] == 0


def _member_offsets(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_corrupt_and_truncated_shards_are_skipped_and_counted(shard_dir: Path, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(shard_dir, bad)
    index = json.loads((bad / INDEX_NAME).read_text())
    names = [s["name"] for s in index["shards"]]
    lost: set[str] = set()
    # shard 0: garbage inside the tensor bytes of its middle sample -> that sample fails its CRC
    s0 = index["shards"][0]
    m = _member_offsets(bad / names[0])[f"{s0['keys'][1]}.safetensors"]
    with open(bad / names[0], "r+b") as f:
        f.seek(m.offset_data + m.size // 2)
        f.write(b"\xde\xad\xbe\xef" * 8)
    lost.add(s0["keys"][1])
    # shard 1: garbage over the tar header of its middle sample -> the rest of the shard is unreadable
    s1 = index["shards"][1]
    m = _member_offsets(bad / names[1])[f"{s1['keys'][1]}.safetensors"]
    with open(bad / names[1], "r+b") as f:
        f.seek(m.offset)
        f.write(b"\x07garbage" * 16)
    lost.update(s1["keys"][1:])
    # shard 2: truncated in the middle of its second sample
    s2 = index["shards"][2]
    m = _member_offsets(bad / names[2])[f"{s2['keys'][1]}.safetensors"]
    with open(bad / names[2], "r+b") as f:
        f.truncate(m.offset_data + m.size // 2)
    lost.update(s2["keys"][1:])

    loader = build_loader(config(bad, **{"data.shuffle_buffer": 0}), 0, 1)
    good = CLIPS - len(lost)
    epoch0 = take(loader, good)
    assert set(keys(epoch0)) == {f"synthetic_0_{i:08d}" for i in range(CLIPS)} - lost
    take(loader, good + 1)  # the stream goes on: epoch 1 is read completely, epoch 2 begins
    stats = loader.stats
    assert stats["corrupt_samples"] == 2 and stats["corrupt_shards"] == 2 * 2, stats
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert s0["keys"][1] in warned and names[1] in warned and names[2] in warned

    # resuming inside damaged data neither repeats nor re-counts anything
    cfg = config(bad, **{"data.shuffle_buffer": 4})
    ref, head = build_loader(cfg, 0, 1), build_loader(cfg, 0, 1)
    full = take(ref, 2 * good)
    part = take(head, good - 2)
    resumed = build_loader(cfg, 0, 1)
    resumed.load_state_dict(head.state_dict())
    assert_same_batches(full, part + take(resumed, good + 2))
    assert resumed.stats == ref.stats


def _indexed_clip(cfg, frames: int) -> tuple[dict[str, torch.Tensor], dict]:
    """A clip whose values are their own time indices (exact in bf16 for these sizes)."""
    schema = ShardSchema.from_model(cfg)
    n, a = schema.video_frames(frames), schema.audio_frames(frames)
    t = {
        "video_latent": torch.arange(frames, dtype=torch.float32)[None, :, None, None]
        .expand(cfg.in_channels, frames, *HW).to(torch.bfloat16).contiguous(),
        "struct": torch.arange(n, dtype=torch.float32)[:, None].expand(n, cfg.motion_dim).contiguous(),
        "kp_canonical": torch.zeros(cfg.kp_dim),
        "audio": torch.arange(a, dtype=torch.float32)[:, None].expand(a, cfg.audio_dim).contiguous(),
        "flame": -torch.arange(n, dtype=torch.float32)[:, None].expand(n, cfg.flame_dim).contiguous(),
    }
    meta = {"fps": cfg.fps, "num_latent_frames": frames, "num_video_frames": n, "num_audio_frames": a,
            "source_dataset": "test", "subject": "s0", "split": "train", "gender": "unknown", "quality": {},
            "source_file": "indexed.mp4", "time_range": [0.0, n / cfg.fps]}
    return t, meta


def test_windows_follow_the_slicing_rule(tmp_path: Path) -> None:
    cfg = config(tmp_path, **{"data.window": 3, "train.micro_batch": 2, "data.normalize": ""})
    frames = 7
    with ShardWriter(tmp_path, cfg.model, max_shard_samples=4) as w:
        for i in range(8):
            w.write(f"indexed_{i}", *_indexed_clip(cfg.model, frames))
    stride, per_frame, W = cfg.model.vae_temporal_stride, cfg.model.audio_rate // cfg.model.fps, cfg.data.window
    starts = set()
    for batch in take(build_loader(cfg, 0, 1), 8):
        for b, t0 in enumerate(batch["__window_start__"].tolist()):
            starts.add(t0)
            assert 0 <= t0 <= frames - W
            lat = batch["video_latent"][b, 0, :, 0, 0]
            assert lat.tolist() == list(range(t0, t0 + W))
            rows = list(range(stride * t0, stride * (t0 + W - 1) + 1))   # INTERFACES: 4*t0 .. 4*(t0+W-1)
            assert batch["struct"][b, :, 0].tolist() == rows
            assert batch["flame"][b, :, 0].tolist() == [-r for r in rows]
            # audio 2*4*t0 .. 2*(4*(t0+W-1)+1)-1
            assert batch["audio"][b, :, 0].tolist() == list(range(per_frame * rows[0], per_frame * (rows[-1] + 1)))
            # window frame j >= 1 ends at struct row 4j, the last video frame of latent frame t0+j
            for j in range(W):
                assert batch["struct"][b, stride * j, 0] == stride * lat[j]
    assert len(starts) > 1  # windows really are random
    s = ShardSchema.from_model(cfg.model).timeline.window_slices(2, 3)
    assert (s.latent, s.video_frames, s.audio) == (slice(2, 5), slice(8, 17), slice(16, 34))


def test_batches_bucket_equal_shapes_and_text_follows_the_model(tmp_path: Path) -> None:
    sizes = [(4, 4), (4, 6)]
    cfg = config(tmp_path, **{"train.micro_batch": 2})
    with ShardWriter(tmp_path, cfg.model, max_shard_samples=5) as w:
        for i in range(10):
            t, m = make_synthetic_clip(i, FRAMES, sizes[i % 2], cfg.model, seed=0)
            w.write(f"clip_{i}", to_storage(t), {**m, "source_dataset": "synthetic"})
    loader = build_loader(cfg, 0, 1)
    seen = []
    for batch in take(loader, 4):  # 5 clips of each size -> 2 full batches each, 1 left over
        hw = {tuple(batch["video_latent"].shape[-2:])}
        assert len(hw) == 1 and hw <= set(sizes) and batch["text_emb"].shape[0] == 2
        seen += batch["__key__"]
    assert len(set(seen)) == 8
    next(loader)
    assert loader.stats["dropped_remainder"] == 2
    no_text = build_config({}, [f"data.shards={tmp_path}", "model.text_dim=0", "train.micro_batch=2"])
    assert "text_emb" not in next(build_loader(no_text, 0, 1))


def test_batches_bucket_by_text_length(tmp_path: Path) -> None:
    """Clips of one latent size whose text has 3 or 2 tokens: never in one batch (they could not stack)."""
    cfg = config(tmp_path, **{"train.micro_batch": 2})
    lengths = {}
    with ShardWriter(tmp_path, cfg.model, max_shard_samples=5) as w:
        for i in range(10):
            t, m = make_synthetic_clip(i, FRAMES, HW, cfg.model, seed=0)
            t["text_emb"] = t["text_emb"][:3 - i % 2]
            lengths[f"clip_{i}"] = t["text_emb"].shape[0]
            w.write(f"clip_{i}", to_storage(t), {**m, "source_dataset": "synthetic"})
    seen = []
    for batch in take(build_loader(cfg, 0, 1), 4):   # 5 clips per length -> 2 full batches each
        assert {lengths[k] for k in batch["__key__"]} == {batch["text_emb"].shape[1]}, batch["__key__"]
        seen += batch["__key__"]
    assert sorted(lengths[k] for k in seen) == [2] * 4 + [3] * 4


def test_clear_errors_for_bad_shard_sets(shard_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ShardSetError, match=str(tmp_path / "missing")):
        build_loader(config(tmp_path / "missing"), 0, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardSetError, match="no shards found"):
        build_loader(config(tmp_path / "empty"), 0, 1)
    with pytest.raises(ShardSetError, match="16 streams"):
        build_loader(config(shard_dir, **{"data.workers": 4}), 0, 4)
    with pytest.raises(ShardSetError, match="model_dims.audio_dim"):
        build_loader(build_config({}, [f"data.shards={shard_dir}", "model.audio_dim=48"]), 0, 1)
    cfg = config(f"{shard_dir}/shard-00000[0-3].tar")  # a glob still finds the index next to the shards
    assert len(build_loader(cfg, 0, 1).shard_set.shards) == 4


def test_state_from_another_layout_is_refused_or_restarts_an_epoch(shard_dir: Path) -> None:
    saved = build_loader(config(shard_dir), 0, 2)
    take(saved, 3)
    state = saved.state_dict()
    other = build_loader(config(shard_dir), 0, 1)
    with pytest.raises(ValueError, match="dp_size"):
        other.load_state_dict(state)
    other.load_state_dict(state, strict=False)
    batch = next(other)
    assert batch["__index__"].tolist() == [3]  # sample indices keep counting
    assert other.state_dict()["streams"][0]["epoch"] == 1
