"""FaceFormer data: the three layouts (old / new FLAME, 20 fps), the 51-d motion and 20 -> 25 fps
resampling against hand-computed values, broken records reported (file, field) and skipped, and a
world-size-independent, resumable batch order."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dualforce_mega.baselines.faceformer.data import (collate, dataset_name, load_sample, load_split,
                                                      read_records)
from dualforce_mega.baselines.faceformer.feed import EpochFeed, validation_batches
from faceformer_fixtures import make_data_root, motion_values

pytestmark = pytest.mark.usefixtures("single_thread")

TRAIN = ("dataset_jsons/digital_human.json", "dataset_jsons/splits/MEAD_VHAP_train.json",
         "dataset_jsons/splits/MultiModal200_train.json")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_data_root(tmp_path_factory.mktemp("ffdata"))


def by_id(clips) -> dict:
    return {c.record.id: c for c in clips}


def test_three_layouts_and_broken_records(root) -> None:
    clips, problems = load_split(TRAIN, root, 25, 50, 10, None)
    assert sorted({c.record.dataset for c in clips}) == ["MEAD_VHAP", "MultiModal200", "digital_human"]
    assert len(clips) == 3 + 2 + 2
    got = sorted((Path(p.file).name, p.field) for p in problems)
    assert got == [("MEAD_VHAP_train.json", "[4].audio"), ("broken.npz", "flame"), ("nope.npz", "flame")]
    assert any("neither of the FLAME formats" in p.message for p in problems)
    assert dataset_name(Path("x/MultiModal200_test.json")) == "MultiModal200"
    assert dataset_name(Path("x/digital_human.json")) == "digital_human"


def test_motion_is_expression_and_jaw_of_either_format(root) -> None:
    clips = by_id(load_split(TRAIN, root, 25, 50, 10, None)[0])
    expr, jaw = motion_values(30, 25)              # 1.2 s at 25 fps as written
    old = clips["digital_human_0"]                 # expcode / posecode: jaw = posecode[:, 3]
    new = clips["MEAD_VHAP_3"]                     # expr / jaw_pose: jaw = jaw_pose[:, 0]
    for clip in (old, new):
        assert clip.motion.shape == (30, 51) and clip.motion.dtype == np.float32
        np.testing.assert_array_equal(clip.motion[:, :50], expr[:, :50])
        np.testing.assert_array_equal(clip.motion[:, 50], jaw)


def test_20_fps_is_resampled_to_25_by_hand(root) -> None:
    clip = by_id(load_split(TRAIN, root, 25, 50, 10, None)[0])["MultiModal200_5"]
    e20, j20 = motion_values(24, 20)               # 24 frames at 20 fps = 1.2 s -> 30 frames at 25 fps
    assert clip.frames == 30 and clip.samples == 30 * 640
    m = clip.motion
    # 25-fps frame k sits at 20-fps position 0.8 k
    np.testing.assert_allclose(m[0, 50], j20[0], atol=1e-7)
    np.testing.assert_allclose(m[1, 50], 0.2 * j20[0] + 0.8 * j20[1], atol=1e-6)
    np.testing.assert_allclose(m[2, 50], 0.4 * j20[1] + 0.6 * j20[2], atol=1e-6)
    np.testing.assert_allclose(m[5, 50], j20[4], atol=1e-7)
    np.testing.assert_allclose(m[29, 50], j20[23], atol=1e-7)     # position 23.2: past the last frame, held
    np.testing.assert_allclose(m[3, 7], 0.6 * e20[2, 7] + 0.4 * e20[3, 7], atol=1e-6)


def test_cut_to_max_frames_and_audio_at_16k(root) -> None:
    clips = by_id(load_split(TRAIN, root, 25, 50, 10, 20)[0])
    clip = clips["MEAD_VHAP_3"]                    # the 22.05 kHz wav
    assert clip.frames == 20
    sample = load_sample(clip, ["M003", "W009"])
    assert sample["audio"].shape == (20 * 640,) and sample["style"] == 0
    assert load_sample(clips["MEAD_VHAP_4"], ["M003", "W009"])["style"] == 1
    assert load_sample(clips["MEAD_VHAP_4"], ["x", "y", "W008"], fallback="y")["style"] == 1   # unseen subject


def test_too_short_and_bad_style_are_reported(root, tmp_path) -> None:
    records = json.loads((root / "dataset_jsons/splits/MEAD_VHAP_val.json").read_text())
    records.append({**records[0], "style": "../escape"})
    (tmp_path / "X_val.json").write_text(json.dumps(records))
    recs, problems = read_records(tmp_path / "X_val.json", root)
    assert len(recs) == 1 and [(p.field) for p in problems] == ["[1].style"]
    clips, problems = load_split([str(tmp_path / "X_val.json")], root, 25, 50, 31, None)
    assert not clips and [p.field for p in problems] == ["[1].style", "frames"]


def test_batches_pad_and_mask() -> None:
    s = [{"audio": torch.ones(6), "motion": torch.ones(3, 4), "style": 1},
         {"audio": torch.ones(4), "motion": torch.ones(2, 4), "style": 0}]
    b = collate(s, [7, 8], valid=[True, False])
    assert b["audio"].shape == (2, 6) and b["audio"][1, 4:].abs().sum() == 0
    assert b["frames"].tolist() == [3, 2] and b["audio_len"].tolist() == [6, 4]
    assert b["mask"].tolist() == [[True, True, True], [False, False, False]]
    assert b["style"].tolist() == [1, 0] and b["__index__"].tolist() == [7, 8]


def test_feed_order_is_world_size_independent_and_resumes(root) -> None:
    clips = load_split(TRAIN, root, 25, 50, 10, 12)[0]
    subjects = sorted({c.record.subject for c in clips})

    def run(dp: int, accum: int, steps: int) -> list[list[int]]:
        feeds = [EpochFeed(clips, subjects, 0, 4, 1, r, dp, accum) for r in range(dp)]
        out = []
        for _ in range(steps):
            ids = []
            for f in feeds:
                for m in range(accum):
                    ids += f.next(m)["__index__"].tolist()
            out.append(sorted(ids))
        return out

    one, two = run(1, 4, 5), run(2, 2, 5)
    assert one == two == [list(range(4 * s, 4 * s + 4)) for s in range(5)]
    feed = EpochFeed(clips, subjects, 0, 4, 1, 0, 1, 4)
    epoch = sorted(feed.clip_of(g) for g in range(len(clips)))
    assert epoch == list(range(len(clips)))        # an epoch visits every clip once
    assert [feed.clip_of(g) for g in range(7)] != [feed.clip_of(g) for g in range(7, 14)]
    for m in range(4):
        feed.next(m)
    state = feed.state_dict()
    resumed = EpochFeed(clips, subjects, 0, 4, 1, 0, 1, 4)
    resumed.load_state_dict(state)
    want = feed.next(0)["__index__"].tolist() + [feed.next(m)["__index__"].item() for m in (1, 2, 3)]
    assert resumed.next(0)["__index__"].tolist() == want[:1] == [4]
    elastic = EpochFeed(clips, subjects, 0, 4, 1, 1, 2, 2)      # rank 1 of 2: streams 2, 3 of the same state
    elastic.load_state_dict(state)
    assert [elastic.next(m)["__index__"].item() for m in (0, 1)] == want[2:]
    with pytest.raises(ValueError, match=r"holds logical data streams \[0, 1\], this rank owns \[2, 3\]"):
        elastic.load_state_dict({"streams": [0, 1], "loaders": state["loaders"][:2]})


def test_validation_split_over_ranks_covers_every_clip_once(root) -> None:
    clips = load_split(TRAIN, root, 25, 50, 10, 12)[0]          # 7 clips over 2 ranks, batch 2
    per_rank = [validation_batches(clips, ["dh_a"], r, 2, 2) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    seen = sorted(i for batches in per_rank for b in batches
                  for i, ok in zip(b["__index__"].tolist(), b["mask"].any(1).tolist()) if ok)
    assert seen == list(range(7))
