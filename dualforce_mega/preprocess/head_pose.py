"""Head pose from MediaPipe FaceMesh landmarks and a PnP fit (offline: mediapipe 0.10.21 ships the
face detector and landmark models inside its wheel).

API (shared by the data pipeline's motion fallback and the evaluation's APD metric)::

    track = estimate_head_pose(frames)      # frames: uint8 RGB [T, H, W, 3], one video (or images)
    track.angles      [T, 3] float64 pitch, yaw, roll in degrees; NaN where no face was found
    track.landmarks   [T, 468, 3] float64 pixels (x right, y down, z into the image in x's pixel
                      scale; MediaPipe's relative depth); NaN where no face was found
    track.translation [T, 3] PnP head position in camera coordinates (units of the 3-D model)
    track.found       [T] bool

Angle convention (LivePortrait's ``camera.py``): axes x right, y down, z into the image (OpenCV's
camera frame); the head rotation is ``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)`` applied to a frontal
face model, so a frontal face is (0, 0, 0) and rotating the image counter-clockwise by theta
degrees gives roll = -theta.

The PnP fit uses fourteen FaceMesh landmarks (midline: nose tip, chin, forehead, upper lip; pairs:
eye corners, mouth corners, temples, forehead sides, jaw), the same vertices of MediaPipe's
canonical 3-D face model (centimetres), and a pinhole camera with focal length = image width and
the principal point at the image centre. (Six points leave pitch poorly determined: on the
scikit-image astronaut they gave 24-34 degrees depending on the crop, fourteen give 11-19.)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)

NUM_LANDMARKS = 468  # FaceMesh without iris refinement
# PnP correspondences: FaceMesh landmark index -> the same vertex of MediaPipe's canonical face model
# (face_geometry/data/canonical_face_model.obj: centimetres, x image-right, y up, z towards the
# camera). Midline points, then (image-left, image-right) pairs, which the symmetric model mirrors.
_MIDLINE = {1: (0.0, -1.126865, 7.475604),      # nose tip
            152: (0.0, -9.403378, 4.264492),    # chin
            10: (0.0, 8.261778, 4.481535),      # forehead
            0: (0.0, -3.406404, 5.979507)}      # upper lip
_PAIRS = {(33, 263): (-4.445859, 2.663991, 3.173422),   # outer eye corners
          (61, 291): (-2.456206, -4.342621, 4.283884),  # mouth corners
          (21, 251): (-7.087960, 5.434801, 0.099620),   # temples
          (54, 284): (-6.279331, 6.615427, 1.425850),   # upper forehead sides
          (58, 288): (-6.719682, -4.788645, -1.745401)}  # jaw
_MODEL_Y_UP = dict(_MIDLINE)
for (left, right), (x, y, z) in _PAIRS.items():
    _MODEL_Y_UP[left], _MODEL_Y_UP[right] = (x, y, z), (-x, y, z)
PNP_LANDMARKS = tuple(_MODEL_Y_UP)
# into the camera frame used throughout: x right, y down, z into the image
PNP_MODEL_POINTS = np.array(list(_MODEL_Y_UP.values()), dtype=np.float64) * np.array([1.0, -1.0, -1.0])
FOCAL_PER_WIDTH = 1.0  # pinhole focal length in units of the image width (a common default; unknown camera)


@dataclass
class HeadPoseTrack:
    angles: np.ndarray        # [T, 3] pitch, yaw, roll (degrees), NaN where no face
    translation: np.ndarray   # [T, 3] PnP translation (model units), NaN where no face
    landmarks: np.ndarray     # [T, 468, 3] pixels, NaN where no face
    found: np.ndarray         # [T] bool

    def __len__(self) -> int:
        return len(self.found)


def _require_mediapipe():
    try:
        import mediapipe as mp
    except ImportError as e:
        raise ImportError("mediapipe is not installed: run scripts/install.sh (mediapipe==0.10.21 --no-deps); "
                          "it is needed for the FaceMesh head pose / motion fallback") from e
    if not hasattr(mp, "solutions"):
        raise ImportError(f"mediapipe {mp.__version__} has no mp.solutions (it ships no face models); "
                          f"install mediapipe==0.10.21 with scripts/install.sh")
    return mp


def euler_from_matrix(rot: np.ndarray) -> np.ndarray:
    """[..., 3, 3] rotation ``Rz(roll) @ Ry(yaw) @ Rx(pitch)`` -> [..., 3] (pitch, yaw, roll) degrees."""
    pitch = np.arctan2(rot[..., 2, 1], rot[..., 2, 2])
    yaw = np.arcsin(np.clip(-rot[..., 2, 0], -1.0, 1.0))
    roll = np.arctan2(rot[..., 1, 0], rot[..., 0, 0])
    return np.degrees(np.stack([pitch, yaw, roll], axis=-1))


def matrix_from_euler(angles: np.ndarray) -> np.ndarray:
    """[..., 3] (pitch, yaw, roll) degrees -> [..., 3, 3] ``Rz(roll) @ Ry(yaw) @ Rx(pitch)``."""
    p, y, r = np.moveaxis(np.radians(np.asarray(angles, dtype=np.float64)), -1, 0)
    one, zero = np.ones_like(p), np.zeros_like(p)
    rx = np.stack([one, zero, zero, zero, np.cos(p), -np.sin(p), zero, np.sin(p), np.cos(p)], -1)
    ry = np.stack([np.cos(y), zero, np.sin(y), zero, one, zero, -np.sin(y), zero, np.cos(y)], -1)
    rz = np.stack([np.cos(r), -np.sin(r), zero, np.sin(r), np.cos(r), zero, zero, zero, one], -1)
    shape = p.shape + (3, 3)
    return rz.reshape(shape) @ ry.reshape(shape) @ rx.reshape(shape)


def solve_head_pose(landmarks: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One face's [468, 3] pixel landmarks -> (rotation [3, 3], translation [3]) by PnP."""
    import cv2

    image_points = np.ascontiguousarray(landmarks[list(PNP_LANDMARKS), :2], dtype=np.float64)
    focal = FOCAL_PER_WIDTH * width
    camera = np.array([[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]])
    ok, rvec, tvec = cv2.solvePnP(PNP_MODEL_POINTS, image_points, camera, None, flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok:
        raise RuntimeError("cv2.solvePnP failed")
    rot, _ = cv2.Rodrigues(rvec)
    return rot, tvec.reshape(3)


def estimate_head_pose(frames: np.ndarray, *, static_images: bool = False, min_confidence: float = 0.5,
                       progress: bool = False) -> HeadPoseTrack:
    """uint8 RGB frames [T, H, W, 3] -> :class:`HeadPoseTrack`.

    ``static_images=False`` runs FaceMesh in video mode (landmarks tracked from frame to frame, the
    right choice for one clip); ``True`` detects in every frame independently (unrelated images).
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 RGB [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    mp = _require_mediapipe()
    t, h, w, _ = frames.shape
    angles = np.full((t, 3), np.nan)
    translation = np.full((t, 3), np.nan)
    landmarks = np.full((t, NUM_LANDMARKS, 3), np.nan)
    found = np.zeros(t, dtype=bool)
    scale = np.array([w, h, w], dtype=np.float64)  # MediaPipe's z shares x's normalisation
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=static_images, max_num_faces=1, refine_landmarks=False,
                                         min_detection_confidence=min_confidence,
                                         min_tracking_confidence=min_confidence) as mesh:
        for i in tqdm(range(t), desc="facemesh", unit="frame", disable=not progress):
            result = mesh.process(np.ascontiguousarray(frames[i]))
            if not result.multi_face_landmarks:
                continue
            pts = result.multi_face_landmarks[0].landmark
            lm = np.array([(p.x, p.y, p.z) for p in pts[:NUM_LANDMARKS]], dtype=np.float64) * scale
            rot, tvec = solve_head_pose(lm, h, w)
            landmarks[i], translation[i], angles[i] = lm, tvec, euler_from_matrix(rot)
            found[i] = True
    return HeadPoseTrack(angles=angles, translation=translation, landmarks=landmarks, found=found)
