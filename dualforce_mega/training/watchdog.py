"""Hang detection: a step watchdog that names the rank the job waits for.

Every rank runs a daemon thread that writes a heartbeat ``<run.dir>/heartbeat/rank_NNNNN.json`` (pid,
host, step, phase, time) every ``run.hang_timeout_s / 8`` seconds (at most every 10 s). The training loop
reports progress (:meth:`Watchdog.progress`). When a rank has made no progress for ``run.hang_timeout_s``
while armed (from the end of the first step of a start on -- that step may compile or autotune for long --
through steps and checkpoint saves), its watchdog reads every rank's heartbeat,
names the ranks that went silent (stopped, dead, unreachable) or fell behind, logs that as one error line
and ends the process with exit code 4; the launcher then stops the other ranks.

A rank that is stopped (SIGSTOP) or hung in the kernel writes no heartbeat, so the ranks waiting for it in
a collective name it. Collective timeouts (``run.collective_timeout_s``) are the backstop outside the
armed region; :func:`diagnose` explains them the same way.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Optional

from . import exit_codes

log = logging.getLogger(__name__)

HEARTBEAT_DIR = "heartbeat"
BEATS_PER_TIMEOUT = 8          # heartbeats per hang timeout: silence is visible long before the timeout
MAX_BEAT_S = 10.0              # ... but at least every 10 s (cheap: one small file per rank)
SILENT_BEATS = 3               # a rank whose heartbeat is this many periods old is silent


def beat_period(timeout_s: float) -> float:
    return min(timeout_s / BEATS_PER_TIMEOUT, MAX_BEAT_S)


def _heartbeat_file(directory: Path, rank: int) -> Path:
    return directory / f"rank_{rank:05d}.json"


def read_heartbeats(directory: Path, world: int) -> dict[int, Optional[dict[str, Any]]]:
    out: dict[int, Optional[dict[str, Any]]] = {}
    for r in range(world):
        try:
            out[r] = json.loads(_heartbeat_file(directory, r).read_text())
        except (OSError, ValueError):
            out[r] = None
    return out


def diagnose(directory: Path, world: int, me: int, period_s: float, now: Optional[float] = None) -> str:
    """Which ranks the job waits for, from the heartbeats: silent ones first, else those behind."""
    now = time.time() if now is None else now
    beats = read_heartbeats(directory, world)
    silent = []
    for r, b in beats.items():
        if r == me:
            continue
        if b is None:
            silent.append(f"rank {r} never reported")
        elif now - b["time"] > SILENT_BEATS * period_s:
            silent.append(f"rank {r} (pid {b['pid']} on {b['host']}) has been silent for {now - b['time']:.1f} s "
                          f"(last seen in step {b['step']}, {b['phase']}): stopped, dead or unreachable")
    if silent:
        return "; ".join(silent)
    live = {r: b for r, b in beats.items() if b is not None}
    lowest = min((b["step"] for b in live.values()), default=None)
    behind = [f"rank {r} (pid {b['pid']} on {b['host']}) is still in step {b['step']} ({b['phase']})"
              for r, b in live.items() if b["step"] == lowest and any(o["step"] > lowest for o in live.values())]
    if behind:
        return "; ".join(behind)
    return f"every rank is alive in step {lowest}: a collective is stuck (network, or ranks disagree on what to run)"


class Watchdog:
    def __init__(self, run_dir: Path, rank: int, world: int, timeout_s: float):
        self.dir = Path(run_dir) / HEARTBEAT_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.period_s = beat_period(timeout_s) if timeout_s > 0 else MAX_BEAT_S
        self.step, self.phase = -1, "start"
        self.armed = False
        self.last_progress = time.monotonic()
        self._host, self._pid = socket.gethostname(), os.getpid()
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, name="dualforce-watchdog", daemon=True)
        self._thread.start()

    def progress(self, step: int, phase: str, armed: Optional[bool] = None) -> None:
        """The loop got somewhere: ``step`` in ``phase``; ``armed`` switches the hang check on / off."""
        self.step, self.phase = step, phase
        self.last_progress = time.monotonic()
        if armed is not None:
            self.armed = armed and self.timeout_s > 0

    def _beat(self) -> None:
        path = _heartbeat_file(self.dir, self.rank)
        tmp = path.with_name(f".{path.name}.{self._pid}")
        try:
            tmp.write_text(json.dumps({"rank": self.rank, "pid": self._pid, "host": self._host, "step": self.step,
                                       "phase": self.phase, "time": time.time()}))
            os.replace(tmp, path)
        except OSError as e:      # a full or flaky filesystem must not stop training; the next beat retries
            log.warning("heartbeat %s not written: %s", path, e)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.period_s):
            now = time.monotonic()
            # this thread itself did not run for several periods: the whole process was suspended (SIGSTOP,
            # a frozen VM); the others have been waiting for it, not the other way round
            suspended = now - last - self.period_s if now - last > SILENT_BEATS * self.period_s else 0.0
            last = now
            self._beat()
            idle = now - self.last_progress
            if self.armed and idle > self.timeout_s:
                self._fire(idle, suspended)

    def _fire(self, idle: float, suspended: float) -> None:
        who = (f"this process was suspended for {suspended:.1f} s (SIGSTOP?), so the job waited for it"
               if suspended else diagnose(self.dir, self.world, self.rank, self.period_s))
        log.error("step watchdog: rank %d made no progress for %.1f s in step %d (%s; run.hang_timeout_s=%g): %s",
                  self.rank, idle, self.step, self.phase, self.timeout_s, who)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(exit_codes.HANG)     # the main thread is blocked in a collective: end the process from here

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.period_s + 1)
