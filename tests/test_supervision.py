"""Preemption agreement and the step watchdog, in small processes (no training): a signal on one rank stops
every rank; the watchdog ends a stuck rank with exit code 4 and names the rank it waits for.
End-to-end runs (SIGTERM to the launcher, SIGSTOP of a rank) are in tests/test_reliability_distributed.py."""
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
from dualforce_mega.training.watchdog import HEARTBEAT_DIR, SILENT_BEATS, diagnose

REPO = Path(__file__).resolve().parents[1]

AGREE = r"""
import os, signal, sys, time
import torch, torch.distributed as dist
from dualforce_mega.training.preemption import StopSignals
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method=f"file://{sys.argv[2]}", rank=rank, world_size=2)
stop = StopSignals("SIGTERM,SIGUSR1")
answers = []
for step in range(3):
    if step == 1 and rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)     # only rank 1 is told
        os.kill(os.getpid(), signal.SIGUSR1)     # twice: still one stop
    answers.append(stop.agreed(torch.device("cpu")))
print(rank, answers, stop.received.name if stop.received else None, flush=True)
dist.destroy_process_group()
"""


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path: Path) -> None:
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "rdv")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0].strip() == "0 [False, True, True] None"
    assert outs[1][0].strip() == "1 [False, True, True] SIGUSR1"


def _heartbeat(directory: Path, rank: int, step: int, age_s: float, now: float) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"rank_{rank:05d}.json").write_text(json.dumps(
        {"rank": rank, "pid": 100 + rank, "host": f"node{rank}", "step": step, "phase": "training",
         "time": now - age_s}))


def test_diagnosis_names_silent_then_lagging_ranks(tmp_path: Path) -> None:
    now, period = 1000.0, 1.0
    d = tmp_path / HEARTBEAT_DIR
    _heartbeat(d, 0, 7, 0.1, now)
    _heartbeat(d, 1, 7, SILENT_BEATS * period + 2, now)     # stopped
    _heartbeat(d, 2, 6, 0.2, now)                           # alive but a step behind
    text = diagnose(d, 4, 0, period, now)
    assert "rank 1 (pid 101 on node1) has been silent for 5.0 s (last seen in step 7" in text
    assert "rank 3 never reported" in text and "rank 2" not in text           # silent ranks first
    _heartbeat(d, 1, 7, 0.1, now)
    _heartbeat(d, 3, 7, 0.1, now)
    assert diagnose(d, 4, 0, period, now) == "rank 2 (pid 102 on node2) is still in step 6 (training)"
    _heartbeat(d, 2, 7, 0.1, now)
    assert "every rank is alive in step 7" in diagnose(d, 4, 0, period, now)


STUCK = r"""
import logging, sys, time
from pathlib import Path
from dualforce_mega.training.watchdog import Watchdog
logging.basicConfig(level=logging.INFO)
w = Watchdog(Path(sys.argv[1]), rank=0, world=2, timeout_s=float(sys.argv[2]))
w.progress(5, "training", armed=True)
time.sleep(60)        # a collective that never returns
"""


def test_watchdog_ends_a_stuck_rank_within_the_timeout(tmp_path: Path) -> None:
    timeout_s = 2.0
    _heartbeat(tmp_path / HEARTBEAT_DIR, 1, 5, 30.0, time.time())       # rank 1 went quiet long ago
    script = tmp_path / "stuck.py"
    script.write_text(STUCK)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, str(script), str(tmp_path), str(timeout_s)], env=dict(
        os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert out.returncode == exit_codes.HANG, out.stderr
    assert "step watchdog: rank 0 made no progress for" in out.stderr and "in step 5 (training" in out.stderr
    assert "rank 1 (pid 101 on node1) has been silent for" in out.stderr
    assert elapsed < 60 / 2, elapsed          # long before the "collective" would have returned


@pytest.mark.parametrize("timeout_s, expected", [(600.0, 10.0), (8.0, 1.0)])
def test_heartbeat_period_follows_the_timeout(timeout_s: float, expected: float) -> None:
    from dualforce_mega.training.watchdog import beat_period
    assert beat_period(timeout_s) == expected
