"""eval.run_eval end to end with --random-models tiny on videos made by eval.generate: every output file,
the table and the plots; a corrupt video is reported and skipped; a missing weight file fails before
any work, naming its flag; the study mode generates (resumably) and evaluates."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from eval.generate import main as generate
from eval_utils import write_pairs
from eval.run_eval import main as run_eval

pytestmark = pytest.mark.usefixtures("single_thread")
FRAMES = 20   # >= 16 for one FVD clip, > 5 for SyncNet windows
SIZE = ["--height", "32", "--width", "32"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    pairs = write_pairs(root / "pairs", ["a", "b"])
    common = ["--batch", str(pairs), "--random-preset", "tiny", "--steps", "1", "--frames", str(FRAMES), "--quiet",
              *SIZE]
    assert generate(common + ["--out-dir", str(root / "gen")]) == 0
    assert generate(common + ["--out-dir", str(root / "real"), "--seed", "1"]) == 0
    (root / "gen" / "corrupt.mp4").write_bytes(b"this is not an mp4")
    return {"root": root, "pairs": pairs, "gen": root / "gen", "real": root / "real"}


def test_folders_end_to_end(videos, tmp_path):
    out = tmp_path / "out"
    rc = run_eval(["--generated", str(videos["gen"]), "--real", str(videos["real"]), "--references",
                   str(videos["pairs"]), "--out", str(out), "--random-models", "tiny", "--faces", "full",
                   "--metrics", "fid,fvd,fvd_r3d18,csim,sync", "--tensorboard", str(tmp_path / "tb")])
    assert rc == 0
    for name in ("results.json", "results.md", "results.csv", "identity_drift.png", "sync_over_time.png",
                 "comparison.png"):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    assert res["random_models"] == "tiny" and "meaningless" in res["warning"]
    (row,) = res["rows"]
    assert row["videos"] == 2
    assert [f["name"] for f in row["failed"]] == ["corrupt"] and "unreadable" in row["failed"][0]["error"]
    for k in ("fid", "fvd", "fvd_r3d18", "csim", "acd", "sync_c", "sync_d"):
        assert isinstance(row[k], float) and np.isfinite(row[k]), k
    assert row["sync_d"] > 0 and row["acd"] >= 0 and -1 <= row["csim"] <= 1
    assert len(row["curves"]["csim"]) == FRAMES
    assert len(row["curves"]["sync_conf"]) == FRAMES - 5
    md = (out / "results.md").read_text()
    assert "RANDOM-WEIGHT" in md and "| FID |" in md.replace("model | FID", "| FID") and "Sync-C" in md
    with open(out / "results.csv") as f:
        (csv_row,) = list(csv.DictReader(f))
    assert float(csv_row["sync_d"]) == pytest.approx(row["sync_d"]) and csv_row["random_models"] == "tiny"
    assert any((tmp_path / "tb").iterdir())
    with Image.open(out / "identity_drift.png") as im:
        assert im.size[0] > 300 and im.size[1] > 200


def test_missing_weight_path_fails_before_any_work(videos, tmp_path, caplog):
    out = tmp_path / "out"
    rc = run_eval(["--generated", str(videos["gen"]), "--real", str(videos["real"]), "--out", str(out),
                   "--metrics", "fid,sync", "--fid-inception", str(tmp_path / "nope.pth")])
    assert rc == 2
    assert "--fid-inception" in caplog.text and "nope.pth does not exist" in caplog.text
    assert not out.exists()
    rc = run_eval(["--generated", str(videos["gen"]), "--out", str(out), "--metrics", "sync"])
    assert rc == 2 and "--syncnet: no path given" in caplog.text
    rc = run_eval(["--generated", str(videos["gen"]), "--out", str(out), "--metrics", "apd", "--motion-extractor",
                   str(tmp_path / "me.pth")])
    assert rc == 2 and "--motion-extractor: " in caplog.text and not out.exists()


def test_apd_from_liveportrait_pose_heads(videos):
    """With a motion extractor, APD's angles are its pose heads (here a random tiny one)."""
    import torch

    from dualforce_mega.preprocess.motion import random_liveportrait
    from eval.metrics.analyze import analyze_video, read_frames
    from eval.metrics.models import MetricModels

    lp = random_liveportrait("tiny", device="cpu")
    models = MetricModels(device=torch.device("cpu"), random="tiny", pose=lp)
    rec = analyze_video(videos["gen"] / "a.mp4", models, ["apd"])
    motion, _ = lp.per_frame(read_frames(videos["gen"] / "a.mp4"))
    assert rec.pose.shape == (FRAMES, 3) and not rec.errors
    np.testing.assert_allclose(rec.pose, motion[:, 63:66].numpy(), rtol=1e-6)


def test_study_generates_resumably_and_evaluates(videos, tmp_path):
    study = {"out": "study_out", "metrics": ["csim", "sync"], "lengths": [12, 16], "faces": "full",
             "generation": {"steps": 1, "height": 32, "width": 32},
             "models": {"m1": {"random_preset": "tiny"}, "m2": {"random_preset": "tiny",
                                                                "diffusion": {"window_blocks": 2}}},
             "test_sets": {"ts": {"pairs": str(videos["pairs"]), "real": str(videos["real"])}},
             "networks": {"random_models": "tiny"}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    assert run_eval(["--study", str(path)]) == 0
    out = tmp_path / "study_out"
    vids = sorted(out.glob("videos/*/*/*/*.mp4"))
    assert len(vids) == 2 * 2 * 2
    mtimes = {p: p.stat().st_mtime_ns for p in vids}
    res = json.loads((out / "results.json").read_text())
    assert [(r["model"], r["length"]) for r in res["rows"]] == [("m1", 12), ("m1", 16), ("m2", 12), ("m2", 16)]
    assert all(r["videos"] == 2 and r["csim"] is not None for r in res["rows"])
    assert len(res["rows"][1]["curves"]["csim"]) == 16
    assert run_eval(["--study", str(path)]) == 0          # resumed: nothing regenerated
    assert {p: p.stat().st_mtime_ns for p in vids} == mtimes
