"""From per-video records to one row of results: set-level FID / FVD against the real videos, means of
the per-video CSIM / ACD / Sync-C / Sync-D, APD against the real video of the same name, and the
curves the plots show (CSIM vs frame index, Sync confidence vs window)."""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from dualforce_mega.metrics import identity, pose
from dualforce_mega.metrics.frechet import frechet_distance_features

from .analyze import VideoRecord

log = logging.getLogger(__name__)

COLUMNS = ("fid", "fvd", "fvd_r3d18", "csim", "acd", "sync_c", "sync_d", "apd")
# metric name (--metrics) -> its result columns
METRIC_COLUMNS = {"fid": ("fid",), "fvd": ("fvd",), "fvd_r3d18": ("fvd_r3d18",), "csim": ("csim", "acd"),
                  "sync": ("sync_c", "sync_d"), "apd": ("apd",)}


def _mean_curve(curves: list[np.ndarray]) -> list[Optional[float]]:
    """Mean over videos at each index (videos shorter than an index leave it out)."""
    if not curves:
        return []
    n = max(len(c) for c in curves)
    m = np.full((len(curves), n), np.nan)
    for i, c in enumerate(curves):
        m[i, :len(c)] = c
    with np.errstate(all="ignore"):
        mean = np.nanmean(m, axis=0)
    return [None if np.isnan(v) else float(v) for v in mean]


def _frechet(real: list[np.ndarray], gen: list[np.ndarray], what: str, notes: list[str]) -> Optional[float]:
    if not real or not gen:
        notes.append(f"{what}: no {'real' if not real else 'generated'} features")
        return None
    a, b = np.concatenate(real).astype(np.float64), np.concatenate(gen).astype(np.float64)
    if len(a) < 2 or len(b) < 2:
        notes.append(f"{what}: fewer than 2 samples")
        return None
    return frechet_distance_features(a, b)


def summarize(generated: list[VideoRecord], real: dict[str, VideoRecord], references: dict[str, np.ndarray],
              metrics: list[str]) -> dict:
    """One row: metric means, curves, per-video values, and the reasons for anything missing."""
    notes: list[str] = []
    row: dict = {k: None for k in COLUMNS}
    real_list = list(real.values())
    if "fid" in metrics:
        row["fid"] = _frechet([r.fid for r in real_list if r.fid is not None],
                              [g.fid for g in generated if g.fid is not None], "fid", notes)
    for m in ("fvd", "fvd_r3d18"):
        if m in metrics:
            row[m] = _frechet([r.fvd[m] for r in real_list if m in r.fvd],
                              [g.fvd[m] for g in generated if m in g.fvd], m, notes)
    videos, csim_curves, sync_curves = [], [], []
    per = {k: [] for k in ("csim", "acd", "sync_c", "sync_d", "apd")}
    for g in generated:
        v: dict = {"name": g.name, "frames": g.frames, "errors": dict(g.errors)}
        if g.identity is not None:
            ref = references.get(g.name)
            if ref is None:
                v["errors"]["csim"] = "no reference image"
            else:
                curve = identity.csim_per_frame(ref, g.identity)
                csim_curves.append(curve)
                v["csim"] = float(curve.mean())
                per["csim"].append(v["csim"])
            if len(g.identity) >= 2:
                v["acd"] = identity.acd(g.identity)
                per["acd"].append(v["acd"])
        if g.sync is not None:
            v.update(sync_c=g.sync.sync_c, sync_d=g.sync.sync_d, offset=g.sync.offset)
            per["sync_c"].append(g.sync.sync_c)
            per["sync_d"].append(g.sync.sync_d)
            sync_curves.append(g.sync.window_conf)
        if g.pose is not None:
            gt = real.get(g.name)
            if gt is None or gt.pose is None:
                v["errors"]["apd"] = "no ground-truth pose (real video of the same name)"
            else:
                try:
                    v["apd"] = pose.apd(g.pose, gt.pose)
                    per["apd"].append(v["apd"]["mean"])
                except ValueError as e:
                    v["errors"]["apd"] = str(e)
        videos.append(v)
    for k, vals in per.items():
        if vals:
            row[k] = float(np.mean(vals))
    row["videos"] = len(generated)
    row["curves"] = {"csim": _mean_curve(csim_curves), "sync_conf": _mean_curve(sync_curves)}
    row["per_video"] = videos
    row["notes"] = notes
    return row
