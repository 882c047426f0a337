"""The node launcher (``dualforce_mega.training.launcher``) and the launch scripts' multi-node options,
with stand-in ranks (small Python programs) instead of training: rank environment, signal forwarding,
failure propagation, no orphans (a SIGKILLed launcher included), and what ``launch/*.sh`` and
``launch/slurm/*.sbatch`` hand to it (probe cases of issue 15)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dualforce_mega.training import exit_codes

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = [sys.executable, "-m", "dualforce_mega.training.launcher"]
DEADLINE_S = 60

# a stand-in rank: sets up its signal handling, writes its pid and environment (the file appears
# complete), then behaves as argv[2] says; in the fail0 modes rank 0 fails once the test creates
# OUT/go (no sleeps: the order of events must not depend on the machine's load)
RANK = r"""
import json, os, signal, sys, time
out, mode = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK")
def done(signum, frame):
    open(f"{out}/signal{rank}", "w").write(str(signum))
    sys.exit(75)
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "fail0-stubborn" else done)
signal.signal(signal.SIGUSR1, done)
with open(f"{out}/.rank{rank}.tmp", "w") as f:
    json.dump({"pid": os.getpid(), **{k: os.environ[k] for k in keys}}, f)
os.replace(f"{out}/.rank{rank}.tmp", f"{out}/rank{rank}.json")
if mode.startswith("fail0") and rank == 0:
    while not os.path.exists(f"{out}/go"):
        time.sleep(0.05)
    sys.exit(3)
while True:
    time.sleep(0.05)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _start(tmp_path: Path, mode: str, *opts: str) -> subprocess.Popen:
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    return subprocess.Popen([*LAUNCHER, *opts, "--", sys.executable, str(script), str(tmp_path), mode],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _ranks(tmp_path: Path, n: int) -> list[dict]:
    _wait_for(lambda: len(list(tmp_path.glob("rank*.json"))) == n, f"{n} ranks to start")
    return [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]


def test_ranks_get_this_nodes_slice_of_the_world(tmp_path: Path) -> None:
    proc = _start(tmp_path, "wait", "--nproc", "2", "--nnodes", "3", "--node-rank", "1", "--master-addr", "10.1.2.3",
                  "--master-port", "1234")
    ranks = _ranks(tmp_path, 2)
    assert [(r["RANK"], r["LOCAL_RANK"]) for r in ranks] == [("2", "0"), ("3", "1")]
    assert {(r["WORLD_SIZE"], r["LOCAL_WORLD_SIZE"], r["NODE_RANK"], r["MASTER_ADDR"], r["MASTER_PORT"])
            for r in ranks} == {("6", "2", "1", "10.1.2.3", "1234")}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(DEADLINE_S) == exit_codes.PREEMPTED


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signals_reach_every_rank_and_the_exit_code_comes_back(tmp_path: Path, signum: int) -> None:
    proc = _start(tmp_path, "wait", "--nproc", "2")
    ranks = _ranks(tmp_path, 2)
    proc.send_signal(signum)
    assert proc.wait(DEADLINE_S) == exit_codes.PREEMPTED
    assert [int((tmp_path / f"signal{r}").read_text()) for r in range(2)] == [signum, signum]
    assert not any(alive(r["pid"]) for r in ranks)


def test_a_failed_rank_ends_the_job_and_leaves_no_rank(tmp_path: Path) -> None:
    """Rank 0 fails; rank 1 ignores SIGTERM (as a rank blocked in a collective would) and is SIGKILLed."""
    proc = _start(tmp_path, "fail0-stubborn", "--nproc", "2", "--kill-after-s", "1")
    ranks = _ranks(tmp_path, 2)
    (tmp_path / "go").touch()
    rc = proc.wait(DEADLINE_S)
    log = proc.stdout.read()
    assert rc == 3 and "rank 0" in log and "exited with code 3" in log and "SIGKILL" in log, log
    assert not any(alive(r["pid"]) for r in ranks)


def test_a_stopped_rank_is_killed_when_another_fails(tmp_path: Path) -> None:
    proc = _start(tmp_path, "fail0", "--nproc", "2", "--kill-after-s", "1")
    ranks = _ranks(tmp_path, 2)
    os.kill(ranks[1]["pid"], signal.SIGSTOP)
    (tmp_path / "go").touch()
    assert proc.wait(DEADLINE_S) == 3
    assert not alive(ranks[1]["pid"])


def test_a_killed_launcher_leaves_no_orphans(tmp_path: Path) -> None:
    proc = _start(tmp_path, "wait", "--nproc", "2")
    ranks = _ranks(tmp_path, 2)
    proc.kill()                              # SIGKILL: no handler runs in the launcher
    proc.wait(DEADLINE_S)
    _wait_for(lambda: not any(alive(r["pid"]) for r in ranks), "the ranks to die with their launcher")


# ------------------------------------------------------------------ launch scripts (stub python)
STUB = r"""#!/usr/bin/env bash
# stands in for python: records each call; preflight answers with $STUB_PREFLIGHT_RC
echo "$*" >> "$STUB_LOG"
if [[ "$*" == *training.preflight* ]]; then exit "${STUB_PREFLIGHT_RC:-0}"; fi
if [[ "$*" == *socket* ]]; then echo 45678; fi
exit 0
"""


def _script(tmp_path: Path, script: str, *args: str, preflight_rc: int = 0, env: dict | None = None
            ) -> tuple[subprocess.CompletedProcess, list[str]]:
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    log = tmp_path / "calls.log"
    log.unlink(missing_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "CUDA_VISIBLE"))}
    base.update(PYTHON=str(stub), STUB_LOG=str(log), STUB_PREFLIGHT_RC=str(preflight_rc), **(env or {}))
    base["PATH"] = f"{tmp_path}:{base['PATH']}"
    out = subprocess.run(["bash", script, *args], cwd=REPO, env=base, capture_output=True, text=True, timeout=60)
    return out, log.read_text().splitlines() if log.exists() else []


def test_the_two_scripts_default_to_their_own_run_directories(tmp_path: Path) -> None:
    for script, phase in (("launch/pretrain_causal.sh", 2), ("launch/train_dualforce.sh", 4)):
        out, calls = _script(tmp_path, script)
        assert out.returncode == 0, out.stderr
        launch = calls[-1]
        assert f"run.dir=runs/tiny_cpu_phase{phase}" in launch and f"train.phase={phase}" in launch
        # a later --set wins over the default
        out, calls = _script(tmp_path, script, "--set", "run.dir=runs/mine")
        assert calls[-1].index("run.dir=runs/mine") > calls[-1].index(f"run.dir=runs/tiny_cpu_phase{phase}")


def test_multi_node_without_ssh(tmp_path: Path) -> None:
    out, calls = _script(tmp_path, "launch/train_dualforce.sh", "--nproc", "2", "--nnodes", "2", "--node-rank", "1",
                         "--master_addr", "10.0.0.7")
    assert out.returncode == 0, out.stderr
    preflight, launch = calls[-2], calls[-1]
    assert "--world 4" in preflight
    assert ("-m dualforce_mega.training.launcher --nproc 2 --nnodes 2 --node-rank 1 --master-addr 10.0.0.7 "
            "--master-port 29500 --") in launch
    assert "deepspeed.launcher" not in launch and "pdsh" not in launch
    out, _ = _script(tmp_path, "launch/train_dualforce.sh", "--nnodes", "2", "--node-rank", "0")
    assert out.returncode == 2 and "--master_addr" in out.stderr
    out, _ = _script(tmp_path, "launch/train_dualforce.sh", "--nnodes", "2", "--node-rank", "2",
                     "--master_addr", "h")
    assert out.returncode == 2 and "--node-rank '2' must be in 0..1" in out.stderr


def test_a_finished_run_starts_no_rank(tmp_path: Path) -> None:
    out, calls = _script(tmp_path, "launch/train_dualforce.sh", preflight_rc=exit_codes.PREFLIGHT_FINISHED)
    assert out.returncode == 0 and not any("training.launcher" in c for c in calls)


def test_slurm_batch_script_uses_the_slurm_variables(tmp_path: Path) -> None:
    """srun runs the launch script once per node; each task takes its node rank from SLURM_NODEID."""
    srun = tmp_path / "srun"
    srun.write_text('#!/usr/bin/env bash\necho "srun $*" >> "$STUB_LOG"\n'
                    'while [[ "$1" == -* ]]; do shift; done\n'
                    'for id in 0 1; do SLURM_NODEID=$id SLURM_PROCID=$id "$@"; done\n')
    scontrol = tmp_path / "scontrol"
    scontrol.write_text('#!/usr/bin/env bash\necho "scontrol $*" >> "$STUB_LOG"\n'
                        'if [[ "$1 $2" == "show hostnames" ]]; then echo gpu-node-17; echo gpu-node-18; fi\n')
    for f in (srun, scontrol):
        f.chmod(0o755)
    env = {"SLURM_JOB_NODELIST": "gpu-node-[17-18]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "42",
           "SLURM_GPUS_ON_NODE": "8"}
    out, calls = _script(tmp_path, "launch/slurm/train_dualforce.sbatch", "--set", "train.steps=10", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    launches = [c for c in calls if "training.launcher" in c]
    assert len(launches) == 2
    for node, call in enumerate(launches):
        assert f"--nproc 8 --nnodes 2 --node-rank {node} --master-addr gpu-node-17 --master-port 29500" in call
        assert "train.steps=10" in call


def test_deepspeed_shm_buffers_of_the_job_are_removed(tmp_path: Path) -> None:
    """DeepSpeed's CPU allreduce leaves one /dev/shm segment per rank (never unlinked; 337 of 66 MiB filled
    this machine's RAM in a day of CPU runs): the launcher removes its job's segments, and no other's."""
    from dualforce_mega.training.launcher import Launcher, shm_buffer_paths

    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    port = 20000 + os.getpid() % 20000
    ours = shm_buffer_paths("127.0.0.1", port, [2, 3])            # node 1 of 2 nodes x 2 ranks
    others = shm_buffer_paths("127.0.0.1", port + 1, [2]) + shm_buffer_paths("127.0.0.1", port, [0])
    for p in ours + others:
        p.write_bytes(b"x")
    try:
        rc = Launcher([sys.executable, "-c", "pass"], nproc=2, nnodes=2, node_rank=1, master_port=port).run()
        assert rc == 0
        assert not any(p.exists() for p in ours) and all(p.exists() for p in others)
    finally:
        for p in ours + others:
            p.unlink(missing_ok=True)
