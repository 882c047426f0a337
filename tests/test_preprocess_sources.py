"""HDTF / CelebV-HQ metadata parsing and slicing on small local files (no network)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")
pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")

from dualforce_mega.preprocess.sources import fetch_segments, parse_celebvhq, parse_hdtf, parse_timestamp  # noqa: E402
from dualforce_mega.preprocess.video_io import iter_frames, probe  # noqa: E402
from media_fixtures import write_video  # noqa: E402


def _counter_video(path: Path, seconds: float, fps: int = 25) -> Path:
    """Frame i has brightness 2i (so a cut's first frame tells where it starts), with a tone."""
    n = round(seconds * fps)
    frames = np.stack([np.full((32, 32, 3), min(2 * i, 255), np.uint8) for i in range(n)])
    sr = 16000
    return write_video(path, frames, fps, 0.3 * np.sin(np.arange(round(seconds * sr)) / sr * 2 * np.pi * 300), sr)


def test_timestamps():
    assert [parse_timestamp(t) for t in ("07", "01:35", "1:02:03", "00:02.5")] == [7, 95, 3723, 2.5]
    with pytest.raises(ValueError):
        parse_timestamp("1::2")


def test_hdtf_parse_and_slice(tmp_path: Path):
    ann = tmp_path / "HDTF_dataset"
    ann.mkdir()
    (ann / "WDA_video_url.txt").write_text("AmyKlobuchar1 https://www.youtube.com/watch?v=EyHSdWDYm1M\n"
                                           "BarackObama https://www.youtube.com/watch?v=tvA_jbuL0Jo\n")
    (ann / "WDA_annotion_time.txt").write_text("AmyKlobuchar1.mp4 00:01-00:03 00:04-00:05\nBarackObama.mp4 00:00-00:02\n"
                                               "Missing.mp4 00:01-00:02\n")
    segs = parse_hdtf(ann)
    assert [(s.name, s.start, s.end, s.info["subject"]) for s in segs] == [
        ("WDA_AmyKlobuchar1_000", 1, 3, "WDA_AmyKlobuchar"), ("WDA_AmyKlobuchar1_001", 4, 5, "WDA_AmyKlobuchar"),
        ("WDA_BarackObama_000", 0, 2, "WDA_BarackObama")]
    cache = tmp_path / "cache"
    cache.mkdir()
    _counter_video(cache / "WDA_AmyKlobuchar1.mp4", 6.0)        # "already downloaded"
    out = tmp_path / "raw" / "HDTF"
    status = fetch_segments(segs[:2], out, cache, out / "dl.jsonl")
    assert status == {"WDA_AmyKlobuchar1_000": "ok", "WDA_AmyKlobuchar1_001": "ok"}
    first = next(iter_frames(out / "WDA_AmyKlobuchar1_000.mp4", 25, chunk=1))[0]
    assert abs(int(first[16, 16, 0]) - 2 * 25) <= 3                 # starts at frame 25 = 1 s
    info = probe(out / "WDA_AmyKlobuchar1_000.mp4")
    assert abs(info.duration - 2.0) < 0.1 and info.has_audio
    side = json.loads((out / "WDA_AmyKlobuchar1_000.json").read_text())
    assert side["dataset"] == "HDTF" and side["source_time_range"] == [1.0, 3.0]
    # a dead link (nothing cached, no yt-dlp / network) is reported, not fatal
    assert fetch_segments(segs[2:], out, cache)["WDA_BarackObama_000"] != "ok"
    with pytest.raises(ValueError, match="annotion_time.txt:1"):
        (ann / "WDA_annotion_time.txt").write_text("AmyKlobuchar1.mp4 00:05-00:03\n")
        parse_hdtf(ann)


def test_celebvhq_parse(tmp_path: Path):
    meta = {"meta_info": {"appearance_mapping": ["blurry", "male", "young"]},
            "clips": {"abc_0": {"ytb_id": "abcdefghijk", "duration": {"start_sec": 1.5, "end_sec": 4.0},
                                "bbox": {"top": 0.1, "bottom": 0.6, "left": 0.2, "right": 0.7},
                                "attributes": {"appearance": [0, 1, 1]}},
                      "abc_1": {"ytb_id": "abcdefghijk", "duration": {"start_sec": 5, "end_sec": 6},
                                "bbox": {}, "attributes": {"appearance": [0, 0, 1]}}}}
    path = tmp_path / "celebvhq_info.json"
    path.write_text(json.dumps(meta))
    segs = parse_celebvhq(path)
    assert [(s.name, s.start, s.end, s.info["gender"], s.info["subject"]) for s in segs] == [
        ("abc_0", 1.5, 4.0, "male", "abcdefghijk"), ("abc_1", 5.0, 6.0, "female", "abcdefghijk")]
    assert segs[0].url.endswith("abcdefghijk")
    path.write_text(json.dumps({"clips": {"x": {"ytb_id": "y"}}}))
    with pytest.raises(ValueError, match="clips.x"):
        parse_celebvhq(path)


def test_download_cli_reports_dead_links(tmp_path: Path):
    """The CLI over the library: a segment that cannot be fetched (no cache, no yt-dlp / network)
    ends in the download manifest and a non-zero exit, nothing is left half-written."""
    from data_tools.download import main
    meta = tmp_path / "celebvhq_info.json"
    meta.write_text(json.dumps({"clips": {"c0": {"ytb_id": "zzzzzzzzzzz", "duration": {"start_sec": 0, "end_sec": 1}}}}))
    out = tmp_path / "raw" / "CelebV-HQ"
    assert main(["celebvhq", "--meta", str(meta), "--out", str(out)]) == 1
    rows = [json.loads(line) for line in (out / "download_manifest.jsonl").read_text().splitlines()]
    assert rows[0]["segment"] == "c0" and rows[0]["status"] != "ok"
    assert not list(out.glob("*.mp4"))
