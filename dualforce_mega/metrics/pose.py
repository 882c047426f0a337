"""APD (average pose distance): the mean absolute difference, in degrees, between the head pitch / yaw /
roll of generated frames and of the ground-truth frames at the same index (per angle, and their mean).
Angles come from MediaPipe FaceMesh + PnP (``dualforce_mega.preprocess.head_pose``) or from the
LivePortrait motion extractor's pose heads when its weights are given."""
from __future__ import annotations

import numpy as np

ANGLES = ("pitch", "yaw", "roll")


def wrap_degrees(d: np.ndarray) -> np.ndarray:
    """Differences mapped to [-180, 180)."""
    return (np.asarray(d, np.float64) + 180.0) % 360.0 - 180.0


def apd(generated: np.ndarray, real: np.ndarray) -> dict[str, float]:
    """[T, 3] (pitch, yaw, roll) degrees each -> {"pitch", "yaw", "roll", "mean"}; frames beyond the
    shorter sequence and frames where either is NaN (no face found) are left out."""
    g, r = np.asarray(generated, np.float64), np.asarray(real, np.float64)
    if g.ndim != 2 or g.shape[1] != 3 or r.ndim != 2 or r.shape[1] != 3:
        raise ValueError(f"poses must be [T, 3] (pitch, yaw, roll): {g.shape} vs {r.shape}")
    n = min(len(g), len(r))
    d = np.abs(wrap_degrees(g[:n] - r[:n]))
    d = d[~np.isnan(d).any(axis=1)]
    if len(d) == 0:
        raise ValueError("APD: no frame with a pose in both videos")
    per = dict(zip(ANGLES, (float(x) for x in d.mean(axis=0))))
    per["mean"] = float(d.mean())
    return per
