"""Batch specifications for ``eval.generate --batch``: a folder or a list file of image/audio pairs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
AUDIO_EXTS = (".wav", ".flac", ".mp3", ".m4a", ".ogg", ".aac")


@dataclass(frozen=True)
class Job:
    image: Path
    audio: Path
    name: str          # output stem


def _name(image: Path, audio: Path) -> str:
    return image.stem if image.stem == audio.stem else f"{image.stem}__{audio.stem}"


def parse_batch(spec: str) -> list[Job]:
    """A folder: every image with an audio file of the same stem. A list file: one pair per line,
    ``IMAGE AUDIO [NAME]`` (whitespace or comma separated, ``#`` comments, paths relative to the
    list file)."""
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file())
        audio = {f.stem: f for f in files if f.suffix.lower() in AUDIO_EXTS}
        jobs = [Job(f, audio[f.stem], f.stem) for f in files
                if f.suffix.lower() in IMAGE_EXTS and f.stem in audio]
        if not jobs:
            raise ValueError(f"{p}: no image/audio pairs with matching names ({IMAGE_EXTS} + {AUDIO_EXTS})")
        return jobs
    if not p.is_file():
        raise FileNotFoundError(f"{p}: batch list or folder not found")
    jobs = []
    for lineno, line in enumerate(p.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").split()
        if len(parts) not in (2, 3):
            raise ValueError(f"{p}:{lineno}: expected 'IMAGE AUDIO [NAME]', got {line!r}")
        image, audio = (Path(x) if Path(x).is_absolute() else p.parent / x for x in parts[:2])
        for f in (image, audio):
            if not f.is_file():
                raise FileNotFoundError(f"{p}:{lineno}: {f} not found")
        jobs.append(Job(image, audio, parts[2] if len(parts) == 3 else _name(image, audio)))
    names = [j.name for j in jobs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{p}: output names used twice: {dup} (give a NAME column)")
    if not jobs:
        raise ValueError(f"{p}: no pairs listed")
    return jobs


def check_job(job: Job) -> None:
    """Fail now, before any model is built, if the job's image or audio cannot be read: decodes the image
    and opens the audio's first stream (``ValueError`` naming the file)."""
    import av
    from PIL import Image

    for path, what in ((job.image, "image"), (job.audio, "audio")):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: {what} file not found")
    try:
        with Image.open(job.image) as img:
            img.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"{job.image}: cannot read image ({e})") from e
    try:
        with av.open(str(job.audio)) as container:
            streams = len(container.streams.audio)
            if streams:
                next(container.decode(audio=0), None)
    except (av.FFmpegError, OSError) as e:
        raise ValueError(f"{job.audio}: cannot read audio ({e})") from e
    if not streams:
        raise ValueError(f"{job.audio}: cannot read audio (no audio stream)")
