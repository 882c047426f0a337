"""Step 04: per-video-frame facial motion (the struct stream) and canonical keypoints of a clip.

Step API (called by ``data_tools.prepare`` and ``data_tools.extract_motion``)::

    extractor = build_motion_extractor(path, device="auto")
    result = extractor(frames)           # frames: uint8 RGB [T, H, W, 3], one clip's face crops
    result.struct        float32 [T, 70]   (None returned instead when no face is found at all)
    result.kp_canonical  float32 [63]
    result.extractor     str: "liveportrait" | "liveportrait-random-tiny" | "mediapipe"
                         (write it into the clip metadata as ``motion_extractor``)
    result.missing_frames int: frames without a face, filled by interpolation (MediaPipe only)

``path`` is LivePortrait's ``motion_extractor.pth`` (or ``.safetensors``); without a path the
MediaPipe FaceMesh fallback runs (offline, real motion). ``random_liveportrait("tiny")`` builds a
tiny random LivePortrait extractor of the same class (smoke runs; logged loudly, named in
``extractor``).

Motion vector layout (``model.motion_dim`` = 3 * num_kp + 7 = 70), one row per video frame::

    [0 : 63]   expression: 21 keypoints x (x, y, z) offsets, point-major (x0, y0, z0, x1, ...)
    [63 : 66]  pitch, yaw, roll in degrees (LivePortrait's Rz(roll) @ Ry(yaw) @ Rx(pitch))
    [66 : 69]  translation t (x, y, z)
    [69]       scale
``kp_canonical`` (63) = the canonical keypoints, point-major like the expression block. For
LivePortrait it is the mean over the clip's frames of the ``kp`` head (the identity's keypoints
are the same in every frame up to estimation noise).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..encoders.liveportrait import (INPUT_SIZE, POINT_DIMS, SCALE_DIMS, TRANSLATION_DIMS,
                                     LivePortraitMotionExtractor, MotionExtractorConfig, bins_to_degrees)
from .netutil import RANDOM_PRESETS, random_init, resolve_device

log = logging.getLogger(__name__)

ANGLE_DIMS = 3                       # pitch, yaw, roll
EXTRA_DIMS = ANGLE_DIMS + TRANSLATION_DIMS + SCALE_DIMS
LIVEPORTRAIT, MEDIAPIPE = "liveportrait", "mediapipe"


@dataclass
class MotionLayout:
    """Slices of the motion vector for ``num_kp`` keypoints (see the module docstring)."""

    num_kp: int

    @property
    def kp_dim(self) -> int:
        return POINT_DIMS * self.num_kp

    @property
    def dim(self) -> int:
        return self.kp_dim + EXTRA_DIMS

    @property
    def exp(self) -> slice:
        return slice(0, self.kp_dim)

    @property
    def angles(self) -> slice:
        return slice(self.kp_dim, self.kp_dim + ANGLE_DIMS)

    @property
    def t(self) -> slice:
        return slice(self.angles.stop, self.angles.stop + TRANSLATION_DIMS)

    @property
    def scale(self) -> slice:
        return slice(self.t.stop, self.t.stop + SCALE_DIMS)

    def pack(self, exp, angles, t, scale):
        """[T, kp_dim], [T, 3], [T, 3], [T, 1] (numpy or torch) -> [T, dim] in the layout order."""
        parts = (exp, angles, t, scale)
        if isinstance(exp, torch.Tensor):
            return torch.cat(parts, dim=-1)
        return np.concatenate(parts, axis=-1)


@dataclass
class MotionResult:
    struct: np.ndarray          # [T, dim] float32
    kp_canonical: np.ndarray    # [kp_dim] float32
    extractor: str
    missing_frames: int = 0


MotionExtractorFn = Callable[[np.ndarray], Optional[MotionResult]]


def check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 RGB [T>0, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    return frames


def liveportrait_motion(outputs: dict[str, torch.Tensor], layout: MotionLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw extractor outputs for B images -> (motion [B, dim], canonical keypoints [B, kp_dim]), fp32."""
    angles = torch.stack([bins_to_degrees(outputs[k]) for k in ("pitch", "yaw", "roll")], dim=-1)
    motion = layout.pack(outputs["exp"].float(), angles, outputs["t"].float(), outputs["scale"].float())
    return motion, outputs["kp"].float()


class LivePortraitMotion:
    """Runs the LivePortrait extractor batched on its device (fp16 autocast on CUDA, as LivePortrait)."""

    def __init__(self, model: LivePortraitMotionExtractor, name: str = LIVEPORTRAIT, batch_size: int = 64,
                 progress: bool = False):
        self.model = model.eval()
        self.layout = MotionLayout(model.cfg.num_kp)
        self.name, self.batch_size, self.progress = name, batch_size, progress
        self.device = next(model.parameters()).device

    def _prepare(self, frames: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            # LivePortrait resizes with cv2.resize (bilinear, half-pixel centres) = align_corners=False
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return x.clamp(0.0, 1.0)

    @torch.no_grad()
    def per_frame(self, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 RGB [T, H, W, 3] -> (motion [T, dim], canonical keypoints [T, kp_dim]) on the CPU."""
        frames = check_frames(frames)
        motions, kps = [], []
        autocast = torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda")
        for start in tqdm(range(0, len(frames), self.batch_size), desc="liveportrait", unit="batch",
                          disable=not self.progress):
            with autocast:
                out = self.model(self._prepare(frames[start:start + self.batch_size]))
            m, k = liveportrait_motion(out, self.layout)
            motions.append(m.cpu())
            kps.append(k.cpu())
        return torch.cat(motions), torch.cat(kps)

    def __call__(self, frames: np.ndarray) -> MotionResult:
        motion, kp = self.per_frame(frames)
        return MotionResult(struct=motion.numpy().astype(np.float32),
                            kp_canonical=kp.mean(dim=0).numpy().astype(np.float32), extractor=self.name)


def build_motion_extractor(path: Optional[str], device: str = "auto", batch_size: int = 64,
                           progress: bool = False) -> MotionExtractorFn:
    """The step-04 extractor: LivePortrait from ``path``, else the MediaPipe FaceMesh fallback."""
    if path:
        dev = resolve_device(device)
        model = LivePortraitMotionExtractor.from_pretrained(path).to(dev)
        log.info("motion: LivePortrait motion extractor from %s on %s", path, dev)
        return LivePortraitMotion(model, batch_size=batch_size, progress=progress)
    from .motion_mediapipe import MediaPipeMotion

    log.info("motion: no motion extractor path given: MediaPipe FaceMesh fallback")
    return MediaPipeMotion(progress=progress)


def random_liveportrait(preset: str = "tiny", device: str = "auto") -> LivePortraitMotion:
    """A tiny randomly initialised LivePortrait extractor (same classes; smoke tests, logged loudly)."""
    if preset not in RANDOM_PRESETS:
        raise ValueError(f"random preset {preset!r} is not one of {RANDOM_PRESETS}")
    log.warning("motion: RANDOM tiny LivePortrait motion extractor (no weights) -- smoke tests only")
    with random_init():
        model = LivePortraitMotionExtractor(MotionExtractorConfig.tiny())
    model = model.to(resolve_device(device))
    return LivePortraitMotion(model, name=f"{LIVEPORTRAIT}-random-{preset}")


def reference_motion(extractor: MotionExtractorFn, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One uint8 RGB reference image [H, W, 3] -> (its motion [dim], canonical keypoints [kp_dim]):
    the sampler's struct frame 0 and ``kp_canonical`` (generation starts from the reference image)."""
    result = extractor(check_frames(np.asarray(image)[None]))
    if result is None:
        raise ValueError(f"{getattr(extractor, 'name', 'motion extractor')}: no face found in the reference image")
    return result.struct[0], result.kp_canonical
