"""Batched face crops for the metric networks, on the device the network runs on.

Both crop kinds are similarity warps of whole frames sampled with ``grid_sample`` (bilinear), in the
pixel-centre convention of ``cv2.warpAffine``:
* ``box_crops``: a square box per frame -> size² (SyncNet 224², FID / FVD face crops);
* ``align_five_points``: 5 landmarks per frame -> the ArcFace 112² template (insightface ``norm_crop``:
  least-squares similarity (Umeyama, as skimage ``SimilarityTransform.estimate``) from the landmarks to
  ``ARCFACE_TEMPLATE``).
Boxes and landmarks come from the shared face module of the data pipeline.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .arcface import ARCFACE_TEMPLATE, INPUT_SIZE

# MediaPipe FaceMesh indices -> the 5 ArcFace points (image-left eye, image-right eye, nose tip,
# image-left mouth corner, image-right mouth corner); an eye is the mean of its two corners.
FACEMESH_FIVE_POINTS = ((33, 133), (362, 263), (1,), (61,), (291,))


def facemesh_five_points(landmarks: np.ndarray) -> np.ndarray:
    """[..., 468+, 2] FaceMesh landmarks in pixels -> [..., 5, 2]."""
    return np.stack([landmarks[..., list(ids), :].mean(axis=-2) for ids in FACEMESH_FIVE_POINTS], axis=-2)


def umeyama_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) with dst ~ M @ src; [3, 3]."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    e = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        e[1, 1] = -1
    rot = u @ e @ vt
    scale = (sig * np.diag(e)).sum() / s.var(axis=0).sum()
    m = np.eye(3)
    m[:2, :2] = scale * rot
    m[:2, 2] = mu_d - scale * rot @ mu_s
    return m


def _pixel_to_normalised(width: int, height: int) -> np.ndarray:
    return np.array([[2.0 / width, 0, 1.0 / width - 1], [0, 2.0 / height, 1.0 / height - 1], [0, 0, 1]])


def warp(frames: torch.Tensor, src_to_dst: np.ndarray, out_size: int) -> torch.Tensor:
    """frames [T, C, H, W] float, src_to_dst [T, 3, 3] pixel maps (frame -> crop) -> [T, C, S, S]."""
    t, _, h, w = frames.shape
    n_in, n_out_inv = _pixel_to_normalised(w, h), np.linalg.inv(_pixel_to_normalised(out_size, out_size))
    theta = np.stack([(n_in @ np.linalg.inv(m) @ n_out_inv)[:2] for m in src_to_dst])
    grid = F.affine_grid(torch.as_tensor(theta, dtype=frames.dtype, device=frames.device),
                         [t, frames.shape[1], out_size, out_size], align_corners=False)
    return F.grid_sample(frames, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def box_crops(frames: torch.Tensor, boxes: np.ndarray, size: int) -> torch.Tensor:
    """boxes [T, 4] (x0, y0, x1, y1) pixels, made square around their centre -> [T, C, size, size]."""
    boxes = np.asarray(boxes, np.float64)
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    mats = []
    for x, y, s in zip(cx, cy, side):
        k = size / s  # box edges (x - s/2 .. x + s/2) -> crop edges (0 .. size), pixel centres at +0.5
        mats.append(np.array([[k, 0, size / 2 - k * x - 0.5 * (1 - k)], [0, k, size / 2 - k * y - 0.5 * (1 - k)],
                              [0, 0, 1]]))
    return warp(frames, np.stack(mats), size)


def full_frame_boxes(n: int, height: int, width: int) -> np.ndarray:
    """The centred square of each frame (for videos that are already face crops)."""
    side = min(height, width)
    x0, y0 = (width - side) / 2, (height - side) / 2
    return np.tile(np.array([[x0, y0, x0 + side, y0 + side]]), (n, 1))


def align_five_points(frames: torch.Tensor, points: np.ndarray) -> torch.Tensor:
    """points [T, 5, 2] pixels -> ArcFace crops [T, C, 112, 112]."""
    mats = np.stack([umeyama_similarity(p, ARCFACE_TEMPLATE) for p in np.asarray(points)])
    return warp(frames, mats, INPUT_SIZE)
