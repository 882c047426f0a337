"""Start this node's ranks, forward signals to them, and never leave one behind.

    python -m dualforce_mega.training.launcher --nproc N [--nnodes M --node-rank R]
        [--master-addr A] [--master-port P] [--kill-after-s S] -- COMMAND ...

Runs COMMAND once per local rank k with RANK = R*N + k, LOCAL_RANK = k, WORLD_SIZE = M*N,
LOCAL_WORLD_SIZE = N, MASTER_ADDR / MASTER_PORT (the rendezvous every rank of every node uses), so
one launcher per node builds a multi-node job without ssh (SLURM ``srun``, Kubernetes: each node runs
the same command with its own ``--node-rank``). ``launch/*.sh`` use it for every run without a
hostfile.

Signals: SIGTERM, SIGINT, SIGUSR1, SIGUSR2 and SIGHUP sent to the launcher go to every rank (the ranks
finish the current step, save a checkpoint and exit 75 for their preemption signals, see
``run.preempt_signals``). A rank that exits with an error ends the job: the others get SIGTERM (and
SIGCONT, so a stopped rank can die), then SIGKILL after ``--kill-after-s``. Each rank is started with
the parent-death signal SIGKILL, so even a SIGKILLed launcher leaves no rank running. The launcher's
exit code is the first failing rank's (else 75 if any rank was preempted, else 0). Once its ranks are
gone it removes DeepSpeed's CPU shared-memory allreduce buffers of this job (``shm_buffer_paths``).
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from . import exit_codes

log = logging.getLogger("dualforce_mega.launcher")

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1     # linux/prctl.h
POLL_S = 0.1              # how often the launcher looks at its ranks
DEFAULT_KILL_AFTER_S = 30.0
KILL_AFTER_ENV = "DUALFORCE_KILL_AFTER_S"
# rank exits that are not failures: finished, or preempted with a checkpoint
CLEAN_EXITS = (exit_codes.OK, exit_codes.PREEMPTED)
SHM_DIR = Path("/dev/shm")
SHM_BUFFER = "deepspeed_allreduce_buffer"   # deepspeed/ops/csrc/cpu/comm/shm.cpp: SHM_BUFFER_NAME


def shm_buffer_paths(master_addr: str, master_port: int, ranks: Sequence[int]) -> list[Path]:
    """DeepSpeed's CPU allreduce (``deepspeed_shm_comm_op``, used when every rank is on one node) maps one
    ~66 MiB segment per rank, named ``<SHM_BUFFER>_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``, and never
    unlinks it: each CPU run left them in /dev/shm (RAM) until the machine ran out of memory."""
    return [SHM_DIR / f"{SHM_BUFFER}_{os.getuid()}_{master_addr}_{master_port}_{r}" for r in ranks]


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the launcher dies, whatever killed it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:     # the launcher died before prctl took effect
        os._exit(exit_codes.FAILED)


def rank_env(base: dict[str, str], node_rank: int, nproc: int, nnodes: int, local_rank: int, master_addr: str,
             master_port: int) -> dict[str, str]:
    env = dict(base)
    env.update(RANK=str(node_rank * nproc + local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nproc * nnodes),
               LOCAL_WORLD_SIZE=str(nproc), LOCAL_SIZE=str(nproc), NODE_RANK=str(node_rank),
               GROUP_RANK=str(node_rank), CROSS_RANK=str(node_rank), CROSS_SIZE=str(nnodes),
               MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
    return env


class Launcher:
    def __init__(self, command: Sequence[str], nproc: int, nnodes: int = 1, node_rank: int = 0,
                 master_addr: str = "127.0.0.1", master_port: int = 29500,
                 kill_after_s: float = DEFAULT_KILL_AFTER_S):
        self.command = list(command)
        self.nproc, self.nnodes, self.node_rank = nproc, nnodes, node_rank
        self.master_addr, self.master_port, self.kill_after_s = master_addr, master_port, kill_after_s
        self.procs: list[subprocess.Popen] = []
        self.signalled: Optional[int] = None

    def _global(self, local: int) -> int:
        return self.node_rank * self.nproc + local

    def start(self) -> None:
        for local in range(self.nproc):
            env = rank_env(os.environ, self.node_rank, self.nproc, self.nnodes, local, self.master_addr,
                           self.master_port)
            # own session: a terminal's Ctrl-C reaches the ranks once, through the launcher
            self.procs.append(subprocess.Popen(self.command, env=env, preexec_fn=_die_with_parent,
                                               start_new_session=True))
        log.info("launcher: node %d/%d started ranks %d..%d (pids %s) of world %d, rendezvous %s:%d",
                 self.node_rank, self.nnodes, self._global(0), self._global(self.nproc - 1),
                 [p.pid for p in self.procs], self.nproc * self.nnodes, self.master_addr, self.master_port)

    def _forward(self, signum: int, _frame=None) -> None:
        self.signalled = signum
        name = signal.Signals(signum).name
        log.warning("launcher: %s received, forwarding it to ranks %s", name,
                    [self._global(i) for i, p in enumerate(self.procs) if p.poll() is None])
        self._send(signum)

    def _send(self, signum: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(signum)
                except ProcessLookupError:
                    pass

    def _stop_all(self) -> None:
        """Failure elsewhere: SIGTERM (+ SIGCONT for a stopped rank), SIGKILL after ``kill_after_s``."""
        self._send(signal.SIGTERM)
        self._send(signal.SIGCONT)
        deadline = time.monotonic() + self.kill_after_s
        while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        for i, p in enumerate(self.procs):
            if p.poll() is None:
                log.error("launcher: rank %d (pid %d) still running %.0f s after SIGTERM: SIGKILL",
                          self._global(i), p.pid, self.kill_after_s)
                p.kill()
        for p in self.procs:
            p.wait()

    def wait(self) -> int:
        """Until every rank exited; returns the job's exit code."""
        first_failure: Optional[tuple[int, int]] = None
        while True:
            codes = [p.poll() for p in self.procs]
            for i, rc in enumerate(codes):
                if rc is not None and rc not in CLEAN_EXITS and first_failure is None:
                    first_failure = (i, rc)
                    log.error("launcher: rank %d (pid %d) exited with code %d (%s); stopping the other ranks",
                              self._global(i), self.procs[i].pid, rc, _describe(rc))
                    self._stop_all()
            if all(rc is not None for rc in codes) or first_failure is not None:
                break
            time.sleep(POLL_S)
        codes = [p.wait() for p in self.procs]
        if first_failure is not None:
            return _exit_code(first_failure[1])
        return exit_codes.PREEMPTED if exit_codes.PREEMPTED in codes else exit_codes.OK

    def run(self) -> int:
        for s in FORWARDED:
            signal.signal(s, self._forward)
        try:
            self.start()
            return self.wait()
        finally:
            for p in self.procs:       # any path out of here (an exception included) takes the ranks along
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for path in shm_buffer_paths(self.master_addr, self.master_port,
                                         [self._global(i) for i in range(self.nproc)]):
                path.unlink(missing_ok=True)


def _describe(rc: int) -> str:
    if rc < 0:
        return f"killed by {signal.Signals(-rc).name}"
    return exit_codes.NAMES.get(rc, "error")


def _exit_code(rc: int) -> int:
    """A rank killed by signal N exits the launcher with 128 + N, as a shell would report it."""
    return 128 - rc if rc < 0 else rc


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m dualforce_mega.training.launcher", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, required=True, help="ranks on this node")
    ap.add_argument("--nnodes", type=int, default=1)
    ap.add_argument("--node-rank", type=int, default=0)
    ap.add_argument("--master-addr", default="127.0.0.1", help="rendezvous host (node 0)")
    ap.add_argument("--master-port", type=int, default=29500)
    ap.add_argument("--kill-after-s", type=float, default=float(os.environ.get(KILL_AFTER_ENV, DEFAULT_KILL_AFTER_S)),
                    help=f"after a rank failed: seconds between SIGTERM and SIGKILL for the others "
                         f"(default ${KILL_AFTER_ENV}, else {DEFAULT_KILL_AFTER_S:g})")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS... (run once per local rank)")
    args = ap.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        ap.error("no command given (launcher options -- COMMAND ...)")
    for flag, value, lo in (("--nproc", args.nproc, 1), ("--nnodes", args.nnodes, 1), ("--node-rank", args.node_rank, 0)):
        if value < lo:
            ap.error(f"{flag} {value} must be >= {lo}")
    if args.node_rank >= args.nnodes:
        ap.error(f"--node-rank {args.node_rank} must be < --nnodes {args.nnodes}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    args = parse_args(argv)
    return Launcher(args.command, args.nproc, args.nnodes, args.node_rank, args.master_addr, args.master_port,
                    args.kill_after_s).run()


if __name__ == "__main__":
    sys.exit(main())
