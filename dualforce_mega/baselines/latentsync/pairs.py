"""Which video is lip-synced to which audio: the seed's gender grouping.

Files in the input folder are named ``g-*`` (female voice / face) or ``m-*`` (male). Every ``g-``
video is paired with every ``g-`` audio and every ``m-`` video with every ``m-`` audio (one audio
may drive many videos). A pairs file restricts the batch to the pairs it lists (any two files of
the folder; a pair that is not one gender gets the default guidance). Files without a valid prefix
are reported, never guessed. Output names: ``{video}__{audio}_out.mp4`` and ``..._mask.mp4``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")
AUDIO_EXTS = (".wav", ".mp3", ".flac", ".m4a", ".aac", ".ogg")
GENDERS = {"g-": "female", "m-": "male"}
OUT_SUFFIX, MASK_SUFFIX = "_out.mp4", "_mask.mp4"


@dataclass(frozen=True)
class Pair:
    video: Path
    audio: Path
    gender: Optional[str]      # "female" / "male" when both files carry that prefix, else None

    @property
    def name(self) -> str:
        return f"{self.video.stem}__{self.audio.stem}"

    @property
    def out_name(self) -> str:
        return self.name + OUT_SUFFIX

    @property
    def mask_name(self) -> str:
        return self.name + MASK_SUFFIX


@dataclass
class Listing:
    pairs: list[Pair]
    unpaired: list[tuple[str, str]]     # (file name, reason)


def gender_of(path: Path) -> Optional[str]:
    for prefix, gender in GENDERS.items():
        if path.name.startswith(prefix):
            return gender
    return None


def _kind(path: Path) -> Optional[str]:
    ext = path.suffix.lower()
    return "video" if ext in VIDEO_EXTS else "audio" if ext in AUDIO_EXTS else None


def _pair(video: Path, audio: Path) -> Pair:
    g = gender_of(video)
    return Pair(video, audio, g if g is not None and g == gender_of(audio) else None)


def list_pairs(input_dir: Union[str, Path], pairs_file: Union[str, Path, None] = None) -> Listing:
    """The pairs to run (sorted by video, then audio) and the files left out with the reason."""
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: input folder not found")
    files = sorted(f for f in root.iterdir() if f.is_file() and not f.name.startswith("."))
    media = {"video": [f for f in files if _kind(f) == "video"], "audio": [f for f in files if _kind(f) == "audio"]}
    unpaired = [(f.name, "not a video or audio file") for f in files if _kind(f) is None]
    if pairs_file is not None:
        pairs = _read_pairs_file(Path(pairs_file), root)
        used = {p.video for p in pairs} | {p.audio for p in pairs}
        unpaired += [(f.name, "not in the pairs file") for f in media["video"] + media["audio"] if f not in used]
        return Listing(pairs, sorted(unpaired))
    pairs = []
    for kind, other in (("video", "audio"), ("audio", "video")):
        for f in media[kind]:
            g = gender_of(f)
            if g is None:
                unpaired.append((f.name, "no g-/m- prefix"))
            elif not any(gender_of(o) == g for o in media[other]):
                unpaired.append((f.name, f"no {g} ({'g-' if g == 'female' else 'm-'}) {other} to pair with"))
    for v in media["video"]:
        for a in media["audio"]:
            if gender_of(v) is not None and gender_of(v) == gender_of(a):
                pairs.append(_pair(v, a))
    return Listing(pairs, sorted(unpaired))


def _read_pairs_file(path: Path, root: Path) -> list[Pair]:
    """``VIDEO AUDIO`` per line (names in the input folder; whitespace or comma separated; ``#`` comments)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pairs file not found")
    pairs: list[Pair] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected 'VIDEO AUDIO', got {line!r}")
        video, audio = (root / Path(p).name for p in parts)
        for f, kind in ((video, "video"), (audio, "audio")):
            if not f.is_file():
                raise FileNotFoundError(f"{path}:{lineno}: {f.name} is not in {root}")
            if _kind(f) != kind:
                exts = " ".join(VIDEO_EXTS if kind == "video" else AUDIO_EXTS)
                raise ValueError(f"{path}:{lineno}: {f.name} is not a {kind} file ({exts})")
        pair = _pair(video, audio)
        if pair in pairs:
            raise ValueError(f"{path}:{lineno}: pair {pair.name} listed twice")
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"{path}: no pairs listed")
    return sorted(pairs, key=lambda p: (p.video.name, p.audio.name))
