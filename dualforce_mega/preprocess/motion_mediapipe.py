"""The MediaPipe motion fallback (seed notes): a 70-d motion vector in LivePortrait's layout from
FaceMesh landmarks and a PnP head pose, for when LivePortrait's weights are unavailable.

Per frame, with FaceMesh's 468 landmarks L (pixels; z in x's scale), their centroid c, RMS radius
s and the PnP head rotation R (``head_pose``):

* pose-free shape ``X = R^T (L - c) / s`` (row-wise ``(L - c) @ R / s``);
* the 21 chosen landmarks of X (brows, eyelids, eye corners, nose, mouth, chin: the regions
  LivePortrait's implicit keypoints cover); the clip's **neutral shape** is their per-coordinate
  median over the clip's frames: ``kp_canonical`` (63);
* expression = X[21] - neutral (63); angles = PnP pitch, yaw, roll (degrees);
* translation = (centroid x, centroid y) in [-1, 1] image coordinates (x right, y down, as
  LivePortrait's keypoint grid) and the PnP depth relative to the clip's median depth minus 1;
* scale = s / image width.

Frames where FaceMesh finds no face get every motion dimension linearly interpolated in time from
the nearest frames with a face (held at the ends) and are counted in ``missing_frames``; a clip
with no face at all gives ``None``.
"""
from __future__ import annotations

import numpy as np

from .head_pose import estimate_head_pose, matrix_from_euler
from .motion import MEDIAPIPE, MotionLayout, MotionResult, check_frames

# FaceMesh indices of the 21 keypoints, image-left before image-right
MOTION_LANDMARKS = (
    70, 105, 334, 300,          # brows (outer, inner | inner, outer)
    159, 145, 386, 374,         # upper / lower eyelids
    33, 133, 362, 263,          # eye corners
    168, 1,                     # nose bridge, nose tip
    61, 291, 0, 17, 13, 14,     # mouth corners, outer lips top / bottom, inner lips top / bottom
    152,                        # chin
)
LAYOUT = MotionLayout(num_kp=len(MOTION_LANDMARKS))


def _fill_missing(values: np.ndarray, found: np.ndarray) -> np.ndarray:
    """[T, D] with rows valid where ``found`` -> every row filled by linear interpolation in time."""
    if found.all():
        return values
    t = np.arange(len(values))
    return np.stack([np.interp(t, t[found], values[found, d]) for d in range(values.shape[1])], axis=1)


def motion_from_landmarks(landmarks: np.ndarray, angles: np.ndarray, depth: np.ndarray, height: int,
                          width: int) -> tuple[np.ndarray, np.ndarray]:
    """Landmarks [T, 468, 3] (pixels), angles [T, 3] (degrees), PnP depth [T] of frames that all
    have a face -> (motion [T, 70], kp_canonical [63]) as described in the module docstring."""
    centre = landmarks.mean(axis=1, keepdims=True)                              # [T, 1, 3]
    offsets = landmarks - centre
    radius = np.sqrt((offsets ** 2).sum(axis=-1).mean(axis=1))                 # [T]
    shape = offsets @ matrix_from_euler(angles) / radius[:, None, None]        # row-wise R^T (L - c) / s
    points = shape[:, list(MOTION_LANDMARKS)]                                   # [T, 21, 3]
    neutral = np.median(points, axis=0)
    exp = (points - neutral).reshape(len(points), -1)
    image_size = np.array([width, height], dtype=np.float64)
    txy = 2.0 * centre[:, 0, :2] / image_size - 1.0
    tz = depth / np.median(depth) - 1.0
    t = np.concatenate([txy, tz[:, None]], axis=1)
    motion = LAYOUT.pack(exp, angles, t, (radius / width)[:, None])
    return motion, neutral.reshape(-1)


class MediaPipeMotion:
    """Step-04 extractor with the same call signature as ``LivePortraitMotion``."""

    name = MEDIAPIPE
    layout = LAYOUT

    def __init__(self, progress: bool = False):
        self.progress = progress

    def __call__(self, frames: np.ndarray) -> MotionResult | None:
        frames = check_frames(frames)
        track = estimate_head_pose(frames, progress=self.progress)
        found = track.found
        if not found.any():
            return None
        _, h, w, _ = frames.shape
        motion, neutral = motion_from_landmarks(track.landmarks[found], track.angles[found],
                                                track.translation[found, 2], h, w)
        full = np.zeros((len(frames), LAYOUT.dim))
        full[found] = motion
        return MotionResult(struct=_fill_missing(full, found).astype(np.float32),
                            kp_canonical=neutral.astype(np.float32), extractor=self.name,
                            missing_frames=int((~found).sum()))
