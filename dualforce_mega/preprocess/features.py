"""Steps 03..06: per-clip network features, batched, resumable, one manifest row per clip.

Each step writes ``work/<step>/<key>.safetensors`` (its tensors) and then ``<key>.json`` (its metadata
and status; written last, so it marks the clip done). Networks are built only when some clip still
needs them, from a user path or, with ``--random-models tiny``, as tiny random instances of the same
classes (logged loudly; the choice is recorded in every clip's metadata).

* 03 ``video_latent`` / ``ref_latent`` / ``ref_positions`` (:mod:`.latents`)
* 04 ``struct`` / ``kp_canonical``: LivePortrait from ``--motion-extractor``, else MediaPipe (:mod:`.motion`)
* 05 ``flame``: precomputed EMOCA outputs (``--flame-dir``) or EMOCA on the crops (``--emoca``); without
  either the clip has no ``flame`` tensor and ``has_flame: false`` (:mod:`.flame`)
* 06 ``audio``: HuBERT / wav2vec2 from ``--audio-encoder``, 2 features per video frame (:mod:`.audio_features`)
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..config import ModelConfig
from ..fsutil import atomic_write
from .netutil import random_init, resolve_device
from .manifest import CACHED, FAILED, OK, PENDING, SKIPPED, Manifest
from .pipeline import PrepareOptions
from .video_io import read_clip, read_wav

log = logging.getLogger(__name__)


@dataclass
class ClipResult:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    skip: Optional[tuple[str, str]] = None        # (reason, detail): the clip is dropped


BatchFn = Callable[[list[dict]], list[ClipResult]]


def network_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def loud_random(what: str, preset: str) -> None:
    log.warning("!" * 80)
    log.warning("RANDOM %s (--random-models %s): tiny random weights, smoke runs only -- NOT real features",
                what, preset)
    log.warning("!" * 80)


def step_outputs(opts: PrepareOptions, step: str, key: str) -> tuple[Path, Path]:
    d = opts.step_dir(step)
    return d / f"{key}.safetensors", d / f"{key}.json"


def load_step(opts: PrepareOptions, step: str, key: str) -> tuple[dict[str, torch.Tensor], dict]:
    st, js = step_outputs(opts, step, key)
    meta = json.loads(js.read_text())
    return (load_file(str(st)) if st.is_file() else {}), meta


def run_clip_step(opts: PrepareOptions, step: str, clips: list[dict], manifest: Manifest, build: Callable[[], BatchFn],
                  batch_size: int = 1, group: Callable[[dict], Any] = lambda r: 0, run: bool = True) -> dict[str, dict]:
    """Run ``build()``'s batch function over the clips whose output is missing; returns key -> meta
    (status ``ok`` / ``skipped``) for every clip, cached or new."""
    d = opts.step_dir(step)
    d.mkdir(parents=True, exist_ok=True)
    timing = manifest.timing(step)
    metas: dict[str, dict] = {}
    todo: list[dict] = []
    for rec in clips:
        _, js = step_outputs(opts, step, rec["key"])
        if js.is_file():
            metas[rec["key"]] = m = json.loads(js.read_text())
            timing.cached += 1
            manifest.add(step, "clip", rec["key"], CACHED, m.get("reason"))
        elif run:
            todo.append(rec)
        else:
            manifest.add(step, "clip", rec["key"], PENDING)
    if not todo:
        return metas
    fn = build()
    batches: list[list[dict]] = []
    for rec in sorted(todo, key=lambda r: (str(group(r)), r["key"])):
        if batches and len(batches[-1]) < batch_size and group(batches[-1][0]) == group(rec):
            batches[-1].append(rec)
        else:
            batches.append([rec])
    t_step = time.perf_counter()
    from tqdm import tqdm
    with tqdm(total=len(todo), desc=step, unit="clip") as bar:
        for batch in batches:
            t0 = time.perf_counter()
            try:
                results = fn(batch)
            except Exception as e:  # noqa: BLE001  -- reported and retried next run (nothing cached)
                log.exception("%s: batch %s failed", step, [r["key"] for r in batch])
                for rec in batch:
                    metas[rec["key"]] = {"status": FAILED, "reason": "error", "detail": f"{type(e).__name__}: {e}"}
                    manifest.add(step, "clip", rec["key"], FAILED, "error", metas[rec["key"]]["detail"])
                bar.update(len(batch))
                continue
            per = (time.perf_counter() - t0) / len(batch)
            for rec, res in zip(batch, results):
                st, js = step_outputs(opts, step, rec["key"])
                meta = {**res.meta, "status": SKIPPED if res.skip else OK,
                        "reason": res.skip[0] if res.skip else None, "detail": res.skip[1] if res.skip else None}
                if res.tensors and not res.skip:
                    tmp = st.with_name(st.name + ".tmp")
                    save_file({k: v.contiguous() for k, v in res.tensors.items()}, str(tmp))
                    tmp.replace(st)
                atomic_write(js, json.dumps(meta, indent=1))
                metas[rec["key"]] = meta
                timing.done += 1
                manifest.add(step, "clip", rec["key"], meta["status"], meta["reason"], meta["detail"], per)
            bar.update(len(batch))
    timing.seconds += time.perf_counter() - t_step
    return metas


def _frames(rec: dict) -> np.ndarray:
    return read_clip(Path(rec["dir"]) / rec["video"])


# --------------------------------------------------------------------------------------------
# builders, one per step
# --------------------------------------------------------------------------------------------
def build_latents(opts: PrepareOptions, model: ModelConfig) -> BatchFn:
    from ..encoders.vae import WanVAE, tiny_vae
    from .latents import encode_clips
    device = resolve_device(opts.device)
    if opts.vae:
        vae = WanVAE.from_pretrained(opts.vae, device, network_dtype(device))
        source = str(opts.vae)
    elif opts.random_models:
        loud_random("Wan VAE", opts.random_models)
        with random_init():
            vae = WanVAE(tiny_vae(z_dim=model.in_channels).to(device))
        source = f"random-{opts.random_models}"
    else:
        raise ValueError("step 03_latents needs --vae PATH (diffusers AutoencoderKLWan dir) or --random-models tiny")
    if vae.z_dim != model.in_channels or vae.temporal_stride != model.vae_temporal_stride:
        raise ValueError(f"--vae {source}: z_dim {vae.z_dim} / temporal stride {vae.temporal_stride} do not match "
                         f"model.in_channels {model.in_channels} / vae_temporal_stride {model.vae_temporal_stride}")
    spatial = vae.spatial_stride * model.patch_size[1]

    def fn(batch: list[dict]) -> list[ClipResult]:
        size = batch[0]["size"]
        if size % spatial:
            return [ClipResult(skip=("bad_size", f"crop size {size} is not a multiple of {spatial}"))] * len(batch)
        outs = encode_clips(vae, [_frames(r) for r in batch], opts.config.ref_every, opts.config.latent_batch)
        return [ClipResult(o, {"vae": source}) for o in outs]
    return fn


def build_motion(opts: PrepareOptions, model: ModelConfig) -> BatchFn:
    from . import motion as motionlib
    if opts.motion_extractor or not opts.random_models:
        extractor = motionlib.build_motion_extractor(opts.motion_extractor, device=opts.device)
    else:
        loud_random("LivePortrait motion extractor", opts.random_models)
        extractor = motionlib.random_liveportrait(opts.random_models, device=opts.device)

    def fn(batch: list[dict]) -> list[ClipResult]:
        out = []
        for rec in batch:
            res = extractor(_frames(rec))
            if res is None:
                out.append(ClipResult(skip=("no_motion", "the motion extractor found no face")))
                continue
            t = {"struct": torch.from_numpy(np.asarray(res.struct, np.float32)),
                 "kp_canonical": torch.from_numpy(np.asarray(res.kp_canonical, np.float32))}
            if tuple(t["struct"].shape) != (rec["num_video_frames"], model.motion_dim) or \
                    t["kp_canonical"].shape[-1] != model.kp_dim:
                raise ValueError(f"motion extractor {res.extractor}: struct {list(t['struct'].shape)} / kp "
                                 f"{list(t['kp_canonical'].shape)} do not match {rec['num_video_frames']} frames x "
                                 f"model.motion_dim {model.motion_dim} / kp_dim {model.kp_dim}")
            out.append(ClipResult(t, {"motion_extractor": res.extractor,
                                      "missing_frames": int(getattr(res, "missing_frames", 0))}))
        return out
    return fn


def build_flame(opts: PrepareOptions, model: ModelConfig) -> BatchFn:
    from .flame import build_flame_step
    if opts.random_models and not opts.emoca:
        loud_random("EMOCA FLAME encoder", opts.random_models)
    step = build_flame_step(opts.flame_dir, emoca=opts.emoca, flame_fps=opts.flame_fps,
                            random_models=None if opts.emoca else opts.random_models, device=opts.device)

    def fn(batch: list[dict]) -> list[ClipResult]:
        out = []
        for rec in batch:
            frames = _frames(rec) if step.emoca is not None else None
            res = step(rec["source_file"], rec["time_range"][0], rec["num_video_frames"], rec["fps"], frames)
            meta = {"has_flame": res.flame is not None, "flame_source": res.source, "flame_reason": res.reason}
            out.append(ClipResult({"flame": torch.from_numpy(np.asarray(res.flame, np.float32))}, meta)
                       if res.flame is not None else ClipResult(meta=meta))
        return out
    return fn


def build_audio(opts: PrepareOptions, model: ModelConfig) -> BatchFn:
    from .audio_features import build_audio_encoder, extract_audio_features
    if opts.random_models and not opts.audio_encoder:
        loud_random("HuBERT audio encoder", opts.random_models)
    enc = build_audio_encoder(opts.audio_encoder, random_models=opts.random_models, random_dim=model.audio_dim,
                              layer=opts.audio_layer, device=opts.device)
    source = str(opts.audio_encoder) if opts.audio_encoder else f"random-{opts.random_models}"
    if enc.dim != model.audio_dim:
        raise ValueError(f"--audio-encoder {source}: hidden size {enc.dim} != model.audio_dim {model.audio_dim}")

    def fn(batch: list[dict]) -> list[ClipResult]:
        out = []
        for rec in batch:
            wave, _ = read_wav(Path(rec["dir"]) / rec["audio"])
            feats = extract_audio_features(enc, torch.from_numpy(wave), rec["num_video_frames"], rec["fps"],
                                           model.audio_rate)
            out.append(ClipResult({"audio": feats}, {"audio_encoder": source, "audio_layer": opts.audio_layer}))
        return out
    return fn


def build_text(opts: PrepareOptions, model: ModelConfig) -> BatchFn:
    from .text import build_text_encoder
    enc = build_text_encoder(opts.text_encoder, model.text_dim, None if opts.text_encoder else opts.random_models,
                             opts.device)

    def fn(batch: list[dict]) -> list[ClipResult]:
        return [ClipResult({"text_emb": enc(rec["caption"])}, {"text_encoder": enc.name, "has_text": True})
                if rec.get("caption") else ClipResult(meta={"has_text": False}) for rec in batch]
    return fn


__all__ = ["ClipResult", "build_text", "run_clip_step", "load_step", "build_latents", "build_motion", "build_flame", "build_audio"]
