"""Run the whole pipeline (or a selection of its steps) and return the summary.

A step that is not selected contributes only the outputs it already has on disk (clips it has not
processed yet are left out of later steps and reported as ``pending``), so the per-step CLIs are
the same command with one step selected, and re-running with all steps finishes what is missing.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ..config import model_preset
from .build_shards import clip_meta, split_subjects, subject_of, write_split_shards, write_splits_file
from .features import build_audio, build_flame, build_latents, build_motion, build_text, load_step, run_clip_step
from .manifest import OK, Manifest, summarize
from .pipeline import STEPS, PrepareOptions, clip_record, list_sources, run_step01, run_step02

log = logging.getLogger(__name__)

TALKING_HEAD_STEPS = STEPS
VIDEO_STEPS = ("01_clips", "02_quality", "03_latents", "06_text", "07_shards")
SHARDS_DIR = "shards"


def run_prepare(opts: PrepareOptions) -> dict[str, Any]:
    cfg = opts.config
    model = model_preset(opts.preset)
    if cfg.clip.fps != model.fps:
        raise ValueError(f"clip.fps {cfg.clip.fps} != model.fps {model.fps} of preset {opts.preset}")
    if opts.random_models:
        log.warning("=" * 80)
        log.warning("--random-models %s: every network without a path is a RANDOM tiny instance; the shards are "
                    "for smoke tests only (recorded as random_models in every clip's metadata)", opts.random_models)
        log.warning("=" * 80)
    check_options(opts, TALKING_HEAD_STEPS if cfg.mode == "talking-head" else VIDEO_STEPS)
    torch.manual_seed(0)
    opts.out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(opts.out / "manifest.jsonl")
    t_start = time.perf_counter()
    sources = list_sources(opts.src, cfg.dataset)
    info_by_input = {s.input_id: s.info for s in sources}
    selected = set(opts.steps)
    mode_steps = TALKING_HEAD_STEPS if cfg.mode == "talking-head" else VIDEO_STEPS

    # 01: inputs -> clips
    records = run_step01(opts, sources, manifest, model.vae_temporal_stride, run="01_clips" in selected)
    clips = [clip_record(opts, r["input_id"], k) for r in records for k in r.get("clips", [])]
    for c in clips:
        c["caption"] = info_by_input.get(c["input_id"], {}).get("caption")
    # 02: quality
    quality = run_step02(opts, clips, manifest, run="02_quality" in selected)
    kept = [c for c in clips if c["key"] in quality and quality[c["key"]]["keep"]]

    # 03..06: features; a clip goes on only with an ok output of every step
    builders = {"03_latents": (build_latents, cfg.latent_batch, lambda r: (r["num_video_frames"], r["size"])),
                "04_motion": (build_motion, 1, lambda r: 0),
                "05_flame": (build_flame, 1, lambda r: 0),
                "06_audio": (build_audio, 1, lambda r: 0),
                "06_text": (build_text, 1, lambda r: 0)}
    step_meta: dict[str, dict[str, dict]] = {}
    for step, (build, batch, group) in builders.items():
        if step not in mode_steps or (step == "06_text" and (model.text_dim == 0 or
                                                            not any(c.get("caption") for c in kept))):
            continue
        metas = run_clip_step(opts, step, kept, manifest, lambda b=build: b(opts, model), batch_size=batch,
                              group=group, run=step in selected)
        step_meta[step] = metas
        kept = [c for c in kept if metas.get(c["key"], {}).get("status") == OK]

    # 07: split by subject, shards
    summary_kept = 0
    if "07_shards" in selected:
        summary_kept = _write_shards(opts, model, kept, info_by_input, quality, step_meta, manifest)
    summary = summarize(manifest, inputs=len(sources), kept=summary_kept)
    summary["seconds"] = round(time.perf_counter() - t_start, 2)
    summary["random_models"] = opts.random_models
    (opts.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def check_options(opts: PrepareOptions, mode_steps: tuple[str, ...]) -> None:
    """Fail before any work when a selected step will need a network nobody gave, or when the
    output would land inside the input folder (a tool never writes into its input)."""
    src, out = opts.src.resolve(), opts.out.resolve()
    if out == src or src in out.parents:
        raise ValueError(f"--out {opts.out} is inside --src {opts.src}: choose an output folder outside the input")
    selected = set(opts.steps) & set(mode_steps)
    need = {"03_latents": ("--vae", opts.vae), "06_audio": ("--audio-encoder", opts.audio_encoder)}
    for step, (flag, value) in need.items():
        if step in selected and not value and not opts.random_models:
            raise ValueError(f"step {step} needs {flag} PATH (or --random-models tiny for a smoke run)")
    for flag, value in (("--vae", opts.vae), ("--audio-encoder", opts.audio_encoder),
                        ("--motion-extractor", opts.motion_extractor), ("--syncnet", opts.syncnet),
                        ("--emoca", opts.emoca), ("--flame-dir", opts.flame_dir), ("--text-encoder", opts.text_encoder)):
        if value and not Path(value).exists():
            raise FileNotFoundError(f"{flag} {value}: no such file or directory")


def _write_shards(opts: PrepareOptions, model, kept: list[dict], info_by_input: dict, quality: dict,
                  step_meta: dict, manifest: Manifest) -> int:
    step = "07_shards"
    timing = manifest.timing(step)
    t0 = time.perf_counter()
    subjects = {c["key"]: subject_of(c["input_id"], info_by_input.get(c["input_id"], {})) for c in kept}
    splits = split_subjects(list(subjects.values()), opts.config.split_fractions, opts.config.split_seed)
    write_splits_file(opts.out / "splits.json", splits)
    by_key = {c["key"]: c for c in kept}

    def load(key: str):
        rec = by_key[key]
        tensors: dict[str, torch.Tensor] = {}
        metas = {}
        for s in step_meta:
            t, m = load_step(opts, s, key)
            tensors.update(t)
            metas[s] = m
        num_latent = int(tensors["video_latent"].shape[1])
        meta = clip_meta(rec, info_by_input.get(rec["input_id"], {}), quality[key]["scores"], metas, model,
                         num_latent, splits[subjects[key]], opts.random_models, opts.config.mode)
        return tensors, meta

    root = opts.out / SHARDS_DIR
    extra = {"prepare": {"mode": opts.config.mode, "preset": opts.preset, "random_models": opts.random_models,
                         "config": opts.config.to_dict()}}
    written = 0
    for split in ("train", "val", "test"):
        keys = [k for k in by_key if splits[subjects[k]] == split]
        if not keys:
            continue
        out = root if split == "train" else root / split
        wrote = write_split_shards(out, keys, load, model, opts.config, {**extra, "split": split})
        for k in keys:
            manifest.add(step, "clip", k, OK if wrote else "cached", None, f"split {split}", shards=str(out))
        written += len(keys)
        if wrote:
            timing.done += len(keys)
        else:
            timing.cached += len(keys)
    timing.seconds += time.perf_counter() - t0
    return written


__all__ = ["run_prepare", "SHARDS_DIR", "VIDEO_STEPS", "TALKING_HEAD_STEPS"]
