"""The batch runner: every pair of the input folder through one LatentSync pipeline, resumable.

A pair is finished when both its outputs exist and are readable (a video and an audio stream, a
first frame that decodes); finished pairs are skipped, so a killed run picks up where it stopped.
Outputs are written under ``.partial.mp4`` names and renamed when complete, so a file with the
final name is never half-written. A pair that fails (unreadable input, no face, ...) is recorded
with its reason and the batch goes on. ``manifest.jsonl`` (the data pipeline's
:class:`~dualforce_mega.preprocess.manifest.Manifest`) gets one row per pair and per left-out file on
every run; the summary counts done / skipped / failed.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import av
import numpy as np
import torch
from tqdm import tqdm

from dualforce_mega.fsutil import refuse_overlap
from dualforce_mega.media import Mp4Writer, load_audio
from dualforce_mega.preprocess.manifest import FAILED, OK, SKIPPED, Manifest
from dualforce_mega.preprocess.video_io import MediaError, iter_frames

from .pairs import Listing, Pair, list_pairs
from .pipeline import FaceAlignment, LipSyncPipeline, NoFaceError
from .whisper import SAMPLE_RATE

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
PARTIAL = ".partial.mp4"
STEP = "latentsync"
FINISHED = "finished"           # the reason of a skipped pair: both outputs exist and are readable
# a bad input or a failed pair: reported, and the batch goes on (OutOfMemoryError is a RuntimeError)
PAIR_ERRORS = (ValueError, RuntimeError, OSError, av.FFmpegError)


@dataclass
class Guidance:
    default: float = 1.5
    female: float = 1.8
    male: float = 1.3

    def of(self, pair: Pair) -> float:
        return {"female": self.female, "male": self.male}.get(pair.gender, self.default)


@dataclass
class Summary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    unpaired: list[tuple[str, str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"pairs: {len(self.done)} done, {len(self.skipped)} skipped (already finished), "
               f"{len(self.failed)} failed"]
        out += [f"  failed {name}: {why}" for name, why in self.failed]
        out += [f"  left out {name}: {why}" for name, why in self.unpaired]
        return out


def readable(path: Path) -> bool:
    """An mp4 with a video and an audio stream whose first video frame decodes."""
    try:
        with av.open(str(path)) as c:
            if not c.streams.video or not c.streams.audio:
                return False
            return next(c.decode(video=0), None) is not None
    except (av.FFmpegError, OSError, UnicodeDecodeError):
        return False


def finished(out_dir: Path, pair: Pair) -> bool:
    return all(readable(out_dir / n) for n in (pair.out_name, pair.mask_name))


def read_video(path: Path, fps: int) -> np.ndarray:
    chunks = list(iter_frames(path, fps))
    if not chunks:
        raise MediaError(path, "no_frames", "no video frames decoded")
    return np.concatenate(chunks)


def _reason(e: Exception) -> str:
    """A short reason code for the manifest (the message goes in ``detail``)."""
    if isinstance(e, MediaError):
        return e.reason
    return "no_face" if isinstance(e, NoFaceError) else type(e).__name__


def _pair_row(manifest: Manifest, pair: Pair, guidance: Guidance, seed: int, status: str, seconds: float,
              error: Optional[Exception] = None, reason: Optional[str] = None, **extra) -> None:
    manifest.add(STEP, "pair", pair.name, status, reason=_reason(error) if error else reason,
                 detail=f"{type(error).__name__}: {error}" if error else None, seconds=seconds,
                 video=pair.video.name, audio=pair.audio.name, gender=pair.gender, guidance=guidance.of(pair),
                 seed=seed, **extra)


def _write_pair(pipe: LipSyncPipeline, pair: Pair, frames: np.ndarray, faces: FaceAlignment, guidance: float,
                seed: int, out_dir: Path) -> int:
    wave = load_audio(pair.audio, SAMPLE_RATE)
    h, w = (frames.shape[1] // 2) * 2, (frames.shape[2] // 2) * 2       # yuv420p needs even sizes
    partial = [out_dir / (n[:-len(".mp4")] + PARTIAL) for n in (pair.out_name, pair.mask_name)]
    fps = pipe.opt.fps
    n = 0
    with Mp4Writer(partial[0], fps, h, w, audio=wave, sample_rate=SAMPLE_RATE) as out, \
            Mp4Writer(partial[1], fps, h, w, audio=wave, sample_rate=SAMPLE_RATE) as mask:
        for synced, masked in pipe.run(frames, faces, wave, guidance, seed):
            out.write(synced[:, :h, :w])
            mask.write(masked[:, :h, :w])
            n += len(synced)
    os.replace(partial[1], out_dir / pair.mask_name)
    os.replace(partial[0], out_dir / pair.out_name)
    return n


def run_batch(input_dir: Path, output_dir: Path, build: Callable[[], LipSyncPipeline], guidance: Guidance,
              seed: int, pairs_file: Optional[Path] = None) -> Summary:
    """Run every pair not yet finished; ``build`` makes the pipeline (only when there is work)."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if input_dir.resolve() == output_dir.resolve():
        raise ValueError(f"--output_dir {output_dir} is the input folder; choose another (inputs are never written)")
    refuse_overlap({"--output_dir": output_dir}, {"--input_dir": input_dir})
    listing: Listing = list_pairs(input_dir, pairs_file)
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(output_dir / MANIFEST)
    summary = Summary(unpaired=listing.unpaired)
    for name, why in listing.unpaired:
        log.warning("left out %s: %s", name, why)
        manifest.add(STEP, "file", name, SKIPPED, reason="unpaired", detail=why)
    todo = []
    for pair in listing.pairs:
        if finished(output_dir, pair):
            summary.skipped.append(pair.name)
            _pair_row(manifest, pair, guidance, seed, SKIPPED, 0.0, reason=FINISHED)
        else:
            todo.append(pair)
    log.info("%d pairs: %d finished before, %d to run", len(listing.pairs), len(summary.skipped), len(todo))
    pipe = build() if todo else None
    video: tuple[Optional[Path], object] = (None, None)     # the last video: (path, (frames, faces) or its error)
    for pair in tqdm(todo, desc="pairs", unit="pair"):
        t0 = time.perf_counter()
        try:
            if video[0] != pair.video:        # pairs are sorted by video: each video is read and aligned once
                try:
                    frames = read_video(pair.video, pipe.opt.fps)
                    video = (pair.video, (frames, pipe.align_video(frames)))
                except PAIR_ERRORS as e:
                    video = (pair.video, e)
            if isinstance(video[1], Exception):
                raise video[1]
            frames, faces = video[1]
            n = _write_pair(pipe, pair, frames, faces, guidance.of(pair), seed, output_dir)
        except PAIR_ERRORS as e:
            if isinstance(e, torch.OutOfMemoryError):
                torch.cuda.empty_cache()
            msg = f"{type(e).__name__}: {e}"
            log.error("pair %s failed: %s", pair.name, msg)
            summary.failed.append((pair.name, msg))
            _pair_row(manifest, pair, guidance, seed, FAILED, time.perf_counter() - t0, error=e)
            continue
        summary.done.append(pair.name)
        _pair_row(manifest, pair, guidance, seed, OK, time.perf_counter() - t0, frames=n)
    for line in summary.lines():
        log.info(line)
    return summary

