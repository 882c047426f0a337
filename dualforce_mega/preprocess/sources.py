"""Dataset sources: HDTF and CelebV-HQ metadata -> segments of YouTube videos -> sliced local clips
with a sidecar (``<clip>.json``: dataset, subject, gender, source url, time range) that
``data_tools.prepare`` reads. Downloading (yt-dlp, an optional extra: ``pip install yt-dlp``) is
one function; parsing and slicing work on local files.

HDTF (github.com/MRzzm/HDTF, ``HDTF_dataset/``): ``{RD,WDA,WRA}_video_url.txt`` lines
``<Name> <url>`` and ``{RD,WDA,WRA}_annotion_time.txt`` lines ``<Name>.mp4 mm:ss-mm:ss [...]``;
one clip per annotated range, subject = the name without a trailing number (``AmyKlobuchar0`` and
``AmyKlobuchar1`` are one person).

CelebV-HQ (``celebvhq_info.json``): ``clips[<id>] = {ytb_id, duration: {start_sec, end_sec},
bbox: {top, bottom, left, right} (fractions), attributes: {appearance: [0/1...], ...}}``; subject =
the YouTube id, gender from the ``male`` appearance attribute when ``meta_info.appearance_mapping``
names it.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from ..fsutil import atomic_write

log = logging.getLogger(__name__)

HDTF_GROUPS = ("RD", "WDA", "WRA")
_TRAILING_NUMBER = re.compile(r"\d+$")


@dataclass
class Segment:
    """One clip to cut: ``video_id``'s [start, end) seconds, saved as ``name``."""
    name: str
    video_id: str
    url: str
    start: float
    end: float
    info: dict = field(default_factory=dict)    # sidecar fields (dataset, subject, gender, ...)


def parse_timestamp(text: str) -> float:
    """``ss``, ``mm:ss`` or ``hh:mm:ss`` (fractional seconds allowed) -> seconds."""
    parts = text.strip().split(":")
    if not 1 <= len(parts) <= 3 or not all(parts):
        raise ValueError(f"bad timestamp {text!r}")
    secs = 0.0
    for p in parts:
        secs = secs * 60 + float(p)
    return secs


def parse_hdtf(annotation_dir: Union[str, Path]) -> list[Segment]:
    d = Path(annotation_dir)
    segments: list[Segment] = []
    for group in HDTF_GROUPS:
        url_file, time_file = d / f"{group}_video_url.txt", d / f"{group}_annotion_time.txt"
        if not url_file.is_file() or not time_file.is_file():
            continue
        urls = {}
        for n, line in enumerate(url_file.read_text().splitlines(), 1):
            if line.strip():
                try:
                    name, url = line.split()[:2]
                except ValueError:
                    raise ValueError(f"{url_file}:{n}: expected '<name> <url>', got {line!r}") from None
                urls[name] = url
        for n, line in enumerate(time_file.read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            name = Path(fields[0]).stem
            if name not in urls:
                log.warning("%s:%d: %s has no url in %s; skipped", time_file, n, name, url_file.name)
                continue
            for k, span in enumerate(fields[1:]):
                try:
                    a, b = (parse_timestamp(t) for t in span.split("-"))
                except ValueError:
                    raise ValueError(f"{time_file}:{n}: bad range {span!r} (expected mm:ss-mm:ss)") from None
                if b <= a:
                    raise ValueError(f"{time_file}:{n}: range {span!r} ends before it starts")
                subject = _TRAILING_NUMBER.sub("", name) or name
                segments.append(Segment(f"{group}_{name}_{k:03d}", f"{group}_{name}", urls[name], a, b,
                                        {"dataset": "HDTF", "subject": f"{group}_{subject}", "group": group}))
    if not segments:
        raise FileNotFoundError(f"{d}: no HDTF annotation pairs ({', '.join(g + '_video_url.txt' for g in HDTF_GROUPS)} "
                                f"+ *_annotion_time.txt)")
    return segments


def parse_celebvhq(json_path: Union[str, Path]) -> list[Segment]:
    data = json.loads(Path(json_path).read_text())
    if "clips" not in data:
        raise ValueError(f"{json_path}: no 'clips' object (CelebV-HQ celebvhq_info.json layout)")
    mapping = [str(a).lower() for a in data.get("meta_info", {}).get("appearance_mapping", [])]
    male = mapping.index("male") if "male" in mapping else None
    segments = []
    for key, clip in data["clips"].items():
        try:
            ytb, dur = clip["ytb_id"], clip["duration"]
            start, end = float(dur["start_sec"]), float(dur["end_sec"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{json_path}: clips.{key}: missing or bad field {e}") from None
        info = {"dataset": "CelebV-HQ", "subject": ytb, "bbox": clip.get("bbox")}
        appearance = clip.get("attributes", {}).get("appearance")
        if male is not None and isinstance(appearance, list) and male < len(appearance):
            info["gender"] = "male" if appearance[male] else "female"
        segments.append(Segment(key, ytb, f"https://www.youtube.com/watch?v={ytb}", start, end, info))
    return segments


def slice_segment(source: Path, seg: Segment, out_dir: Path) -> Path:
    """Cut [start, end) of ``source`` (re-encoded, so the cut is frame exact) to ``out_dir/<name>.mp4``
    with its sidecar; an existing clip is kept (resumable)."""
    out = out_dir / f"{seg.name}.mp4"
    if out.is_file() and out.with_suffix(".json").is_file():
        return out
    if shutil.which("ffmpeg") is None:
        raise FileNotFoundError("ffmpeg not found (scripts/install.sh installs it)")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.mp4")
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-ss", f"{seg.start:.3f}", "-i", str(source),
                    "-t", f"{seg.end - seg.start:.3f}", "-c:v", "libx264", "-crf", "16", "-pix_fmt", "yuv420p",
                    "-c:a", "aac", str(tmp)], check=True)
    tmp.replace(out)
    atomic_write(out.with_suffix(".json"), json.dumps({**seg.info, "source_url": seg.url,
                                                       "source_time_range": [seg.start, seg.end]}, indent=1))
    return out


def download(url: str, out_stem: Path) -> Path:
    """The whole YouTube video via yt-dlp (best mp4 <= 1080p) at ``<out_stem>.mp4``; kept if present."""
    out = out_stem.with_suffix(".mp4")
    if out.is_file():
        return out
    try:
        import yt_dlp
    except ImportError:
        raise ImportError("downloading needs yt-dlp: pip install yt-dlp") from None
    opts = {"format": "bestvideo[height<=1080][ext=mp4]+bestaudio[ext=m4a]/best[ext=mp4]/best",
            "outtmpl": str(out_stem) + ".%(ext)s", "merge_output_format": "mp4", "quiet": True}
    with yt_dlp.YoutubeDL(opts) as ydl:
        ydl.download([url])
    if not out.is_file():
        raise FileNotFoundError(f"yt-dlp did not produce {out}")
    return out


def fetch_segments(segments: list[Segment], out_dir: Path, cache: Path, manifest_path: Optional[Path] = None
                   ) -> dict[str, str]:
    """Download (or find in ``cache/<video_id>.mp4``) and slice every segment; returns name -> status
    (``ok`` or the error), appended to ``manifest_path`` as JSON lines. Failures do not stop the run."""
    from tqdm import tqdm
    status: dict[str, str] = {}
    cache.mkdir(parents=True, exist_ok=True)
    if manifest_path is not None:
        manifest_path.parent.mkdir(parents=True, exist_ok=True)
    for seg in tqdm(segments, desc="segments", unit="clip"):
        try:
            slice_segment(download(seg.url, cache / seg.video_id), seg, out_dir)
            status[seg.name] = "ok"
        except Exception as e:  # noqa: BLE001  -- dead links etc. are reported, the others go on
            status[seg.name] = f"{type(e).__name__}: {e}"
            log.warning("%s: %s", seg.name, status[seg.name])
        if manifest_path is not None:
            with open(manifest_path, "a") as f:
                f.write(json.dumps({"segment": seg.name, "url": seg.url, "status": status[seg.name]}) + "\n")
    return status


__all__ = ["Segment", "parse_timestamp", "parse_hdtf", "parse_celebvhq", "slice_segment", "download", "fetch_segments"]
