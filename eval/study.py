"""The evaluation study: models x test sets x lengths, generation through ``eval.pipeline`` (resumable:
an existing video is not generated again), then metrics per (model, test set, length).

Study YAML (relative paths are relative to the YAML file)::

    out: results/study
    metrics: [fid, fvd, csim, sync, apd]
    lengths: [32, 128, 256, 512]
    faces: detect                     # detect (Haar + tracking) | full (videos are face crops)
    generation: {steps: 8, seed: 0}   # eval.generate sampling options (height, width, cfg_audio, ...)
    models:
      dualforce: {bundle: bundles/dualforce}
      long_window: {bundle: bundles/dualforce, diffusion: {window_blocks: 8, chunk_blocks: 1}}
      smoke: {random_preset: tiny}
    test_sets:
      hdtf: {pairs: data/hdtf_test, real: data/hdtf_test/videos}   # pairs: eval.generate --batch format
    networks: {fid_inception: ..., i3d: ..., r3d18: ..., arcface: ..., syncnet: ...}   # or random_models: tiny
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .batch import Job, parse_batch
from .pipeline import GenerateOptions, PipelineSpec, build_pipeline, generate_one

log = logging.getLogger(__name__)

DEFAULT_LENGTHS = (32, 128, 256, 512)
MODEL_KEYS = {"bundle", "random_preset", "vae", "audio_encoder", "audio_layer", "diffusion", "dtype"}
GENERATION_KEYS = {"steps", "seed", "height", "width", "shift", "cfg_audio", "chunk_blocks", "window_blocks",
                   "ar_step"}
# generation option -> DiffusionConfig field
DIFFUSION_FLAGS = {"steps": "sample_steps", "shift": "sample_shift", "cfg_audio": "cfg_audio",
                   "chunk_blocks": "chunk_blocks", "window_blocks": "window_blocks", "ar_step": "ar_step"}
NETWORK_KEYS = {"fid_inception", "i3d", "r3d18", "arcface", "syncnet", "motion_extractor", "random_models"}


@dataclass
class Study:
    out: Path
    metrics: list[str]
    lengths: list[int]
    faces: str
    models: dict[str, dict[str, Any]]
    test_sets: dict[str, dict[str, Path]]
    generation: dict[str, Any] = field(default_factory=dict)
    networks: dict[str, Any] = field(default_factory=dict)


def _unknown(what: str, got: dict, allowed: set) -> None:
    bad = sorted(set(got) - allowed)
    if bad:
        raise ValueError(f"{what}: unknown keys {bad} (allowed: {sorted(allowed)})")


def load_study(path: Path, out: Optional[str] = None) -> Study:
    base = path.parent
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read the study YAML ({e})") from None
    _unknown(str(path), raw, {"out", "metrics", "lengths", "faces", "models", "test_sets", "generation", "networks"})
    rel = lambda p: None if p is None else (Path(p) if Path(p).is_absolute() else base / p)  # noqa: E731
    models = raw.get("models") or {}
    if not models:
        raise ValueError(f"{path}: models: at least one model (bundle or random_preset) is needed")
    for name, m in models.items():
        _unknown(f"{path}: models.{name}", m, MODEL_KEYS)
        for k in ("bundle", "vae", "audio_encoder"):
            if m.get(k):
                m[k] = str(rel(m[k]))
    test_sets = {}
    for name, t in (raw.get("test_sets") or {}).items():
        _unknown(f"{path}: test_sets.{name}", t, {"pairs", "real"})
        if "pairs" not in t:
            raise ValueError(f"{path}: test_sets.{name}: needs pairs (folder or list of image/audio pairs)")
        test_sets[name] = {"pairs": rel(t["pairs"]), "real": rel(t.get("real"))}
    if not test_sets:
        raise ValueError(f"{path}: test_sets: at least one test set is needed")
    gen = raw.get("generation") or {}
    _unknown(f"{path}: generation", gen, GENERATION_KEYS)
    nets = raw.get("networks") or {}
    _unknown(f"{path}: networks", nets, NETWORK_KEYS)
    nets = {k: (str(rel(v)) if k != "random_models" and v else v) for k, v in nets.items()}
    out_dir = Path(out) if out else rel(raw.get("out") or "results")
    return Study(out=out_dir, metrics=list(raw.get("metrics") or ["fid", "fvd", "csim", "sync", "apd"]),
                 lengths=[int(x) for x in raw.get("lengths") or DEFAULT_LENGTHS], faces=raw.get("faces", "detect"),
                 models=models, test_sets=test_sets, generation=gen, networks=nets)


def network_args(study: Study, cli: argparse.Namespace) -> argparse.Namespace:
    """The study's networks section, overridden by command-line flags that were given."""
    merged = dict(study.networks)
    for k in NETWORK_KEYS:
        if getattr(cli, k, None):
            merged[k] = getattr(cli, k)
    return argparse.Namespace(**{k: merged.get(k) for k in NETWORK_KEYS}, device=getattr(cli, "device", None))


def pipeline_spec(model: dict, gen: dict) -> PipelineSpec:
    diffusion = {DIFFUSION_FLAGS[k]: v for k, v in gen.items() if k in DIFFUSION_FLAGS}
    diffusion.update(model.get("diffusion") or {})
    return PipelineSpec(bundle=model.get("bundle"), random_preset=model.get("random_preset"), vae=model.get("vae"),
                        audio_encoder=model.get("audio_encoder"), audio_layer=model.get("audio_layer", -1),
                        dtype=model.get("dtype", "auto"), height=gen.get("height"), width=gen.get("width"),
                        diffusion=diffusion)


def generate_videos(study: Study, model_name: str, jobs: dict[str, list[Job]]) -> tuple[dict, list[dict]]:
    """Generates what is missing for one model; returns {(test_set, length): folder} and failures."""
    folders, failed, pipe = {}, [], None
    for ts, ts_jobs in jobs.items():
        for length in study.lengths:
            folder = study.out / "videos" / model_name / ts / str(length)
            folders[(ts, length)] = folder
            todo = [j for j in ts_jobs if not (folder / f"{j.name}.mp4").exists()]
            if todo:
                log.info("%s / %s / %d frames: generating %d of %d videos", model_name, ts, length, len(todo),
                         len(ts_jobs))
            for job in todo:
                if pipe is None:
                    pipe = build_pipeline(pipeline_spec(study.models[model_name], study.generation))
                try:
                    generate_one(pipe, job, folder / f"{job.name}.mp4",
                                 GenerateOptions(frames=length, seed=int(study.generation.get("seed", 0)),
                                                 progress=False))
                except (ValueError, OSError, RuntimeError) as e:
                    log.error("%s / %s / %s: generation failed: %s", model_name, ts, job.name, e)
                    failed.append({"model": model_name, "test_set": ts, "length": length, "name": job.name,
                                   "error": str(e)})
    return folders, failed


def test_set_jobs(study: Study) -> dict[str, list[Job]]:
    return {name: parse_batch(str(t["pairs"])) for name, t in study.test_sets.items()}
