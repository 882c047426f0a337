"""LatentSync baseline, the batch runner (python -m eval.baselines.latentsync) with tiny random
networks on a folder of real-face videos: g-/m- pairing, outputs and manifest, broken inputs,
resuming after a kill."""
from __future__ import annotations

import os
import wave
from pathlib import Path

import av
import numpy as np
import pytest

pytest.importorskip("cv2")
pytest.importorskip("skimage")

import torch  # noqa: E402

from dualforce_mega.baselines.latentsync.build import BuildSpec, build_lipsync  # noqa: E402
from dualforce_mega.baselines.latentsync.pairs import list_pairs  # noqa: E402
from dualforce_mega.preprocess.manifest import read_manifest  # noqa: E402
from eval.baselines.latentsync import main  # noqa: E402
from kill_point import run_killed_after_first_row  # noqa: E402
from media_fixtures import face_frames, write_video  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[1]
FPS = 25
SAMPLE_RATE = 16000
VALID_PAIRS = {"g-a__g-x", "g-b__g-x", "m-c__m-y", "m-c__m-z"}
AUDIO_SECONDS = {"g-x": 0.3, "m-y": 0.6, "m-z": 0.2}     # m-y is longer than the videos: they loop


def _wav(path: Path, seconds: float, freq: float) -> None:
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pcm = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """g-a, g-b (not square), m-c videos of the astronaut; g-x, m-y, m-z audios; other.wav without a
    prefix; g-broken.mp4 that is not a video; notes.txt that is neither."""
    d = tmp_path_factory.mktemp("latentsync_in")
    frames, _, _ = face_frames(10, 128)
    write_video(d / "g-a.mp4", frames, FPS)
    write_video(d / "g-b.mp4", np.ascontiguousarray(frames[:, 16:112]), FPS)
    write_video(d / "m-c.mp4", np.ascontiguousarray(frames[::-1]), FPS)
    for i, (name, seconds) in enumerate(AUDIO_SECONDS.items()):
        _wav(d / f"{name}.wav", seconds, 150.0 + 60 * i)
    _wav(d / "other.wav", 0.2, 300.0)
    (d / "g-broken.mp4").write_bytes(b"this is not an mp4 " * 20)
    (d / "notes.txt").write_text("not media")
    (d / "unet.yaml").write_text("data:\n  num_frames: 8\n  resolution: 32\nmodel: {}\n")
    return d


def _args(inputs: Path, out: Path, *extra: str) -> list[str]:
    return ["--input_dir", str(inputs), "--output_dir", str(out), "--unet_config_path", str(inputs / "unet.yaml"),
            "--random-models", "tiny", "--steps", "2", *extra]


def _rows(out: Path) -> list[dict]:
    return read_manifest(out / "manifest.jsonl")


def _streams(path: Path) -> tuple[int, int, int]:
    """(video frames, audio streams, audio samples at the stream rate)."""
    with av.open(str(path)) as c:
        n = sum(1 for _ in c.decode(video=0))
    with av.open(str(path)) as c:
        samples = sum(f.samples for f in c.decode(audio=0))
        return n, len(c.streams.audio), samples


def _first_frame(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return next(c.decode(video=0)).to_ndarray(format="rgb24").astype(np.int16)


def test_pairs_by_gender(tmp_path):
    for name in ("g-a.mp4", "g-b.mov", "m-c.mp4", "m-solo.mp4", "x.mp4", "g-x.wav", "g-y.mp3", "other.wav",
                 "readme.txt", "m-v.wav"):
        (tmp_path / name).touch()
    listing = list_pairs(tmp_path)
    assert [p.name for p in listing.pairs] == ["g-a__g-x", "g-a__g-y", "g-b__g-x", "g-b__g-y", "m-c__m-v",
                                               "m-solo__m-v"]
    assert {p.gender for p in listing.pairs} == {"female", "male"}
    assert listing.pairs[0].out_name == "g-a__g-x_out.mp4" and listing.pairs[0].mask_name == "g-a__g-x_mask.mp4"
    assert dict(listing.unpaired) == {"other.wav": "no g-/m- prefix", "x.mp4": "no g-/m- prefix",
                                      "readme.txt": "not a video or audio file"}
    # a pairs file restricts the batch; a pair that is not one gender has no gender (default guidance)
    spec = tmp_path / "pairs.txt"
    spec.write_text("# video audio\nm-c.mp4 m-v.wav\nx.mp4, other.wav\n")
    listing = list_pairs(tmp_path, spec)
    assert [(p.name, p.gender) for p in listing.pairs] == [("m-c__m-v", "male"), ("x__other", None)]
    assert ("g-a.mp4", "not in the pairs file") in listing.unpaired
    for text, err in (("g-a.mp4 missing.wav\n", "pairs.txt:1: missing.wav is not in"),
                      ("g-x.wav g-a.mp4\n", "pairs.txt:1: g-x.wav is not a video file"),
                      ("g-a.mp4 g-x.wav\n\ng-a.mp4 g-x.wav\n", "pairs.txt:3: pair g-a__g-x listed twice"),
                      ("g-a.mp4\n", "pairs.txt:1: expected 'VIDEO AUDIO'")):
        spec.write_text(text)
        with pytest.raises((ValueError, FileNotFoundError), match=err):
            list_pairs(tmp_path, spec)


def test_batch_outputs_manifest_and_broken_input(inputs, tmp_path):
    before = sorted(p.name for p in inputs.iterdir())
    out = tmp_path / "out"
    assert main(_args(inputs, out)) == 1                       # one pair failed (the broken video)
    expected = {f"{p}{s}" for p in VALID_PAIRS for s in ("_out.mp4", "_mask.mp4")} | {"manifest.jsonl"}
    assert {p.name for p in out.iterdir()} == expected
    assert sorted(p.name for p in inputs.iterdir()) == before  # nothing written into the input folder

    rows = _rows(out)
    pairs = {r["id"]: r for r in rows if r["kind"] == "pair"}
    assert {k for k, r in pairs.items() if r["status"] == "ok"} == VALID_PAIRS
    assert {r["id"]: r["guidance"] for r in pairs.values()} == {
        "g-a__g-x": 1.8, "g-b__g-x": 1.8, "g-broken__g-x": 1.8, "m-c__m-y": 1.3, "m-c__m-z": 1.3}
    assert all(r["seed"] == 1247 and r["seconds"] >= 0 for r in pairs.values())
    broken = pairs["g-broken__g-x"]
    assert (broken["status"], broken["reason"]) == ("failed", "unreadable") and "g-broken.mp4" in broken["detail"]
    left_out = {r["id"]: r["detail"] for r in rows if r["kind"] == "file" and r["reason"] == "unpaired"}
    assert left_out == {"other.wav": "no g-/m- prefix", "notes.txt": "not a video or audio file",
                        "unet.yaml": "not a video or audio file"}

    for pair in VALID_PAIRS:
        audio = pair.split("__")[1]
        # LatentSync's frame count: Whisper windows until one's centre passes the audio (50 Hz features)
        feats = round(AUDIO_SECONDS[audio] * SAMPLE_RATE) // 160 // 2
        frames = next(i for i in range(10 ** 4) if (i - 1) * 2 > feats)
        assert pairs[pair]["frames"] == frames
        for suffix in ("_out.mp4", "_mask.mp4"):
            n, audio_streams, samples = _streams(out / f"{pair}{suffix}")
            assert (n, audio_streams) == (frames, 1), (pair, suffix)
            assert samples > 0.8 * AUDIO_SECONDS[audio] * SAMPLE_RATE
    # only the face changes: the frame corner is the input's (up to the codec), the mouth is regenerated
    src, synced, masked = (_first_frame(p) for p in (inputs / "g-a.mp4", out / "g-a__g-x_out.mp4",
                                                     out / "g-a__g-x_mask.mp4"))
    assert np.abs(synced - src)[:20, :20].mean() < 6 and np.abs(masked - src)[:20, :20].mean() < 6  # re-encoding
    assert np.abs(synced - src).max() > 60
    assert (np.abs(masked - 128) <= 4).all(-1).sum() > 50                 # the grey mouth mask shows

    # a second run finds everything finished (the broken input fails again) and writes nothing
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")}
    assert main(_args(inputs, out)) == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")} == stamps
    second = [r for r in _rows(out)[len(rows):] if r["kind"] == "pair"]
    assert {r["id"] for r in second if r["status"] == "skipped" and r["reason"] == "finished"} == VALID_PAIRS


def test_pairs_file_and_default_guidance(inputs, tmp_path):
    spec = tmp_path / "pairs.txt"
    spec.write_text("g-a.mp4 other.wav\nm-c.mp4 m-z.wav\n")
    out = tmp_path / "out"
    assert main(_args(inputs, out, "--pairs", str(spec), "--guidance_scale", "1.6")) == 0
    assert {p.name for p in out.glob("*_out.mp4")} == {"g-a__other_out.mp4", "m-c__m-z_out.mp4"}
    guidance = {r["id"]: r["guidance"] for r in _rows(out) if r["kind"] == "pair"}
    assert guidance == {"g-a__other": 1.6, "m-c__m-z": 1.3}


def test_output_dir_is_not_the_input(inputs):
    with pytest.raises(ValueError, match="is the input folder"):
        main(_args(inputs, inputs))


@pytest.mark.slow
def test_killed_run_resumes_only_missing_pairs(inputs, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    run_killed_after_first_row("eval.baselines.latentsync", _args(inputs, out), "latentsync", "pair", REPO, env)
    finished = {p.name[:-len("_out.mp4")] for p in out.glob("*_out.mp4")}
    assert len(finished) == 1, finished
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4") if ".partial" not in p.name}
    first_rows = len(_rows(out))

    assert main(_args(inputs, out)) == 1
    rows = [r for r in _rows(out)[first_rows:] if r["kind"] == "pair"]
    assert {r["id"] for r in rows if r["status"] == "skipped"} == finished
    assert {r["id"] for r in rows if r["status"] == "ok"} == VALID_PAIRS - finished
    for name, stamp in stamps.items():
        if name.split("_out.mp4")[0].split("_mask.mp4")[0] in finished:
            assert (out / name).stat().st_mtime_ns == stamp, name       # finished pairs are not redone
    assert not list(out.glob("*.partial.mp4"))
    assert {p.name for p in out.glob("*_mask.mp4")} == {f"{p}_mask.mp4" for p in VALID_PAIRS}


@pytest.mark.gpu
def test_pipeline_cuda_float16(inputs):
    """The pipeline as it runs for real: CUDA, float16, SDPA (tiny random networks)."""
    pipe = build_lipsync(BuildSpec(str(inputs / "unet.yaml"), random_models="tiny", steps=2, device="cuda"))
    assert pipe.dtype == torch.float16 and next(pipe.unet.parameters()).dtype == torch.float16
    frames, _, _ = face_frames(10, 128)
    wave = torch.from_numpy(np.sin(np.arange(8000) / 20.0).astype(np.float32) * 0.3)
    outs = list(pipe.run(frames, pipe.align_video(frames), wave, 1.5, 0))
    synced = np.concatenate([o[0] for o in outs])
    assert synced.shape[1:] == frames.shape[1:] and synced.dtype == np.uint8
    assert np.abs(synced[:10].astype(int) - frames.astype(int)).max() > 30     # the mouth region changed
