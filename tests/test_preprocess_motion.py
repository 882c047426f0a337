"""Step 04 motion: the LivePortrait motion extractor (official key layout loaded strictly, bins ->
degrees, the 70-d layout) and the MediaPipe FaceMesh + PnP fallback on a real face with a planted
head rotation and shift."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dualforce_mega.encoders.liveportrait import (ChannelsFirstLayerNorm, LivePortraitMotionExtractor,
                                                  MotionExtractorConfig, bins_to_degrees)
from dualforce_mega.preprocess.head_pose import euler_from_matrix, matrix_from_euler
from dualforce_mega.preprocess.motion import (LivePortraitMotion, MotionLayout, build_motion_extractor,
                                              random_liveportrait)

pytestmark = pytest.mark.usefixtures("single_thread")


def official_motion_extractor_keys(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), num_kp=21, bins=66
                                   ) -> dict[str, tuple[int, ...]]:
    """The key -> shape table of LivePortrait's motion_extractor.pth, written out from the
    architecture description (ConvNeXt-V2 backbone wrapped as ``detector``), not from our module."""
    keys: dict[str, tuple[int, ...]] = {}
    p = "detector."
    keys[p + "downsample_layers.0.0.weight"] = (dims[0], 3, 4, 4)
    keys[p + "downsample_layers.0.0.bias"] = (dims[0],)
    keys[p + "downsample_layers.0.1.weight"] = (dims[0],)
    keys[p + "downsample_layers.0.1.bias"] = (dims[0],)
    for i in range(1, 4):
        keys[p + f"downsample_layers.{i}.0.weight"] = (dims[i - 1],)
        keys[p + f"downsample_layers.{i}.0.bias"] = (dims[i - 1],)
        keys[p + f"downsample_layers.{i}.1.weight"] = (dims[i], dims[i - 1], 2, 2)
        keys[p + f"downsample_layers.{i}.1.bias"] = (dims[i],)
    for i, (depth, d) in enumerate(zip(depths, dims)):
        for j in range(depth):
            b = p + f"stages.{i}.{j}."
            keys.update({b + "dwconv.weight": (d, 1, 7, 7), b + "dwconv.bias": (d,), b + "norm.weight": (d,),
                         b + "norm.bias": (d,), b + "pwconv1.weight": (4 * d, d), b + "pwconv1.bias": (4 * d,),
                         b + "grn.gamma": (1, 1, 1, 4 * d), b + "grn.beta": (1, 1, 1, 4 * d),
                         b + "pwconv2.weight": (d, 4 * d), b + "pwconv2.bias": (d,)})
    keys[p + "norm.weight"] = keys[p + "norm.bias"] = (dims[-1],)
    for head, out in (("kp", 3 * num_kp), ("scale", 1), ("pitch", bins), ("yaw", bins), ("roll", bins), ("t", 3),
                      ("exp", 3 * num_kp)):
        keys[p + f"fc_{head}.weight"] = (out, dims[-1])
        keys[p + f"fc_{head}.bias"] = (out,)
    return keys


def test_official_state_dict_loads_strictly(tmp_path) -> None:
    state = {k: torch.randn(shape) for k, shape in official_motion_extractor_keys().items()}
    path = tmp_path / "motion_extractor.pth"
    torch.save(state, path)
    model = LivePortraitMotionExtractor.from_pretrained(path)
    assert set(model.state_dict()) == set(state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    out = model(torch.rand(2, 3, 256, 256))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "kp": (2, 63), "exp": (2, 63), "pitch": (2, 66), "yaw": (2, 66), "roll": (2, 66), "t": (2, 3), "scale": (2, 1)}

    # safetensors with the same keys; a missing or extra key is refused, naming the key
    from safetensors.torch import save_file
    save_file(state, str(tmp_path / "m.safetensors"))
    LivePortraitMotionExtractor.from_pretrained(tmp_path / "m.safetensors")
    broken = dict(state)
    broken.pop("detector.fc_exp.bias")
    broken["detector.head.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="fc_exp.bias.*head.weight"):
        LivePortraitMotionExtractor.from_pretrained(tmp_path / "broken.pth")


def test_pickled_code_is_never_executed(tmp_path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"detector.norm.weight": torch.zeros(1), "x": math.sqrt}, path)  # a callable: not weights-only
    with pytest.raises(ValueError, match="weights_only"):
        LivePortraitMotionExtractor.from_pretrained(path)


def test_channels_first_layer_norm_matches_formula() -> None:
    ln = ChannelsFirstLayerNorm(5)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2.0)
        ln.bias.uniform_(-1.0, 1.0)
    x = torch.randn(2, 5, 3, 4)
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    ref = ln.weight[:, None, None] * (x - u) / torch.sqrt(s + 1e-6) + ln.bias[:, None, None]
    torch.testing.assert_close(ln(x), ref)


def test_bins_to_degrees_hand_computed() -> None:
    big = 1e4
    logits = torch.full((5, 66), -big)
    logits[0, 0] = big                     # all mass on bin 0 -> 0 * 3 - 97.5
    logits[1, 65] = big                    # bin 65 -> 65 * 3 - 97.5 = 97.5
    logits[2, 32] = logits[2, 33] = big    # half / half -> 32.5 * 3 - 97.5 = 0
    logits[3] = 0.0                        # uniform -> mean index 32.5 -> 0
    logits[4, 10], logits[4, 20] = math.log(0.25), math.log(0.75)  # 0.25*10 + 0.75*20 = 17.5 -> -45
    torch.testing.assert_close(bins_to_degrees(logits), torch.tensor([-97.5, 97.5, 0.0, 0.0, -45.0]))


def test_liveportrait_motion_layout_and_batching() -> None:
    """Zero head weights make every output its bias: the packed rows must hold exp | angles | t | scale
    in that order, identical for every frame and batch size."""
    lp = random_liveportrait("tiny", device="cpu")
    det = lp.model.detector
    exp = torch.arange(63, dtype=torch.float32)
    kp = -torch.arange(63, dtype=torch.float32)
    pose_logits = torch.full((66,), -1e4)
    pose_logits[40] = 1e4                  # 40 * 3 - 97.5 = 22.5 degrees
    with torch.no_grad():
        for head, bias in (("exp", exp), ("kp", kp), ("pitch", pose_logits), ("yaw", pose_logits.roll(-20)),
                           ("roll", pose_logits.roll(5)), ("t", torch.tensor([0.1, -0.2, 0.3])),
                           ("scale", torch.tensor([1.5]))):
            fc = getattr(det, f"fc_{head}")
            fc.weight.zero_()
            fc.bias.copy_(bias)
    frames = np.random.default_rng(0).integers(0, 256, size=(5, 64, 48, 3), dtype=np.uint8)
    lp.batch_size = 2
    res = lp(frames)
    layout = MotionLayout(21)
    assert res.struct.shape == (5, 70) and res.kp_canonical.shape == (63,) and layout.dim == 70
    want = np.concatenate([exp.numpy(), [22.5, 22.5 - 60.0, 22.5 + 15.0], [0.1, -0.2, 0.3], [1.5]])
    np.testing.assert_allclose(res.struct, np.broadcast_to(want, (5, 70)), atol=1e-4)
    np.testing.assert_allclose(res.kp_canonical, kp.numpy(), atol=1e-5)
    assert res.extractor == "liveportrait-random-tiny"


def test_random_extractor_frames_are_independent_of_batch_size() -> None:
    lp = random_liveportrait("tiny", device="cpu")
    frames = np.random.default_rng(1).integers(0, 256, size=(5, 256, 256, 3), dtype=np.uint8)
    lp.batch_size = 5
    a, _ = lp.per_frame(frames)
    lp.batch_size = 2
    b, _ = lp.per_frame(frames)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert a.std(dim=0).max() > 0  # different frames give different motion


def test_euler_convention() -> None:
    # Rz(90): x -> y (image right -> down, a clockwise turn on screen since y points down)
    np.testing.assert_allclose(matrix_from_euler(np.array([0.0, 0.0, 90.0])),
                               [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-12)
    np.testing.assert_allclose(matrix_from_euler(np.array([90.0, 0.0, 0.0])),
                               [[1, 0, 0], [0, 0, -1], [0, 1, 0]], atol=1e-12)
    angles = np.array([[10.0, -20.0, 5.0], [-30.0, 40.0, -60.0]])
    np.testing.assert_allclose(euler_from_matrix(matrix_from_euler(angles)), angles, atol=1e-9)


# ---------------------------------------------------------------- MediaPipe fallback on a real face
def planted_face_video(num_frames: int = 24, size: int = 256):
    """The scikit-image astronaut's face crop, rotated in the image plane about the face centre by a
    known angle and shifted sideways by a known amount per frame."""
    import cv2
    from skimage import data

    from dualforce_mega.preprocess.head_pose import estimate_head_pose

    img = data.astronaut()                      # 512 x 512 portrait
    cx, cy = estimate_head_pose(img[None], static_images=True).landmarks[0].mean(axis=0)[:2]
    phase = 2 * np.pi * np.arange(num_frames) / num_frames
    angle = 15.0 * np.sin(phase)                # degrees, counter-clockwise on screen
    shift = 20.0 * np.sin(2 * phase + 1.0)      # pixels to the right (in the 512 image)
    top, left, side = 30, 100, 300              # the face crop
    frames = []
    for a, dx in zip(angle, shift):
        m = cv2.getRotationMatrix2D((float(cx), float(cy)), float(a), 1.0)  # counter-clockwise for a > 0
        m[0, 2] += dx
        moved = cv2.warpAffine(img, m, img.shape[1::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        frames.append(cv2.resize(moved[top:top + side, left:left + side], (size, size), interpolation=cv2.INTER_AREA))
    return np.stack(frames), angle, shift


@pytest.fixture(scope="module")
def planted():
    pytest.importorskip("mediapipe")
    return planted_face_video()


def test_head_pose_follows_planted_rotation(planted) -> None:
    from dualforce_mega.preprocess.head_pose import estimate_head_pose

    frames, angle, _ = planted
    track = estimate_head_pose(frames)
    assert track.found.all()
    assert track.landmarks.shape == (len(frames), 468, 3) and track.angles.shape == (len(frames), 3)
    # counter-clockwise on screen = negative roll in the x-right / y-down convention
    assert np.corrcoef(track.angles[:, 2], -angle)[0, 1] > 0.8
    # an image-plane rotation is not a nod or a turn: pitch and yaw stay nearly constant
    assert np.ptp(track.angles[:, :2], axis=0).max() < 0.5 * np.ptp(angle)

    blank = np.full((2, 64, 64, 3), 127, np.uint8)
    none = estimate_head_pose(blank, static_images=True)
    assert not none.found.any() and np.isnan(none.angles).all()


def test_mediapipe_motion_vector(planted) -> None:
    frames, angle, shift = planted
    extractor = build_motion_extractor(None)
    res = extractor(frames)
    layout = MotionLayout(21)
    assert res.extractor == "mediapipe" and res.missing_frames == 0
    assert res.struct.shape == (len(frames), 70) and res.struct.dtype == np.float32
    assert res.kp_canonical.shape == (63,) and np.isfinite(res.struct).all()
    assert np.corrcoef(res.struct[:, layout.angles][:, 2], -angle)[0, 1] > 0.8        # roll
    assert np.corrcoef(res.struct[:, layout.t][:, 0], shift)[0, 1] > 0.8              # t_x
    # a rigid image motion carries (almost) no expression: the pose-free offsets stay small next
    # to the keypoint spread of the canonical shape
    spread = np.abs(res.kp_canonical).mean()
    assert np.abs(res.struct[:, layout.exp]).mean() < 0.1 * spread

    # frames without a face are filled from their neighbours, a clip without any face is None
    gap = frames.copy()
    gap[5] = 127
    filled = extractor(gap)
    assert filled.missing_frames == 1 and np.isfinite(filled.struct).all()
    assert extractor(np.full((3, 64, 64, 3), 127, np.uint8)) is None


def test_build_motion_extractor_loads_liveportrait(tmp_path) -> None:
    cfg = MotionExtractorConfig.tiny()
    torch.save(LivePortraitMotionExtractor(cfg).state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(ValueError, match="wrong shapes"):  # the official (full-size) layout is required
        build_motion_extractor(str(tmp_path / "tiny.pth"), device="cpu")
    assert isinstance(random_liveportrait(), LivePortraitMotion)
