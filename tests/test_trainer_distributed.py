"""End-to-end DeepSpeed ZeRO-3 training on CPU through the real launch path (2 ranks, gloo).

Launches shared by the tests (DeepSpeed start-up dominates their cost):
  straight  `bash launch/train_dualforce.sh` (the README command), 2 ranks, tiny preset, synthetic data
  single    the same config in one process (`python -m dualforce_mega.training.train`)
  crashed   the straight command with rank 1 SIGKILLed in the middle of saving step 10
  resumed   the identical command again: resumes from step 5 (the last complete checkpoint)
plus a short `deepspeed launch/pretrain_causal.sh` run (Phase 2) on the straight run's shards.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from dualforce_mega.training.checkpoint import FAULT_ENV, TMP_PREFIX, tag_for

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY, CRASH_STEP = 20, 5, 10
TIMEOUT_S = 600
# Runs in different processes (and thread counts) compute the same fp32 steps with different rounding;
# measured over the 20 steps, 2 ranks vs 1 process: losses 1.2e-7 apart, gradient norms 3.6e-7
# relative. A wrong sample, noise seed, learning rate or gradient scale moves them by >= 1e-2.
LOSS_TOL = 1e-5
GRAD_NORM_RTOL = 1e-4


def _args(run_dir: Path, shards: str = "") -> list[str]:
    # lip-sync negatives from the micro batch only: gathering them over the data-parallel group ties the
    # loss to the number of ranks, and these runs are compared across world sizes
    args = ["--set", f"run.dir={run_dir}", "--set", f"train.steps={STEPS}", "--set", f"train.save_every={SAVE_EVERY}",
            "--set", "run.log_samples=true", "--set", "diffusion.lipsync_negatives=local"]
    return args + (["--set", f"data.shards={shards}"] if shards else [])


def _run(cmd: list[str], fault: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env["DS_ACCELERATOR"] = "cpu"
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _launch(run_dir: Path, shards: str = "", fault: str = "") -> subprocess.CompletedProcess:
    return _run(["bash", "launch/train_dualforce.sh", *_args(run_dir, shards)], fault)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("straight")
    out = _launch(run_dir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return run_dir, out


@pytest.fixture(scope="module")
def shards(straight) -> str:
    return str(straight[0] / "synthetic_shards")


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, shards: str):
    run_dir = tmp_path_factory.mktemp("single")
    out = _run([sys.executable, "-m", "dualforce_mega.training.train", "--config", "launch/configs/tiny_cpu.yaml",
                "--set", "train.phase=4", *_args(run_dir, shards)])
    assert out.returncode == 0, out.stderr[-5000:]
    return run_dir, out


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory, shards: str):
    run_dir = tmp_path_factory.mktemp("crash")
    out = _launch(run_dir, shards, fault=f"{CRASH_STEP}:1")
    first_attempt = _records(run_dir)
    return run_dir, out, first_attempt


@pytest.fixture(scope="module")
def resumed(crashed, shards: str):
    run_dir = crashed[0]
    out = _launch(run_dir, shards)    # exactly the command that crashed, minus the fault
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return run_dir, out


def test_readme_command_trains_and_loss_falls(straight) -> None:
    run_dir, _ = straight
    records = _records(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for key in ("loss", "loss_video", "loss_struct", "loss_flame", "loss_lipsync", "lr", "grad_norm",
                "tokens_per_s", "step_time_s", "memory_mb", "model_tflops_per_s"):
        assert all(isinstance(r[key], float) for r in records), key
    assert any(k.startswith("loss_video_sigma_") for r in records for k in r)
    losses = [r["loss"] for r in records]
    # per-step noise levels differ, so compare medians of the first and last quarter
    quarter = STEPS // 4
    assert statistics.median(losses[-quarter:]) < 0.9 * statistics.median(losses[:quarter]), losses
    # run directory: resolved config, tensorboard, checkpoints (train.keep_last=2 of the tiny config)
    config = (run_dir / "config.yaml").read_text()
    assert f"shards: {run_dir / 'synthetic_shards'}" in config and "phase: 4" in config
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text() == tag_for(STEPS)
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == [tag_for(STEPS - SAVE_EVERY), tag_for(STEPS)]
    assert len(list((ckpt / tag_for(STEPS)).glob("rank_state_*.pt"))) == 2


def test_zero3_two_ranks_equals_single_process(straight, single) -> None:
    two, one = _records(straight[0]), _records(single[0])
    assert "dp=2" in straight[1].stderr + straight[1].stdout and "dp=1" in single[1].stderr
    assert len(two) == len(one) == STEPS
    # the comparison is only meaningful if every global batch holds the same samples
    assert [r["sample_ids"] for r in two] == [r["sample_ids"] for r in one]
    # Two processes at different thread counts (torchrun ranks run one thread) and a gradient
    # all-reduce: fp32 rounding differs, so the losses and the pre-clipping gradient norms agree to a
    # stated tolerance. The losses alone would hide a gradient scaled by the dp size (AdamW and
    # clipping cancel the scale); the gradient norm of step 1 (identical weights) shows it directly.
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(two, one)) < LOSS_TOL
    worst = max(abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"] for a, b in zip(two, one))
    assert worst < GRAD_NORM_RTOL, [(a["grad_norm"], b["grad_norm"]) for a, b in zip(two, one)]


def test_kill_during_save_keeps_previous_checkpoint(crashed) -> None:
    run_dir, out, first_attempt = crashed
    assert out.returncode != 0
    assert f"{FAULT_ENV}={CRASH_STEP}:1: killing rank 1" in out.stdout + out.stderr
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text() == tag_for(SAVE_EVERY)
    assert (ckpt / f"{TMP_PREFIX}{tag_for(CRASH_STEP)}").is_dir()        # the half-written save
    assert not (ckpt / tag_for(CRASH_STEP)).exists()
    assert [r["step"] for r in first_attempt] == list(range(1, CRASH_STEP + 1))


def test_same_command_resumes_exactly(straight, crashed, resumed) -> None:
    run_dir, out = resumed
    log = out.stdout + out.stderr
    assert f"resumed from {run_dir / 'checkpoints' / tag_for(SAVE_EVERY)} (step {SAVE_EVERY})" in log
    assert "removing incomplete checkpoint" in log
    assert not (run_dir / "checkpoints" / f"{TMP_PREFIX}{tag_for(CRASH_STEP)}").exists()
    reference = _records(straight[0])
    records = _records(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))      # each step logged once
    after = slice(SAVE_EVERY, STEPS)        # steps computed by the fresh process
    assert [r["sample_ids"] for r in records[after]] == [r["sample_ids"] for r in reference[after]]
    assert [r["lr"] for r in records[after]] == [r["lr"] for r in reference[after]]
    # the fresh process recomputes steps 6-20 from the restored weights, optimizer, data and RNG state
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(records[after], reference[after])) < LOSS_TOL
    assert max(abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"]
               for a, b in zip(records[after], reference[after])) < GRAD_NORM_RTOL
    assert (run_dir / "checkpoints" / "latest").read_text() == tag_for(STEPS)


def test_deepspeed_launcher_runs_the_phase2_script(tmp_path: Path, shards: str) -> None:
    """`deepspeed launch/pretrain_causal.sh`: DeepSpeed's launcher runs the .sh file with python on each rank."""
    run_dir = tmp_path / "phase2"
    steps = 2
    out = _run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "launch/pretrain_causal.sh",
                "--set", f"run.dir={run_dir}", "--set", f"train.steps={steps}", "--set", f"data.shards={shards}"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "phase 2" in out.stdout + out.stderr and "dp=2" in out.stdout + out.stderr
    records = _records(run_dir)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    # video-only: no struct tower, so no struct / FLAME / lip-sync terms
    assert all(r["loss"] == r["loss_video"] and "loss_struct" not in r and "loss_lipsync" not in r for r in records)
