"""Face detection, one-face tracking and square cropping: the one implementation shared by the data
pipeline (step 01), the evaluation crops (FID / CSIM / Sync) and the LatentSync baseline.

API (frames are always uint8 RGB ``[T, H, W, 3]`` numpy arrays; boxes are ``x0, y0, x1, y1`` pixels)::

    det = build_detector("haar")                     # offline default, weights ship in opencv<5
    det = build_detector("s3fd", weights="s3fd-619a316812.pth", device="cuda")   # stronger, batched
    faces = det.detect(frames)                       # list[Faces], one per frame (batched)
    track = track_face(faces, num_frames=T)          # one face over the clip (IoU linking)
    box = clip_crop_box(track, frame_hw=(H, W), scale=1.8)   # ONE square box for the whole clip
    crops = crop_frames(frames, box, size=512)       # uint8 [T, 512, 512, 3], no jitter
    per_frame = smooth_boxes(track.boxes, window=13) # or per-frame smoothed boxes (SyncNet style)
    crops = crop_frames(frames, square_boxes(per_frame, 1.4), size=224)

``Faces`` holds per-frame ``boxes [K, 4]``, ``scores [K]`` and, when the detector gives them,
``landmarks [K, P, 2]`` with names ``landmark_names`` (Haar and S3FD give none; 5-point alignment
uses FaceMesh, see ``metrics.crops``). Another detector plugs in by implementing
:class:`FaceDetector` (``detect(frames) -> list[Faces]``) and a name in :func:`build_detector`;
tracking and cropping do not change.

Why Haar is the default: the frontal-face cascade ships inside the ``opencv-python<5`` wheel the
pipeline needs anyway (Laplacian blur, resizing), installs with no dependency conflicts (mediapipe
0.10.21 pins numpy<2 / protobuf 4 and facenet-pytorch pins torch<2.3 and needs torchvision) and runs
on any CPU. Its weaknesses -- frontal only, occasional false positives, box jitter, no landmarks --
are what the tracker (largest consistent IoU track, gaps bridged by interpolation) and the fixed
per-clip crop absorb. With S3FD weights (the SyncNet reference pipeline's detector) detection runs
batched on the GPU and handles profiles and small faces.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Sequence, Union

import numpy as np

log = logging.getLogger(__name__)

BOX_DIM = 4


@dataclass
class Faces:
    """Detections of one frame."""
    boxes: np.ndarray                       # [K, 4] float32 x0, y0, x1, y1
    scores: np.ndarray                      # [K] float32, higher = more confident
    landmarks: Optional[np.ndarray] = None  # [K, P, 2] float32 x, y
    landmark_names: tuple[str, ...] = ()

    @staticmethod
    def empty() -> "Faces":
        return Faces(np.zeros((0, BOX_DIM), np.float32), np.zeros((0,), np.float32))

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


class FaceDetector(Protocol):
    name: str

    def detect(self, frames: np.ndarray) -> list[Faces]:
        """uint8 RGB [T, H, W, 3] -> one :class:`Faces` per frame."""


def _check_frames(frames: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames: expected uint8 RGB [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")


# --------------------------------------------------------------------------------------------
# detectors
# --------------------------------------------------------------------------------------------
class HaarDetector:
    """OpenCV's frontal-face Haar cascade (weights ship in opencv-python < 5).

    Frames are downscaled so the short side is at most ``max_side`` before detection (the cascade
    cost grows with pixels; faces in talking-head video are large). The score is the cascade's
    final-stage level weight.
    """
    name = "haar"

    def __init__(self, cascade: str = "haarcascade_frontalface_default.xml", max_side: int = 256,
                 min_size_frac: float = 0.1, scale_factor: float = 1.1, min_neighbors: int = 3):
        import cv2
        if not hasattr(cv2, "CascadeClassifier"):
            raise ImportError("OpenCV >= 5 has no Haar cascades: install opencv-python<5")
        path = Path(cv2.data.haarcascades) / cascade
        self.cascade = cv2.CascadeClassifier(str(path))
        if self.cascade.empty():
            raise FileNotFoundError(f"{path}: Haar cascade not found in the OpenCV wheel")
        self.max_side, self.min_size_frac = max_side, min_size_frac
        self.scale_factor, self.min_neighbors = scale_factor, min_neighbors

    def detect(self, frames: np.ndarray) -> list[Faces]:
        import cv2
        _check_frames(frames)
        h, w = frames.shape[1:3]
        s = min(1.0, self.max_side / min(h, w))
        out = []
        for frame in frames:
            gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
            if s < 1.0:
                gray = cv2.resize(gray, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
            gray = cv2.equalizeHist(gray)
            min_px = max(1, int(self.min_size_frac * min(gray.shape)))
            rects, _, weights = self.cascade.detectMultiScale3(
                gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
                minSize=(min_px, min_px), outputRejectLevels=True)
            if len(rects) == 0:
                out.append(Faces.empty())
                continue
            r = np.asarray(rects, np.float32).reshape(-1, 4) / s
            boxes = np.concatenate([r[:, :2], r[:, :2] + r[:, 2:]], axis=1)
            out.append(Faces(boxes, np.asarray(weights, np.float32).reshape(-1)))
        return out


DETECTORS = ("haar", "s3fd")


def build_detector(name: str = "haar", weights: Union[str, Path, None] = None, device: str = "cpu",
                   **kwargs) -> FaceDetector:
    """``haar`` (offline default, no weights) or ``s3fd`` (``weights``: the official
    ``s3fd-619a316812.pth``, run batched on ``device``; :mod:`.s3fd`)."""
    if name == "haar":
        if weights is not None:
            raise ValueError("the haar detector uses the cascade inside opencv; it takes no weights path")
        return HaarDetector(**kwargs)
    if name == "s3fd":
        if weights is None:
            raise ValueError("face detector s3fd needs its weights (--face-weights s3fd-619a316812.pth)")
        from .s3fd import S3FDDetector
        return S3FDDetector.from_path(weights, device, **kwargs)
    raise ValueError(f"face detector {name!r}: expected one of {DETECTORS}")


def detect_strided(detector: FaceDetector, frames: np.ndarray, every: int) -> list[Optional[Faces]]:
    """Detect on every ``every``-th frame only (``None`` for the others; :func:`track_face` interpolates)."""
    if every < 1:
        raise ValueError(f"detect every: {every} must be >= 1")
    idx = list(range(0, len(frames), every))
    found = detector.detect(frames[idx]) if idx else []
    out: list[Optional[Faces]] = [None] * len(frames)
    for i, f in zip(idx, found):
        out[i] = f
    return out


# --------------------------------------------------------------------------------------------
# tracking
# --------------------------------------------------------------------------------------------
def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of x0, y0, x1, y1 boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2:] - x[:, :2], 0, None).prod(-1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


@dataclass
class Track:
    """One face over a clip: ``boxes [T, 4]`` (gaps up to ``max_gap`` interpolated, NaN beyond),
    ``detected [T]`` True where a detector box was linked (False where interpolated or missing /
    not examined)."""
    boxes: np.ndarray
    detected: np.ndarray
    examined: np.ndarray     # [T] frames the detector looked at

    @property
    def present(self) -> np.ndarray:
        return ~np.isnan(self.boxes[:, 0])

    def continuity(self) -> float:
        """Fraction of examined frames in which the tracked face was detected."""
        n = int(self.examined.sum())
        return float((self.detected & self.examined).sum() / n) if n else 0.0

    def size_frac(self, frame_hw: tuple[int, int]) -> float:
        """Median face box side (sqrt of area) as a fraction of the frame's short side."""
        b = self.boxes[self.present]
        if len(b) == 0:
            return 0.0
        side = np.sqrt(np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None))
        return float(np.median(side) / min(frame_hw))


def track_face(faces: Sequence[Optional[Faces]], iou_threshold: float = 0.3, max_gap: int = 12) -> Track:
    """Link detections frame to frame by IoU (greedy, best match first) into tracks and keep the one
    with the largest summed ``score * sqrt(area)`` (the main speaker: big and steady). ``None``
    entries are frames the detector did not look at. Gaps of at most ``max_gap`` frames inside the
    track are filled by linear interpolation, and up to ``max_gap`` frames before its first / after its
    last detection hold that box; longer gaps and frames further out stay NaN."""
    T = len(faces)
    tracks: list[dict] = []          # {"frames": [...], "boxes": [...], "weight": float, "last": idx}
    for t, f in enumerate(faces):
        if f is None or len(f) == 0:
            continue
        live = [tr for tr in tracks if t - tr["last"] <= max_gap + 1]
        used: set[int] = set()
        if live:
            iou = box_iou(np.stack([tr["boxes"][-1] for tr in live]), f.boxes)
            for flat in np.argsort(-iou, axis=None):
                i, j = np.unravel_index(flat, iou.shape)
                if iou[i, j] < iou_threshold:
                    break
                if live[i]["last"] == t or j in used:
                    continue
                _append(live[i], t, f.boxes[j], f.scores[j])
                used.add(int(j))
        for j in range(len(f)):
            if j not in used:
                tr = {"frames": [], "boxes": [], "weight": 0.0, "last": -1}
                _append(tr, t, f.boxes[j], f.scores[j])
                tracks.append(tr)
    boxes = np.full((T, BOX_DIM), np.nan, np.float32)
    detected = np.zeros(T, bool)
    examined = np.array([f is not None for f in faces], bool)
    if not tracks:
        return Track(boxes, detected, examined)
    best = max(tracks, key=lambda tr: tr["weight"])
    frames = np.asarray(best["frames"])
    kb = np.stack(best["boxes"]).astype(np.float32)
    boxes[frames] = kb
    detected[frames] = True
    for a, b, ba, bb in zip(frames[:-1], frames[1:], kb[:-1], kb[1:]):
        if 1 < b - a <= max_gap + 1:
            w = ((np.arange(a + 1, b) - a) / (b - a))[:, None]
            boxes[a + 1:b] = (1 - w) * ba + w * bb
    # hold the first / last box over up to max_gap frames at the ends (strided detection leaves the
    # last frames unexamined)
    boxes[max(0, frames[0] - max_gap):frames[0]] = kb[0]
    boxes[frames[-1] + 1:frames[-1] + 1 + max_gap] = kb[-1]
    return Track(boxes, detected, examined)


def _append(tr: dict, t: int, box: np.ndarray, score: float) -> None:
    side = float(np.sqrt(max(box[2] - box[0], 0) * max(box[3] - box[1], 0)))
    tr["frames"].append(t)
    tr["boxes"].append(np.asarray(box, np.float32))
    tr["weight"] += max(float(score), 1e-3) * side
    tr["last"] = t


# --------------------------------------------------------------------------------------------
# crop boxes
# --------------------------------------------------------------------------------------------
def smooth_boxes(boxes: np.ndarray, window: int) -> np.ndarray:
    """Per-frame boxes [T, 4] median-filtered over ``window`` frames (odd), NaN rows ignored."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"smoothing window: {window} must be a positive odd number")
    half = window // 2
    out = np.full_like(boxes, np.nan)
    for t in range(len(boxes)):
        win = boxes[max(0, t - half):t + half + 1]
        win = win[~np.isnan(win[:, 0])]
        if len(win):
            out[t] = np.median(win, axis=0)
    return out


def square_boxes(boxes: np.ndarray, scale: float) -> np.ndarray:
    """Boxes [..., 4] -> squares [..., 3] (centre x, centre y, side) with side = scale * max(w, h)."""
    c = (boxes[..., :2] + boxes[..., 2:]) / 2
    side = scale * np.maximum(boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1])
    return np.concatenate([c, side[..., None]], axis=-1).astype(np.float32)


def clip_crop_box(track: Track, frame_hw: tuple[int, int], scale: float = 1.8) -> np.ndarray:
    """One fixed square (cx, cy, side) for the whole clip: centred on the median face centre, side =
    ``scale`` x the median face size, grown to cover where the face moves (centre range) so the face
    never leaves it, and shrunk / shifted to stay inside the frame where possible."""
    b = track.boxes[track.present]
    if len(b) == 0:
        raise ValueError("clip_crop_box: the track has no face box")
    sq = square_boxes(b, 1.0)
    cx, cy = np.median(sq[:, 0]), np.median(sq[:, 1])
    face = float(np.median(sq[:, 2]))
    travel = float(max(np.ptp(sq[:, 0]), np.ptp(sq[:, 1])))
    side = max(scale * face, face + travel)
    h, w = frame_hw
    side = min(side, float(min(h, w)))
    cx = float(np.clip(cx, side / 2, w - side / 2))
    cy = float(np.clip(cy, side / 2, h - side / 2))
    return np.array([cx, cy, side], np.float32)


def centre_offset(track: Track, box: np.ndarray) -> float:
    """Largest distance (per axis) of the tracked face centre from the crop centre over the clip,
    as a fraction of the crop side (0 = always centred; 0.5 = at the crop edge)."""
    b = track.boxes[track.present]
    if len(b) == 0:
        return float("inf")
    c = (b[:, :2] + b[:, 2:]) / 2
    return float(np.abs(c - box[:2]).max() / box[2])


def centre_crop_box(frame_hw: tuple[int, int]) -> np.ndarray:
    """The largest centred square (for video-only mode and pre-aligned clips)."""
    h, w = frame_hw
    side = float(min(h, w))
    return np.array([w / 2, h / 2, side], np.float32)


def crop_frames(frames: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """Crop squares (cx, cy, side) -- one ``[3]`` for all frames or ``[T, 3]`` per frame -- and resize
    to ``size``; parts outside the frame are black. Returns uint8 [T, size, size, 3]."""
    import cv2
    _check_frames(frames)
    boxes = np.broadcast_to(np.asarray(box, np.float32), (len(frames), 3))
    out = np.empty((len(frames), size, size, 3), np.uint8)
    h, w = frames.shape[1:3]
    for i, (frame, (cx, cy, side)) in enumerate(zip(frames, boxes)):
        n = max(1, round(float(side)))
        x0, y0 = round(float(cx) - n / 2), round(float(cy) - n / 2)
        sq = np.zeros((n, n, 3), np.uint8)
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + n, w), min(y0 + n, h)
        if xb > xa and yb > ya:
            sq[ya - y0:yb - y0, xa - x0:xb - x0] = frame[ya:yb, xa:xb]
        out[i] = cv2.resize(sq, (size, size), interpolation=cv2.INTER_AREA if n > size else cv2.INTER_LINEAR)
    return out


__all__ = ["Faces", "FaceDetector", "HaarDetector", "DETECTORS", "build_detector", "detect_strided", "box_iou", "Track",
           "track_face", "smooth_boxes", "square_boxes", "clip_crop_box", "centre_offset", "centre_crop_box", "crop_frames"]
