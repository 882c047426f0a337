"""Step 07: clip metadata, the train / val / test split by subject, and the shard sets.

``OUT/shards`` holds the train split (what ``--set data.shards=OUT/shards`` trains on), with
``val/`` and ``test/`` beside its tars when those splits are not empty; every set has its own
``index.json`` with the normalisation statistics of its clips (``ShardWriter``). ``OUT/splits.json``
lists the subjects of each split: a subject is in exactly one split.

Subjects: the sidecar's ``subject``, else the input id without a trailing ``_<digits>`` (HDTF's
``WDA_BarackObama_000`` -> ``WDA_BarackObama``). Gender: the sidecar's ``gender`` (female / male /
f / m), else ``unknown``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..config import ModelConfig
from ..data.schema import GENDERS, SPLITS, to_storage
from ..data.shard_writer import INDEX_NAME, ShardWriter
from ..fsutil import atomic_write
from ..timeline import Timeline
from .config import PrepareConfig

log = logging.getLogger(__name__)

_TRAILING_INDEX = re.compile(r"_\d+$")
_GENDER_ALIASES = {"f": "female", "female": "female", "woman": "female", "m": "male", "male": "male", "man": "male"}


def subject_of(input_id: str, info: dict) -> str:
    return str(info.get("subject") or _TRAILING_INDEX.sub("", input_id) or input_id)


def gender_of(info: dict) -> str:
    g = _GENDER_ALIASES.get(str(info.get("gender", "")).strip().lower(), "unknown")
    assert g in GENDERS
    return g


def split_subjects(subjects: list[str], fractions: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Subjects in a seeded hash order; the first round(n * val) go to val, the next round(n * test)
    to test, the rest to train (so few subjects all train). Stable: a subject keeps its split when
    others are added only if the counts allow it -- the order itself never changes."""
    order = sorted(set(subjects), key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    n = len(order)
    n_val, n_test = round(n * fractions[1]), round(n * fractions[2])
    out = {}
    for i, s in enumerate(order):
        out[s] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    return out


def clip_meta(rec: dict, source_info: dict, quality: dict, step_meta: dict[str, dict], model: ModelConfig,
              num_latent: int, split: str, random_models: Optional[str], mode: str) -> dict[str, Any]:
    n = rec["num_video_frames"]
    motion = step_meta.get("04_motion", {})
    flame = step_meta.get("05_flame", {})
    return {
        "key": rec["key"], "fps": rec["fps"], "num_latent_frames": num_latent, "num_video_frames": n,
        "num_audio_frames": n * Timeline.of(model).audio_per_video_frame, "source_dataset": str(source_info.get("dataset", "raw")),
        "subject": subject_of(rec["input_id"], source_info), "split": split, "gender": gender_of(source_info),
        "quality": {k: float(v) for k, v in quality.items()}, "source_file": rec["source_file"],
        "time_range": [float(t) for t in rec["time_range"]], "crop_box": rec["crop_box"], "crop_size": rec["size"],
        "mode": mode, "aligned": rec["aligned"], "motion_extractor": motion.get("motion_extractor"),
        "has_flame": bool(flame.get("has_flame", False)), "has_audio": "06_audio" in step_meta,
        "vae": step_meta.get("03_latents", {}).get("vae"), "audio_encoder": step_meta.get("06_audio", {}).get("audio_encoder"),
        "random_models": random_models, "caption": source_info.get("caption"),
        "text_encoder": step_meta.get("06_text", {}).get("text_encoder"),
    }


def _index_keys(index_path: Path) -> Optional[list[str]]:
    try:
        index = json.loads(index_path.read_text())
        return sorted(k for s in index["shards"] for k in s["keys"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None


def write_split_shards(out: Path, keys: list[str], load: Callable[[str], tuple[dict[str, torch.Tensor], dict]],
                       model: ModelConfig, cfg: PrepareConfig, extra: dict) -> bool:
    """Write one split's clips (sorted by key, loaded one at a time) unless ``out`` already holds
    exactly these keys. Returns whether it wrote."""
    keys = sorted(keys)
    if _index_keys(out / INDEX_NAME) == keys:
        return False
    shards = min(cfg.min_shards, len(keys))
    with ShardWriter(out, model, max_shard_bytes=cfg.max_shard_bytes, overwrite=True, extra=extra) as w:
        for i, key in enumerate(keys):
            if i and i * shards // len(keys) != (i - 1) * shards // len(keys):
                w.next_shard()    # clip i goes to shard i * shards // n (at least; size still rolls over)
            tensors, meta = load(key)
            w.write(key, to_storage(tensors), meta)
    return True


def write_splits_file(path: Path, splits: dict[str, str]) -> None:
    by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
    for subject, split in sorted(splits.items()):
        by_split[split].append(subject)
    atomic_write(path, json.dumps(by_split, indent=1))


__all__ = ["subject_of", "gender_of", "split_subjects", "clip_meta", "write_split_shards", "write_splits_file"]
