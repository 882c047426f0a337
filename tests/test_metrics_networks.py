"""Each metric network loads a random weight file saved in its official layout, strictly (a renamed,
missing or mis-shaped key is an error naming the file); the I3D torchscript and ArcFace ONNX calling
conventions; network-level FID(A, A) = 0 and batching that does not change Sync scores."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dualforce_mega.metrics import fvd, sync
from dualforce_mega.metrics.arcface import ArcFace, write_tiny_arcface
from dualforce_mega.metrics.fid import FrameFeatures
from dualforce_mega.metrics.frechet import frechet_distance_features
from dualforce_mega.metrics.inception import FIDInception
from dualforce_mega.metrics.r3d import R3D18, preprocess
from dualforce_mega.metrics.syncnet import SyncNet
from dualforce_mega.metrics.weights import WeightFileError, require_file

pytestmark = pytest.mark.usefixtures("single_thread")

# official key counts / first keys of the reference files' layouts (torchvision / pytorch-fid / syncnet)
LAYOUTS = {
    FIDInception: ("Conv2d_1a_3x3.conv.weight", "fc.bias", 23_850_960),
    R3D18: ("stem.0.weight", "layer4.1.conv2.1.running_var", 33_371_472),
    SyncNet: ("netcnnaud.0.weight", "netcnnlip.19.running_mean", None),
}


def _random_state_dict(cls) -> dict:
    torch.manual_seed(1)
    sd = cls().state_dict()
    return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in sd.items()}


@pytest.mark.parametrize("cls", list(LAYOUTS), ids=lambda c: c.__name__)
def test_official_layout_loads_strictly(cls, tmp_path):
    first, some, params = LAYOUTS[cls]
    sd = _random_state_dict(cls)
    assert first in sd and some in sd
    if params is not None:  # the published parameter count of the reference network
        assert sum(v.numel() for k, v in sd.items() if "running" not in k and "num_batches" not in k) == params
    path = tmp_path / "w.pth"
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, path)  # old files lack it
    model = cls.from_file(path)
    for k, v in model.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, sd[k]), k
    renamed = dict(sd)
    renamed["extra.weight"] = renamed.pop(first)
    torch.save(renamed, path)
    with pytest.raises(WeightFileError, match=r"w\.pth: not the .* layout"):
        cls.from_file(path)
    bad = dict(sd)
    bad[first] = bad[first][:1]
    torch.save(bad, path)
    with pytest.raises(WeightFileError, match="size mismatch"):
        cls.from_file(path)


def test_missing_weight_path_names_the_flag(tmp_path):
    with pytest.raises(WeightFileError, match="--syncnet: .*nope.model does not exist"):
        require_file(tmp_path / "nope.model", "--syncnet", "SyncNet weights")
    with pytest.raises(WeightFileError, match="--fid-inception: no path given"):
        require_file(None, "--fid-inception", "FID Inception weights")


def test_i3d_torchscript_convention(tmp_path):
    path = tmp_path / "i3d_torchscript.pt"
    fvd.tiny_i3d().save(str(path))
    net = fvd.load_i3d(path, torch.device("cpu"))
    clips = torch.randint(0, 256, (2, 3, 16, 40, 48), dtype=torch.uint8)
    torch.set_grad_enabled(False)
    feats = net(clips, rescale=True, resize=True, return_features=True)
    assert feats.shape == (2, fvd.I3D_FEATURE_DIM)
    # rescale=True on uint8 == rescale=False on x / 255 * 2 - 1 (the stylegan-v input convention)
    manual = net(clips.float() / 255 * 2 - 1, rescale=False, resize=True, return_features=True)
    torch.testing.assert_close(feats, manual)
    torch.set_grad_enabled(True)
    extractor = fvd.VideoFeatures("i3d", net, torch.device("cpu"), batch=1)
    np.testing.assert_allclose(extractor(clips.permute(0, 2, 3, 4, 1).numpy()), feats.double().numpy(), rtol=1e-5)
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(WeightFileError, match="junk.pt: not a TorchScript"):
        fvd.load_i3d(tmp_path / "junk.pt", torch.device("cpu"))


def test_video_clips():
    frames = np.arange(40).reshape(40, 1, 1, 1).astype(np.uint8)
    assert fvd.video_clips(frames, 1).shape == (1, 16, 1, 1, 1)
    all_clips = fvd.video_clips(frames, 0)
    assert all_clips.shape == (2, 16, 1, 1, 1) and all_clips[1, 0, 0, 0, 0] == 16
    with pytest.raises(ValueError, match="at least 16"):
        fvd.video_clips(frames[:10], 1)


def test_r3d_preprocess_matches_torchvision_kinetics_transform():
    clip = torch.randint(0, 256, (1, 2, 128, 171, 3), dtype=torch.uint8)   # already at the resize size
    x = preprocess(clip)
    assert x.shape == (1, 3, 2, 112, 112)
    raw = clip[0, 0, 8:120, 30:142, 0].float() / 255   # centre crop: round(16/2), round(59/2) = 8, 30
    torch.testing.assert_close(x[0, 0, 0], (raw - 0.43216) / 0.22803)


def test_arcface_onnx_layout(tmp_path):
    path = write_tiny_arcface(tmp_path / "arcface.onnx")
    net = ArcFace(path)
    assert (net.mean, net.std) == (127.5, 127.5)     # no Sub/Mul at the graph start
    crops = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3)).astype(np.uint8)
    emb = net.embed(crops, batch=2)
    assert emb.shape == (3, 512)
    np.testing.assert_allclose(emb[2:], net.embed(crops[2:]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[N, 112, 112, 3\]"):
        net.embed(crops[:, :64])
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(WeightFileError, match="junk.onnx: not a loadable ONNX"):
        ArcFace(tmp_path / "junk.onnx")


def test_fid_of_a_frame_set_with_itself_is_zero():
    net = FIDInception(width_div=16)
    frames = np.random.default_rng(0).integers(0, 256, (24, 48, 48, 3)).astype(np.uint8)
    feats = FrameFeatures(net, torch.device("cpu"), batch=7)(frames)
    assert feats.shape == (24, net.feature_dim)
    assert abs(frechet_distance_features(feats[:12], feats[:12])) < 1e-6
    assert frechet_distance_features(feats[:12], feats[12:]) > 0


def test_sync_scorer_batches_do_not_change_scores():
    torch.manual_seed(0)
    net = SyncNet(width_div=16)
    rng = np.random.default_rng(0)
    frames = torch.from_numpy(rng.uniform(0, 255, (14, 3, 224, 224)).astype(np.float32))
    wave = rng.uniform(-0.5, 0.5, 14 * sync.SAMPLES_PER_FRAME).astype(np.float32)
    a = sync.SyncScorer(net, torch.device("cpu"), batch=4)(frames, wave)
    b = sync.SyncScorer(net, torch.device("cpu"), batch=100)(frames, wave)
    assert len(a.window_conf) == 14 - 5
    np.testing.assert_allclose(a.mdist, b.mdist, rtol=1e-5)
    assert a.offset == b.offset
    with pytest.raises(ValueError, match="too short"):
        sync.SyncScorer(net, torch.device("cpu"))(frames[:5], wave)
