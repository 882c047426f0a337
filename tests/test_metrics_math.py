"""The metric math against independent or hand-computed values: Fréchet distance, Sync-C / Sync-D and
the SyncNet windowing, CSIM / ACD, APD, LVE / FDD, and the crop warps."""
from __future__ import annotations

import math

import numpy as np
import pytest
import python_speech_features
import scipy.linalg
import torch

from dualforce_mega.metrics import crops, identity, lve, pose, sync
from dualforce_mega.preprocess.face import centre_crop_box
from dualforce_mega.metrics.frechet import feature_stats, frechet_distance, frechet_distance_features


# ---------------------------------------------------------------- Fréchet
def _independent_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Tr sqrt(S1 S2) through the symmetric form sqrt(S1)^T S2 sqrt(S1) and its eigenvalues."""
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a.T), np.cov(b.T)
    r1 = scipy.linalg.sqrtm(s1).real
    ev = scipy.linalg.eigvalsh(r1 @ s2 @ r1)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


def test_frechet_matches_independent_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(size=(250, 16)) @ rng.normal(size=(16, 16)) + 0.3
    ours, ref = frechet_distance_features(a, b), _independent_frechet(a, b)
    assert abs(ours - ref) <= 1e-6 * abs(ref)


def test_frechet_identity_and_translation():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8))
    assert abs(frechet_distance_features(a, a)) < 1e-8
    delta = rng.normal(size=8)
    mu, sigma = feature_stats(a)
    assert frechet_distance(mu, sigma, mu + delta, sigma) == pytest.approx(float(delta @ delta), rel=1e-9)
    assert frechet_distance_features(a, a + delta) == pytest.approx(float(delta @ delta), rel=1e-6)


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------- Sync
def test_sync_planted_offset_hand_computed():
    n, d, vshift = 20, 3, 15
    video = torch.eye(n)
    audio = torch.zeros(n, n)
    for j in range(d, n):
        audio[j] = video[j - d]          # audio window j shows what video window j - d showed
    res = sync.sync_scores(video, audio, vshift)
    # offset s = d: n - d windows match (distance 0), d windows meet zero padding (distance 1)
    assert res.offset == -d
    assert res.sync_d == pytest.approx(d / n, abs=1e-5)
    # other offsets s: window i meets a_{i+s}; c(s) windows see a one-hot of another window (sqrt 2),
    # the rest see a zero row or the zero padding (1)
    def count(s: int) -> int:
        return max(0, min(n, n - s) - max(0, d - s))

    expected = np.array([((n - count(s)) + count(s) * math.sqrt(2)) / n if s != d else d / n
                         for s in range(-vshift, vshift + 1)])
    np.testing.assert_allclose(res.mdist, expected, atol=1e-5)
    median = float(np.median(expected))
    assert res.sync_c == pytest.approx(median - d / n, abs=1e-5)
    # per-window confidence at the chosen offset: median - 0 for matched windows, median - 1 at padding
    np.testing.assert_allclose(res.window_conf[:n - d], median, atol=1e-5)
    np.testing.assert_allclose(res.window_conf[n - d:], median - 1, atol=1e-5)


def test_sync_windowing_matches_reference_indexing():
    n_frames, n_seconds_frames = 50, 30
    n_samples = n_seconds_frames * sync.SAMPLES_PER_FRAME + 100
    n = sync.num_windows(n_frames, n_samples)
    assert n == n_seconds_frames - 5          # min(len(images), floor(len(audio) / 640)) - 5
    frames = torch.arange(n_frames, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)
    vw = sync.video_windows(frames, n)
    assert vw.shape == (n, 3, 5, 2, 2)
    for i in (0, 7, n - 1):
        assert vw[i, 0, :, 0, 0].tolist() == list(range(i, i + 5))       # imtv[:, :, i:i+5]
    cols = torch.arange(4 * n_seconds_frames, dtype=torch.float32).expand(13, -1)
    aw = sync.audio_windows(cols, n)
    assert aw.shape == (n, 1, 13, 20)
    for i in (0, 7, n - 1):
        assert aw[i, 0, 5].tolist() == list(range(4 * i, 4 * i + 20))    # cct[..., 4i:4i+20]


def test_mfcc_rate_and_int16_scale_match_reference():
    rng = np.random.default_rng(2)
    frames = 12
    pcm = rng.integers(-20000, 20000, size=frames * sync.SAMPLES_PER_FRAME).astype(np.int16)
    ours = sync.mfcc(pcm.astype(np.float32) / 32768.0)
    ref = np.stack([np.array(c) for c in zip(*python_speech_features.mfcc(pcm, 16000))])  # as the reference
    assert ours.shape == ref.shape == (13, 4 * frames - 1)                  # 100 Hz: 4 per video frame
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-9)
    last_end = (sync.num_windows(frames, len(pcm)) - 1) * 4 + 20
    assert last_end <= ours.shape[1]


# ---------------------------------------------------------------- identity
def test_csim_and_acd_on_known_rotations():
    rng = np.random.default_rng(3)
    angles = np.deg2rad([0.0, 10.0, 30.0, 60.0])
    basis = np.linalg.qr(rng.normal(size=(16, 2)))[0]      # an arbitrary plane in 16-d
    frames = np.stack([np.cos(angles), np.sin(angles)], 1) @ basis.T * rng.uniform(0.5, 3, size=(4, 1))
    ref = basis[:, 0] * 2.0
    assert identity.csim(ref, frames) == pytest.approx(np.cos(angles).mean(), abs=1e-12)
    i, j = np.triu_indices(4, 1)
    chord = 2 * np.abs(np.sin((angles[i] - angles[j]) / 2))
    assert identity.acd(frames) == pytest.approx(chord.mean(), abs=1e-12)


# ---------------------------------------------------------------- pose
def test_apd_hand_computed_with_wrap_and_missing_frames():
    gen = np.array([[10.0, 179.0, 0.0], [0.0, 0.0, 0.0], [np.nan, 0, 0], [5.0, -20.0, 3.0]])
    real = np.array([[0.0, -179.0, 4.0], [2.0, 10.0, -1.0], [0.0, 0.0, 0.0], [5.0, -10.0, 3.0], [9, 9, 9]])
    r = pose.apd(gen, real)   # frame 2 has no pose in gen, frame 4 has no generated counterpart
    assert r["pitch"] == pytest.approx((10 + 2 + 0) / 3)
    assert r["yaw"] == pytest.approx((2 + 10 + 10) / 3)
    assert r["roll"] == pytest.approx((4 + 1 + 0) / 3)
    assert r["mean"] == pytest.approx((12 + 22 + 5) / 9)


# ---------------------------------------------------------------- meshes
def test_lve_and_fdd_on_hand_made_meshes():
    lips = [1, 2]
    gt = np.zeros((2, 4, 3))
    pred = gt.copy()
    pred[0, 1] = [1, 2, 0]    # frame 0: lip errors 5 and 0 -> 5 ; vertex 0 is not a lip vertex
    pred[0, 0] = [100, 0, 0]
    pred[1, 2] = [0, 0, 3]    # frame 1: 0 and 9 -> 9
    gt2, pred2 = np.zeros((1, 4, 3)), np.zeros((1, 4, 3))
    pred2[0, 1] = [1, 0, 0]   # a second sequence, one frame: 1
    assert lve.lve([pred, pred2], [gt, gt2], lips) == pytest.approx((5 + 9 + 1) / 3)
    template = np.zeros((4, 3))
    upper = [0, 3]
    g = np.zeros((3, 4, 3))
    g[:, 0, 0] = [0, 1, 2]    # squared motion 0, 1, 4 -> std sqrt(26/9 - ...) ; vertex 3 still
    p = np.zeros((3, 4, 3))
    p[:, 3, 1] = [1, 1, 1]    # constant motion: std 0
    sq = np.array([0.0, 1.0, 4.0])
    expected = (sq.std() + 0.0) / 2 - 0.0
    assert lve.fdd([p], [g], [template], upper) == pytest.approx(expected)
    with pytest.raises(ValueError, match="vertex indices"):
        lve.lve([pred], [gt], [7])


# ---------------------------------------------------------------- crops
def test_umeyama_recovers_a_similarity():
    rng = np.random.default_rng(4)
    a = np.deg2rad(17.0)
    m = np.array([[1.7 * np.cos(a), -1.7 * np.sin(a), 12.0], [1.7 * np.sin(a), 1.7 * np.cos(a), -4.0], [0, 0, 1]])
    src = rng.uniform(0, 100, size=(5, 2))
    dst = src @ m[:2, :2].T + m[:2, 2]
    np.testing.assert_allclose(crops.umeyama_similarity(src, dst), m, atol=1e-9)


def test_crop_warps_are_exact_on_identity_geometry():
    rng = np.random.default_rng(5)
    img = torch.from_numpy(rng.uniform(0, 255, size=(2, 3, 112, 112)))  # float64: exact up to rounding
    full = crops.square_crops(img, np.stack([centre_crop_box((112, 112))] * 2), 112)
    torch.testing.assert_close(full, img, atol=1e-9, rtol=0)
    aligned = crops.align_five_points(img, np.stack([crops.ARCFACE_TEMPLATE] * 2))
    torch.testing.assert_close(aligned, img, atol=1e-9, rtol=0)
    # a box at an integer offset, same scale: exactly that sub-image
    part = crops.square_crops(img, np.array([[84, 56, 56]] * 2, float), 56)
    torch.testing.assert_close(part, img[:, :, 28:84, 56:112], atol=1e-9, rtol=0)
    # 2x upsampling of [0, 56)²: crop pixel 2n+1 sits at source n + 1/4 (pixel-centre convention)
    up = crops.square_crops(img, np.array([[28, 28, 56]] * 2, float), 112)
    src = img[:, :, :56, :56]
    rows = 0.75 * src[:, :, :-1, :] + 0.25 * src[:, :, 1:, :]
    expect = 0.75 * rows[..., :-1] + 0.25 * rows[..., 1:]
    torch.testing.assert_close(up[:, :, 1:-1:2, 1:-1:2], expect, atol=1e-9, rtol=0)


def test_syncnet_squares_follow_crop_video():
    # a 100x80 box at (200, 100): bs = 50, cs = 0.4 -> rows cy - bs .. cy + bs (1 + 2 cs), cols cx +- bs (1 + cs)
    sq = crops.syncnet_squares(np.array([[150.0, 60.0, 250.0, 140.0]]))
    np.testing.assert_allclose(sq, [[200.0, 100.0 + 0.4 * 50, 2 * 50 * 1.4]])


def test_lve_cli_reads_the_faceformer_layout(tmp_path, capsys):
    import json

    from eval.metrics.lve import main as lve_main

    gt = np.zeros((3, 4, 3))
    pred = gt.copy()
    pred[:, 2, 0] = [1.0, 2.0, 3.0]             # lip vertex 2: squared errors 1, 4, 9
    (tmp_path / "gt").mkdir()
    np.save(tmp_path / "gt" / "seq.npy", gt.reshape(3, 12))            # [T, V*3]
    for t in range(3):                                                  # per-frame files, one extra frame
        (tmp_path / "pred" / "seq").mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / "pred" / "seq" / f"{t}.npy", pred[t])
    np.save(tmp_path / "pred" / "seq" / "3.npy", pred[0] + 100)
    (tmp_path / "lips.txt").write_text("1, 2")
    (tmp_path / "upper.txt").write_text("0 2")
    np.save(tmp_path / "template.npy", np.zeros((4, 3)))
    assert lve_main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--lip-vertices",
                     str(tmp_path / "lips.txt"), "--upper-vertices", str(tmp_path / "upper.txt"), "--template",
                     str(tmp_path / "template.npy"), "--out", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["frames"] == 3 and r["lve"] == pytest.approx((1 + 4 + 9) / 3)
    assert r["fdd"] == pytest.approx(0.0 - np.array([1.0, 4.0, 9.0]).std() / 2)
