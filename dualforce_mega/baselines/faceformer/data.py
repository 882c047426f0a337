"""FaceFormer's data: JSON lists of records under ``DATA_ROOT``, FLAME motion at 25 fps, 16 kHz audio.

A JSON list (``dataset_jsons/digital_human.json``, ``dataset_jsons/splits/MEAD_VHAP_train.json`` ...) holds
records ``{"id", "subject", "style", "audio": <wav, relative to DATA_ROOT>, "flame": <FLAME file>, "fps"}``.
The FLAME file is read by ``preprocess.flame_import`` (old ``expcode``/``posecode`` -> jaw =
``posecode[:, 3:4]``; new ``expr``/``jaw_pose`` -> jaw = ``jaw_pose[:, 0:1]``; the file's own ``fps`` entry
wins over the record's); motion = 50 expression values + the jaw opening, linearly resampled to
``data.fps`` (20 -> 25 fps for MultiModal200). A clip has ``min(motion frames, whole audio frames)``
frames, cut to ``data.max_frames`` for training and validation. Records whose files are missing or
malformed are reported as ``file: field: why`` and skipped.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import torch

from ...encoders.speech import AUDIO_SAMPLE_RATE
from ...media import load_audio
from ...preprocess.flame_import import EXPR_DIMS, FlameFormatError, FlameSequence, read_flame, resample

RECORD_FIELDS = ("id", "subject", "style", "audio", "flame", "fps")
_SPLIT_SUFFIX = re.compile(r"_(train|val|test)$")

log = logging.getLogger(__name__)


class Problem(NamedTuple):
    """A record left out: the file at fault, the field, and why."""
    file: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.message}"


@dataclass(frozen=True)
class Record:
    dataset: str          # the JSON list's name without its split suffix (MEAD_VHAP, digital_human ...)
    id: str
    subject: str
    style: str
    audio: Path
    flame: Path
    fps: float
    where: str            # "<json file>[index]"


@dataclass
class Clip:
    record: Record
    motion: np.ndarray    # [frames, motion_dim] float32 at data.fps
    samples: int          # 16 kHz audio samples covering those frames

    @property
    def frames(self) -> int:
        return len(self.motion)


def dataset_name(json_path: Path) -> str:
    return _SPLIT_SUFFIX.sub("", Path(json_path).stem)


def _resolve(root: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else root / p


def read_records(json_path: Path, root: Path) -> tuple[list[Record], list[Problem]]:
    """The records of one JSON list; a record with a missing or mistyped field is a Problem."""
    name = dataset_name(json_path)
    try:
        items = json.loads(Path(json_path).read_text())
    except (OSError, ValueError) as e:
        return [], [Problem(str(json_path), "<file>", f"cannot read the JSON list ({e})")]
    if not isinstance(items, list):
        return [], [Problem(str(json_path), "<file>", f"expected a list of records, found {type(items).__name__}")]
    records, problems = [], []
    for i, item in enumerate(items):
        where = f"{json_path}[{i}]"
        missing = [k for k in RECORD_FIELDS if not isinstance(item, dict) or item.get(k) in (None, "")]
        if missing:
            problems.append(Problem(str(json_path), f"[{i}].{missing[0]}", f"missing (record fields: {RECORD_FIELDS})"))
            continue
        style = str(item["style"])
        if style in (".", "..") or any(c in style for c in "/\\\0"):
            problems.append(Problem(str(json_path), f"[{i}].style", f"{style!r} is not a folder name (outputs are "
                                    f"written to <dataset>/<style>_passionate/)"))
            continue
        try:
            fps = float(item["fps"])
        except (TypeError, ValueError):
            fps = math.nan
        if not fps > 0:
            problems.append(Problem(str(json_path), f"[{i}].fps", f"{item['fps']!r} is not a positive frame rate"))
            continue
        records.append(Record(dataset=name, id=str(item["id"]), subject=str(item["subject"]), style=style,
                              audio=_resolve(root, str(item["audio"])), flame=_resolve(root, str(item["flame"])),
                              fps=fps, where=where))
    return records, problems


def motion_from_sequence(seq: FlameSequence, expr_dims: int) -> np.ndarray:
    """[T, expr_dims + 1] = expression[:, :expr_dims] | jaw opening (the first jaw axis-angle component)."""
    return np.concatenate([seq.expr[:, :expr_dims], seq.jaw_pose[:, :1]], axis=1).astype(np.float32)


def load_motion(record: Record, fps: float, expr_dims: int) -> np.ndarray:
    """The record's FLAME motion at ``fps`` (raises FlameFormatError naming the file)."""
    seq = read_flame(record.flame, default_fps=record.fps)
    return resample(motion_from_sequence(seq, expr_dims), seq.fps, fps)


def audio_samples(frames: int, fps: float) -> int:
    return round(frames * AUDIO_SAMPLE_RATE / fps)


def scan(records: Sequence[Record], fps: float, expr_dims: int, min_frames: int,
         max_frames: Optional[int]) -> tuple[list[Clip], list[Problem]]:
    """Read every record's motion and audio once: the usable clips, and the Problems of the others."""
    if expr_dims > EXPR_DIMS:
        raise ValueError(f"model.motion_dim: {expr_dims} expression values, the FLAME files hold {EXPR_DIMS}")
    clips, problems = [], []
    for rec in records:
        try:
            motion = load_motion(rec, fps, expr_dims)
        except FlameFormatError as e:
            why = str(e).removeprefix(f"{rec.flame}: ")
            problems.append(Problem(str(rec.flame), "flame", f"{why} (record {rec.where})"))
            continue
        if not rec.audio.is_file():
            problems.append(Problem(str(rec.audio), "audio", f"file not found (record {rec.where})"))
            continue
        try:
            total = load_audio(rec.audio, AUDIO_SAMPLE_RATE).numel()
        except ValueError as e:
            why = str(e).removeprefix(f"{rec.audio}: ")
            problems.append(Problem(str(rec.audio), "audio", f"{why} (record {rec.where})"))
            continue
        frames = min(len(motion), math.floor(total * fps / AUDIO_SAMPLE_RATE))
        if max_frames is not None:
            frames = min(frames, max_frames)
        if frames < min_frames:
            problems.append(Problem(str(rec.flame), "frames", f"{frames} frames with both motion and audio, fewer "
                                    f"than data.min_frames={min_frames} (record {rec.where})"))
            continue
        clips.append(Clip(record=rec, motion=motion[:frames], samples=audio_samples(frames, fps)))
    return clips, problems


def load_split(jsons: Sequence[str], root: Path, fps: float, expr_dims: int, min_frames: int,
               max_frames: Optional[int]) -> tuple[list[Clip], list[Problem]]:
    """All clips of the JSON lists of one split; every Problem is logged as a warning."""
    clips, problems = [], []
    for name in jsons:
        path = _resolve(root, name)
        if not path.is_file():
            problems.append(Problem(str(path), "<file>", "JSON list not found"))
            continue
        records, bad = read_records(path, root)
        good, bad_files = scan(records, fps, expr_dims, min_frames, max_frames)
        clips += good
        problems += bad + bad_files
    for p in problems:
        log.warning("skipped: %s", p)
    return clips, problems


# ----------------------------------------------------------------------------- samples and batches
def style_index(subjects: Sequence[str], subject: str, fallback: str = "") -> int:
    """The style (speaker) embedding of ``subject``; subjects not seen in training use ``fallback``
    (default: the first training subject)."""
    if subject in subjects:
        return list(subjects).index(subject)
    return list(subjects).index(fallback) if fallback else 0


def load_sample(clip: Clip, subjects: Sequence[str], fallback: str = "") -> dict[str, Any]:
    wave = load_audio(clip.record.audio, AUDIO_SAMPLE_RATE)[:clip.samples]
    if wave.numel() < clip.samples:   # the file changed since the scan
        raise ValueError(f"{clip.record.audio}: audio: {wave.numel()} samples, the scan found >= {clip.samples}")
    return {"audio": wave, "motion": torch.from_numpy(clip.motion),
            "style": style_index(subjects, clip.record.subject, fallback)}


def collate(samples: Sequence[dict[str, Any]], indices: Sequence[int], valid: Optional[Sequence[bool]] = None
            ) -> dict[str, Any]:
    """Pad to the longest clip: audio [B, S] + audio_len, motion [B, T, D] + frames and mask [B, T]
    (``valid`` False: a padding sample whose frames are all masked out)."""
    b = len(samples)
    frames = torch.tensor([len(s["motion"]) for s in samples])
    audio_len = torch.tensor([s["audio"].numel() for s in samples])
    audio = torch.zeros(b, int(audio_len.max()))
    motion = torch.zeros(b, int(frames.max()), samples[0]["motion"].shape[1])
    for i, s in enumerate(samples):
        audio[i, :audio_len[i]] = s["audio"]
        motion[i, :frames[i]] = s["motion"]
    mask = torch.arange(motion.shape[1])[None] < frames[:, None]
    if valid is not None:
        mask &= torch.tensor(list(valid))[:, None]
    return {"audio": audio, "audio_len": audio_len, "frames": frames, "motion": motion, "mask": mask,
            "style": torch.tensor([s["style"] for s in samples]), "__index__": torch.tensor(list(indices))}
