"""Face alignment for LatentSync: three facial points -> a similarity transform onto LatentSync's
face template -> a square aligned face; and the way back (paste-back with a feathered edge).

Conventions follow the official ``affine_transform.py`` (``AlignRestore``): the template places the
left / right eyebrow centres and the nose centre at ``(17, 20)``, ``(58, 20)``, ``(37.5, 40)`` in a
75 x 100 face scaled by ``2.8 * resolution / 256``; that crop is then resized to
``resolution x resolution`` (so faces are stretched horizontally by 4:3, as in training). Here the
similarity and the resize are one affine map, applied with ``grid_sample`` (batched, on the GPU).
The paste-back erodes the warped face area, feathers it with a Gaussian whose width grows with the
face (edge = sqrt(area) / 20) and blends it over the frame.

Pixel convention: integer coordinates are pixel centres (OpenCV's), matrices map source -> target.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

TEMPLATE_POINTS = ((17.0, 20.0), (58.0, 20.0), (37.5, 40.0))   # left brow, right brow, nose (75x100 face)
TEMPLATE_SIZE = (75, 100)                                        # w, h
TEMPLATE_SCALE = 2.8                                             # at resolution 256
TEMPLATE_RESOLUTION = 256
FILL = 127.0                                                     # grey outside the frame (uint8 scale)
EDGE_FRACTION = 20                                               # feather width = sqrt(face area) / 20
EROSION = 2                                                      # px, removes the warp's soft border

# FaceMesh (468) vertices of the 68-point layout's left brow (17-21), right brow (22-26) and nose
# (27-35), as LatentSync 1.0 maps them; the alignment points are their centres
MESH_LEFT_BROW = (71, 63, 105, 66, 107)
MESH_RIGHT_BROW = (336, 296, 334, 293, 301)
MESH_NOSE = (168, 197, 5, 4, 75, 97, 2, 326, 305)
# Where the three points sit inside an upright frontal face box (x0, y0, x1, y1), as fractions of the
# box width / height: measured with the FaceMesh points above against OpenCV's Haar box on
# scikit-image's astronaut. Used where FaceMesh finds no face (and without mediapipe).
BOX_POINTS = ((0.25, 0.255), (0.77, 0.255), (0.51, 0.595))


def points_from_boxes(boxes: np.ndarray) -> np.ndarray:
    """Face boxes [T, 4] -> the three alignment points [T, 3, 2] (no roll: boxes are upright)."""
    wh = boxes[:, 2:] - boxes[:, :2]
    return boxes[:, None, :2] + np.asarray(BOX_POINTS, np.float32)[None] * wh[:, None]


def points_from_mesh(landmarks: np.ndarray) -> np.ndarray:
    """FaceMesh landmarks [T, 468, >=2] (NaN rows where no face) -> the three points [T, 3, 2]."""
    return np.stack([landmarks[:, list(ids), :2].mean(1) for ids in (MESH_LEFT_BROW, MESH_RIGHT_BROW, MESH_NOSE)], 1)


def template(resolution: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The template points [3, 2] and the crop size (w, h) at ``resolution``."""
    ratio = resolution / TEMPLATE_RESOLUTION * TEMPLATE_SCALE
    size = (int(TEMPLATE_SIZE[0] * ratio), int(TEMPLATE_SIZE[1] * ratio))
    return np.asarray(TEMPLATE_POINTS, np.float64) * ratio, size


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The similarity [2, 3] taking points ``src`` [P, 2] onto ``dst`` [P, 2]: least-squares
    rotation, scale = ratio of the point spreads (as the official ``transformation_from_points``)."""
    c1, c2 = src.mean(0), dst.mean(0)
    p, q = src - c1, dst - c2
    angle = math.atan2(float((p[:, 0] * q[:, 1] - p[:, 1] * q[:, 0]).sum()), float((p * q).sum()))
    scale = float(np.sqrt((q ** 2).sum() / max((p ** 2).sum(), 1e-12)))
    r = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return np.concatenate([r, (c2 - r @ c1)[:, None]], axis=1)


def align_matrices(points: np.ndarray, resolution: int) -> np.ndarray:
    """Points [T, 3, 2] -> affine maps [T, 2, 3] from frame pixels to the aligned square face."""
    tpl, (w, h) = template(resolution)
    # the crop (w x h) is resized to resolution^2: pixel centres scale by (n_out / n_in) about -0.5
    sx, sy = resolution / w, resolution / h
    resize = np.array([[sx, 0, 0.5 * (sx - 1)], [0, sy, 0.5 * (sy - 1)], [0, 0, 1]])
    out = []
    for pts in points.astype(np.float64):
        m = np.vstack([similarity(pts, tpl), [0, 0, 1]])
        out.append((resize @ m)[:2])
    return np.stack(out).astype(np.float32)


def _invert(m: torch.Tensor) -> torch.Tensor:
    """Affine [N, 2, 3] -> its inverse [N, 2, 3]."""
    a = torch.linalg.inv(m[:, :, :2])
    return torch.cat([a, -(a @ m[:, :, 2:])], dim=2)


def warp(images: torch.Tensor, matrices: torch.Tensor, size: tuple[int, int], fill: float = 0.0) -> torch.Tensor:
    """Bilinear affine warp. images [N, C, H, W]; matrices [N, 2, 3] map source pixels -> output
    pixels; size (h, w) of the output; outside the source reads ``fill``."""
    n, _, hs, ws = images.shape
    h, w = size
    inv = _invert(matrices.double()).to(images.dtype if images.is_floating_point() else torch.float32)
    ys, xs = torch.meshgrid(torch.arange(h, device=images.device, dtype=inv.dtype),
                            torch.arange(w, device=images.device, dtype=inv.dtype), indexing="ij")
    grid = torch.stack([xs, ys, torch.ones_like(xs)], -1).reshape(1, -1, 3) @ inv.transpose(1, 2)  # [N, h*w, 2]
    # pixel centres 0 .. n-1 -> -1 .. 1 (align_corners=True)
    grid = grid / torch.tensor([max(ws - 1, 1), max(hs - 1, 1)], device=grid.device, dtype=grid.dtype) * 2 - 1
    out = F.grid_sample(images - fill, grid.view(n, h, w, 2).to(images.dtype), mode="bilinear",
                        padding_mode="zeros", align_corners=True)
    return out + fill


def erode(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Binary-ish erosion of [N, 1, H, W] by a k x k square, anchor at k // 2 (OpenCV's); outside
    the image counts as inside the mask (OpenCV's default border)."""
    if k <= 1:
        return mask
    lo, hi = k // 2, k - 1 - k // 2
    return 1 - F.max_pool2d(F.pad(1 - mask, (lo, hi, lo, hi)), k, stride=1)


def gaussian_blur(x: torch.Tensor, k: int) -> torch.Tensor:
    """[N, C, H, W] blurred by a k x k Gaussian with OpenCV's default sigma for that size
    (0.3 * ((k - 1) / 2 - 1) + 0.8), reflect border."""
    if k <= 1:
        return x
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
    r = torch.arange(k, device=x.device, dtype=x.dtype) - (k - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    c = x.shape[1]
    pad = k // 2
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def paste_back(frames: torch.Tensor, faces: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Blend aligned faces back into their frames with a feathered edge.

    frames [N, 3, H, W] and faces [N, 3, R, R] in 0..255 (float); matrices [N, 2, 3] frame -> face.
    Returns [N, 3, H, W] in 0..255."""
    n, _, h, w = frames.shape
    r = faces.shape[-1]
    inv = _invert(matrices.double()).float()
    face_in_frame = warp(faces, inv, (h, w), fill=FILL)
    inside = erode(warp(torch.ones(n, 1, r, r, device=faces.device, dtype=faces.dtype), inv, (h, w)), EROSION)
    out = torch.empty_like(frames)
    for i in range(n):   # the feather width depends on the face size, so per frame
        edge = int(float(inside[i].sum()) ** 0.5) // EDGE_FRACTION
        soft = gaussian_blur(erode(inside[i:i + 1], 2 * edge), 2 * edge + 1)
        out[i] = soft[0] * face_in_frame[i] + (1 - soft[0]) * frames[i]
    return out
