"""data_tools.prepare: resume after a kill, memory on long inputs, the video-only (Phase 2) mode."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("av")
pytest.importorskip("scenedetect")
from kill_point import run_killed_after_first_row  # noqa: E402
from media_fixtures import have_espeak, long_face_video, noise_video, train_losses  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _cmd(module: str, src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", module, "--src", str(src), "--out", str(out), "--size", "64",
            "--random-models", "tiny", *extra]


def _rows(out: Path) -> list[dict]:
    rows = []
    for line in (out / "manifest.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass          # the row a kill tore
    return rows


def _video_inputs(root: Path, n: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        noise_video(root / f"clip{i}.mp4", 2.5, size=64, with_speech=False)
    return root


def test_kill_and_restart_does_not_redo_finished_clips(tmp_path):
    src = _video_inputs(tmp_path / "raw", 3)
    out = tmp_path / "out"
    cmd = _cmd("data_tools.prepare", src, out, "--mode", "video")
    run_killed_after_first_row("data_tools.prepare", cmd[3:], "01_clips", "input", REPO)
    first = [r["id"] for r in _rows(out) if r["step"] == "01_clips" and r["status"] == "ok"]
    assert len(first) == 1, first
    clip_files = {p: p.stat().st_mtime_ns for p in (out / "work" / "01_clips").rglob("*.mp4")
                  if ".tmp" not in p.name}
    n_before = len(_rows(out))
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    second = _rows(out)[n_before:]
    step01 = [r for r in second if r["step"] == "01_clips" and r["kind"] == "input"]
    assert sorted(r["id"] for r in step01 if r["status"] == "cached") == sorted(first)
    assert len([r for r in step01 if r["status"] == "ok"]) == 3 - len(first)
    for p, mtime in clip_files.items():
        assert p.stat().st_mtime_ns == mtime, f"{p} was rewritten"
    index = json.loads((out / "shards" / "index.json").read_text())
    assert index["total_samples"] == 3
    # a third run has nothing left to do
    n_before = len(_rows(out))
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    rows3 = [r for r in _rows(out)[n_before:] if r["kind"] in ("input", "clip")]
    assert rows3 and all(r["status"] == "cached" for r in rows3), {r["status"] for r in rows3}


PEAK_RSS = """
import resource, runpy, sys
sys.argv = ["step01"] + sys.argv[1:]
try:
    runpy.run_module("data_tools.step01_clips", run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.skipif(not have_espeak(), reason="needs espeak-ng")
def test_step01_memory_does_not_grow_with_video_length(tmp_path):
    """Peak RSS of step 01 on a 10-minute video is within 1.5x of that on a 1-minute one (a
    step that kept the decoded frames would hold 15000 x 160^2 x 3 bytes = 1.1 GB more)."""
    cfg = tmp_path / "prepare.yaml"
    cfg.write_text("clip:\n  detect_every: 25\n  scene_side: 32\n")
    peaks, clips = {}, {}
    for minutes in (1, 10):
        src = tmp_path / f"raw{minutes}"
        src.mkdir()
        long_face_video(src / "talk.mkv", 60 * minutes, size=160)
        out = tmp_path / f"out{minutes}"
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS, "--src", str(src), "--out", str(out), "--size", "64",
                               "--config", str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        peaks[minutes] = int(proc.stdout.split("PEAK_RSS_KB")[1].split()[0])
        clips[minutes] = len(list((out / "work" / "01_clips" / "talk").glob("*.mp4")))
    assert clips[1] >= 3 and clips[10] >= 30          # 20 s clips: the long video really was processed
    assert peaks[10] <= 1.5 * peaks[1], peaks


def test_video_only_mode_trains_phase2(tmp_path):
    src = tmp_path / "raw" / "panda"
    src.mkdir(parents=True)
    noise_video(src / "generic.mp4", 3.0, size=96, with_speech=False)     # no face, no audio
    (src / "generic.txt").write_text("colourful stripes drifting to the right\n")   # its caption
    out = tmp_path / "out"
    proc = subprocess.run(_cmd("data_tools.prepare", tmp_path / "raw", out, "--mode", "video"), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "clips in shards: 1" in proc.stdout
    index = json.loads((out / "shards" / "index.json").read_text())
    assert index["total_samples"] == 1 and "struct" not in index["stats"]
    import tarfile
    from safetensors.torch import load as st_load
    with tarfile.open(out / "shards" / index["shards"][0]["name"]) as tar:
        blob = next(tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".safetensors"))
    tensors = st_load(blob)
    assert set(tensors) == {"video_latent", "ref_latent", "ref_positions", "text_emb"}
    assert tensors["text_emb"].shape[1] == 32      # tiny preset text_dim
    losses = train_losses("pretrain_causal.sh", out / "shards", tmp_path / "run")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
