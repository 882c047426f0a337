"""A FaceFormer data root in the seed's three layouts, with a few broken records, and a tiny FLAME model.

    DATA_ROOT/dataset_jsons/digital_human.json                  old FLAME (expcode / posecode), 25 fps
    DATA_ROOT/dataset_jsons/splits/MEAD_VHAP_{train,val,test}.json     new FLAME (expr / jaw_pose), 25 fps
    DATA_ROOT/dataset_jsons/splits/MultiModal200_{train,val,test}.json new FLAME at 20 fps (resampled)

Motion is smooth and known: expression k of frame t (at the file's own rate) = 0.5 sin(2 pi 1.3 t / fps + k),
jaw opening = 0.1 (1 + sin(2 pi 2.1 t / fps)); audio is noise whose loudness follows the jaw.
"""
from __future__ import annotations

import json
import math
import wave
from pathlib import Path
from typing import Optional

import numpy as np

from dualforce_mega.models.flame import random_flame_arrays

EXPR = 100            # columns in the files (FaceFormer keeps the first 50)
SHAPE_COMPONENTS = 2  # identity components of the tiny FLAME model
BROKEN = {"MEAD_VHAP_train": 3}   # records that must be reported and skipped


def motion_values(frames: int, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """(expression [frames, EXPR], jaw opening [frames]) at ``fps``."""
    t = np.arange(frames)[:, None] / fps
    expr = 0.5 * np.sin(2 * math.pi * 1.3 * t + np.arange(EXPR)[None])
    jaw = 0.1 * (1 + np.sin(2 * math.pi * 2.1 * t[:, 0]))
    return expr.astype(np.float32), jaw.astype(np.float32)


def write_wav(path: Path, seconds: float, rate: int, jaw_fn, seed: int) -> None:
    n = int(round(seconds * rate))
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate
    samples = rng.normal(0, 1, n) * (0.05 + jaw_fn(t)) * 0.5
    pcm = np.clip(samples * 32767, -32768, 32767).astype("<i2")
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def write_flame(path: Path, frames: int, fps: float, old: bool) -> None:
    expr, jaw = motion_values(frames, fps)
    path.parent.mkdir(parents=True, exist_ok=True)
    if old:   # posecode = global 3 | jaw 3
        pose = np.zeros((frames, 6), np.float32)
        pose[:, 0] = 0.01     # a head rotation FaceFormer must ignore
        pose[:, 3] = jaw
        np.savez(path, expcode=expr, posecode=pose, shapecode=np.zeros((frames, 100), np.float32))
    else:
        jaw_pose = np.stack([jaw, np.full(frames, 0.02), np.zeros(frames)], 1).astype(np.float32)
        np.savez(path, expr=expr, jaw_pose=jaw_pose, rotation=np.zeros((frames, 3), np.float32))


def _clip(root: Path, dataset: str, i: int, subject: str, style: str, seconds: float, fps: float, old: bool,
          rate: int = 16000) -> dict:
    rel_audio, rel_flame = f"{dataset}/audio/{i}.wav", f"{dataset}/flame/{i}.npz"
    frames = int(round(seconds * fps))
    write_flame(root / rel_flame, frames, fps, old)
    write_wav(root / rel_audio, seconds, rate, lambda t: 0.1 * (1 + np.sin(2 * math.pi * 2.1 * t)), seed=i)
    return {"id": f"{dataset}_{i}", "subject": subject, "style": style, "audio": rel_audio, "flame": rel_flame,
            "fps": fps}


def make_data_root(root: Path, seconds: float = 1.2, test_seconds: Optional[float] = None) -> Path:
    """Writes the three layouts under ``root``; returns it."""
    test_seconds = test_seconds or seconds
    lists: dict[str, list[dict]] = {}
    n = 0

    def add(name: str, dataset: str, subject: str, style: str, secs: float, fps: float, old: bool, **kw) -> None:
        nonlocal n
        lists.setdefault(name, []).append(_clip(root, dataset, n, subject, style, secs, fps, old, **kw))
        n += 1

    for s in ("dh_a", "dh_b", "dh_a"):
        add("digital_human", "digital_human", s, f"{s}_style", seconds, 25, old=True)
    for s in ("M003", "W009"):
        add("splits/MEAD_VHAP_train", "MEAD_VHAP", s, f"{s}_x", seconds, 25, old=False, rate=22050)
    add("splits/MultiModal200_train", "MultiModal200", "mm1", "mm1_x", seconds, 20, old=False)
    add("splits/MultiModal200_train", "MultiModal200", "mm2", "mm2_x", seconds, 20, old=False)
    add("splits/MEAD_VHAP_val", "MEAD_VHAP", "M003", "M003_val", seconds, 25, old=False)
    add("splits/MultiModal200_val", "MultiModal200", "mm9", "mm9_val", seconds, 20, old=False)
    add("splits/MEAD_VHAP_test", "MEAD_VHAP", "M003", "M003_angry", test_seconds, 25, old=False)
    add("splits/MEAD_VHAP_test", "MEAD_VHAP", "W777", "W777_happy", test_seconds, 25, old=False)
    add("splits/MultiModal200_test", "MultiModal200", "mm1", "mm1_t", test_seconds, 20, old=False)

    # broken records: reported and skipped, the run goes on
    bad = root / "MEAD_VHAP" / "flame" / "broken.npz"
    np.savez(bad, foo=np.zeros(3))
    good_audio = lists["splits/MEAD_VHAP_train"][0]["audio"]
    lists["splits/MEAD_VHAP_train"] += [
        {"id": "no_flame", "subject": "M003", "style": "s", "audio": good_audio, "flame": "MEAD_VHAP/flame/nope.npz",
         "fps": 25},
        {"id": "bad_flame", "subject": "M003", "style": "s", "audio": good_audio,
         "flame": "MEAD_VHAP/flame/broken.npz", "fps": 25},
        {"id": "no_audio_field", "subject": "M003", "style": "s", "flame": lists["splits/MEAD_VHAP_train"][0]["flame"],
         "fps": 25},
    ]
    for name, records in lists.items():
        path = root / "dataset_jsons" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records, indent=1))
    return root


def write_tiny_flame(path: Path, num_vertices: int = 48, seed: int = 0) -> Path:
    arrays = random_flame_arrays(num_vertices, SHAPE_COMPONENTS, EXPR, seed=seed)
    np.savez(path, **{k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in arrays.items()})
    return path


def faceformer_sets(root: Path, flame: Path, run_dir: Path, **extra: str) -> list[str]:
    """``--set`` overrides for a tiny CPU run on this data root."""
    sets = {"run.dir": str(run_dir), "data.root": str(root), "model.audio_encoder": "random:tiny",
            "model.flame_model": str(flame), "model.flame_shape_components": str(SHAPE_COMPONENTS),
            "data.max_frames": "20", "train.epochs": "0", "train.steps": "4", "train.save_every": "2",
            "train.precision": "fp32", "run.tensorboard": "false", "train.log_every": "1"}
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]
