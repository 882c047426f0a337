"""Cluster-scale reliability end to end on CPU ranks (gloo, tiny preset), through ``launch/train_dualforce.sh``.

Launches shared by the tests (start-up dominates their cost):
  straight   2 ranks on one node, STEPS steps, a checkpoint every SAVE_EVERY (all kept): the reference
  loopback1  two "nodes" on 127.0.0.1 with 1 rank each (--nnodes 2 --node-rank 0/1), same steps
  loopback2  two "nodes" with 2 ranks each (world 4: one sample per rank and step)
  shrink     the straight run's step-3 checkpoint resumed on 1 rank (elastic 2 -> 1) to the end, saving
             every step
  grow       shrink's run directory as of step 7, with the step-7 checkpoint truncated (a node died
             writing it): named, set aside, and shrink's step 6 (1 rank) resumed on 2 ranks (elastic 1 -> 2)
Batches and noise do not depend on the world size, so every run must reproduce the straight run's losses.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dualforce_mega.config import load_config, save_config
from dualforce_mega.training.checkpoint import BROKEN_PREFIX, tag_for

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 9, 3
LAST_GOOD = 6        # grow: the checkpoint after it is damaged
TIMEOUT_S = 900
# the same computation in other processes / other world sizes: fp32 sums in another order (measured
# differences ~1e-7 over 20 steps, tests/test_trainer_distributed.py); a wrong state is off by >1e-3
LOSS_TOL = 1e-5


def _env() -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    env.pop("DUALFORCE_FAULT_KILL_IN_SAVE", None)
    return env


def _args(run_dir: Path, shards: str = "") -> list[str]:
    args = ["--set", f"run.dir={run_dir}", "--set", f"train.steps={STEPS}", "--set", f"train.save_every={SAVE_EVERY}",
            "--set", f"train.keep_last={STEPS}", "--set", "run.log_samples=true", "--set", "run.tensorboard=false"]
    return args + (["--set", f"data.shards={shards}"] if shards else [])


def _launch(run_dir: Path, *extra: str, shards: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "launch/train_dualforce.sh", *_args(run_dir, shards), *extra], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def _records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in (json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
                                   if x.strip())}


def _same_losses(run: dict[int, dict], ref: dict[int, dict], steps) -> None:
    for s in steps:
        assert run[s]["sample_ids"] == ref[s]["sample_ids"], s
        assert run[s]["lr"] == pytest.approx(ref[s]["lr"], rel=1e-12), s
    diff = max(abs(run[s]["loss"] - ref[s]["loss"]) for s in steps)
    assert diff < LOSS_TOL, (diff, {s: (run[s]["loss"], ref[s]["loss"]) for s in steps})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback(run_dir: Path, per_node: int, shards: str) -> list[subprocess.CompletedProcess]:
    """Two launch scripts, as two nodes would run them, meeting at 127.0.0.1."""
    port = str(_free_port())
    procs = [subprocess.Popen(["bash", "launch/train_dualforce.sh", *_args(run_dir, shards), "--nproc", str(per_node),
                               "--nnodes", "2", "--node-rank", str(node), "--master_addr", "127.0.0.1",
                               "--master_port", port], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, out, "") for p, out in zip(procs, outs)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight")
    out = _launch(run_dir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return run_dir


@pytest.fixture(scope="module")
def shards(straight: Path) -> str:
    return str(straight / "synthetic_shards")


def _resume_copy(src: Path, dst: Path, step: int) -> Path:
    """``src``'s run directory as it was right after the checkpoint of ``step`` (later tags removed)."""
    shutil.copytree(src, dst)
    ckpt = dst / "checkpoints"
    for tag in ckpt.iterdir():
        if tag.name.startswith("step") and int(tag.name[4:]) > step:
            shutil.rmtree(tag)
    (ckpt / "latest").write_text(tag_for(step))
    cfg = load_config(str(dst / "config.yaml"), [f"run.dir={dst}"])    # as if the run had been moved here
    save_config(cfg, dst / "config.yaml")
    return dst


@pytest.fixture(scope="module")
def shrink(straight: Path, shards: str, tmp_path_factory: pytest.TempPathFactory):
    run_dir = _resume_copy(straight, tmp_path_factory.mktemp("shrink") / "run", SAVE_EVERY)
    out = _launch(run_dir, "--nproc", "1", "--set", "train.save_every=1", shards=shards)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return run_dir, out


@pytest.fixture(scope="module")
def grow(shrink, shards: str, tmp_path_factory: pytest.TempPathFactory):
    run_dir = _resume_copy(shrink[0], tmp_path_factory.mktemp("grow") / "run", LAST_GOOD + 1)
    damaged = sorted((run_dir / "checkpoints" / tag_for(LAST_GOOD + 1)).glob("*optim_states.pt"))[0]
    damaged.write_bytes(damaged.read_bytes()[:1000])        # the last save of a node that died writing it
    out = _launch(run_dir, "--nproc", "2", shards=shards)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return run_dir, out, damaged


def test_loopback_two_nodes_one_rank_each_equal_one_node(straight: Path, shards: str, tmp_path: Path) -> None:
    outs = _loopback(tmp_path / "run", 1, shards)
    assert [o.returncode for o in outs] == [0, 0], outs[0].stdout[-3000:] + outs[1].stdout[-3000:]
    assert "node 1/2 started ranks 1..1" in outs[1].stdout and "dp=2" in outs[0].stdout
    _same_losses(_records(tmp_path / "run"), _records(straight), range(1, STEPS + 1))


def test_loopback_two_nodes_two_ranks_each_equal_one_node(straight: Path, shards: str, tmp_path: Path) -> None:
    outs = _loopback(tmp_path / "run", 2, shards)
    assert [o.returncode for o in outs] == [0, 0], outs[0].stdout[-3000:] + outs[1].stdout[-3000:]
    assert "node 1/2 started ranks 2..3" in outs[1].stdout and "dp=4" in outs[0].stdout
    _same_losses(_records(tmp_path / "run"), _records(straight), range(1, STEPS + 1))


def test_resume_on_fewer_ranks_is_exact(straight: Path, shrink) -> None:
    run_dir, out = shrink
    assert "written by 2 ranks, this run has 1: resharding it" in out.stderr + out.stdout
    _same_losses(_records(run_dir), _records(straight), range(SAVE_EVERY + 1, STEPS + 1))


def test_damaged_checkpoint_falls_back_and_resume_on_more_ranks_is_exact(straight: Path, grow) -> None:
    run_dir, out, damaged = grow
    log = out.stdout + out.stderr
    assert f"checkpoint {tag_for(LAST_GOOD + 1)} is damaged, falling back to the previous one: {damaged}" in log
    assert (run_dir / "checkpoints" / f"{BROKEN_PREFIX}{tag_for(LAST_GOOD + 1)}").is_dir()
    assert "written by 1 ranks, this run has 2: resharding it" in log
    _same_losses(_records(run_dir), _records(straight), range(LAST_GOOD + 1, STEPS + 1))


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_on_resume(straight: Path, shards: str, tmp_path: Path) -> None:
    run_dir = _resume_copy(straight, tmp_path / "run", 2 * SAVE_EVERY)
    marker = tmp_path / "code_ran"
    target = sorted((run_dir / "checkpoints" / tag_for(2 * SAVE_EVERY)).glob("*model_states.pt"))[0]
    with open(target, "wb") as f:
        pickle.dump({"module": _Payload(marker)}, f)
    config_before = (run_dir / "config.yaml").read_text()
    out = _launch(run_dir, shards=shards)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-5000:]
    assert f"resume refused: {target}: refused to load" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert not marker.exists()
    assert (run_dir / "config.yaml").read_text() == config_before


def test_finished_run_exits_cleanly_without_starting_ranks(straight: Path) -> None:
    """Re-running a finished run: the probe saw exit 250 ("terminate called without an active exception")."""
    for _ in range(3):
        out = _launch(straight)
        assert out.returncode == 0 and "nothing to do" in out.stdout, out.stdout + out.stderr
        assert "training.launcher" not in out.stdout + out.stderr
    direct = subprocess.run([sys.executable, "-m", "dualforce_mega.training.train", "--config",
                             str(straight / "config.yaml")], cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert direct.returncode == 0 and "nothing to do" in direct.stderr, direct.stderr[-3000:]


def test_another_phase_on_an_existing_run_is_refused(straight: Path) -> None:
    before = (straight / "config.yaml").read_text()
    out = subprocess.run(["bash", "launch/pretrain_causal.sh", *_args(straight)], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode == 2
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: run.dir: {straight} holds a run of another model/phase")
    assert "train.phase: 4 -> 2" in line and "model.struct_tower: True -> False" in line
    assert "train.init_from=" in line and "Traceback" not in out.stderr
    assert (straight / "config.yaml").read_text() == before      # nothing rewritten
