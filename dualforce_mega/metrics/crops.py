"""Batched face crops for the metric networks, on the device the network runs on.

Both crop kinds are similarity warps of whole frames sampled with ``grid_sample`` (bilinear), in the
pixel-centre convention of ``cv2.warpAffine``:
* ``square_crops``: a square (cx, cy, side) per frame -> size² (SyncNet 224², box-cropped ArcFace input);
* ``align_five_points``: 5 landmarks per frame -> the ArcFace 112² template (insightface ``norm_crop``:
  least-squares similarity (Umeyama, as skimage ``SimilarityTransform.estimate``) from the landmarks to
  ``ARCFACE_TEMPLATE``).
Face boxes come from the shared detector / tracker ``dualforce_mega.preprocess.face``, landmarks from
FaceMesh (``dualforce_mega.preprocess.head_pose``).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .arcface import ARCFACE_TEMPLATE, INPUT_SIZE
from .syncnet import CROP_SIZE as SYNCNET_SIZE

SYNCNET_CROP_SCALE = 0.4   # syncnet_python run_pipeline --crop_scale
SYNCNET_SMOOTH = 13        # its median filter over the track's box sizes and centres (frames)

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


def square_crops(frames: torch.Tensor, squares: np.ndarray, size: int) -> torch.Tensor:
    """squares [T, 3] (centre x, centre y, side) pixels, the convention of ``preprocess.face`` ->
    [T, C, size, size]; outside the frame is black."""
    mats = []
    for cx, cy, side in np.asarray(squares, np.float64):
        k = size / side  # square edges (cx - side/2 .. cx + side/2) -> crop edges (0 .. size)
        shift = lambda c: size / 2 - k * c - 0.5 * (1 - k)  # noqa: E731 - pixel centres at +0.5
        mats.append(np.array([[k, 0, shift(cx)], [0, k, shift(cy)], [0, 0, 1]]))
    return warp(frames, np.stack(mats), size)


def syncnet_squares(boxes: np.ndarray, crop_scale: float = SYNCNET_CROP_SCALE) -> np.ndarray:
    """Face boxes [T, 4] -> the squares syncnet_python's ``crop_video`` cuts: side (1 + cs) * max(w, h),
    centre moved down by cs * max(w, h) / 2."""
    b = np.asarray(boxes, np.float64)
    half = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) / 2
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2 + crop_scale * half
    return np.stack([cx, cy, 2 * half * (1 + crop_scale)], axis=1)


def align_five_points(frames: torch.Tensor, points: np.ndarray) -> torch.Tensor:
    """points [T, 5, 2] pixels -> ArcFace crops [T, C, 112, 112]."""
    mats = np.stack([umeyama_similarity(p, ARCFACE_TEMPLATE) for p in np.asarray(points)])
    return warp(frames, mats, INPUT_SIZE)


def rgb_to_bgr(x: torch.Tensor) -> torch.Tensor:
    return x.flip(1)


def syncnet_crops(frames: np.ndarray, boxes: Optional[np.ndarray], device: torch.device,
                  size: int = SYNCNET_SIZE) -> torch.Tensor:
    """uint8 RGB [T, H, W, 3] + the tracked face boxes [T, 4] (None: the frames are face crops already;
    the centred square is used) -> SyncNet input crops [T, 3, 224, 224], BGR float 0..255, on ``device``."""
    t, h, w, _ = frames.shape
    if boxes is None:
        side = min(h, w)
        squares = np.tile([[w / 2, h / 2, side]], (t, 1))
    else:
        squares = syncnet_squares(boxes)
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float()
    return rgb_to_bgr(square_crops(x, squares, size))
