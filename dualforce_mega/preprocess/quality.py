"""Step 02: quality scores of a cropped clip and the keep / drop decision.

Scores (all kept in the clip metadata under ``quality``):

* ``sharpness``  variance of the Laplacian of the grey crop resized to 256 px (mean over
  ``sample_frames`` evenly spaced frames); low = blurry.
* ``face_frac``, ``continuity``, ``centre_offset``  from step 01's face track (face size relative to
  the source frame, fraction of examined frames with a detection, largest face-centre offset in
  the fixed crop).
* ``speech_frac``  fraction of the clip's samples inside silero-vad speech segments.

* ``sync_confidence`` / ``sync_offset``  with SyncNet weights (``--syncnet syncnet_v2.model``): the
  evaluation's Sync-C and AV offset (:mod:`dualforce_mega.metrics.sync`) on the crop resized to 224
  (the crop is already a face square, so no second crop; the reference's 0.4 margin differs a little).

The first failing check names the reason (``blurry``, ``small_face``, ``track_broken``,
``face_off_centre``, ``silent``, ``out_of_sync``).
"""
from __future__ import annotations

import logging
from functools import lru_cache
from typing import Optional

import numpy as np

from .config import QualityConfig

log = logging.getLogger(__name__)

SHARPNESS_SIDE = 256     # scores are comparable across crop sizes


def sharpness(frames: np.ndarray, samples: int) -> float:
    """Mean variance of the Laplacian over ``samples`` evenly spaced frames (uint8 RGB [T, H, W, 3])."""
    import cv2
    idx = np.unique(np.linspace(0, len(frames) - 1, min(samples, len(frames))).round().astype(int))
    vals = []
    for frame in frames[idx]:
        grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        grey = cv2.resize(grey, (SHARPNESS_SIDE, SHARPNESS_SIDE), interpolation=cv2.INTER_AREA)
        vals.append(cv2.Laplacian(grey, cv2.CV_64F).var())
    return float(np.mean(vals))


@lru_cache(maxsize=1)
def _vad_model():
    from silero_vad import load_silero_vad
    return load_silero_vad()


def speech_fraction(wave: np.ndarray, sample_rate: int, threshold: float) -> float:
    """Fraction of samples that silero-vad marks as speech (float32 mono in [-1, 1])."""
    import torch
    from silero_vad import get_speech_timestamps
    if wave.size == 0:
        return 0.0
    stamps = get_speech_timestamps(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)), _vad_model(),
                                   sampling_rate=sample_rate, threshold=threshold)
    return float(sum(s["end"] - s["start"] for s in stamps) / wave.size)


@lru_cache(maxsize=2)
def sync_scorer(path: str, device: str):
    """The evaluation's SyncNet scorer, loaded once per process."""
    import torch
    from ..metrics.sync import SyncScorer
    from ..metrics.syncnet import SyncNet
    return SyncScorer(SyncNet.from_file(path), torch.device(device))


def sync_confidence(frames: np.ndarray, wave: np.ndarray, syncnet: str, device: str) -> dict[str, float]:
    """Sync-C and the AV offset (frames) of face crops uint8 RGB [T, H, W, 3] with 16 kHz audio."""
    import torch
    from ..metrics.crops import syncnet_crops
    scorer = sync_scorer(syncnet, device)
    res = scorer(syncnet_crops(frames, None, torch.device(device)), wave)
    return {"sync_confidence": res.sync_c, "sync_offset": float(res.offset)}


def score_clip(frames: np.ndarray, wave: Optional[np.ndarray], sample_rate: int, track_quality: dict,
               cfg: QualityConfig, syncnet: Optional[str] = None, device: str = "cpu") -> dict[str, float]:
    scores = {"sharpness": sharpness(frames, cfg.sample_frames), **track_quality}
    if wave is not None:
        scores["speech_frac"] = speech_fraction(wave, sample_rate, cfg.vad_threshold)
        if syncnet:
            scores.update(sync_confidence(frames, wave, syncnet, device))
    return scores


def verdict(scores: dict[str, float], cfg: QualityConfig, *, need_face: bool, need_speech: bool
            ) -> Optional[tuple[str, str]]:
    """(reason, detail) of the first failed check, or None when the clip is kept."""
    checks = [("blurry", "sharpness", cfg.min_sharpness, +1)]
    if need_face:
        checks += [("small_face", "face_frac", cfg.min_face_frac, +1),
                   ("track_broken", "continuity", cfg.min_continuity, +1),
                   ("face_off_centre", "centre_offset", cfg.max_centre_offset, -1)]
    if need_speech:
        checks += [("silent", "speech_frac", cfg.min_speech_frac, +1),
                   ("out_of_sync", "sync_confidence", cfg.min_sync_confidence, +1)]
    for reason, name, limit, sign in checks:
        if name not in scores:
            continue
        v = scores[name]
        if (sign > 0 and v < limit) or (sign < 0 and v > limit):
            rel = "<" if sign > 0 else ">"
            return reason, f"{name} {v:.3g} {rel} {limit:g}"
    return None


__all__ = ["sharpness", "speech_fraction", "sync_confidence", "score_clip", "verdict"]
