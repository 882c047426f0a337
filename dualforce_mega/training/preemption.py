"""Preemption: a signal on any rank (or on the launcher, which forwards it) stops every rank after the
same step, with a checkpoint.

Each rank installs handlers for ``run.preempt_signals`` (default SIGTERM, SIGUSR1) as early as possible;
a handler only records the signal. At the end of every step the ranks agree on whether any of them got
one (a one-element all-reduce, MAX), so all of them stop after the same step; the trainer then saves a
checkpoint and raises :class:`~.exit_codes.Preempted` (exit code 75). Rerunning the same command resumes
exactly. A second signal changes nothing: the step still finishes and the checkpoint is still written.
"""
from __future__ import annotations

import logging
import signal
from typing import Any, Optional

log = logging.getLogger(__name__)


def parse_signals(spec: str) -> list[signal.Signals]:
    return [signal.Signals[name.strip()] for name in spec.split(",") if name.strip()]


class StopSignals:
    def __init__(self, spec: str):
        self.signals = parse_signals(spec)
        self.received: Optional[signal.Signals] = None
        for s in self.signals:
            signal.signal(s, self._record)

    def _record(self, signum: int, _frame=None) -> None:
        first = self.received is None
        self.received = self.received or signal.Signals(signum)
        if first:   # logging from a handler: only once, and it runs between two Python bytecodes
            log.warning("%s received: finishing the current step, then saving a checkpoint and stopping",
                        signal.Signals(signum).name)

    def agreed(self, device: Any) -> bool:
        """Collective when distributed: True on every rank if any rank received a stop signal."""
        import torch
        import torch.distributed as dist

        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.received is not None
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for s in self.signals:
            signal.signal(s, signal.SIG_DFL)
