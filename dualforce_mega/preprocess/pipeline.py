"""The raw-video pipeline (``python -m data_tools.prepare``): steps 01..07 over a folder of videos.

Layout of ``OUT``::

    manifest.jsonl                    one row per input and per clip and step (status, reason, seconds)
    work/01_clips/<input>/<key>.mp4   cropped clip (25 fps, size^2), <key>.wav (16 kHz mono), <key>.json
    work/01_clips/<input>.json        the input's step-01 record (written last: the input is done)
    work/02_quality/<key>.json        quality scores and keep / drop
    work/0N_<name>/<key>.safetensors  per-clip features of steps 03..06 (+ <key>.json metadata)
    shards/                           WebDataset shards + index.json (step 07)

Every per-item output is written atomically and an existing one is not recomputed, so a killed
run restarted with the same arguments continues where it stopped. Steps 01 and 02 (CPU) run in
``workers`` processes over files / clips; steps 03..06 run the networks in this process, batched,
on ``device``.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from tqdm import tqdm

from ..fsutil import atomic_write
from .clips import extract_clips, safe_id
from .config import PrepareConfig
from .netutil import resolve_device
from .manifest import CACHED, FAILED, OK, PENDING, SKIPPED, Manifest
from .video_io import MediaError

log = logging.getLogger(__name__)

STEPS = ("01_clips", "02_quality", "03_latents", "04_motion", "05_flame", "06_audio", "06_text", "07_shards")
SIDECAR_EXT = ".json"          # <video stem>.json next to a video: dataset / subject / gender / caption
CAPTION_EXT = ".txt"


@dataclass
class PrepareOptions:
    src: Path
    out: Path
    config: PrepareConfig = field(default_factory=PrepareConfig)
    vae: Optional[str] = None
    audio_encoder: Optional[str] = None
    audio_layer: int = -1
    motion_extractor: Optional[str] = None
    flame_dir: Optional[str] = None
    emoca: Optional[str] = None               # EMOCA checkpoint: FLAME from the crops when no flame file
    flame_fps: float = 25.0                   # frame rate of precomputed FLAME files without one inside
    text_encoder: Optional[str] = None
    syncnet: Optional[str] = None             # syncnet_v2.model: SyncNet confidence in step 02
    workers: int = 1
    device: str = "auto"
    random_models: Optional[str] = None       # "tiny": random networks of the real classes (smoke runs)
    preset: str = "lite"                      # model preset whose dims the shards must match
    steps: tuple[str, ...] = STEPS

    @property
    def work(self) -> Path:
        return self.out / "work"

    def step_dir(self, step: str) -> Path:
        return self.work / step


@dataclass
class Source:
    """One input file and what its sidecar says about it."""
    path: Path
    input_id: str
    info: dict

    @property
    def dataset(self) -> str:
        return str(self.info.get("dataset", "raw"))


def list_sources(src: Path, dataset: Optional[str]) -> list[Source]:
    """Every regular file under ``src`` except hidden files and sidecars (``<stem>.json`` / ``.txt``
    next to another file with that stem); sorted, ids unique."""
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src}: not a directory")
    files = sorted(p for p in src.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(src).parts))
    stems = {}
    for p in files:
        if p.suffix not in (SIDECAR_EXT, CAPTION_EXT):
            stems.setdefault((p.parent, p.stem), p)
    out, seen = [], set()
    for p in files:
        if p.suffix in (SIDECAR_EXT, CAPTION_EXT) and (p.parent, p.stem) in stems:
            continue
        rel = p.relative_to(src)
        input_id = safe_id(str(rel.with_suffix("")))
        while input_id in seen:
            input_id += "_"
        seen.add(input_id)
        info: dict[str, Any] = {"dataset": dataset or (rel.parts[0] if len(rel.parts) > 1 else "raw")}
        side = p.with_suffix(SIDECAR_EXT)
        if side.is_file() and side != p:
            try:
                info.update(json.loads(side.read_text()))
            except json.JSONDecodeError as e:
                raise ValueError(f"{side}: sidecar is not valid JSON: {e}") from None
        cap = p.with_suffix(CAPTION_EXT)
        if cap.is_file() and cap != p and "caption" not in info:
            info["caption"] = cap.read_text().strip()
        out.append(Source(p, input_id, info))
    return out


# --------------------------------------------------------------------------------------------
# parallel map with resume and manifest rows
# --------------------------------------------------------------------------------------------
def parallel_map(fn: Callable[[Any], dict], items: list, workers: int, desc: str) -> Iterable[dict]:
    """``fn`` over ``items`` in ``workers`` spawned processes (in this process when 1), results as
    they complete. ``fn`` must be a module-level function returning a dict."""
    if workers <= 1 or len(items) <= 1:
        for item in tqdm(items, desc=desc, unit="item"):
            yield fn(item)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                             initializer=_worker_init) as pool:
        futures = [pool.submit(fn, item) for item in items]
        for fut in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="item"):
            yield fut.result()


def _worker_init() -> None:
    import torch
    torch.set_num_threads(1)           # workers are the parallelism; no oversubscription
    logging.basicConfig(level=logging.WARNING)


# --------------------------------------------------------------------------------------------
# step 01
# --------------------------------------------------------------------------------------------
_DETECTORS: dict = {}


def _step01_one(job: dict) -> dict:
    """Worker: step 01 for one input; writes the input record last and returns it."""
    from . import face as facelib
    from .config import ClipConfig
    cfg = ClipConfig(**job["clip"])
    src, out_dir, record_path = Path(job["path"]), Path(job["out_dir"]), Path(job["record"])
    t0 = time.perf_counter()
    detector = None
    if job["mode"] == "talking-head" and not cfg.aligned:
        key = (cfg.detector, cfg.detector_weights, job["device"])
        if key not in _DETECTORS:
            _DETECTORS[key] = facelib.build_detector(cfg.detector, cfg.detector_weights, job["device"])
        detector = _DETECTORS[key]
    record: dict[str, Any] = {"input_id": job["input_id"], "source_file": job["path"], "info": job["info"]}
    try:
        clips, skips = extract_clips(src, job["input_id"], out_dir, cfg, stride=job["stride"], mode=job["mode"],
                                     detector=detector, need_audio=job["mode"] == "talking-head")
        record.update(status=OK if clips else SKIPPED, clips=[c["key"] for c in clips],
                      skips=[s.to_json() for s in skips])
        if not clips:
            reasons = sorted({s.reason for s in skips}) or ["no_clips"]
            record.update(reason=reasons[0] if len(reasons) == 1 else "no_usable_clip",
                          detail="; ".join(s.detail for s in skips[:3]))
    except MediaError as e:
        record.update(status=SKIPPED, clips=[], skips=[], reason=e.reason, detail=e.detail)
    except Exception as e:  # noqa: BLE001  -- one bad input must not end the run; not cached, so retried
        log.exception("%s: step 01 failed", src)
        record.update(status=FAILED, clips=[], skips=[], reason="error", detail=f"{type(e).__name__}: {e}",
                      seconds=time.perf_counter() - t0)
        return record
    record["seconds"] = time.perf_counter() - t0
    atomic_write(record_path, json.dumps(record, indent=1))
    return record


def run_step01(opts: PrepareOptions, sources: list[Source], manifest: Manifest, stride: int, run: bool = True
               ) -> list[dict]:
    """Step 01 over all inputs; returns every input record (cached or new; only cached when not ``run``)."""
    step = STEPS[0]
    base = opts.step_dir(step)
    base.mkdir(parents=True, exist_ok=True)
    timing = manifest.timing(step)
    records, jobs = [], []
    clip_cfg = {k: v for k, v in vars(opts.config.clip).items()}
    for s in sources:
        rec_path = base / f"{s.input_id}.json"
        if rec_path.is_file():
            rec = json.loads(rec_path.read_text())
            records.append(rec)
            timing.cached += 1
            manifest.add(step, "input", s.input_id, CACHED, rec.get("reason"), source=str(s.path))
            continue
        if not run:
            manifest.add(step, "input", s.input_id, PENDING, source=str(s.path))
            continue
        jobs.append({"path": str(s.path), "input_id": s.input_id, "out_dir": str(base / s.input_id),
                     "record": str(rec_path), "clip": clip_cfg, "mode": opts.config.mode, "stride": stride,
                     "device": "cpu" if opts.config.clip.detector == "haar" else str(resolve_device(opts.device)),
                     "info": s.info})
    t0 = time.perf_counter()
    for rec in parallel_map(_step01_one, jobs, opts.workers, "01 clips"):
        records.append(rec)
        timing.done += 1
        manifest.add(step, "input", rec["input_id"], rec["status"], rec.get("reason"), rec.get("detail"),
                     rec["seconds"], source=rec["source_file"], clips=len(rec["clips"]))
        for skip in rec["skips"]:
            manifest.add(step, "segment", rec["input_id"], SKIPPED, skip["reason"], skip["detail"],
                         time_range=skip["time_range"])
    timing.seconds += time.perf_counter() - t0
    return records


def clip_record(opts: PrepareOptions, input_id: str, key: str) -> dict:
    d = opts.step_dir(STEPS[0]) / input_id
    rec = json.loads((d / f"{key}.json").read_text())
    rec["dir"] = str(d)
    return rec


# --------------------------------------------------------------------------------------------
# step 02
# --------------------------------------------------------------------------------------------
def _step02_one(job: dict) -> dict:
    from .config import QualityConfig
    cfg = QualityConfig(**job["quality"])
    rec = job["record"]
    t0 = time.perf_counter()
    try:
        return _score(rec, cfg, Path(job["out"]), t0, job.get("syncnet"), job.get("device", "cpu"))
    except Exception as e:  # noqa: BLE001  -- reported, not cached
        log.exception("%s: step 02 failed", rec["key"])
        return {"key": rec["key"], "scores": {}, "keep": False, "failed": True, "reason": "error",
                "detail": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0}


def _score(rec: dict, cfg, out: Path, t0: float, syncnet: Optional[str], device: str) -> dict:
    from .quality import score_clip, verdict
    from .video_io import read_clip, read_wav
    d = Path(rec["dir"])
    frames = read_clip(d / rec["video"])
    wave, rate = read_wav(d / rec["audio"]) if rec.get("audio") else (None, rec["sample_rate"])
    talking = rec["mode"] == "talking-head"
    scores = score_clip(frames, wave if talking else None, rate, rec["quality"], cfg, syncnet, device)
    bad = verdict(scores, cfg, need_face=talking and not rec["aligned"], need_speech=talking)
    result = {"key": rec["key"], "scores": scores, "keep": bad is None, "reason": bad[0] if bad else None,
              "detail": bad[1] if bad else None, "seconds": time.perf_counter() - t0}
    atomic_write(out, json.dumps(result, indent=1))
    return result


def run_step02(opts: PrepareOptions, clips: list[dict], manifest: Manifest, run: bool = True) -> dict[str, dict]:
    """Quality of every clip; returns key -> result (scores, keep, reason)."""
    step = STEPS[1]
    base = opts.step_dir(step)
    base.mkdir(parents=True, exist_ok=True)
    timing = manifest.timing(step)
    results, jobs = {}, []
    for rec in clips:
        out = base / f"{rec['key']}.json"
        if out.is_file():
            results[rec["key"]] = res = json.loads(out.read_text())
            timing.cached += 1
            manifest.add(step, "clip", rec["key"], CACHED, res["reason"])
            continue
        if not run:
            manifest.add(step, "clip", rec["key"], PENDING)
            continue
        jobs.append({"record": rec, "out": str(out), "quality": vars(opts.config.quality), "syncnet": opts.syncnet,
                     "device": str(resolve_device(opts.device)) if opts.syncnet else "cpu"})
    t0 = time.perf_counter()
    for res in parallel_map(_step02_one, jobs, opts.workers, "02 quality"):
        results[res["key"]] = res
        timing.done += 1
        status = FAILED if res.get("failed") else OK if res["keep"] else SKIPPED
        manifest.add(step, "clip", res["key"], status, res["reason"], res["detail"], res["seconds"],
                     scores=res["scores"])
    timing.seconds += time.perf_counter() - t0
    return results


__all__ = ["STEPS", "PrepareOptions", "Source", "list_sources", "parallel_map", "run_step01", "run_step02",
           "clip_record"]
