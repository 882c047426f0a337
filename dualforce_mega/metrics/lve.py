"""Mesh metrics for audio -> 3D face baselines (FaceFormer / CodeTalker evaluation).

* LVE (lip vertex error; FaceFormer ``calculate_lve``, torchmetrics ``lip_vertex_error``): for each frame
  the max over lip vertices of the **squared** L2 distance to ground truth; the mean over all frames
  (over all sequences together: ``lip_max_sq_errors`` per sequence, then the mean of the concatenation).
* FDD (upper-face dynamics deviation; CodeTalker ``cal_metric``): per sequence, motion = vertices -
  template; for each upper-face vertex the std over time (ddof 0) of its squared motion norm, averaged
  over the vertices; FDD = that of the ground truth minus that of the prediction, averaged over
  sequences. (torchmetrics' FDD uses frame-to-frame displacements instead; we follow CodeTalker, whose
  numbers papers report.)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _check(pred: np.ndarray, gt: np.ndarray, idx: Sequence[int], what: str) -> None:
    if pred.ndim != 3 or pred.shape[-1] != 3 or pred.shape != gt.shape:
        raise ValueError(f"vertices must both be [T, V, 3]: {pred.shape} vs {gt.shape}")
    if len(idx) == 0 or max(idx) >= pred.shape[1] or min(idx) < 0:
        raise ValueError(f"{what} vertex indices must be non-empty and within 0..{pred.shape[1] - 1}")


def lip_max_sq_errors(pred: np.ndarray, gt: np.ndarray, lip_idx: Sequence[int]) -> np.ndarray:
    """[T] per-frame max over lip vertices of the squared L2 error."""
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    _check(pred, gt, lip_idx, "lip")
    return ((pred[:, lip_idx] - gt[:, lip_idx]) ** 2).sum(-1).max(1)


def lve(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], lip_idx: Sequence[int]) -> float:
    """Frame-weighted mean over all sequences."""
    return float(np.concatenate([lip_max_sq_errors(p, g, lip_idx) for p, g in zip(preds, gts)]).mean())


def upper_motion_std(vertices: np.ndarray, template: np.ndarray, upper_idx: Sequence[int]) -> float:
    motion = np.asarray(vertices, np.float64)[:, upper_idx] - np.asarray(template, np.float64)[None, upper_idx]
    return float(((motion ** 2).sum(-1)).std(axis=0).mean())


def fdd(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], templates: Sequence[np.ndarray],
        upper_idx: Sequence[int]) -> float:
    diffs = []
    for p, g, t in zip(preds, gts, templates):
        _check(np.asarray(p), np.asarray(g), upper_idx, "upper-face")
        diffs.append(upper_motion_std(g, t, upper_idx) - upper_motion_std(p, t, upper_idx))
    return float(np.mean(diffs))
