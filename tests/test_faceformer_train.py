"""FaceFormer trained by the project's trainer through the real launch path (tiny random wav2vec2, a tiny
FLAME-layout model, the fixture data root in all three layouts, 2 CPU ranks with gloo, ZeRO-3).

Launches shared by the tests:
  single    `python -m dualforce_mega.training.train --config launch/configs/faceformer.yaml` (1 process,
            2 accumulation steps)
  crashed   `DATA_ROOT=... bash launch/train_faceformer.sh --nproc 2 ...` with rank 1 SIGKILLed in the middle
            of saving step 8
  resumed   the identical command again: resumes from step 4 (the last complete checkpoint) to the end
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from dualforce_mega.training.checkpoint import FAULT_ENV, tag_for
from faceformer_fixtures import faceformer_sets, make_data_root, write_tiny_flame

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY, VAL_EVERY, CRASH_STEP = 12, 4, 4, 8
TIMEOUT_S = 600
# fp32 on CPU in different processes: the same steps up to rounding (measured below 1e-6 relative); a
# wrong sample, batch split or gradient scale moves the loss by > 1e-2
LOSS_RTOL = 1e-4


def _sets(data: tuple[Path, Path], run_dir: Path) -> list[str]:
    root, flame = data
    sets = faceformer_sets(root, flame, run_dir, **{"train.steps": str(STEPS), "train.save_every": str(SAVE_EVERY),
                                                     "train.val_every": str(VAL_EVERY), "train.global_batch": "2",
                                                     "train.lr": "1e-3", "model.dropout": "0",
                                                     "parallel.zero_stage": "3", "run.tensorboard": "true",
                                                     "run.log_samples": "true"})
    sets = [s for s in sets if not s.startswith("data.root=")]     # the data root comes from $DATA_ROOT
    return [a for s in sets for a in ("--set", s)]


def _run(cmd: list[str], data_root: Path, fault: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env.update(DS_ACCELERATOR="cpu", DATA_ROOT=str(data_root), OMP_NUM_THREADS="1")
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("fftrain")
    return make_data_root(base / "data"), write_tiny_flame(base / "flame.npz")


@pytest.fixture(scope="module")
def single(tmp_path_factory, data):
    run_dir = tmp_path_factory.mktemp("single")
    out = _run([sys.executable, "-m", "dualforce_mega.training.train", "--config", "launch/configs/faceformer.yaml",
                *_sets(data, run_dir)], data[0])
    assert out.returncode == 0, out.stderr[-5000:]
    return run_dir, out


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, data):
    run_dir = tmp_path_factory.mktemp("two")
    cmd = ["bash", "launch/train_faceformer.sh", "--nproc", "2", *_sets(data, run_dir)]
    crashed = _run(cmd, data[0], fault=f"{CRASH_STEP}:1")
    assert crashed.returncode != 0 and (run_dir / "checkpoints" / "latest").read_text() == tag_for(CRASH_STEP - SAVE_EVERY)
    out = _run(cmd, data[0])   # exactly the command that crashed, minus the fault
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return run_dir, crashed.stdout + crashed.stderr + out.stdout + out.stderr


def test_two_zero3_ranks_resumed_equal_one_process_and_loss_falls(single, resumed) -> None:
    one, two = _records(single[0]), _records(resumed[0])
    assert "dp=2" in resumed[1] and "ZeRO-3" in resumed[1] and "dp=1" in single[1].stderr
    assert f"resuming {resumed[0]} at step {CRASH_STEP - SAVE_EVERY}" in resumed[1]
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two):
        assert a["sample_ids"] == b["sample_ids"] == list(range(2 * a["step"] - 2, 2 * a["step"]))
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL), (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=LOSS_RTOL)
    losses = [r["loss"] for r in one]
    quarter = STEPS // 4
    assert statistics.median(losses[-quarter:]) < 0.8 * statistics.median(losses[:quarter]), losses
    vals = {r["step"]: r["val_loss"] for r in two if "val_loss" in r}
    assert sorted(vals) == [4, 8, 12]
    assert vals == pytest.approx({r["step"]: r["val_loss"] for r in one if "val_loss" in r}, rel=LOSS_RTOL)


def test_run_directory_best_model_and_skipped_records(resumed) -> None:
    run_dir = resumed[0]
    vals = {r["step"]: r["val_loss"] for r in _records(run_dir) if "val_loss" in r}
    with safe_open(str(run_dir / "best" / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert any(k.startswith("audio_encoder.") for k in f.keys()) and "motion_out.weight" in f.keys()
    best_step = min(vals, key=vals.get)
    assert int(meta["step"]) == best_step and float(meta["val_loss"]) == pytest.approx(vals[best_step])
    config = (run_dir / "config.yaml").read_text()
    assert "task: faceformer" in config and "- M003" in config and "- dh_a" in config   # resolved style vocabulary
    skipped = [json.loads(line) for line in (run_dir / "skipped_records.jsonl").read_text().splitlines()]
    assert sorted((Path(p["file"]).name, p["field"]) for p in skipped) == [
        ("MEAD_VHAP_train.json", "[4].audio"), ("broken.npz", "flame"), ("nope.npz", "flame")]
    assert (run_dir / "checkpoints" / "latest").read_text() == tag_for(STEPS)
    assert len(list((run_dir / "checkpoints" / tag_for(STEPS)).glob("rank_state_*.pt"))) == 2
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))


def test_inference_from_the_trained_run(resumed, data, tmp_path) -> None:
    from eval.baselines.faceformer import main as inference_main
    out = tmp_path / "out"
    os.environ["DATA_ROOT"] = str(data[0])
    try:
        assert inference_main(["--run", str(resumed[0]), "--out", str(out), "--device", "cpu"]) == 0
    finally:
        del os.environ["DATA_ROOT"]
    folders = sorted(p for p in (out / resumed[0].name).glob("*/*") if p.is_dir())
    assert [f"{p.parent.name}/{p.name}" for p in folders] == [
        "MEAD_VHAP/M003_angry_passionate", "MEAD_VHAP/W777_happy_passionate", "MultiModal200/mm1_t_passionate"]
    assert all(len(list(p.glob("*.npy"))) == 30 for p in folders)     # 1.2 s at 25 fps, whole clips


@pytest.mark.parametrize("script", ["launch/train_faceformer.sh", "launch/inference_faceformer.sh"])
def test_launch_scripts(script: str) -> None:
    path = REPO / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    if script.startswith("launch/train"):
        compile(path.read_text(), str(path), "exec")            # DeepSpeed's launcher runs it with python
    out = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True, check=True)
    assert "--set" in out.stdout


def test_launch_fails_before_spawning_without_data(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATA_ROOT"}
    out = subprocess.run(["bash", "launch/train_faceformer.sh", "--set", "model.audio_encoder=random:tiny"],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "data.root: empty and $DATA_ROOT is not set" in out.stderr
    env["DATA_ROOT"] = str(tmp_path)
    out = subprocess.run(["bash", "launch/train_faceformer.sh", "--set", "model.audio_encoder=random:tiny"],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "data.train:" in out.stderr and "digital_human.json not found" in out.stderr
    assert "deepspeed.launcher" not in out.stdout + out.stderr
