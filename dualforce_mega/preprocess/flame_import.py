"""Precomputed FLAME parameters (EMOCA / FLAME trackers) -> per-video-frame ``flame [N, 56]``.

Reader + resampler API (the data pipeline's step 05 and the FaceFormer baseline use the same)::

    seq = read_flame(path, default_fps=25.0)     # FlameSequence: expr [T, 50], jaw_pose [T, 3],
                                                 # global_pose [T, 3] or None, fps, format
    seq25 = seq.resampled(25.0)                  # linear interpolation in time (below)
    flame = seq.flame56()                        # [T, 56] = expr 50 | jaw 3 | global pose 3
    rows = flame_for_clip(seq, start_s, num_frames, fps=25)   # [num_frames, 56] or None

Both formats the seed notes name:

* **EMOCA / DECA codes** ("old"): ``expcode [T, >=50]`` and ``posecode [T, 6]`` = global head
  rotation (axis-angle, ``posecode[:, :3]``) then jaw (``posecode[:, 3:6]``; the notes' "jaw =
  posecode[:, 3:]"). Also EMOCA's own video output: a folder with one sub-folder per frame
  holding ``exp.npy`` [50] and ``pose.npy`` [6] (sub-folders in natural name order).
* **FLAME tracker parameters** ("new"): ``expr [T, >=50]``, ``jaw_pose [T, 3]`` and, when present,
  the global head rotation under ``global_pose`` / ``rotation`` (VHAP) / ``global_orient`` /
  ``root_pose``. A file without one has no 56-d FLAME (the 51-d FaceFormer motion still works).

Files: ``.npz`` (numpy, no pickles), ``.safetensors``, ``.pt`` / ``.pth`` (``torch.load`` with
``weights_only=True``), ``.pkl`` (a dict of numpy arrays, read by an unpickler that only builds
numpy arrays, dtypes and scalars -- any other object in the file is refused, nothing is executed),
or an EMOCA per-frame folder. The frame rate is the file's ``fps`` entry
when it has one, else ``default_fps`` (the dataset's, e.g. 20 for MultiModal200).

Resampling (e.g. 20 -> 25 fps): target frame k sits at time k / dst_fps, i.e. at source position
u = k * src_fps / dst_fps; its value is the linear interpolation of source frames floor(u) and
floor(u) + 1. A sequence of T source frames covers T / src_fps seconds, so it yields every target
frame whose time lies in [0, T / src_fps); positions past the last source frame (inside its frame
interval) hold the last value. Axis-angle poses are interpolated component-wise (exact for the
small frame-to-frame rotations of talking heads, and what the seed's 20 -> 25 conversion did).
"""
from __future__ import annotations

import math
import pickle
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np

EXPR_DIMS = 50
JAW_DIMS = 3
GLOBAL_POSE_DIMS = 3
FLAME_DIM = EXPR_DIMS + JAW_DIMS + GLOBAL_POSE_DIMS   # 56 = model.flame_dim
POSECODE_DIMS = GLOBAL_POSE_DIMS + JAW_DIMS           # EMOCA posecode: global 3 | jaw 3
GLOBAL_POSE_KEYS = ("global_pose", "rotation", "global_orient", "root_pose")
FILE_SUFFIXES = (".npz", ".safetensors", ".pt", ".pth", ".pkl")
# the only globals a .pkl may reference: how numpy pickles arrays, dtypes and scalars
_NUMPY_CORE = ("numpy.core", "numpy._core")  # numpy 1, numpy 2
PICKLE_ALLOWED = frozenset(
    [(f"{core}.multiarray", name) for core in _NUMPY_CORE for name in ("_reconstruct", "scalar")]
    + [(f"{core}.numeric", "_frombuffer") for core in _NUMPY_CORE]      # pickle protocol 5
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
       ("_codecs", "encode")])                                           # protocol <= 2 bytes
EMOCA_FRAME_FILES = ("exp.npy", "pose.npy")
OLD, NEW = "emoca", "flame"
# a target time may exceed the last source time by up to one source frame (its frame interval);
# this tolerance absorbs float rounding of k / fps
TIME_EPS = 1e-9


class FlameFormatError(ValueError):
    """A FLAME file that cannot be read or is in neither known format (the message names the file)."""


@dataclass
class FlameSequence:
    expr: np.ndarray                    # [T, 50] float32
    jaw_pose: np.ndarray                # [T, 3]
    global_pose: Optional[np.ndarray]   # [T, 3], None when the file has no global head rotation
    fps: float
    format: str                         # OLD ("emoca": expcode / posecode) or NEW ("flame": expr / jaw_pose)
    source: str = ""

    def __len__(self) -> int:
        return len(self.expr)

    @property
    def seconds(self) -> float:
        return len(self) / self.fps

    def flame56(self) -> np.ndarray:
        """[T, 56] = expr 50 | jaw 3 | global pose 3 (float32)."""
        if self.global_pose is None:
            raise FlameFormatError(f"{self.source}: no global head pose ({' / '.join(GLOBAL_POSE_KEYS)}), "
                                   f"so no 56-d FLAME vector")
        return np.concatenate([self.expr, self.jaw_pose, self.global_pose], axis=1).astype(np.float32)

    def resampled(self, fps: float) -> "FlameSequence":
        """The same motion at ``fps`` (module docstring: linear in time, covering the same seconds)."""
        if fps == self.fps:
            return self
        times = np.arange(num_frames_covering(len(self), self.fps, fps)) / fps
        at = lambda v: None if v is None else sample_at(v, self.fps, times)  # noqa: E731
        return replace(self, expr=at(self.expr), jaw_pose=at(self.jaw_pose), global_pose=at(self.global_pose),
                       fps=float(fps))


def num_frames_covering(num_src: int, src_fps: float, dst_fps: float) -> int:
    """How many ``dst_fps`` frames have their time k / dst_fps inside [0, num_src / src_fps)."""
    return max(0, math.ceil(num_src * dst_fps / src_fps - TIME_EPS))


def sample_at(values: np.ndarray, src_fps: float, times: np.ndarray) -> np.ndarray:
    """[T, D] frames at ``src_fps`` -> [len(times), D] linearly interpolated at ``times`` (seconds,
    each in [0, T / src_fps); past the last frame the last value is held)."""
    values = np.asarray(values, dtype=np.float64)
    times = np.asarray(times, dtype=np.float64)
    if len(times) and (times.min() < -TIME_EPS or times.max() >= len(values) / src_fps - TIME_EPS):
        raise ValueError(f"times {times.min():.4f}..{times.max():.4f} s outside the sequence's "
                         f"[0, {len(values) / src_fps:.4f}) s")
    u = np.clip(times * src_fps, 0.0, len(values) - 1)
    lo = np.floor(u).astype(np.int64)
    hi = np.minimum(lo + 1, len(values) - 1)
    a = (u - lo)[:, None]
    return ((1.0 - a) * values[lo] + a * values[hi]).astype(np.float32)


def resample(values: np.ndarray, src_fps: float, dst_fps: float) -> np.ndarray:
    """[T, D] at ``src_fps`` -> [N, D] at ``dst_fps`` over the same seconds (e.g. FaceFormer's 51-d)."""
    n = num_frames_covering(len(values), src_fps, dst_fps)
    return sample_at(values, src_fps, np.arange(n) / dst_fps)


# ------------------------------------------------------------------------------ reading
def _rows(arrays: Mapping[str, np.ndarray], key: str, min_dims: int, source: str) -> np.ndarray:
    a = np.asarray(arrays[key], dtype=np.float32)
    if a.ndim == 1:
        a = a[None]  # a single frame
    if a.ndim != 2 or a.shape[1] < min_dims:
        raise FlameFormatError(f"{source}: {key!r} has shape {list(a.shape)}, need [frames, >={min_dims}]")
    return a


def flame_from_arrays(arrays: Mapping[str, np.ndarray], default_fps: float, source: str = "") -> FlameSequence:
    """Detects the format from the keys (module docstring) and slices the parts."""
    old = "expcode" in arrays and "posecode" in arrays
    new = "expr" in arrays and "jaw_pose" in arrays
    if old == new:
        found = sorted(arrays)
        raise FlameFormatError(f"{source}: {'both' if old else 'neither'} of the FLAME formats (expcode + posecode | "
                               f"expr + jaw_pose); keys found: {found}")
    fps = float(np.asarray(arrays["fps"]).reshape(-1)[0]) if "fps" in arrays else float(default_fps)
    if not fps > 0:
        raise FlameFormatError(f"{source}: fps must be positive, got {fps}")
    if old:
        expr = _rows(arrays, "expcode", EXPR_DIMS, source)[:, :EXPR_DIMS]
        pose = _rows(arrays, "posecode", POSECODE_DIMS, source)
        glob, jaw = pose[:, :GLOBAL_POSE_DIMS], pose[:, GLOBAL_POSE_DIMS:POSECODE_DIMS]
        fmt = OLD
    else:
        expr = _rows(arrays, "expr", EXPR_DIMS, source)[:, :EXPR_DIMS]
        jaw = _rows(arrays, "jaw_pose", JAW_DIMS, source)[:, :JAW_DIMS]
        key = next((k for k in GLOBAL_POSE_KEYS if k in arrays), None)
        glob = None if key is None else _rows(arrays, key, GLOBAL_POSE_DIMS, source)[:, :GLOBAL_POSE_DIMS]
        fmt = NEW
    for name, part in (("pose", jaw), ("global pose", glob)):
        if part is not None and len(part) != len(expr):
            raise FlameFormatError(f"{source}: {len(expr)} expression frames but {len(part)} {name} frames")
    if len(expr) == 0:
        raise FlameFormatError(f"{source}: no frames")
    return FlameSequence(expr=expr, jaw_pose=jaw, global_pose=glob, fps=fps, format=fmt, source=source)


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _read_emoca_folder(path: Path) -> dict[str, np.ndarray]:
    frames = sorted((d for d in path.iterdir() if d.is_dir() and all((d / f).is_file() for f in EMOCA_FRAME_FILES)),
                    key=lambda d: _natural_key(d.name))
    if not frames:
        raise FlameFormatError(f"{path}: no per-frame sub-folders with {' and '.join(EMOCA_FRAME_FILES)} "
                               f"(EMOCA's video output)")
    exp = [np.load(d / "exp.npy", allow_pickle=False).reshape(-1) for d in frames]
    pose = [np.load(d / "pose.npy", allow_pickle=False).reshape(-1) for d in frames]
    return {"expcode": np.stack(exp), "posecode": np.stack(pose)}


class ArrayUnpickler(pickle.Unpickler):
    """Builds numpy arrays, dtypes and scalars (``PICKLE_ALLOWED``) and nothing else: any other global a
    pickle names is refused before anything is called. A subclass may answer further globals with inert
    stand-ins of its own (``substitute``), e.g. the FLAME model file's chumpy / scipy objects."""

    def substitute(self, module: str, name: str) -> Any:
        """The stand-in for ``module.name``, or None to apply the numpy-only rule."""
        return None

    def find_class(self, module: str, name: str):
        stand_in = self.substitute(module, name)
        if stand_in is not None:
            return stand_in
        if (module, name) not in PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")
        return super().find_class(module, name)


def load_pickle(path: Union[str, Path], unpickler: type[ArrayUnpickler] = ArrayUnpickler) -> Any:
    """The object in a ``.pkl`` file through ``unpickler`` (latin1: numpy arrays pickled by Python 2)."""
    with open(path, "rb") as f:
        return unpickler(f, encoding="latin1").load()


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    if path.is_dir():
        return _read_emoca_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if suffix == ".safetensors":
        from safetensors.numpy import load_file
        return load_file(str(path))
    if suffix in (".pt", ".pth"):
        import torch
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(obj, dict):
            raise FlameFormatError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
        return {k: v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in obj.items()}
    if suffix == ".pkl":
        obj = load_pickle(path)
        if not isinstance(obj, dict):
            raise FlameFormatError(f"{path}: expected a dict of arrays, found {type(obj).__name__}")
        return {k: np.asarray(v) for k, v in obj.items()}
    raise FlameFormatError(f"{path}: unsupported FLAME file type (use {', '.join(FILE_SUFFIXES)} or an "
                           f"EMOCA per-frame folder)")


def read_flame(path: Union[str, Path], default_fps: float = 25.0) -> FlameSequence:
    """One FLAME file (or EMOCA folder) -> :class:`FlameSequence`; errors name the file."""
    path = Path(path)
    if not path.exists():
        raise FlameFormatError(f"{path}: FLAME file not found")
    try:
        arrays = _read_arrays(path)
    except FlameFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable / refused (e.g. pickled objects) -> one clear line
        raise FlameFormatError(f"{path}: cannot read FLAME parameters ({type(e).__name__}: {e})") from e
    return flame_from_arrays(arrays, default_fps, source=str(path))


def find_flame_file(flame_dir: Union[str, Path], name: str) -> Optional[Path]:
    """``FLAME_DIR/<name>{.npz,.safetensors,.pt,.pth,.pkl}`` or the EMOCA folder ``FLAME_DIR/<name>/``;
    ``name`` is the source video's stem. None when there is none."""
    base = Path(flame_dir)
    for suffix in FILE_SUFFIXES:
        if (base / f"{name}{suffix}").is_file():
            return base / f"{name}{suffix}"
    return base / name if (base / name).is_dir() else None


def flame_for_clip(seq: FlameSequence, start_s: float, num_frames: int, fps: float) -> Optional[np.ndarray]:
    """``flame [num_frames, 56]`` for a clip starting ``start_s`` seconds into the source video the
    sequence covers from its time 0, sampled at the clip's ``fps``; None when the sequence does not
    cover the whole clip (never padded with made-up values)."""
    times = start_s + np.arange(num_frames) / fps
    if num_frames <= 0 or times[0] < -TIME_EPS or times[-1] >= seq.seconds - TIME_EPS:
        return None
    return sample_at(seq.flame56(), seq.fps, times)  # on the sequence's own frames this copies them exactly
