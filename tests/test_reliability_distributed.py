"""Cluster-scale reliability end to end on CPU ranks (gloo, tiny preset), through ``launch/train_dualforce.sh``.

Launches shared by the tests (start-up dominates their cost):
  straight   2 ranks on one node, STEPS steps, a checkpoint every SAVE_EVERY (all kept): the reference
  loopback1  two "nodes" on 127.0.0.1 with 1 rank each (--nnodes 2 --node-rank 0/1), same steps
  loopback2  two "nodes" with 2 ranks each (world 4: one sample per rank and step)
  preempted  the straight command, SIGTERM to the launcher once step PREEMPT_AFTER is logged: every rank
             finishes the step it is in, saves it (not a save_every step) and exits 75
  shrink     the preempted run resumed by the same command on 1 rank (elastic 2 -> 1) to the end, saving
             every step
  grow       shrink's run directory as of step 7, with the step-7 checkpoint truncated (a node died
             writing it): named, set aside, and shrink's step 6 (1 rank) resumed on 2 ranks (elastic 1 -> 2)
Batches and noise do not depend on the world size, so every run must reproduce the straight run's losses
(also a resume with parallel.sp=2 instead of 1). Then: a stopped rank (SIGSTOP) ends the job within the watchdog timeout with a message naming it; NaN /
Inf samples are skipped and counted; a run of non-finite steps stops with exit code 3.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dualforce_mega.config import load_config, save_config
from dualforce_mega.training.checkpoint import BROKEN_PREFIX, tag_for

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 9, 3
PREEMPT_AFTER = 4    # SIGTERM once this step is in metrics.jsonl
LAST_GOOD = 6        # grow: the checkpoint after it is damaged
HANG_TIMEOUT_S = 5   # run.hang_timeout_s of the SIGSTOP test
KILL_AFTER_S = 5     # the launcher's SIGTERM -> SIGKILL delay after a failed rank, in these tests
TIMEOUT_S = 900
# the same computation in other processes / other world sizes: fp32 sums in another order (measured
# differences ~1e-7 over 20 steps, tests/test_trainer_distributed.py); a wrong state is off by >1e-3
LOSS_TOL = 1e-5


def _env() -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", DUALFORCE_KILL_AFTER_S=str(KILL_AFTER_S))
    env.pop("DUALFORCE_FAULT_KILL_IN_SAVE", None)
    return env


def _args(run_dir: Path, shards: str = "") -> list[str]:
    args = ["--set", f"run.dir={run_dir}", "--set", f"train.steps={STEPS}", "--set", f"train.save_every={SAVE_EVERY}",
            "--set", f"train.keep_last={STEPS}", "--set", "run.log_samples=true", "--set", "run.tensorboard=false",
            # lip-sync negatives from the micro batch only: gathered over the data-parallel group they tie the
            # loss to the number of ranks, and these runs are compared across world sizes
            "--set", "diffusion.lipsync_negatives=local"]
    return args + (["--set", f"data.shards={shards}"] if shards else [])


def _launch(run_dir: Path, *extra: str, shards: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "launch/train_dualforce.sh", *_args(run_dir, shards), *extra], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def _records(run_dir: Path) -> dict[int, dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    return {r["step"]: r for r in (json.loads(x) for x in path.read_text().splitlines() if x.strip())}


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _start(run_dir: Path, *extra: str, shards: str = "") -> subprocess.Popen:
    return subprocess.Popen(["bash", "launch/train_dualforce.sh", *_args(run_dir, shards), *extra], cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while max(_records(run_dir), default=0) < step:
        assert proc.poll() is None, proc.stdout.read()[-5000:]
        assert time.monotonic() < deadline, f"step {step} never logged"
        time.sleep(0.1)


def _rank_pids(run_dir: Path) -> dict[int, int]:
    """Rank -> pid, from the ranks' heartbeat files (training/watchdog.py)."""
    return {int(p.stem.split("_")[1]): json.loads(p.read_text())["pid"]
            for p in (run_dir / "heartbeat").glob("rank_*.json")}


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
def preempted(shards: str, tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("preempted") / "run"
    proc = _start(run_dir, shards=shards)
    _wait_for_step(proc, run_dir, PREEMPT_AFTER)
    pids = _rank_pids(run_dir)
    proc.send_signal(signal.SIGTERM)          # what a scheduler sends to the job
    out, _ = proc.communicate(timeout=TIMEOUT_S)
    return run_dir, proc.returncode, out, pids, dict(_records(run_dir))


@pytest.fixture(scope="module")
def shrink(preempted, shards: str):
    run_dir = preempted[0]
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


def test_sigterm_saves_the_current_step_and_leaves_no_process(preempted) -> None:
    run_dir, rc, out, pids, records = preempted
    assert rc == 75, out[-5000:]
    stopped = max(records)
    # the step that was running when the signal came (or the next one) -- not a save_every step
    assert PREEMPT_AFTER < stopped <= PREEMPT_AFTER + 2 and stopped % SAVE_EVERY != 0, stopped
    assert (run_dir / "checkpoints" / "latest").read_text() == tag_for(stopped)
    assert f"preempted by SIGTERM: stopped after step {stopped} with a checkpoint" in out
    assert "launcher: SIGTERM received, forwarding it to ranks [0, 1]" in out
    assert sorted(pids) == [0, 1] and not any(_alive(p) for p in pids.values())
    # train.log also holds the warnings of ranks > 0
    assert "[rank 1] WARNING dualforce_mega.training.preemption: SIGTERM received" in (run_dir / "train.log").read_text()


def test_preempted_run_resumes_exactly_on_fewer_ranks(straight: Path, preempted, shrink) -> None:
    """The same command again, on 1 rank instead of 2: the checkpoint is resharded (elastic 2 -> 1)."""
    run_dir, out = shrink
    stopped = max(preempted[4])
    assert f"resumed from {run_dir / 'checkpoints' / tag_for(stopped)} (step {stopped})" in out.stdout + out.stderr
    assert "written by 2 ranks, this run has 1: resharding it" in out.stderr + out.stdout
    records = _records(run_dir)
    assert sorted(records) == list(range(1, STEPS + 1))                 # each step logged once
    _same_losses(records, _records(straight), range(1, STEPS + 1))


def test_damaged_checkpoint_falls_back_and_resume_on_more_ranks_is_exact(straight: Path, grow) -> None:
    run_dir, out, damaged = grow
    log = out.stdout + out.stderr
    assert f"checkpoint {tag_for(LAST_GOOD + 1)} is damaged, falling back to the previous one: {damaged}" in log
    assert (run_dir / "checkpoints" / f"{BROKEN_PREFIX}{tag_for(LAST_GOOD + 1)}").is_dir()
    assert "written by 1 ranks, this run has 2: resharding it" in log
    _same_losses(_records(run_dir), _records(straight), range(LAST_GOOD + 1, STEPS + 1))


def test_resume_with_another_sequence_parallel_degree_is_exact(straight: Path, shards: str, tmp_path: Path) -> None:
    """Same world, parallel.sp 1 -> 2: the data-parallel size halves, so every rank now owns other logical
    streams; their positions come from the merged rank states."""
    run_dir = _resume_copy(straight, tmp_path / "run", SAVE_EVERY)
    out = _launch(run_dir, "--set", "parallel.sp=2", shards=shards)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "dp=1 sp=2" in out.stdout + out.stderr
    _same_losses(_records(run_dir), _records(straight), range(SAVE_EVERY + 1, STEPS + 1))


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
    config_before = (run_dir / "config.yaml").stat().st_mtime_ns
    out = _launch(run_dir, shards=shards)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-5000:]
    assert f"resume refused: {target}: refused to load" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert not marker.exists()
    assert (run_dir / "config.yaml").stat().st_mtime_ns == config_before    # written only after a resume


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


def test_a_stopped_rank_ends_the_job_naming_it(shards: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _start(run_dir, "--set", "train.steps=200", "--set", "train.save_every=200",
                  "--set", f"run.hang_timeout_s={HANG_TIMEOUT_S}", "--set", "run.collective_timeout_s=300", shards=shards)
    _wait_for_step(proc, run_dir, 3)          # the watchdog is armed from the second step of a start
    pids = _rank_pids(run_dir)
    os.kill(pids[1], signal.SIGSTOP)
    t0 = time.monotonic()
    out, _ = proc.communicate(timeout=TIMEOUT_S)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 4, out[-5000:]
    assert f"rank 1 (pid {pids[1]} on {socket.gethostname()}) has been silent for" in out
    assert "stopped, dead or unreachable" in out
    # watchdog timeout + one heartbeat period, then the launcher's SIGTERM/SIGCONT (SIGKILL after KILL_AFTER_S)
    assert elapsed < HANG_TIMEOUT_S + KILL_AFTER_S + 10, elapsed
    assert not any(_alive(p) for p in pids.values())


def test_non_finite_samples_are_skipped_and_training_goes_on(shards: str, tmp_path: Path) -> None:
    """The probe's shard with NaN latents and an Inf audio value: DeepSpeed skipped every step, silently."""
    from test_nonfinite import poison

    data = Path(shutil.copytree(shards, tmp_path / "shards"))
    keys = json.loads((data / "index.json").read_text())["shards"][0]["keys"]
    poison(data, keys[0], "video_latent", float("nan"))
    poison(data, keys[1], "audio", float("inf"))
    out = _launch(tmp_path / "run", shards=str(data))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    records = _records(tmp_path / "run")
    assert sorted(records) == list(range(1, STEPS + 1))
    assert all(not r["step_skipped"] and r["nonfinite_steps"] == 0 for r in records.values())
    assert all(r["grad_norm"] == r["grad_norm"] and r["grad_norm"] < float("inf") for r in records.values())
    # counted each time the stream reading that shard meets them (its second epoch starts within these steps)
    assert records[STEPS]["data_nonfinite_samples"] >= 2 and records[1]["data_corrupt_samples"] == 0
    assert f"{keys[0]}: video_latent contains NaN or Inf" in out.stdout + out.stderr


def test_a_run_of_non_finite_steps_stops_with_exit_code_3(shards: str, tmp_path: Path) -> None:
    """An absurd learning rate: the loss turns non-finite, every rank skips those steps, then the run stops."""
    run_dir = tmp_path / "run"
    out = _launch(run_dir, "--set", "train.lr=1e15", "--set", "train.warmup_steps=0", "--set",
                  "train.nonfinite_limit=3", shards=shards)
    assert out.returncode == 3, out.stdout[-3000:] + out.stderr[-5000:]
    records = _records(run_dir)
    skipped = [s for s, r in records.items() if r["step_skipped"]]
    assert len(skipped) == 3 and skipped == list(range(skipped[0], skipped[0] + 3))
    assert records[skipped[-1]]["nonfinite_steps"] == 3 and records[skipped[0]]["nonfinite_samples"]
    assert f"stopping: 3 consecutive steps ({skipped[0]}..{skipped[-1]}) had a non-finite loss" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr and "KeyError" not in out.stdout + out.stderr
