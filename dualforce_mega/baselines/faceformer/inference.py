"""FaceFormer inference in the evaluation's layout, resumable, with LVE / FDD against the ground truth.

For every record of the test JSON lists (``data.test``) the model generates the motion of the whole clip
autoregressively (no ``data.max_frames`` cut), FLAME turns it into vertices, and each frame is written as

    {out}/{exp_name}/{DATASET}/{STYLE_ID}_passionate/{i}.npy      (V, 3) float32, i = 0 .. frames-1

(DATASET = the JSON list's name without _test, STYLE_ID = the record's ``style``). A record's folder is
filled under a temporary name and renamed when complete, so an existing folder is a finished record
and a rerun skips it. Two test records of one dataset with the same style would share a folder: the
second is reported and skipped. With ``gt_out`` the ground-truth meshes are written in the same layout
(and ``template.npy``, the neutral FLAME mesh), for ``python -m eval.metrics.lve``; ``render`` adds
``{STYLE_ID}_passionate.mp4`` next to a new record's folder when pyrender is installed. With lip vertex
indices, LVE (and FDD with upper-face indices) over all records is computed in place
(``dualforce_mega.metrics.lve``) and written to ``{out}/{exp_name}/metrics.json``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ...encoders.weights import load_strict, read_state_dict
from ...fsutil import atomic_write
from ...metrics.lve import lip_max_sq_errors, upper_motion_std
from ...models.faceformer import FaceFormer
from ...models.flame import FlameModel
from ...preprocess.manifest import FAILED, OK, SKIPPED, Manifest
from .build import build_model
from .config import FaceFormerConfig
from .data import Clip, Problem, collate, load_sample, load_split
from .render import render_mp4

STEP = "faceformer"
STYLE_SUFFIX = "_passionate"
PARTIAL_PREFIX = "."
PARTIAL_SUFFIX = ".partial"

log = logging.getLogger(__name__)


def record_dir(root: Path, clip: Clip) -> Path:
    return root / clip.record.dataset / f"{clip.record.style}{STYLE_SUFFIX}"


def write_frames(folder: Path, vertices: np.ndarray) -> None:
    """One ``{i}.npy`` (V, 3) float32 per frame, published by renaming a temporary folder."""
    tmp = folder.with_name(f"{PARTIAL_PREFIX}{folder.name}{PARTIAL_SUFFIX}")
    if tmp.exists():
        shutil.rmtree(tmp)          # left by a killed run
    tmp.mkdir(parents=True)
    for i, frame in enumerate(vertices.astype(np.float32)):
        np.save(tmp / f"{i}.npy", frame)
    os.rename(tmp, folder)


def read_frames(folder: Path) -> np.ndarray:
    frames = sorted((p for p in folder.glob("*.npy") if p.stem.isdigit()), key=lambda p: int(p.stem))
    return np.stack([np.load(p, allow_pickle=False) for p in frames])


def load_faceformer(cfg: FaceFormerConfig, weights: Path, device: torch.device) -> FaceFormer:
    """The configured model with the trained weights (safetensors / weights-only torch file, strict)."""
    model = build_model(cfg.model)
    load_strict(model, read_state_dict(weights, "FaceFormer"), weights, "FaceFormer")
    return model.to(device).eval()


@dataclass
class LveAccumulator:
    lip_idx: Sequence[int]
    upper_idx: Optional[Sequence[int]]
    template: np.ndarray
    lip_errors: list[np.ndarray] = field(default_factory=list)
    fdd_diffs: list[float] = field(default_factory=list)

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        n = min(len(pred), len(gt))
        self.lip_errors.append(lip_max_sq_errors(pred[:n], gt[:n], self.lip_idx))
        if self.upper_idx is not None:
            self.fdd_diffs.append(upper_motion_std(gt[:n], self.template, self.upper_idx)
                                  - upper_motion_std(pred[:n], self.template, self.upper_idx))

    def result(self) -> dict:
        """Same definitions as ``metrics.lve.lve`` / ``fdd`` (frame-weighted LVE, sequence-mean FDD)."""
        out: dict = {"sequences": len(self.lip_errors)}
        if self.lip_errors:
            errors = np.concatenate(self.lip_errors)
            out.update(frames=int(len(errors)), lve=float(errors.mean()))
        if self.fdd_diffs:
            out["fdd"] = float(np.mean(self.fdd_diffs))
        return out


@dataclass
class InferenceSummary:
    done: int = 0
    finished_before: int = 0
    problems: list[Problem] = field(default_factory=list)
    metrics: Optional[dict] = None

    def lines(self) -> list[str]:
        out = [f"records written: {self.done}, already finished: {self.finished_before}, "
               f"skipped: {len(self.problems)}"]
        out += [f"  skipped: {p}" for p in self.problems]
        if self.metrics:
            out.append("metrics: " + json.dumps(self.metrics))
        return out


def run_inference(cfg: FaceFormerConfig, model_fn: Callable[[], FaceFormer], flame: FlameModel, out: Path,
                  exp_name: str, device: torch.device, gt_out: Optional[Path] = None,
                  lip_idx: Optional[Sequence[int]] = None, upper_idx: Optional[Sequence[int]] = None,
                  max_frames: Optional[int] = None, render: bool = False) -> InferenceSummary:
    """Generate every test record not yet written (``model_fn`` builds the model only if one is left)."""
    d, m = cfg.data, cfg.model
    root = out / exp_name
    clips, problems = load_split(d.test, d.resolved_root(), d.fps, m.expr_dims, 1, max_frames)
    summary = InferenceSummary(problems=list(problems))
    manifest = Manifest(root / "manifest.jsonl")
    for p in problems:
        manifest.add(STEP, "record", p.file, SKIPPED, reason=p.field, detail=p.message)
    seen: dict[Path, Clip] = {}
    flame = flame.to(device)
    neutral = flame.motion_vertices(torch.zeros(1, m.motion_dim, device=device))[0].cpu().numpy()
    lve = LveAccumulator(lip_idx, upper_idx, neutral) if lip_idx is not None else None
    if gt_out is not None:
        (gt_out / exp_name).mkdir(parents=True, exist_ok=True)
        np.save(gt_out / exp_name / "template.npy", neutral.astype(np.float32))
    model: Optional[FaceFormer] = None
    for clip in tqdm(clips, desc="faceformer inference", unit="clip"):
        folder = record_dir(root, clip)
        if folder in seen:
            p = Problem(clip.record.where, "style", f"{clip.record.style!r} is also the style of {seen[folder].record.where} "
                        f"in {clip.record.dataset}: both would write {folder}")
            log.warning("skipped: %s", p)
            summary.problems.append(p)
            manifest.add(STEP, "record", clip.record.where, SKIPPED, reason="duplicate_style", detail=p.message)
            continue
        seen[folder] = clip
        need_gt = gt_out is not None or lve is not None
        gt = flame.motion_vertices(torch.from_numpy(clip.motion).to(device)).cpu().numpy() if need_gt else None
        if gt_out is not None:
            gt_folder = record_dir(gt_out / exp_name, clip)
            if not gt_folder.exists():
                write_frames(gt_folder, gt)
        if folder.exists():
            summary.finished_before += 1
            if lve is not None:
                lve.add(read_frames(folder), gt)
            continue
        t0 = time.perf_counter()
        try:
            sample = load_sample(clip, m.subjects)
        except ValueError as e:
            p = Problem(str(clip.record.audio), "audio", str(e))
            summary.problems.append(p)
            manifest.add(STEP, "record", clip.record.where, FAILED, reason="audio", detail=str(e))
            continue
        if model is None:
            model = model_fn()
        batch = collate([sample], [0])
        with torch.no_grad():
            motion = model.generate(batch["audio"].to(device), batch["audio_len"].to(device),
                                    batch["frames"].to(device), batch["style"].to(device))[0]
            verts = flame.motion_vertices(motion.float()).cpu().numpy()
        write_frames(folder, verts)
        if render:
            render_mp4(verts, flame.faces.cpu().numpy(), folder.with_name(folder.name + ".mp4"), d.fps, sample["audio"])
        if lve is not None:
            lve.add(verts, gt)
        summary.done += 1
        manifest.add(STEP, "record", clip.record.where, OK, seconds=time.perf_counter() - t0,
                     frames=int(len(verts)), output=str(folder))
    if lve is not None:
        summary.metrics = lve.result()
        atomic_write(root / "metrics.json", json.dumps(summary.metrics, indent=1))
    return summary
