"""The per-step CLIs of steps 04 / 05 / 06 (data_tools.step04_motion, step05_flame, step06_audio) on
clips made by steps 01..03: each runs only its step, with the prepare options; the MediaPipe motion
fallback, a precomputed 20-fps FLAME file resampled into the clip, and 2 audio features per frame."""
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

pytest.importorskip("av")
pytest.importorskip("mediapipe")
pytest.importorskip("silero_vad")
from media_fixtures import have_espeak, talking_video  # noqa: E402

from data_tools.prepare import main as prepare_main  # noqa: E402
from dualforce_mega.preprocess.flame_import import flame_for_clip, read_flame  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not have_espeak(), reason="needs espeak-ng")]
SIZE, FPS, FLAME_FPS = 64, 25, 20


def _run_step_cli(module: str, argv: list[str]) -> None:
    saved = sys.argv
    sys.argv = [module, *argv]
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_module(module, run_name="__main__")
        assert done.value.code == 0
    finally:
        sys.argv = saved


def test_steps_04_to_06_alone(tmp_path) -> None:
    raw, out, flame_dir = tmp_path / "raw" / "HDTF", tmp_path / "out", tmp_path / "flame"
    raw.mkdir(parents=True)
    flame_dir.mkdir()
    talking_video(raw / "Astro.mp4", 2.0, size=160)
    seconds = 4.0  # the FLAME file covers more than the video, at 20 fps, old EMOCA format
    t = np.arange(int(seconds * FLAME_FPS))[:, None]
    np.savez(flame_dir / "Astro.npz", expcode=(t + np.arange(50)).astype(np.float32),
             posecode=np.tile(np.linspace(-0.1, 0.1, 6, dtype=np.float32), (len(t), 1)), fps=np.array(FLAME_FPS))
    common = ["--src", str(raw.parent), "--out", str(out), "--size", str(SIZE), "--preset", "tiny"]
    assert prepare_main([*common, "--random-models", "tiny"], steps=("01_clips", "02_quality", "03_latents")) == 0
    assert not list((out / "work").glob("0[4-6]_*/*.json"))  # steps 04..06 not run yet

    _run_step_cli("data_tools.step04_motion", common)            # no --random-models: MediaPipe, real motion
    _run_step_cli("data_tools.step05_flame", [*common, "--flame-dir", str(flame_dir)])
    _run_step_cli("data_tools.step06_audio", [*common, "--random-models", "tiny"])

    keys = sorted(p.stem for p in (out / "work" / "04_motion").glob("*.safetensors"))
    assert keys, "step 04 wrote no clip"
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    for key in keys:
        clip = json.loads(next((out / "work" / "01_clips").rglob(f"{key}.json")).read_text())
        n = clip["num_video_frames"]
        motion, meta = load_file(str(out / "work" / "04_motion" / f"{key}.safetensors")), \
            json.loads((out / "work" / "04_motion" / f"{key}.json").read_text())
        assert meta["motion_extractor"] == "mediapipe"
        assert motion["struct"].shape == (n, 70) and motion["kp_canonical"].shape == (63,)
        flame_meta = json.loads((out / "work" / "05_flame" / f"{key}.json").read_text())
        assert flame_meta["has_flame"] and flame_meta["flame_source"].startswith("precomputed:")
        flame = load_file(str(out / "work" / "05_flame" / f"{key}.safetensors"))["flame"]
        want = flame_for_clip(read_flame(flame_dir / "Astro.npz"), clip["time_range"][0], n, FPS)
        np.testing.assert_allclose(flame.numpy(), want)
        # expcode[i, 0] = i at 20 fps: 25-fps frame k of the clip sits at 20 * (start + k / 25)
        np.testing.assert_allclose(flame[:, 0].numpy(), FLAME_FPS * (clip["time_range"][0] + np.arange(n) / FPS),
                                   atol=1e-4)
        audio = load_file(str(out / "work" / "06_audio" / f"{key}.safetensors"))["audio"]
        assert audio.shape == (2 * n, 32)
        steps = {r["step"] for r in rows if r.get("id") == key and r["status"] == "ok"}
        assert {"04_motion", "05_flame", "06_audio"} <= steps
    assert not (out / "shards").exists()  # only the selected steps ran
