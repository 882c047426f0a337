"""Unit tests of the raw-video pipeline's pieces (hand-computed values, small local files)."""
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")

from dualforce_mega.preprocess.build_shards import gender_of, split_subjects, subject_of
from dualforce_mega.preprocess.clips import split_run, trim_length
from dualforce_mega.preprocess.config import ClipConfig, PrepareConfig, QualityConfig
from dualforce_mega.preprocess.manifest import Manifest, summarize
from dualforce_mega.preprocess.pipeline import list_sources
from dualforce_mega.preprocess.quality import verdict
from dualforce_mega.preprocess.video_io import MediaError, decode_audio, iter_frames, probe, read_wav
from media_fixtures import write_video


def test_constant_fps_resampling_picks_the_frame_on_screen(tmp_path: Path):
    """A 30 fps source whose frame i has brightness 4i: 25 fps output frame k shows source frame
    floor(k * 30 / 25) -- the one on screen at k / 25 s -- and chunks never change that."""
    n = 60
    frames = np.stack([np.full((32, 48, 3), 4 * i, np.uint8) for i in range(n)])
    path = write_video(tmp_path / "v30.mp4", frames, fps=30)
    assert probe(path).fps == 30 and not probe(path).has_audio
    for chunk in (7, 64):
        out = np.concatenate(list(iter_frames(path, 25, chunk=chunk)))
        assert len(out) == 50
        got = np.round(out[:, 16, 24, 0] / 4).astype(int)
        np.testing.assert_array_equal(got, np.floor(np.arange(50) * 30 / 25 + 1e-9).astype(int))
    small = next(iter_frames(path, 25, chunk=4, max_side=16))
    assert small.shape == (4, 16, 24, 3)


def test_audio_is_16k_mono_and_aligned(tmp_path: Path):
    sr = 22050
    t = np.arange(int(2.0 * sr)) / sr
    stereo_free = 0.5 * np.sin(2 * np.pi * 440 * t).astype(np.float32)
    frames = np.zeros((50, 32, 32, 3), np.uint8)
    path = write_video(tmp_path / "a.mp4", frames, 25, stereo_free, sr)
    n = decode_audio(path, tmp_path / "a.wav")
    wave, rate = read_wav(tmp_path / "a.wav")
    assert rate == 16000 and wave.size == n
    assert abs(n - 32000) < 0.05 * 32000           # AAC may pad the last packet
    # the tone survives resampling: dominant frequency 440 Hz
    spec = np.abs(np.fft.rfft(wave[:16000]))
    assert abs(np.argmax(spec) * 16000 / 16000 - 440) <= 2
    with pytest.raises(MediaError) as e:
        decode_audio(write_video(tmp_path / "mute.mp4", frames), tmp_path / "m.wav")
    assert e.value.reason == "no_audio"
    (tmp_path / "junk.mp4").write_bytes(b"\0" * 100)
    with pytest.raises(MediaError) as e:
        probe(tmp_path / "junk.mp4")
    assert e.value.reason == "unreadable"


def test_clip_lengths_follow_the_vae_rule():
    assert [trim_length(n, 4) for n in (0, 1, 4, 5, 8, 9, 12)] == [0, 1, 1, 5, 5, 9, 9]
    cfg = ClipConfig(fps=25, max_seconds=2.0)                     # max 50 frames -> 49 = 1 + 4*12
    pieces = split_run(10, 130, cfg, 4)                           # 120 frames -> 3 parts of 40
    assert pieces == [(10, 37), (50, 37), (90, 37)]
    assert all((n - 1) % 4 == 0 and n <= 49 for _, n in pieces)


def test_split_by_subject_is_disjoint_and_proportional():
    subjects = [f"s{i:03d}" for i in range(100)]
    splits = split_subjects(subjects + subjects[:10], (0.8, 0.1, 0.1), seed=3)
    assert set(splits) == set(subjects)                            # one split per subject
    counts = {s: sum(v == s for v in splits.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 80, "val": 10, "test": 10}
    assert split_subjects(subjects, (0.8, 0.1, 0.1), seed=3) == splits        # deterministic
    assert split_subjects(subjects, (0.8, 0.1, 0.1), seed=4) != splits
    assert set(split_subjects(["a", "b"], (0.9, 0.05, 0.05), 0).values()) == {"train"}   # few subjects: all train


def test_subject_and_gender_rules():
    assert subject_of("HDTF_WDA_BarackObama_000", {}) == "HDTF_WDA_BarackObama"
    assert subject_of("x_12", {"subject": "id7"}) == "id7"
    assert [gender_of({"gender": g}) for g in ("F", "male", "", "x")] == ["female", "male", "unknown", "unknown"]


def test_quality_verdict_names_first_failure():
    cfg = QualityConfig(min_sharpness=10, min_face_frac=0.1, min_continuity=0.5, max_centre_offset=0.1,
                        min_speech_frac=0.3)
    good = {"sharpness": 50, "face_frac": 0.2, "continuity": 0.9, "centre_offset": 0.05, "speech_frac": 0.8}
    assert verdict(good, cfg, need_face=True, need_speech=True) is None
    assert verdict({**good, "sharpness": 5}, cfg, need_face=True, need_speech=True)[0] == "blurry"
    assert verdict({**good, "centre_offset": 0.2}, cfg, need_face=True, need_speech=True)[0] == "face_off_centre"
    assert verdict({**good, "speech_frac": 0.1}, cfg, need_face=True, need_speech=True)[0] == "silent"
    assert verdict({**good, "speech_frac": 0.1}, cfg, need_face=True, need_speech=False) is None


def test_sources_sidecars_and_config_errors(tmp_path: Path):
    (tmp_path / "HDTF").mkdir()
    (tmp_path / "HDTF" / "a_001.mp4").write_bytes(b"x")
    (tmp_path / "HDTF" / "a_001.json").write_text(json.dumps({"gender": "f", "subject": "A"}))
    (tmp_path / "HDTF" / "a_001.txt").write_text("a caption\n")
    (tmp_path / "b.mkv").write_bytes(b"x")
    (tmp_path / ".hidden").write_bytes(b"x")
    src = list_sources(tmp_path, None)
    assert [s.input_id for s in src] == ["HDTF_a_001", "b"]
    assert src[0].info == {"dataset": "HDTF", "gender": "f", "subject": "A", "caption": "a caption"}
    assert src[1].info == {"dataset": "raw"}
    with pytest.raises(ValueError, match="unknown key clip.sise"):
        PrepareConfig.from_dict({"clip": {"sise": 3}})


def test_manifest_summary_counts_latest_rows(tmp_path: Path):
    m = Manifest(tmp_path / "manifest.jsonl")
    m.add("01_clips", "input", "a", "skipped", "no_face")
    m.add("01_clips", "input", "b", "ok")
    m.add("02_quality", "clip", "b_c000", "skipped", "silent")
    m.timing("01_clips").done, m.timing("01_clips").seconds = 2, 4.0
    s = summarize(m, inputs=2, kept=0)
    assert s["skipped"] == {"clip:silent": 1, "input:no_face": 1}
    assert s["steps"]["01_clips"]["items_per_s"] == 0.5
    assert len((tmp_path / "manifest.jsonl").read_text().splitlines()) == 3


def test_syncnet_confidence_from_weights_file(tmp_path: Path):
    """Step 02's SyncNet score goes through the evaluation's SyncNet (official key layout, strict load)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("python_speech_features")
    from dualforce_mega.metrics.syncnet import SyncNet
    from dualforce_mega.preprocess.quality import score_clip
    torch.manual_seed(0)
    weights = tmp_path / "syncnet_v2.model"
    torch.save(SyncNet().state_dict(), weights)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (12, 64, 64, 3), dtype=np.uint8)
    wave = (0.1 * rng.standard_normal(12 * 640)).astype(np.float32)
    s = score_clip(frames, wave, 16000, {}, QualityConfig(), syncnet=str(weights))
    assert np.isfinite(s["sync_confidence"]) and s["sync_confidence"] >= 0 and -15 <= s["sync_offset"] <= 15
    torch.save({"bad": torch.zeros(1)}, tmp_path / "bad.model")
    with pytest.raises(Exception, match="bad.model"):
        score_clip(frames, wave, 16000, {}, QualityConfig(), syncnet=str(tmp_path / "bad.model"))


def test_aligned_inputs_skip_detection(tmp_path: Path):
    """--aligned (VFHQ-512 style pre-cropped faces): no detector runs, the centred square is the crop,
    so even a clip in which no face can be found becomes one clip of 1 + 4k frames."""
    from dualforce_mega.preprocess.clips import extract_clips
    from media_fixtures import noise_video
    if not __import__("shutil").which("espeak-ng"):
        pytest.skip("needs espeak-ng")
    src = noise_video(tmp_path / "aligned.mp4", 2.5, size=80)
    cfg = ClipConfig(size=32, min_seconds=2.0, aligned=True)
    recs, skips = extract_clips(src, "aligned", tmp_path / "out", cfg, stride=4, mode="talking-head",
                                detector=None, need_audio=True)
    assert not skips and len(recs) == 1
    assert recs[0]["num_video_frames"] == 61 and recs[0]["crop_box"] == [40.0, 40.0, 80.0]
    assert recs[0]["quality"] == {} and (tmp_path / "out" / recs[0]["audio"]).is_file()


def test_missing_weights_fail_before_any_work(tmp_path: Path):
    from dualforce_mega.preprocess.pipeline import PrepareOptions
    from dualforce_mega.preprocess.prepare import run_prepare
    (tmp_path / "raw").mkdir()
    with pytest.raises(ValueError, match="03_latents needs --vae"):
        run_prepare(PrepareOptions(src=tmp_path / "raw", out=tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="--vae /nonexistent"):
        run_prepare(PrepareOptions(src=tmp_path / "raw", out=tmp_path / "out", vae="/nonexistent",
                                   audio_encoder="/nonexistent"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="inside --src"):
        run_prepare(PrepareOptions(src=tmp_path / "raw", out=tmp_path / "raw" / "out", random_models="tiny"))


def test_small_split_spreads_over_min_shards(tmp_path: Path):
    from dualforce_mega.config import model_preset
    from dualforce_mega.data.synthetic import make_synthetic_clip
    from dualforce_mega.preprocess.build_shards import write_split_shards
    cfg = model_preset("tiny")
    clips = {f"k{i}": make_synthetic_clip(i, 3, (4, 4), cfg, seed=0) for i in range(5)}
    pc = PrepareConfig(min_shards=2)
    assert write_split_shards(tmp_path, list(clips), lambda k: clips[k], cfg, pc, {})
    index = json.loads((tmp_path / "index.json").read_text())
    assert [s["keys"] for s in index["shards"]] == [["k0", "k1", "k2"], ["k3", "k4"]]
    assert not write_split_shards(tmp_path, list(clips), lambda k: clips[k], cfg, pc, {})   # same keys: kept


@pytest.mark.gpu
def test_latents_bf16_on_gpu_match_fp32_cpu():
    """Step 03 as it runs on a GPU node (bf16 VAE, batched clips) against the fp32 CPU reference."""
    import torch
    from dualforce_mega.encoders.vae import WanVAE, tiny_vae
    from dualforce_mega.preprocess.latents import encode_clips
    torch.manual_seed(0)
    vae = tiny_vae()
    clips = [np.random.default_rng(i).integers(0, 255, (9, 64, 64, 3), dtype=np.uint8) for i in range(2)]
    ref = encode_clips(WanVAE(vae.float()), clips, ref_every=1, image_batch=2)
    gpu = encode_clips(WanVAE(vae.to("cuda", torch.bfloat16)), clips, ref_every=1, image_batch=2)
    for a, b in zip(ref, gpu):
        for k in ("video_latent", "ref_latent"):
            err = (a[k].float() - b[k].float()).abs().max() / a[k].float().abs().max()
            assert err < 0.05, (k, float(err))
        assert a["ref_positions"].tolist() == [0, 1, 2]


def test_reference_encodings_are_single_image_encodings():
    """ref_latent[i] is the VAE encoding of video frame 4 * ref_positions[i] alone: at t0 = 0 it equals
    the video latent's first frame (the causal VAE encodes frame 0 alone too), at t0 >= 1 it differs
    from the video latent (which mixes 4 frames) but equals encoding that frame as a 1-frame video."""
    import torch
    from dualforce_mega.encoders.vae import WanVAE, tiny_vae
    from dualforce_mega.preprocess.latents import encode_clips, to_model_range
    torch.manual_seed(0)
    vae = WanVAE(tiny_vae())
    clip = np.random.default_rng(0).integers(0, 255, (9, 32, 32, 3), dtype=np.uint8)
    out = encode_clips(vae, [clip], ref_every=2, image_batch=1)[0]
    assert out["video_latent"].shape == (16, 3, 4, 4) and out["ref_positions"].tolist() == [0, 2]
    lat, ref = out["video_latent"].float(), out["ref_latent"].float()
    torch.testing.assert_close(ref[0], lat[:, 0], atol=2e-2, rtol=2e-2)      # bf16 storage
    alone = vae.encode_video(to_model_range(clip[8:9])[None])[0, :, 0]
    torch.testing.assert_close(ref[1], alone.to(torch.bfloat16).float())
    assert (ref[1] - lat[:, 2]).abs().max() > 0.1
