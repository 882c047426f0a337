"""The FLAME head model as a linear blend-skinning layer (FLAME, Li et al. 2017; the math of ``smplx.lbs``).

    flame = FlameModel.from_file("generic_model.pkl", shape_components=300)   # or an .npz
    verts = flame(expr [N, E], pose [N, 3 * joints])                       # [N, V, 3]
    verts = flame.motion_vertices(motion [..., E + 1])                      # FaceFormer's 51-d motion

Files: the official ``generic_model.pkl`` (a Python 2 pickle holding numpy arrays, chumpy ``Ch`` arrays
and a scipy sparse ``J_regressor``), read by :class:`FlamePickleUnpickler`: numpy arrays as
``flame_import`` reads them, every chumpy / scipy sparse object as an inert stand-in that only keeps its
pickled state (converted to numpy afterwards) -- no pickled code is executed and any other global is
refused. Or an ``.npz`` with the official array names (``FLAME_ARRAYS``, ``J_regressor`` dense).

Layout (FLAME 2017 / 2020): ``v_template [V, 3]``; ``shapedirs [V, 3, K]`` = identity components
``0 .. shape_components-1`` then expression components; ``posedirs [V, 3, 9 (J-1)]``; ``J_regressor
[J, V]``; ``weights [V, J]``; ``kintree_table [2, J]`` (row 0 = parents, root first); ``f [F, 3]``.
Joints: 0 global (root), 1 neck, 2 jaw, 3 / 4 eyes; a pose vector holds 3 axis-angle values per joint
in that order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from ..preprocess.flame_import import ArrayUnpickler, load_pickle

FLAME_ARRAYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "f")
JAW_JOINT = 2
AXIS_ANGLE = 3
# below this angle (radians) Rodrigues' coefficients use their Taylor series (exact to float precision
# and with clean gradients at the zero rotation every neutral frame starts from)
_SMALL_ANGLE = 1e-4


class FlameModelError(ValueError):
    """A FLAME model file that cannot be used (the message names the file and the array)."""


# ----------------------------------------------------------------------------- the official pickle
class _PickledState:
    """Inert stand-in for an object of a pickled class: keeps constructor arguments and state, runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_PickledState":
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def field(self, name: str) -> Any:
        state = self.state[0] if isinstance(self.state, tuple) else self.state
        return state.get(name) if isinstance(state, dict) else None


class _ChumpyArray(_PickledState):
    """A chumpy ``Ch``: its value is the pickled ``x``."""

    def to_numpy(self) -> np.ndarray:
        x = self.field("x")
        if isinstance(x, _ChumpyArray):
            return x.to_numpy()
        if not isinstance(x, np.ndarray):
            raise TypeError("a chumpy object without a stored array 'x' (a chumpy expression, not data)")
        return x


class _SparseMatrix(_PickledState):
    """A scipy CSC / CSR matrix: rebuilt dense from its pickled ``data`` / ``indices`` / ``indptr``."""

    def to_numpy(self) -> np.ndarray:
        shape = self.field("_shape") or self.field("shape")
        data, indices, indptr = (np.asarray(self.field(k)) for k in ("data", "indices", "indptr"))
        if shape is None or data.ndim != 1:
            raise TypeError("a sparse matrix without shape / data")
        csc = self.args_kind == "csc"
        rows, cols = (shape[1], shape[0]) if csc else tuple(shape)   # compressed axis first
        dense = np.zeros((rows, cols), dtype=data.dtype)
        for r in range(rows):
            lo, hi = int(indptr[r]), int(indptr[r + 1])
            dense[r, indices[lo:hi]] = data[lo:hi]
        return dense.T if csc else dense


def _sparse_class(kind: str) -> type:
    return type(f"_Sparse_{kind}", (_SparseMatrix,), {"args_kind": kind})


_SPARSE = {kind: _sparse_class(kind) for kind in ("csc", "csr")}


def _safe_reconstructor(cls: Any, base: Any, state: Any) -> _PickledState:
    """``copyreg._reconstructor`` (protocol 0/1 pickles), for the inert stand-ins only."""
    if not (isinstance(cls, type) and issubclass(cls, _PickledState)):
        raise TypeError(f"refusing to reconstruct {cls!r}")
    return cls.__new__(cls)


class FlamePickleUnpickler(ArrayUnpickler):
    """``flame_import``'s numpy-only unpickler plus inert stand-ins for chumpy and scipy sparse objects and
    the harmless builtins their pickles use (``set``, ``object``, ``copy_reg._reconstructor``)."""

    def substitute(self, module: str, name: str) -> Any:
        if module == "chumpy" or module.startswith("chumpy."):
            return _ChumpyArray
        if module.startswith("scipy.sparse") and name in ("csc_matrix", "csc_array", "csr_matrix", "csr_array"):
            return _SPARSE[name[:3]]
        if module in ("__builtin__", "builtins") and name in ("set", "frozenset", "object"):
            return {"set": set, "frozenset": frozenset, "object": object}[name]
        if module in ("copy_reg", "copyreg") and name == "_reconstructor":
            return _safe_reconstructor
        return None


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, (_ChumpyArray, _SparseMatrix)):
        return value.to_numpy()
    return np.asarray(value)


def read_flame_arrays(path: Union[str, Path]) -> dict[str, np.ndarray]:
    """The ``FLAME_ARRAYS`` of a ``generic_model.pkl`` or ``.npz`` as numpy; errors name the file and array."""
    path = Path(path)
    if not path.is_file():
        raise FlameModelError(f"{path}: FLAME model file not found")
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as z:
                raw: Mapping[str, Any] = {k: z[k] for k in z.files}
        elif path.suffix.lower() == ".pkl":
            raw = load_pickle(path, FlamePickleUnpickler)
        else:
            raise FlameModelError(f"{path}: unsupported FLAME model file (use generic_model.pkl or an .npz "
                                  f"with {', '.join(FLAME_ARRAYS)})")
    except FlameModelError:
        raise
    except Exception as e:  # noqa: BLE001 - refused globals, truncated files: one clear line
        raise FlameModelError(f"{path}: cannot read the FLAME model ({type(e).__name__}: {e})") from e
    if not isinstance(raw, Mapping):
        raise FlameModelError(f"{path}: expected a dict of arrays, found {type(raw).__name__}")
    missing = [k for k in FLAME_ARRAYS if k not in raw]
    if missing:
        raise FlameModelError(f"{path}: missing FLAME arrays {missing} (found {sorted(raw)})")
    out = {}
    for key in FLAME_ARRAYS:
        try:
            out[key] = _as_numpy(raw[key])
        except (TypeError, ValueError) as e:
            raise FlameModelError(f"{path}: {key}: {e}") from e
    return out


# ----------------------------------------------------------------------------- linear blend skinning
def rodrigues(axis_angle: torch.Tensor) -> torch.Tensor:
    """[..., 3] axis-angle -> [..., 3, 3] rotation matrices, R = I + a [r]x + b [r]x^2 with
    a = sin t / t, b = (1 - cos t) / t^2 (t = |r|)."""
    t2 = (axis_angle * axis_angle).sum(-1, keepdim=True)[..., None]       # [..., 1, 1]
    t = t2.clamp_min(_SMALL_ANGLE ** 2).sqrt()
    small = t2 < _SMALL_ANGLE ** 2
    a = torch.where(small, 1 - t2 / 6, torch.sin(t) / t)
    b = torch.where(small, 0.5 - t2 / 24, (1 - torch.cos(t)) / (t * t))
    x, y, z = axis_angle.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*axis_angle.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)
    return eye + a * k + b * (k @ k)


def rigid_transforms(rot: torch.Tensor, joints: torch.Tensor, parents: list[int]) -> torch.Tensor:
    """Per-joint 4x4 transforms that move rest-pose points to posed ones ([N, J, 3, 3] rotations about
    the rest joints [N, J, 3] composed down the kinematic tree) -> [N, J, 4, 4]."""
    n, j = joints.shape[:2]
    rel = joints.clone()
    rel[:, 1:] = joints[:, 1:] - joints[:, parents[1:]]
    local = torch.zeros(n, j, 4, 4, dtype=rot.dtype, device=rot.device)
    local[..., :3, :3] = rot
    local[..., :3, 3] = rel
    local[..., 3, 3] = 1
    chain = [local[:, 0]]
    for i in range(1, j):
        chain.append(chain[parents[i]] @ local[:, i])
    world = torch.stack(chain, 1)
    # remove the rest joint location: world @ [p - J; 1] for a rest point p
    offset = (world[..., :3, :3] @ joints[..., None])[..., 0]
    out = world.clone()
    out[..., :3, 3] = world[..., :3, 3] - offset
    return out


class FlameModel(nn.Module):
    """FLAME vertices from expression, pose and (optional) identity coefficients; all tensors are buffers
    (nothing here trains)."""

    def __init__(self, arrays: Mapping[str, np.ndarray], shape_components: int, expr_components: int,
                 source: str = "<arrays>"):
        super().__init__()
        a = {k: np.asarray(v) for k, v in arrays.items()}

        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise FlameModelError(f"{source}: {key}: {msg}")

        v = a["v_template"].shape[0]
        need(a["v_template"].shape == (v, 3), "v_template", f"shape {a['v_template'].shape}, need [V, 3]")
        dirs = a["shapedirs"]
        need(dirs.ndim == 3 and dirs.shape[:2] == (v, 3), "shapedirs", f"shape {dirs.shape}, need [{v}, 3, K]")
        need(dirs.shape[2] >= shape_components + expr_components, "shapedirs",
             f"{dirs.shape[2]} components < {shape_components} identity + {expr_components} expression")
        kintree = a["kintree_table"].astype(np.int64)
        j = kintree.shape[1] if kintree.ndim == 2 else 0
        need(kintree.ndim == 2 and kintree.shape[0] == 2 and j > JAW_JOINT, "kintree_table",
             f"shape {kintree.shape}, need [2, J] with J > {JAW_JOINT} (root, neck, jaw, ...)")
        parents = [-1] + [int(p) for p in kintree[0, 1:]]
        need(all(0 <= p < i for i, p in enumerate(parents) if i), "kintree_table",
             f"parents {parents} are not a tree listed root first")
        need(a["J_regressor"].shape == (j, v), "J_regressor", f"shape {a['J_regressor'].shape}, need [{j}, {v}]")
        need(a["weights"].shape == (v, j), "weights", f"shape {a['weights'].shape}, need [{v}, {j}]")
        pose_basis = 9 * (j - 1)
        posedirs = a["posedirs"]
        need(posedirs.shape == (v, 3, pose_basis), "posedirs", f"shape {posedirs.shape}, need [{v}, 3, {pose_basis}]")
        need(a["f"].ndim == 2 and a["f"].shape[1] == 3, "f", f"shape {a['f'].shape}, need [F, 3]")

        f32 = lambda x: torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)  # noqa: E731
        self.register_buffer("v_template", f32(a["v_template"]))
        self.register_buffer("shape_dirs", f32(dirs[:, :, :shape_components]))
        self.register_buffer("expr_dirs", f32(dirs[:, :, shape_components:shape_components + expr_components]))
        self.register_buffer("pose_dirs", f32(posedirs.reshape(v * 3, pose_basis).T))    # [9 (J-1), V*3]
        self.register_buffer("j_regressor", f32(a["J_regressor"]))
        self.register_buffer("lbs_weights", f32(a["weights"]))
        self.register_buffer("faces", torch.as_tensor(a["f"].astype(np.int64)))
        self.parents = parents
        self.num_joints, self.num_vertices = j, v
        self.shape_components, self.expr_components = shape_components, expr_components

    @classmethod
    def from_file(cls, path: Union[str, Path], shape_components: int, expr_components: int) -> "FlameModel":
        return cls(read_flame_arrays(path), shape_components, expr_components, source=str(path))

    def forward(self, expr: torch.Tensor, pose: torch.Tensor, shape: Optional[torch.Tensor] = None) -> torch.Tensor:
        """expr [N, E], pose [N, 3 J] (axis-angle per joint), shape [N or 1, S] or None (zero = the template
        identity) -> vertices [N, V, 3]."""
        n = expr.shape[0]
        v = self.v_template + torch.einsum("ne,vce->nvc", expr, self.expr_dirs)
        if shape is not None:
            v = v + torch.einsum("ns,vcs->nvc", shape, self.shape_dirs)
        joints = torch.einsum("jv,nvc->njc", self.j_regressor, v)
        rot = rodrigues(pose.reshape(n, self.num_joints, AXIS_ANGLE))
        eye = torch.eye(3, dtype=rot.dtype, device=rot.device)
        pose_feature = (rot[:, 1:] - eye).reshape(n, -1)
        v = v + (pose_feature @ self.pose_dirs).reshape(n, self.num_vertices, 3)
        transforms = rigid_transforms(rot, joints, self.parents)                       # [N, J, 4, 4]
        per_vertex = torch.einsum("vj,njab->nvab", self.lbs_weights, transforms[:, :, :3])  # [N, V, 3, 4]
        return (per_vertex[..., :3] @ v[..., None])[..., 0] + per_vertex[..., 3]

    def motion_pose(self, jaw: torch.Tensor) -> torch.Tensor:
        """[N] jaw opening (the first jaw axis-angle component) -> full pose [N, 3 J]: head, neck and eyes
        at rest, jaw = (jaw, 0, 0)."""
        pose = jaw.new_zeros(jaw.shape[0], self.num_joints * AXIS_ANGLE)
        pose[:, JAW_JOINT * AXIS_ANGLE] = jaw
        return pose

    def motion_vertices(self, motion: torch.Tensor, shape: Optional[torch.Tensor] = None) -> torch.Tensor:
        """FaceFormer motion [..., E + 1] (expression | jaw) -> vertices [..., V, 3] (shape: the identity;
        None = the template)."""
        lead = motion.shape[:-1]
        flat = motion.reshape(-1, motion.shape[-1])
        if flat.shape[1] != self.expr_components + 1:
            raise ValueError(f"motion has {flat.shape[1]} values per frame, the FLAME model takes "
                             f"{self.expr_components} expression + 1 jaw")
        verts = self(flat[:, :self.expr_components], self.motion_pose(flat[:, self.expr_components]), shape)
        return verts.reshape(*lead, self.num_vertices, 3)


def random_flame_arrays(num_vertices: int, shape_components: int, expr_components: int, seed: int = 0,
                        num_faces: int = 0) -> dict[str, np.ndarray]:
    """A random model in the official layout (5 joints: root, neck, jaw, eyes) for tests and smoke runs:
    every vertex skinned to one joint, blendshapes of about a millimetre per unit coefficient."""
    rng = np.random.default_rng(seed)
    joints = 5
    v = rng.normal(0.0, 0.05, (num_vertices, 3))
    owner = rng.integers(0, joints, num_vertices)
    weights = np.eye(joints)[owner]
    j_reg = np.zeros((joints, num_vertices))
    for j in range(joints):  # each joint = mean of its vertices (a regressor of rows summing to 1)
        members = np.flatnonzero(owner == j)
        j_reg[j, members if len(members) else np.arange(num_vertices)] = 1.0
    j_reg /= j_reg.sum(1, keepdims=True)
    faces = rng.integers(0, num_vertices, (num_faces or max(1, num_vertices // 2), 3))
    return {"v_template": v, "shapedirs": rng.normal(0, 1e-3, (num_vertices, 3, shape_components + expr_components)),
            "posedirs": rng.normal(0, 1e-4, (num_vertices, 3, 9 * (joints - 1))), "J_regressor": j_reg,
            "weights": weights, "kintree_table": np.array([[2 ** 32 - 1, 0, 1, 1, 1], list(range(joints))]),
            "f": faces}
