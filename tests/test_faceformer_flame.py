"""FLAME linear blend skinning against hand-computed rotations, and the official generic_model.pkl read
without running pickled code (chumpy / scipy objects as inert stand-ins, everything else refused)."""
from __future__ import annotations

import math
import os
import pickle
import sys
import types

import numpy as np
import pytest
import scipy.sparse
import torch

from dualforce_mega.models.flame import (FLAME_ARRAYS, JAW_JOINT, FlameModel, FlameModelError, random_flame_arrays,
                                         read_flame_arrays)

pytestmark = pytest.mark.usefixtures("single_thread")

V, SHAPE, EXPR = 40, 3, 50


def arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Float values representable in float32 (the model's buffers), so float64 references are exact."""
    a = random_flame_arrays(V, SHAPE, EXPR, seed=seed)
    return {k: v.astype(np.float32).astype(np.float64) if v.dtype.kind == "f" else v for k, v in a.items()}


def rot_x(t: float) -> np.ndarray:
    c, s = math.cos(t), math.sin(t)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def rot_y(t: float) -> np.ndarray:
    c, s = math.cos(t), math.sin(t)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def flame64(a: dict[str, np.ndarray]) -> FlameModel:
    return FlameModel(a, SHAPE, EXPR).double()


def test_rest_pose_is_the_template_plus_blendshapes() -> None:
    a = arrays()
    f = flame64(a)
    expr = np.random.default_rng(1).normal(size=(2, EXPR))
    shape = np.random.default_rng(2).normal(size=(2, SHAPE))
    got = f(torch.from_numpy(expr), torch.zeros(2, 15, dtype=torch.float64), torch.from_numpy(shape)).numpy()
    want = a["v_template"][None] + np.einsum("ne,vce->nvc", expr, a["shapedirs"][:, :, SHAPE:]) \
        + np.einsum("ns,vcs->nvc", shape, a["shapedirs"][:, :, :SHAPE])
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_jaw_rotates_jaw_vertices_about_the_jaw_joint_with_pose_correctives() -> None:
    a = arrays()
    f = flame64(a)
    theta, expr = 0.3, np.random.default_rng(3).normal(size=(1, EXPR))
    motion = torch.from_numpy(np.concatenate([expr, [[theta]]], 1))
    got = f.motion_vertices(motion)[0].numpy()

    shaped = a["v_template"] + np.einsum("e,vce->vc", expr[0], a["shapedirs"][:, :, SHAPE:])
    joints = a["J_regressor"] @ shaped
    feature = np.zeros(9 * 4)                       # (R_j - I) of joints 1..4, row-major; only the jaw turns
    feature[9 * (JAW_JOINT - 1):9 * JAW_JOINT] = (rot_x(theta) - np.eye(3)).reshape(-1)
    posed = shaped + np.einsum("k,vck->vc", feature, a["posedirs"])
    owner = a["weights"].argmax(1)
    for v in range(V):
        if owner[v] == JAW_JOINT:
            want = rot_x(theta) @ (posed[v] - joints[JAW_JOINT]) + joints[JAW_JOINT]
        else:    # root, neck and eyes stay at rest (the eyes hang off the neck, not the jaw)
            want = posed[v]
        np.testing.assert_allclose(got[v], want, atol=1e-12, err_msg=f"vertex {v} (joint {owner[v]})")
    assert (owner == JAW_JOINT).any() and (owner != JAW_JOINT).any()


def test_global_rotation_turns_the_whole_head_about_the_root() -> None:
    a = arrays()
    f = flame64(a)
    pose = torch.zeros(1, 15, dtype=torch.float64)
    pose[0, 1] = 0.4                                # root, about y
    got = f(torch.zeros(1, EXPR, dtype=torch.float64), pose)[0].numpy()
    root = (a["J_regressor"] @ a["v_template"])[0]
    want = (rot_y(0.4) @ (a["v_template"] - root).T).T + root   # no pose correctives for the root
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_small_angles_and_gradients_at_rest() -> None:
    f = flame64(arrays())
    jaw = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    motion = torch.cat([torch.zeros(1, EXPR, dtype=torch.float64), jaw[:, None]], 1)
    f.motion_vertices(motion).sum().backward()
    assert torch.isfinite(jaw.grad).all() and jaw.grad.abs().item() > 0
    tiny = torch.cat([torch.zeros(1, EXPR, dtype=torch.float64), torch.full((1, 1), 1e-6, dtype=torch.float64)], 1)
    rest = f.motion_vertices(torch.zeros(1, EXPR + 1, dtype=torch.float64))
    assert 0 < (f.motion_vertices(tiny) - rest).abs().max() < 1e-6


# ----------------------------------------------------------------------------- the official pickle
class _Ch:
    """Pickles like chumpy's Ch (state = __dict__ without its weak references)."""

    def __init__(self, x: np.ndarray):
        self.x = x
        self._dirty_vars = {"x"}
        self._itr = None
        self._make_dense = False
        self._make_sparse = False
        self._depends_on_deps = {}

    def __getstate__(self) -> dict:
        return dict(self.__dict__)


def official_pickle(a: dict[str, np.ndarray], protocol: int) -> bytes:
    """generic_model.pkl's structure: chumpy arrays, a scipy CSC J_regressor, numpy arrays, strings."""
    module = types.ModuleType("chumpy.ch")
    _Ch.__module__, _Ch.__qualname__ = "chumpy.ch", "Ch"
    module.Ch = _Ch
    saved = {k: sys.modules.get(k) for k in ("chumpy", "chumpy.ch")}
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = types.ModuleType("chumpy"), module
    try:
        obj = {"v_template": _Ch(a["v_template"]), "shapedirs": _Ch(a["shapedirs"]), "posedirs": a["posedirs"],
               "J_regressor": scipy.sparse.csc_matrix(a["J_regressor"]), "weights": _Ch(a["weights"]),
               "kintree_table": a["kintree_table"].astype(np.uint32), "f": a["f"].astype(np.uint32),
               "J": _Ch(a["J_regressor"] @ a["v_template"]), "bs_style": "lbs", "bs_type": "lrotmin"}
        return pickle.dumps(obj, protocol=protocol)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_official_pickle_equals_the_npz(tmp_path, protocol) -> None:
    a = arrays()
    (tmp_path / "generic_model.pkl").write_bytes(official_pickle(a, protocol))
    np.savez(tmp_path / "flame.npz", **{k: a[k] for k in FLAME_ARRAYS})
    from_pkl, from_npz = read_flame_arrays(tmp_path / "generic_model.pkl"), read_flame_arrays(tmp_path / "flame.npz")
    for k in FLAME_ARRAYS:
        np.testing.assert_array_equal(from_pkl[k].astype(np.float64), from_npz[k].astype(np.float64), err_msg=k)
    motion = torch.randn(3, EXPR + 1, dtype=torch.float64) * 0.1
    m1 = FlameModel.from_file(tmp_path / "generic_model.pkl", SHAPE, EXPR).double()
    m2 = FlameModel.from_file(tmp_path / "flame.npz", SHAPE, EXPR).double()
    torch.testing.assert_close(m1.motion_vertices(motion), m2.motion_vertices(motion))


class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path) -> None:
    marker = tmp_path / "pwned"
    a = arrays()
    cases = {
        "top": {**{k: a[k] for k in FLAME_ARRAYS}, "v_template": _Exploit(str(marker))},
        # hidden inside what looks like a chumpy array's state
        "nested": {**{k: a[k] for k in FLAME_ARRAYS}, "shapedirs": {"x": [_Exploit(str(marker))]}},
    }
    for name, obj in cases.items():
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=2))
        with pytest.raises(FlameModelError, match=f"{name}.pkl.*refusing to load (posix|os|nt).system"):
            FlameModel.from_file(path, SHAPE, EXPR)
    # copy_reg._reconstructor (protocol 0) with a real class instead of a stand-in
    evil = b"ccopy_reg\n_reconstructor\n(c__builtin__\nset\nc__builtin__\nobject\nNtR."
    (tmp_path / "recon.pkl").write_bytes(evil)
    with pytest.raises(FlameModelError, match="recon.pkl.*refusing to reconstruct"):
        read_flame_arrays(tmp_path / "recon.pkl")
    assert not marker.exists()


def test_bad_layouts_name_the_file_and_array(tmp_path) -> None:
    a = arrays()
    np.savez(tmp_path / "short.npz", **{k: a[k] for k in FLAME_ARRAYS if k != "posedirs"})
    with pytest.raises(FlameModelError, match=r"short.npz: missing FLAME arrays \['posedirs'\]"):
        FlameModel.from_file(tmp_path / "short.npz", SHAPE, EXPR)
    np.savez(tmp_path / "few.npz", **{k: a[k] for k in FLAME_ARRAYS})
    with pytest.raises(FlameModelError, match="few.npz: shapedirs: 53 components < 300 identity"):
        FlameModel.from_file(tmp_path / "few.npz", 300, EXPR)
    bad = {k: a[k] for k in FLAME_ARRAYS}
    bad["weights"] = bad["weights"][:, :3]
    np.savez(tmp_path / "w.npz", **bad)
    with pytest.raises(FlameModelError, match=r"w.npz: weights: shape \(40, 3\), need \[40, 5\]"):
        FlameModel.from_file(tmp_path / "w.npz", SHAPE, EXPR)
    with pytest.raises(FlameModelError, match="nothere.pkl: FLAME model file not found"):
        read_flame_arrays(tmp_path / "nothere.pkl")
