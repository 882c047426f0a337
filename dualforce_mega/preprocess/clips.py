"""Step 01: one raw video -> face-cropped clips at constant fps (mp4) with 16 kHz mono audio (wav).

Two streaming passes over the input, so memory does not grow with its length:

1. *scan*: frames at constant fps, downscaled, go chunk by chunk through PySceneDetect's
   ``ContentDetector`` (scene cuts) and, every ``detect_every`` frames, the face detector; only
   boxes are kept.
2. *write*: per scene, the face track (:func:`face.track_face`) is split into runs where the face is
   present, runs into clips of ``min_seconds..max_seconds`` trimmed to ``1 + stride * k`` frames (the
   VAE's frame count rule), and each clip gets ONE square box (:func:`face.clip_crop_box`); a second
   decode crops and encodes the clips while the audio is streamed to a wav and sliced.

``mode="video"`` (generic video for Phase 2) and ``aligned=True`` (pre-cropped faces such as VFHQ-512)
skip detection and take the centred square of every scene. Everything that is dropped is returned
with its reason (``too_short``, ``no_face``, ...).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..fsutil import atomic_write
from ..timeline import Timeline
from . import face as facelib
from .config import ClipConfig
from .video_io import ClipWriter, MediaError, decode_audio, iter_frames, probe, read_wav, write_wav

log = logging.getLogger(__name__)

_KEY_SAFE = re.compile(r"[^A-Za-z0-9_\-]+")


def safe_id(text: str) -> str:
    """A shard-key-safe id (letters, digits, _ and -)."""
    return _KEY_SAFE.sub("_", text).strip("_") or "clip"


@dataclass
class Skip:
    reason: str
    detail: str
    time_range: Optional[tuple[float, float]] = None

    def to_json(self) -> dict:
        return {"reason": self.reason, "detail": self.detail,
                "time_range": list(self.time_range) if self.time_range else None}


@dataclass
class Scan:
    num_frames: int
    scan_hw: tuple[int, int]
    source_hw: tuple[int, int]
    cuts: list[int]
    faces: list[Optional[facelib.Faces]] = field(default_factory=list)


def scan(path: Path, cfg: ClipConfig, detector: Optional[facelib.FaceDetector]) -> Scan:
    """Pass 1: scene cuts and (strided) face detections at scan resolution."""
    import cv2
    from scenedetect import ContentDetector
    from scenedetect.common import FrameTimecode

    info = probe(path)
    scenes = ContentDetector(threshold=cfg.scene_threshold, min_scene_len=max(1, round(cfg.min_seconds * cfg.fps)))
    cuts: list[int] = []
    faces: list[Optional[facelib.Faces]] = []
    n = 0
    scan_hw = (0, 0)
    for chunk in iter_frames(path, cfg.fps, cfg.chunk, max_side=cfg.detect_side):
        scan_hw = chunk.shape[1:3]
        s = cfg.scene_side / min(scan_hw)
        small_wh = (max(1, round(scan_hw[1] * s)), max(1, round(scan_hw[0] * s)))
        for i, frame in enumerate(chunk):
            bgr = cv2.cvtColor(cv2.resize(frame, small_wh, interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2BGR)
            cuts += [c.frame_num for c in scenes.process_frame(FrameTimecode(n + i, float(cfg.fps)), bgr)]
        if detector is not None:
            faces += _strided_at(detector, chunk, n, cfg.detect_every)
        n += len(chunk)
    if n > 0:
        cuts += [c.frame_num for c in scenes.post_process(FrameTimecode(n, float(cfg.fps)))]
    return Scan(n, scan_hw, (info.height, info.width), sorted(c for c in set(cuts) if 0 < c < n), faces)


def _strided_at(detector: facelib.FaceDetector, chunk: np.ndarray, offset: int, every: int
                ) -> list[Optional[facelib.Faces]]:
    """Detect on the frames whose global index is a multiple of ``every`` (chunk-size independent)."""
    out: list[Optional[facelib.Faces]] = [None] * len(chunk)
    idx = [i for i in range(len(chunk)) if (offset + i) % every == 0]
    for i, f in zip(idx, detector.detect(chunk[idx]) if idx else []):
        out[i] = f
    return out


@dataclass
class ClipPlan:
    start: int                  # first frame (constant-fps index in the source)
    length: int                 # frames, 1 + stride * k
    box: np.ndarray             # (cx, cy, side) in source pixels
    quality: dict


def trim_length(n: int, stride: int) -> int:
    """Largest ``1 + stride * k <= n`` (0 when n < 1): the video frames of the latent frames within n."""
    tl = Timeline(stride=stride)
    return 0 if n < 1 else tl.video_frames(tl.latent_frames_within(n))


def split_run(start: int, end: int, cfg: ClipConfig, stride: int) -> list[tuple[int, int]]:
    """[start, end) -> pieces of at most max_seconds (equal parts), each trimmed to 1 + stride*k frames."""
    n = end - start
    max_len = trim_length(round(cfg.max_seconds * cfg.fps), stride)
    parts = max(1, math.ceil(n / max_len))
    bounds = [start + round(i * n / parts) for i in range(parts + 1)]
    return [(a, trim_length(b - a, stride)) for a, b in zip(bounds[:-1], bounds[1:])]


def plan_clips(sc: Scan, cfg: ClipConfig, stride: int, find_faces: bool) -> tuple[list[ClipPlan], list[Skip]]:
    """Scenes -> face runs -> clips with one crop box each; everything dropped comes back as a Skip."""
    clips: list[ClipPlan] = []
    skips: list[Skip] = []
    min_len = max(1, round(cfg.min_seconds * cfg.fps))
    to_src = min(sc.source_hw) / min(sc.scan_hw) if sc.num_frames else 1.0
    sec = lambda a, b: (round(a / cfg.fps, 3), round(b / cfg.fps, 3))  # noqa: E731
    bounds = [0] + sc.cuts + [sc.num_frames]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b - a < min_len:
            skips.append(Skip("too_short", f"scene of {(b - a) / cfg.fps:.2f}s < min {cfg.min_seconds}s", sec(a, b)))
            continue
        if not find_faces:
            box = facelib.centre_crop_box(sc.source_hw)
            clips += [ClipPlan(s, n, box, {}) for s, n in split_run(a, b, cfg, stride) if n >= min_len]
            continue
        # gaps between examined frames are not dropouts: bridge at least the detection stride
        track = facelib.track_face(sc.faces[a:b], max_gap=max(round(cfg.max_gap_seconds * cfg.fps), cfg.detect_every))
        present = track.present
        if not present.any():
            skips.append(Skip("no_face", "no face track in the scene", sec(a, b)))
            continue
        for ra, rb in _runs(present):
            if rb - ra < min_len:
                skips.append(Skip("too_short", f"face run of {(rb - ra) / cfg.fps:.2f}s < min {cfg.min_seconds}s",
                                  sec(a + ra, a + rb)))
                continue
            for s, n in split_run(ra, rb, cfg, stride):
                sub = facelib.Track(track.boxes[s:s + n], track.detected[s:s + n], track.examined[s:s + n])
                box = facelib.clip_crop_box(sub, sc.scan_hw, cfg.crop_scale)
                quality = {"face_frac": sub.size_frac(sc.scan_hw), "continuity": sub.continuity(),
                           "centre_offset": facelib.centre_offset(sub, box)}
                clips.append(ClipPlan(a + s, n, box * to_src, quality))
    return clips, skips


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of the True runs of a boolean vector."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def extract_clips(path: Path, input_id: str, out_dir: Path, cfg: ClipConfig, *, stride: int, mode: str,
                  detector: Optional[facelib.FaceDetector], need_audio: bool) -> tuple[list[dict], list[Skip]]:
    """Step 01 for one input. Writes ``<key>.mp4`` / ``<key>.wav`` / ``<key>.json`` per clip into
    ``out_dir`` (each atomically) and returns the clip records and the skips. Raises MediaError for
    an input that cannot be used at all."""
    info = probe(path)
    if need_audio and not info.has_audio:
        raise MediaError(path, "no_audio", "no audio stream")
    find_faces = mode == "talking-head" and not cfg.aligned
    sc = scan(path, cfg, detector if find_faces else None)
    if sc.num_frames == 0:
        raise MediaError(path, "no_frames", "no decodable video frames")
    plans, skips = plan_clips(sc, cfg, stride, find_faces)
    if not plans:
        return [], skips
    out_dir.mkdir(parents=True, exist_ok=True)
    wav_all = out_dir / f"{input_id}.audio.tmp.wav"
    has_audio = info.has_audio
    if has_audio:
        decode_audio(path, wav_all, cfg.sample_rate)
    records = _write_clips(path, input_id, out_dir, cfg, plans, info.path, wav_all if has_audio else None, mode)
    wav_all.unlink(missing_ok=True)
    return records, skips


def _write_clips(path: Path, input_id: str, out_dir: Path, cfg: ClipConfig, plans: list[ClipPlan],
                 source: str, wav_all: Optional[Path], mode: str) -> list[dict]:
    """Pass 2: crop each planned clip while decoding the full-resolution frames once."""
    samples_per_frame = cfg.sample_rate // cfg.fps
    plans = sorted(plans, key=lambda p: p.start)
    records: list[dict] = []
    writers: dict[int, tuple[ClipWriter, Path]] = {}
    pos = 0
    for chunk in iter_frames(path, cfg.fps, cfg.chunk):
        lo, hi = pos, pos + len(chunk)
        for i, p in enumerate(plans):
            a, b = max(p.start, lo), min(p.start + p.length, hi)
            if a >= b:
                continue
            if i not in writers:
                tmp = out_dir / f"{input_id}_c{i:03d}.tmp.mp4"
                writers[i] = (ClipWriter(tmp, cfg.fps, (cfg.size, cfg.size), cfg.crf), tmp)
            writers[i][0].write(facelib.crop_frames(chunk[a - lo:b - lo], p.box, cfg.size))
            if b == p.start + p.length:
                records.append(_finish(input_id, i, p, writers.pop(i), out_dir, cfg, source, wav_all,
                                       samples_per_frame, mode))
        pos = hi
    for i, (w, tmp) in writers.items():     # the stream ended early (shorter than its header said)
        w.close()
        tmp.unlink(missing_ok=True)
    return records


def _finish(input_id: str, i: int, p: ClipPlan, writer: tuple[ClipWriter, Path], out_dir: Path, cfg: ClipConfig,
            source: str, wav_all: Optional[Path], samples_per_frame: int, mode: str) -> dict:
    w, tmp = writer
    w.close()
    key = f"{input_id}_c{i:03d}"
    os.replace(tmp, out_dir / f"{key}.mp4")
    audio = None
    if wav_all is not None:
        samples, rate = read_wav(wav_all, p.start * samples_per_frame, p.length * samples_per_frame)
        tmp_wav = out_dir / f"{key}.tmp.wav"
        write_wav(tmp_wav, samples, rate)
        os.replace(tmp_wav, out_dir / f"{key}.wav")
        audio = f"{key}.wav"
    record = {"key": key, "input_id": input_id, "mode": mode, "source_file": source,
              "time_range": [p.start / cfg.fps, (p.start + p.length) / cfg.fps], "start_frame": p.start,
              "num_video_frames": p.length, "fps": cfg.fps, "sample_rate": cfg.sample_rate, "size": cfg.size,
              "crop_box": [float(v) for v in p.box], "aligned": cfg.aligned, "video": f"{key}.mp4",
              "audio": audio, "quality": {k: float(v) for k, v in p.quality.items()}}
    atomic_write(out_dir / f"{key}.json", json.dumps(record, indent=1))
    return record


__all__ = ["Skip", "Scan", "ClipPlan", "scan", "plan_clips", "split_run", "trim_length", "extract_clips", "safe_id"]
