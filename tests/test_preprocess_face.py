"""Face detection / tracking / cropping (dualforce_mega.preprocess.face)."""
import numpy as np
import pytest

pytest.importorskip("cv2")
pytest.importorskip("skimage")

from dualforce_mega.preprocess.face import (Faces, box_iou, build_detector, centre_crop_box, clip_crop_box,
                                            centre_offset,
                                            crop_frames, detect_strided, smooth_boxes, track_face)
from media_fixtures import face_frames


def _faces(*boxes_scores):
    if not boxes_scores:
        return Faces.empty()
    b = np.array([bs[0] for bs in boxes_scores], np.float32)
    return Faces(b, np.array([bs[1] for bs in boxes_scores], np.float32))


def test_box_iou_hand_computed():
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30]], np.float32)
    np.testing.assert_allclose(box_iou(a, b), [[50 / 150, 0.0]])


def test_track_keeps_big_face_and_interpolates_gap():
    big = lambda x: ((x, 10, x + 40, 50), 1.0)      # noqa: E731  moving 4 px per frame
    small = ((200, 200, 210, 210), 5.0)              # confident but tiny false positive
    faces = [_faces(big(0), small), _faces(big(4)), _faces(), _faces(), _faces(big(16), small), None, _faces(big(24))]
    tr = track_face(faces, max_gap=3)
    np.testing.assert_allclose(tr.boxes[:, 0], [0, 4, 8, 12, 16, 20, 24])    # gaps filled linearly
    assert tr.detected.tolist() == [True, True, False, False, True, False, True]
    assert tr.examined.tolist() == [True] * 5 + [False, True]
    assert tr.continuity() == pytest.approx(4 / 6)
    # a gap longer than max_gap is not bridged
    tr = track_face(faces, max_gap=1)
    assert np.isnan(tr.boxes[3, 0]) and tr.boxes[2, 0] == 4     # the end of a track holds max_gap frames


def test_smooth_boxes_median_removes_outlier():
    b = np.tile(np.array([[10, 10, 50, 50]], np.float32), (7, 1))
    b[3] += 30
    b[5] = np.nan
    s = smooth_boxes(b, 3)
    np.testing.assert_allclose(s[3], [10, 10, 50, 50])
    np.testing.assert_allclose(s[5], [10, 10, 50, 50])


def test_crop_frames_exact_pixels_and_black_padding():
    frame = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(1, 8, 8, 3)
    inside = crop_frames(frame, np.array([4, 4, 4], np.float32), size=4)     # rows/cols 2..5
    np.testing.assert_array_equal(inside[0], frame[0, 2:6, 2:6])
    corner = crop_frames(frame, np.array([1, 1, 4], np.float32), size=4)     # rows/cols -1..2
    assert (corner[0, 0] == 0).all() and (corner[0, :, 0] == 0).all()
    np.testing.assert_array_equal(corner[0, 1:, 1:], frame[0, :3, :3])
    np.testing.assert_array_equal(centre_crop_box((6, 10)), [5, 3, 6])


def test_haar_finds_real_face():
    frames, _, centres = face_frames(1, size=512)
    f = build_detector("haar").detect(frames)[0]
    assert len(f) >= 1
    c = (f.boxes[np.argmax(f.scores), :2] + f.boxes[np.argmax(f.scores), 2:]) / 2
    assert np.abs(c - centres[0]).max() < 15


@pytest.mark.parametrize("size", [128, 96])
def test_face_stays_in_fixed_crop(size):
    """The tracked face centre stays within 10 % of the crop size of the crop centre on every frame,
    with one fixed box for the clip, and the crop has the configured size."""
    frames, _, true_centres = face_frames(40, size=256)
    det = build_detector("haar")
    track = track_face(detect_strided(det, frames, every=2))
    assert track.present.all() and track.continuity() > 0.9
    box = clip_crop_box(track, frames.shape[1:3])
    crops = crop_frames(frames, box, size)
    assert crops.shape == (40, size, size, 3)
    # true face centre, in crop pixels
    c = (true_centres - box[:2] + box[2] / 2) * size / box[2]
    assert np.abs(c - size / 2).max() < 0.1 * size
    assert centre_offset(track, box) < 0.1
    # the detector still finds the face, near the centre, in the crops themselves
    found = det.detect(crops[::8])
    for f in found:
        assert len(f) >= 1
        cc = (f.boxes[:, :2] + f.boxes[:, 2:]).mean(0) / 2
        assert np.abs(cc - size / 2).max() < 0.1 * size


def test_s3fd_loads_official_layout_strictly_and_decodes_anchors(tmp_path):
    import torch
    from dualforce_mega.preprocess.s3fd import S3FD, decode_level, nms
    torch.manual_seed(0)
    sd = S3FD().state_dict()
    # the official file's key names (face-alignment net_s3fd.py)
    for k in ("conv1_1.weight", "fc6.bias", "conv3_3_norm.weight", "conv3_3_norm_mbox_conf.weight",
              "conv7_2_mbox_loc.bias"):
        assert k in sd
    assert sd["conv3_3_norm_mbox_conf.weight"].shape == (4, 256, 3, 3) and float(sd["conv4_3_norm.weight"][0]) == 8
    torch.save(sd, tmp_path / "s3fd.pth")
    det = build_detector("s3fd", weights=tmp_path / "s3fd.pth", threshold=0.0)
    frames = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    out = det.detect(frames)
    assert len(out) == 3 and all(f.boxes.shape[1:] == (4,) for f in out)
    torch.save({k: v for k, v in sd.items() if k != "fc7.bias"}, tmp_path / "bad.pth")
    with pytest.raises(Exception, match="bad.pth"):
        build_detector("s3fd", weights=tmp_path / "bad.pth")
    # decoding: one confident anchor at (x=2, y=1) of the stride-8 map; loc shifts x by 1 -> 0.1 * 32
    cls = torch.zeros(1, 2, 4, 4)
    cls[0, 0] = 10.0                              # background everywhere ...
    cls[0, 1, 1, 2], cls[0, 0, 1, 2] = 10.0, 0.0  # ... but one face
    loc = torch.zeros(1, 4, 4, 4)
    loc[0, 0, 1, 2] = 1.0
    loc[0, 2, 1, 2] = np.log(2) / 0.2            # width doubles: 64
    b, boxes, score = decode_level(cls, loc, 8)
    assert b.tolist() == [0] and float(score[0]) > 0.99
    cx, cy = 4 + 2 * 8 + 0.1 * 32, 4 + 1 * 8
    np.testing.assert_allclose(boxes[0].numpy(), [cx - 32, cy - 16, cx + 32, cy + 16], atol=1e-4)
    keep = nms(np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], np.float32), np.array([0.5, 0.9, 0.7]), 0.3)
    assert keep.tolist() == [1, 2]
