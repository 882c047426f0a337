"""Evaluate one folder of generated videos against real ones: analyse every video (a failing one is
reported and skipped), then summarise into one results row."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from .metrics.aggregate import summarize
from .metrics.analyze import VideoRecord, analyze_video, list_videos, read_frames, reference_embedding
from .metrics.models import MetricModels

log = logging.getLogger(__name__)

# what the real videos are needed for
REAL_METRICS = ("fid", "fvd", "fvd_r3d18", "apd")


def analyze_folder(paths: list[Path], models: MetricModels, metrics: list[str], desc: str,
                   **kw) -> tuple[list[VideoRecord], list[dict]]:
    records, failed = [], []
    for p in tqdm(paths, desc=desc, unit="video"):
        try:
            records.append(analyze_video(p, models, metrics, **kw))
        except (ValueError, OSError, RuntimeError) as e:
            log.error("%s: skipped: %s", p, e)
            failed.append({"name": p.stem, "path": str(p), "error": str(e)})
    return records, failed


def load_rgb(path: Path) -> np.ndarray:
    try:
        return np.array(Image.open(path).convert("RGB"))
    except OSError as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None


def references(records: list[VideoRecord], models: MetricModels, images: dict[str, Path],
               real_dir: Optional[Path], face_mode: str, detector) -> tuple[dict[str, np.ndarray], list[str]]:
    """ArcFace embedding of each generated video's reference: the given image of the same name, else the
    first frame of the real video of the same name, else the video's own first frame (noted)."""
    out, notes = {}, []
    real = {p.stem: p for p in list_videos(real_dir)} if real_dir else {}
    for r in records:
        if r.identity is None:
            continue
        try:
            if r.name in images:
                img = load_rgb(images[r.name])
            elif r.name in real:
                img = read_frames(real[r.name])[0]
            else:
                img = read_frames(Path(r.path))[0]
                notes.append(f"{r.name}: no reference image or real video; CSIM is against its own first frame")
            out[r.name] = reference_embedding(img, models, face_mode, detector)
        except ValueError as e:
            notes.append(f"{r.name}: reference: {e}")
    return out, notes


def evaluate(generated: list[Path], real_records: dict[str, VideoRecord], models: MetricModels,
             metrics: list[str], ref_images: dict[str, Path], real_dir: Optional[Path], face_mode: str,
             detector, fvd_clips: int, desc: str = "generated") -> dict:
    recs, failed = analyze_folder(generated, models, metrics, desc, face_mode=face_mode, detector=detector,
                                  fvd_clips=fvd_clips)
    refs, notes = references(recs, models, ref_images, real_dir, face_mode, detector) if "csim" in metrics \
        else ({}, [])
    row = summarize(recs, real_records, refs, metrics)
    row["failed"] = failed
    row["notes"] = row["notes"] + notes
    return row


def real_records(real_dir: Optional[Path], models: MetricModels, metrics: list[str], face_mode: str,
                 detector, fvd_clips: int) -> tuple[dict[str, VideoRecord], list[dict]]:
    need = [m for m in metrics if m in REAL_METRICS]
    if real_dir is None or not need:
        return {}, []
    recs, failed = analyze_folder(list_videos(real_dir), models, need, "real", face_mode=face_mode,
                                  detector=detector, fvd_clips=fvd_clips)
    return {r.name: r for r in recs}, failed
