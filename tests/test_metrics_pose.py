"""APD through the shared head-pose module (MediaPipe FaceMesh + PnP, dualforce_mega.preprocess.head_pose):
known rotations of the PnP face model give APD = the hand-computed mean absolute angle differences,
and a real face photo (scikit-image's astronaut) seen by a camera turned by a known angle gives yaw
changes within a few degrees of that angle."""
from __future__ import annotations

import numpy as np
import pytest

from dualforce_mega.metrics.pose import apd
from dualforce_mega.preprocess import head_pose

H, W = 480, 640


def _project(angles: np.ndarray, distance: float = 60.0) -> np.ndarray:
    """FaceMesh-shaped landmarks [468, 3] of the PnP model posed by ``angles`` in front of the camera."""
    rot = head_pose.matrix_from_euler(angles)
    pts = head_pose.PNP_MODEL_POINTS @ rot.T + np.array([0.0, 0.0, distance])
    f = head_pose.FOCAL_PER_WIDTH * W
    lm = np.zeros((head_pose.NUM_LANDMARKS, 3))
    lm[list(head_pose.PNP_LANDMARKS), 0] = f * pts[:, 0] / pts[:, 2] + W / 2
    lm[list(head_pose.PNP_LANDMARKS), 1] = f * pts[:, 1] / pts[:, 2] + H / 2
    return lm


def test_apd_on_known_rotations_through_pnp():
    gt = np.array([[0.0, 0.0, 0.0], [5.0, -10.0, 2.0], [-8.0, 20.0, -4.0]])
    gen = gt + np.array([[3.0, -6.0, 1.0], [0.0, 4.0, -2.0], [-1.0, 2.0, 3.0]])
    solve = lambda a: head_pose.euler_from_matrix(head_pose.solve_head_pose(_project(a), H, W)[0])  # noqa: E731
    recovered_gt = np.stack([solve(a) for a in gt])
    recovered_gen = np.stack([solve(a) for a in gen])
    np.testing.assert_allclose(recovered_gt, gt, atol=0.05)
    r = apd(recovered_gen, recovered_gt)
    assert r["pitch"] == pytest.approx((3 + 0 + 1) / 3, abs=0.05)
    assert r["yaw"] == pytest.approx((6 + 4 + 2) / 3, abs=0.05)
    assert r["roll"] == pytest.approx((1 + 2 + 3) / 3, abs=0.05)


def test_real_face_yaw_follows_a_known_camera_turn():
    pytest.importorskip("mediapipe")
    cv2 = pytest.importorskip("cv2")
    from skimage import data

    img = data.astronaut()
    h, w = img.shape[:2]
    k = np.array([[head_pose.FOCAL_PER_WIDTH * w, 0, w / 2], [0, head_pose.FOCAL_PER_WIDTH * w, h / 2], [0, 0, 1.0]])
    turns = np.array([-20.0, -10.0, 0.0, 10.0, 20.0])
    # a pure camera rotation is exactly the homography K R K^-1 (no depth needed)
    views = np.stack([cv2.warpPerspective(img, k @ head_pose.matrix_from_euler(np.array([0, t, 0.0])) @
                                          np.linalg.inv(k), (w, h)) for t in turns])
    angles = head_pose.estimate_head_pose(views, static_images=True).angles
    assert not np.isnan(angles).any()
    front = angles[turns == 0][0]
    yaw_change = angles[:, 1] - front[1]
    np.testing.assert_allclose(yaw_change, turns, atol=4.0)      # within a few degrees
    r = apd(angles, np.tile(front, (len(turns), 1)))
    assert r["yaw"] == pytest.approx(np.abs(turns).mean(), abs=3.0)
    assert r["pitch"] < 3.0 and r["roll"] < 3.0


def test_metric_face_crops_on_a_real_face():
    """The eval crops on the astronaut: Haar track -> SyncNet squares; FaceMesh landmarks -> ArcFace
    alignment that puts the eyes, nose tip and mouth corners on the 112² template."""
    pytest.importorskip("mediapipe")
    import torch
    from skimage import data

    from dualforce_mega.metrics import crops
    from dualforce_mega.preprocess.face import build_detector
    from eval.metrics.analyze import face_boxes, identity_crops

    frames = np.stack([data.astronaut()] * 2)
    boxes = face_boxes(frames, build_detector("haar"))
    assert np.isfinite(boxes).all()
    sync_in = crops.syncnet_crops(frames, boxes, torch.device("cpu"))
    assert sync_in.shape == (2, 3, 224, 224)
    torch.testing.assert_close(sync_in[:, 0], crops.square_crops(torch.from_numpy(frames).permute(0, 3, 1, 2).float(),
                                                                  crops.syncnet_squares(boxes), 224)[:, 2])  # BGR
    lm = head_pose.estimate_head_pose(frames, static_images=True).landmarks
    aligned = identity_crops(frames, lm, boxes, torch.device("cpu"))
    assert aligned.shape == (2, 112, 112, 3) and aligned.dtype == np.uint8
    # FaceMesh again on the aligned crop (upsampled so the detector sees a normal-sized face)
    big = np.asarray(torch.nn.functional.interpolate(torch.from_numpy(aligned[:1]).permute(0, 3, 1, 2).float(),
                                                     scale_factor=4, mode="bilinear").round().clamp(0, 255)
                     .byte().permute(0, 2, 3, 1))
    again = head_pose.estimate_head_pose(big, static_images=True).landmarks[0, :, :2] / 4
    assert not np.isnan(again).any()
    src = crops.facemesh_five_points(lm[0, :, :2])
    m = crops.umeyama_similarity(src, crops.ARCFACE_TEMPLATE)
    expected = src @ m[:2, :2].T + m[:2, 2]   # where the warp must put them (the template up to the fit)
    err = np.linalg.norm(crops.facemesh_five_points(again) - expected, axis=1)
    assert err.max() < 1.5, err      # pixels of the 112² crop (FaceMesh jitter; measured < 1)
    assert np.linalg.norm(expected - crops.ARCFACE_TEMPLATE, axis=1).max() < 10.0
