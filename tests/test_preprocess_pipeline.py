"""data_tools.prepare end to end on a real face (the astronaut with planted head motion and espeak-ng
speech) plus bad inputs, with --random-models tiny; the shards train with the launch script."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")
pytest.importorskip("cv2")
pytest.importorskip("silero_vad")
from media_fixtures import bad_inputs, have_espeak, talking_video, train_losses  # noqa: E402

pytestmark = [pytest.mark.skipif(not have_espeak(), reason="needs espeak-ng (scripts/install.sh installs it)"),
              pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
SIZE = 64       # crop side: 8x8 latents for the tiny model
GOOD = ["WDA_Astro_000.mp4", "WDA_Astro_001.mp4"]


def run_prepare(src: Path, out: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "data_tools.prepare", "--src", str(src), "--out", str(out), "--size", str(SIZE),
           "--random-models", "tiny", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    (raw / "HDTF").mkdir()
    good = [talking_video(raw / "HDTF" / name, 3.0, size=160) for name in GOOD]
    (raw / "HDTF" / "WDA_Astro_000.json").write_text(json.dumps({"gender": "female"}))
    expected = bad_inputs(raw / "bad", good[0])
    out = tmp_path_factory.mktemp("out")
    proc = run_prepare(raw, out, "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return raw, out, expected, proc


def test_bad_inputs_end_as_manifest_rows_with_reasons(prepared):
    raw, out, expected, proc = prepared
    rows = manifest(out)
    reason = {}
    for r in rows:
        if r["status"] in ("skipped", "failed") and r["kind"] in ("input", "clip"):
            reason.setdefault(r["id"].split("_c0")[0], r["reason"])
    for name, why in expected.items():
        assert reason.get(f"bad_{Path(name).stem}") == why, (name, reason)
    # the summary is printed: inputs, kept, the skip reasons and every step's clips/s
    assert f"inputs: {len(expected) + len(GOOD)}" in proc.stdout
    assert f"clips in shards: {len(GOOD)}" in proc.stdout
    for why in set(expected.values()):
        assert why in proc.stdout
    for step in ("01_clips", "02_quality", "03_latents", "04_motion", "05_flame", "06_audio", "07_shards"):
        assert step in proc.stdout


def test_good_clips_are_all_in_the_shards(prepared):
    from dualforce_mega.data.schema import ShardSchema
    from dualforce_mega.data.shard_source import resolve_shards
    from dualforce_mega.config import model_preset
    _, out, _, _ = prepared
    index = json.loads((out / "shards" / "index.json").read_text())
    keys = sorted(k for s in index["shards"] for k in s["keys"])
    assert keys == sorted(f"HDTF_{Path(n).stem}_c000" for n in GOOD)
    assert resolve_shards(str(out / "shards"), ShardSchema.from_model(model_preset("tiny"))).shards
    assert set(index["stats"]) >= {"video_latent", "struct", "audio", "kp_canonical"}
    import tarfile
    from safetensors.torch import load as st_load
    with tarfile.open(out / "shards" / index["shards"][0]["name"]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    meta = json.loads(members[f"{keys[0]}.json"])
    tensors = st_load(members[f"{keys[0]}.safetensors"])
    assert meta["random_models"] == "tiny" and meta["gender"] == "female" and meta["split"] == "train"
    assert meta["subject"] == "HDTF_WDA_Astro" and meta["source_dataset"] == "HDTF"
    assert meta["motion_extractor"] and meta["vae"] == "random-tiny"
    assert set(meta["quality"]) >= {"sharpness", "face_frac", "continuity", "centre_offset", "speech_frac"}
    n = meta["num_video_frames"]
    assert tensors["struct"].shape == (n, 70) and tensors["audio"].shape == (2 * n, 32)
    assert tensors["video_latent"].shape == (16, (n - 1) // 4 + 1, SIZE // 8, SIZE // 8)
    assert tensors["ref_positions"].tolist() == list(range(0, tensors["video_latent"].shape[1], 4))
    assert tensors["ref_latent"].shape[0] == len(tensors["ref_positions"])
    assert ("flame" in tensors) == meta["has_flame"]


def test_face_stays_centred_in_the_fixed_crop(prepared):
    from dualforce_mega.preprocess.face import build_detector
    from dualforce_mega.preprocess.video_io import read_clip
    _, out, _, _ = prepared
    d = out / "work" / "01_clips" / "HDTF_WDA_Astro_000"
    rec = json.loads((d / "HDTF_WDA_Astro_000_c000.json").read_text())
    frames = read_clip(d / rec["video"])
    assert frames.shape[1:] == (SIZE, SIZE, 3) and len(frames) == rec["num_video_frames"]
    det = build_detector("haar", min_size_frac=0.2)
    found = det.detect(frames[::6])
    hits = [f for f in found if len(f)]
    assert len(hits) >= 0.8 * len(found)
    for f in hits:
        b = f.boxes[np.argmax(f.scores)]
        centre = (b[:2] + b[2:]) / 2
        assert np.abs(centre - SIZE / 2).max() < 0.1 * SIZE, centre


@pytest.mark.slow
def test_train_dualforce_on_prepared_shards(prepared, tmp_path):
    _, out, _, _ = prepared
    losses = train_losses("train_dualforce.sh", out / "shards", tmp_path / "run")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
