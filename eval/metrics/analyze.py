"""Per-video measurements shared by every metric CLI and run_eval: decode once, find the face once,
run each requested network once. Set-level numbers (FID, FVD) and comparisons with ground truth (APD)
are made from these records by ``eval.metrics.aggregate``."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dualforce_mega.media import load_audio
from dualforce_mega.metrics import crops, fvd
from dualforce_mega.metrics.sync import FPS, SAMPLE_RATE, SyncResult
from dualforce_mega.preprocess.video_io import iter_frames

from .models import MetricModels

log = logging.getLogger(__name__)

VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
FACE_MODES = ("detect", "full")   # detect: Haar + tracking (preprocess.face); full: frames are face crops


@dataclass
class VideoRecord:
    name: str
    path: str
    frames: int = 0
    fid: Optional[np.ndarray] = None                  # [T, D] frame features
    fvd: dict[str, np.ndarray] = field(default_factory=dict)   # backbone -> [K, D] clip features
    identity: Optional[np.ndarray] = None             # [T, D] ArcFace embeddings
    sync: Optional[SyncResult] = None
    pose: Optional[np.ndarray] = None                 # [T, 3] pitch, yaw, roll degrees (NaN: no face)
    errors: dict[str, str] = field(default_factory=dict)  # metric -> why it has no value


def list_videos(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: video folder not found")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_EXTS and ".partial" not in p.name)


def read_frames(path: Path) -> np.ndarray:
    """All frames on the 25 fps grid (``preprocess.video_io``), uint8 RGB [T, H, W, 3]; an unreadable or
    empty file is a ValueError naming it."""
    frames = list(iter_frames(path, fps=FPS))
    if not frames:
        raise ValueError(f"{path}: no frames")
    return np.concatenate(frames)


def face_boxes(frames: np.ndarray, detector) -> np.ndarray:
    """One tracked face: boxes [T, 4]; frames the track does not reach hold the nearest box."""
    from dualforce_mega.preprocess.face import track_face

    track = track_face(detector.detect(frames))
    ok = track.present
    if not ok.any():
        raise ValueError("no face found")
    idx = np.where(ok)[0]
    nearest = idx[np.abs(np.arange(len(frames))[:, None] - idx[None]).argmin(1)]
    return track.boxes[nearest]


def _to_tensor(frames: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float()


def identity_crops(frames: np.ndarray, landmarks: Optional[np.ndarray], boxes: Optional[np.ndarray],
                   device: torch.device) -> np.ndarray:
    """ArcFace input: 5-point aligned crops where FaceMesh landmarks exist, else the face box (or the
    centred square) resized to 112²; uint8 [T, 112, 112, 3]."""
    x = _to_tensor(frames, device)
    t, h, w, _ = frames.shape
    if boxes is None:
        squares = np.tile([[w / 2, h / 2, min(h, w)]], (t, 1))
    else:
        squares = np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2,
                                  np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])[:, None]], 1)
    out = crops.square_crops(x, squares, crops.INPUT_SIZE)
    if landmarks is not None:
        have = ~np.isnan(landmarks[:, 0, 0])
        if have.any():
            pts = crops.facemesh_five_points(landmarks[have][..., :2])
            out[torch.as_tensor(have, device=out.device)] = crops.align_five_points(x[have], pts)
    return out.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def analyze_frames(name: str, path: str, frames: np.ndarray, wave: Optional[np.ndarray], models: MetricModels,
                   metrics: list[str], face_mode: str = "full", detector=None,
                   fvd_clips: int = 1) -> VideoRecord:
    rec = VideoRecord(name=name, path=path, frames=len(frames))
    dev = models.device

    def attempt(metric: str, fn) -> None:
        try:
            fn()
        except (ValueError, RuntimeError, ImportError) as e:
            rec.errors[metric] = str(e)
            log.warning("%s: %s skipped: %s", name, metric, e)

    boxes = None
    if face_mode == "detect" and {"csim", "sync"} & set(metrics):
        try:
            boxes = face_boxes(frames, detector)
        except ValueError as e:
            for m in ("csim", "sync"):
                rec.errors[m] = str(e)
    landmarks = None
    if "apd" in metrics and models.pose is not None:
        motion, _ = models.pose.per_frame(frames)
        rec.pose = motion[:, models.pose.layout.angles].double().numpy()
    if (models.pose is None and "apd" in metrics) or ("csim" in metrics and face_mode == "detect"):
        def pose() -> None:
            nonlocal landmarks
            from dualforce_mega.preprocess.head_pose import estimate_head_pose

            track = estimate_head_pose(frames)
            landmarks = track.landmarks
            if "apd" in metrics and models.pose is None:
                if not track.found.any():
                    raise ValueError("no face found by FaceMesh")
                rec.pose = track.angles
        attempt("apd", pose)
        if "apd" not in metrics:  # landmarks only served the alignment: box crops take over
            rec.errors.pop("apd", None)
    with torch.no_grad():
        if "fid" in metrics:
            attempt("fid", lambda: setattr(rec, "fid", models.fid(frames).astype(np.float32)))
        for m in ("fvd", "fvd_r3d18"):
            if m in metrics:
                attempt(m, lambda m=m: rec.fvd.__setitem__(m, getattr(models, m)(fvd.video_clips(frames, fvd_clips))))
        if "csim" in metrics and "csim" not in rec.errors:
            attempt("csim", lambda: setattr(rec, "identity", models.arcface.embed(
                identity_crops(frames, landmarks, boxes, dev))))
        if "sync" in metrics and "sync" not in rec.errors:
            def sync() -> None:
                if wave is None:
                    raise ValueError("no audio stream")
                rec.sync = models.sync(crops.syncnet_crops(frames, boxes, dev), wave)
            attempt("sync", sync)
    return rec


def analyze_video(path: Path, models: MetricModels, metrics: list[str], **kw) -> VideoRecord:
    """Decode + analyse one file; a file that cannot be decoded raises ValueError (the caller reports
    and skips it)."""
    frames = read_frames(path)
    wave = None
    if "sync" in metrics:
        try:
            wave = load_audio(path, SAMPLE_RATE).numpy()
        except ValueError:
            wave = None
    return analyze_frames(path.stem, str(path), frames, wave, models, metrics, **kw)


def reference_embedding(image: np.ndarray, models: MetricModels, face_mode: str, detector=None) -> np.ndarray:
    """The ArcFace embedding of a reference image (uint8 RGB [H, W, 3]), cropped like the frames."""
    rec = analyze_frames("reference", "", image[None], None, models, ["csim"], face_mode=face_mode,
                         detector=detector)
    if rec.identity is None:
        raise ValueError(f"reference image: {rec.errors.get('csim', 'no embedding')}")
    return rec.identity[0]
