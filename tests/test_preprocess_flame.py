"""Step 05 FLAME: both precomputed formats, 20 -> 25 fps resampling and clip slicing against
hand-computed values, "no FLAME" never becoming zeros, and EMOCA's encoders in their checkpoint layout."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy

from dualforce_mega.encoders.emoca import EmocaConfig, EmocaEncoder
from dualforce_mega.preprocess.flame import EmocaRunner, build_flame_step
from dualforce_mega.preprocess.flame_import import (FLAME_DIM, FlameFormatError, find_flame_file, flame_for_clip,
                                                    read_flame, resample)

pytestmark = pytest.mark.usefixtures("single_thread")


def old_arrays(t: int = 3) -> dict[str, np.ndarray]:
    """EMOCA codes with recognisable values: expcode[i, j] = 100 i + j, posecode[i, j] = -(10 i + j)."""
    i = np.arange(t)[:, None]
    return {"expcode": (100 * i + np.arange(100)).astype(np.float32),
            "posecode": (-(10 * i + np.arange(6))).astype(np.float32),
            "shapecode": np.zeros((t, 100), np.float32)}


def test_old_format_slices_by_hand(tmp_path) -> None:
    np.savez(tmp_path / "v.npz", **old_arrays())
    seq = read_flame(tmp_path / "v.npz")
    assert seq.format == "emoca" and seq.fps == 25.0 and len(seq) == 3
    flame = seq.flame56()
    assert flame.shape == (3, FLAME_DIM) and flame.dtype == np.float32
    for i in range(3):
        np.testing.assert_array_equal(flame[i, :50], 100 * i + np.arange(50))            # expcode[:, :50]
        np.testing.assert_array_equal(flame[i, 50:53], [-(10 * i + 3), -(10 * i + 4), -(10 * i + 5)])  # jaw
        np.testing.assert_array_equal(flame[i, 53:56], [-(10 * i), -(10 * i + 1), -(10 * i + 2)])      # global


def test_new_format_and_global_pose_keys(tmp_path) -> None:
    t = 4
    expr = np.arange(t * 60, dtype=np.float32).reshape(t, 60)
    jaw = np.full((t, 3), 0.5, np.float32)
    rot = np.tile(np.array([0.1, 0.2, 0.3], np.float32), (t, 1))
    save_numpy({"expr": expr, "jaw_pose": jaw, "rotation": rot, "fps": np.array([20.0])}, str(tmp_path / "a.safetensors"))
    torch.save({"expr": torch.from_numpy(expr), "jaw_pose": torch.from_numpy(jaw),
                "global_orient": torch.from_numpy(rot)}, tmp_path / "b.pt")
    a, b = read_flame(tmp_path / "a.safetensors"), read_flame(tmp_path / "b.pt")
    assert a.format == b.format == "flame" and a.fps == 20.0 and b.fps == 25.0  # the file's fps wins
    want = np.concatenate([expr[:, :50], jaw, rot], axis=1)
    np.testing.assert_array_equal(a.flame56(), want)
    np.testing.assert_array_equal(b.flame56(), want)
    # expression + jaw only: readable (FaceFormer's 51-d), but no 56-d FLAME
    np.savez(tmp_path / "c.npz", expr=expr, jaw_pose=jaw)
    c = read_flame(tmp_path / "c.npz")
    assert c.global_pose is None and c.jaw_pose.shape == (t, 3)
    with pytest.raises(FlameFormatError, match="c.npz.*no global head pose"):
        c.flame56()


def test_emoca_per_frame_folders_in_natural_order(tmp_path) -> None:
    root = tmp_path / "video1"
    for frame in (10, 2, 1):                        # "10" sorts before "2" as text
        d = root / f"{frame:d}_000"
        d.mkdir(parents=True)
        np.save(d / "exp.npy", np.full(50, frame, np.float32))
        np.save(d / "pose.npy", np.full(6, -frame, np.float32))
    assert find_flame_file(tmp_path, "video1") == root
    seq = read_flame(root)
    np.testing.assert_array_equal(seq.expr[:, 0], [1, 2, 10])
    np.testing.assert_array_equal(seq.jaw_pose[:, 0], [-1, -2, -10])


def test_resample_20_to_25_by_hand() -> None:
    v = np.array([[0.0, 1.0], [10.0, 1.0], [20.0, 3.0], [30.0, 3.0]])  # 4 frames at 20 fps = 0.2 s
    out = resample(v, 20.0, 25.0)
    # 25-fps frames at 0, .04, .08, .12, .16 s = source positions 0, .8, 1.6, 2.4, 3.2 (held at 3)
    np.testing.assert_allclose(out, [[0, 1], [8, 1], [16, 2.2], [24, 3], [30, 3]], atol=1e-6)
    np.testing.assert_allclose(resample(out, 25.0, 25.0), out)
    assert len(resample(np.zeros((100, 1)), 20.0, 25.0)) == 125  # 5 s stay 5 s
    assert len(resample(np.zeros((125, 1)), 25.0, 20.0)) == 100


def test_sequence_resampled_and_sliced_for_a_clip(tmp_path) -> None:
    arrays = old_arrays(t=10)
    arrays["fps"] = np.array(20.0)
    np.savez(tmp_path / "talk.npz", **arrays)
    seq = read_flame(tmp_path / "talk.npz")               # 10 frames at 20 fps = 0.5 s
    assert len(seq.resampled(25.0)) == 13 and seq.resampled(25.0).fps == 25.0  # ceil(0.5 * 25 - eps)
    rows = flame_for_clip(seq, start_s=0.2, num_frames=3, fps=25)
    # times .2, .24, .28 s = source positions 4, 4.8, 5.6; expcode[i, 0] = 100 i
    np.testing.assert_allclose(rows[:, 0], [400, 480, 560], atol=1e-3)
    np.testing.assert_allclose(rows[:, 55], [-42, -50, -58], atol=1e-4)  # global pose z = -(10 i + 2)
    # the last 25-fps frames inside the last 20-fps frame interval hold its value (position 9.6 -> 9)
    np.testing.assert_allclose(flame_for_clip(seq, start_s=0.4, num_frames=3, fps=25)[:, 0], [800, 880, 900],
                               atol=1e-3)
    assert flame_for_clip(seq, start_s=0.46, num_frames=2, fps=25) is None    # .50 s is past the 0.5 s covered
    assert flame_for_clip(seq, start_s=-0.1, num_frames=2, fps=25) is None


def test_bad_files_name_the_file(tmp_path) -> None:
    np.savez(tmp_path / "none.npz", foo=np.zeros(3))
    with pytest.raises(FlameFormatError, match="none.npz.*neither.*foo"):
        read_flame(tmp_path / "none.npz")
    both = {**old_arrays(), "expr": np.zeros((3, 50)), "jaw_pose": np.zeros((3, 3))}
    np.savez(tmp_path / "both.npz", **both)
    with pytest.raises(FlameFormatError, match="both"):
        read_flame(tmp_path / "both.npz")
    np.savez(tmp_path / "short.npz", expcode=np.zeros((3, 20)), posecode=np.zeros((3, 6)))
    with pytest.raises(FlameFormatError, match="expcode.*>=50"):
        read_flame(tmp_path / "short.npz")
    torch.save({"expcode": math.sqrt}, tmp_path / "code.pt")  # pickled code: refused, never run
    with pytest.raises(FlameFormatError, match="code.pt: cannot read"):
        read_flame(tmp_path / "code.pt")
    (tmp_path / "x.txt").write_text("1 2 3")
    with pytest.raises(FlameFormatError, match="unsupported"):
        read_flame(tmp_path / "x.txt")


class _Exploit:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickle_reads_arrays_and_nothing_else(tmp_path, capsys) -> None:
    import pickle
    from collections import OrderedDict

    arrays = old_arrays()
    for protocol in (2, 4, 5):  # raw bytes via _codecs (<= 2), inline (3, 4), out-of-band buffers (5)
        (tmp_path / "ok.pkl").write_bytes(pickle.dumps(OrderedDict(arrays), protocol=protocol))
        seq = read_flame(tmp_path / "ok.pkl")
        np.testing.assert_array_equal(seq.expr, arrays["expcode"][:, :50])
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"expcode": _Exploit()}))
    with pytest.raises(FlameFormatError, match="evil.pkl.*refusing to load builtins.print"):
        read_flame(tmp_path / "evil.pkl")
    assert "pickled code ran" not in capsys.readouterr().out


def test_step_without_flame_is_none_never_zeros(tmp_path) -> None:
    res = build_flame_step()("raw/clipA.mp4", 0.0, 5, 25)
    assert res.flame is None and res.source == "none" and "no --flame-dir" in res.reason
    np.savez(tmp_path / "clipA.npz", **old_arrays(t=10))
    step = build_flame_step(flame_dir=str(tmp_path))
    got = step("raw/clipA.mp4", 0.04, 5, 25)
    assert got.source.startswith("precomputed:") and got.flame.shape == (5, FLAME_DIM)
    np.testing.assert_allclose(got.flame[:, 0], [100, 200, 300, 400, 500], atol=1e-3)
    missing = step("raw/clipB.mp4", 0.0, 5, 25)
    assert missing.flame is None and "clipB" in missing.reason
    short = step("raw/clipA.mp4", 0.0, 20, 25)
    assert short.flame is None and "does not cover" in short.reason


def test_random_emoca_step_on_crops() -> None:
    step = build_flame_step(random_models="tiny", device="cpu")
    crops = np.random.default_rng(0).integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    res = step("raw/x.mp4", 0.0, 3, 25, frames=crops)
    assert res.source == "emoca-random-tiny" and res.flame.shape == (3, FLAME_DIM)
    assert np.isfinite(res.flame).all() and res.flame.std(axis=0).max() > 0
    assert step("raw/x.mp4", 0.0, 3, 25).flame is None  # EMOCA without crops: no FLAME, with a reason


# ---------------------------------------------------------------------------------------------- EMOCA
def resnet50_keys(prefix: str) -> dict[str, tuple[int, ...]]:
    """torchvision ResNet-50 parameter/buffer names and shapes without ``fc`` (EMOCA's ResNet.py)."""
    keys: dict[str, tuple[int, ...]] = {}

    def bn(name: str, c: int) -> None:
        for p in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}{name}.{p}"] = (c,)
        keys[f"{prefix}{name}.num_batches_tracked"] = ()

    keys[prefix + "conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    for li, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for b in range(blocks):
            n = f"layer{li}.{b}."
            keys[prefix + n + "conv1.weight"] = (planes, inplanes, 1, 1)
            bn(n + "bn1", planes)
            keys[prefix + n + "conv2.weight"] = (planes, planes, 3, 3)
            bn(n + "bn2", planes)
            keys[prefix + n + "conv3.weight"] = (4 * planes, planes, 1, 1)
            bn(n + "bn3", 4 * planes)
            if b == 0:
                keys[prefix + n + "downsample.0.weight"] = (4 * planes, inplanes, 1, 1)
                bn(n + "downsample.1", 4 * planes)
            inplanes = 4 * planes
    return keys


def test_emoca_full_size_layout_matches_the_checkpoint_names() -> None:
    want = {}
    for part, out in (("E_flame", 236), ("E_expression", 53)):
        want.update(resnet50_keys(f"{part}.encoder."))
        want.update({f"{part}.layers.0.weight": (1024, 2048), f"{part}.layers.0.bias": (1024,),
                     f"{part}.layers.2.weight": (out, 1024), f"{part}.layers.2.bias": (out,)})
    with torch.device("meta"):
        model = EmocaEncoder(EmocaConfig())
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == want


def _zero_heads(model: EmocaEncoder, flame_bias: torch.Tensor, exp_bias: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        for head, bias in ((model.E_flame.layers[2], flame_bias), (model.E_expression.layers[2], exp_bias)):
            head.weight.zero_()
            head.bias.copy_(bias)
    return {"deca." + k: v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("parallel", [False, True])
def test_emoca_loads_lightning_state_dict_and_assembles_codes(tmp_path, parallel) -> None:
    cfg = EmocaConfig.tiny()
    flame_bias = torch.arange(cfg.n_param, dtype=torch.float32)     # pose = entries 200..205
    exp_bias = -torch.arange(cfg.n_exp + 3, dtype=torch.float32)    # exp 50 | jaw 3
    src = EmocaEncoder(EmocaConfig(**{**cfg.__dict__, "parallel": parallel}))
    state = _zero_heads(src, flame_bias, exp_bias)
    if parallel:  # Lightning stores the shared backbone under both names
        state.update({"deca.E_expression.resnet." + k[len("deca.E_flame."):]: v for k, v in state.items()
                      if k.startswith("deca.E_flame.")})
    state["deca.E_detail.layers.0.weight"] = torch.zeros(2)          # other branches are ignored
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "emoca.pt")
    model = EmocaEncoder.from_pretrained(tmp_path / "emoca.pt", cfg)
    assert model.cfg.parallel == parallel and model.cfg.exp_jaw_pose and not model.cfg.exp_global_pose
    flame = EmocaRunner(model)(np.zeros((2, 40, 40, 3), np.uint8))
    want = np.concatenate([-np.arange(50), [-50, -51, -52], [200, 201, 202]])  # expr | jaw (EMOCA) | global (DECA)
    np.testing.assert_allclose(flame, np.broadcast_to(want, (2, 56)), atol=1e-5)

    state.pop("deca.E_flame.encoder.bn1.running_mean")
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="broken.pt.*missing.*E_flame.encoder.bn1.running_mean"):
        EmocaEncoder.from_pretrained(tmp_path / "broken.pt", cfg)
