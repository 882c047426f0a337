"""What the training loop reports to, so that a run ends cleanly whatever happens around it.

One object per rank bundles the preemption signals (``preemption.py``), the non-finite step guard
(``nonfinite.py``) and the step watchdog (``watchdog.py``); the loop calls it at a few points:

    sup.step_begins(step)                       # watchdog progress (armed from the second step of a start)
    loss = sup.loss_hook(loss, batch)           # inside the step (TrainStep), before each backward
    sup.step_ends(step, applied)                # after the update: counts non-finite (skipped) steps
    sup.metrics(...)                            # log steps: nonfinite + data skip counters (collective)
    sup.saving(step)                            # before a checkpoint save
    sup.after_step(done, total, saved, save)    # stops: non-finite limit, preemption (saves first)
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..config import Config
from .exit_codes import Preempted
from .nonfinite import NonFiniteGuard
from .preemption import StopSignals
from .watchdog import Watchdog

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, cfg: Config, rank: int, world: int, signals: StopSignals):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.signals = signals
        self.guard: Optional[NonFiniteGuard] = None
        self.watchdog = Watchdog(Path(cfg.run.dir), rank, world, cfg.run.hang_timeout_s)
        self.skipped: Optional[list[str]] = None     # keys of the last step if it was skipped
        self._steps_this_start = 0

    def attach(self, update_skips: bool, nonfinite_so_far: int) -> None:
        """Once the optimizer is known: can it skip updates itself (ZeRO >= 1 or bf16)? Resumed count."""
        self.guard = NonFiniteGuard(self.cfg.train.nonfinite_limit, update_skips, nonfinite_so_far)

    # ------------------------------------------------------------------ inside the loop
    def step_begins(self, step: int) -> None:
        # the first step of a start may compile / autotune for long: only the collective timeout bounds it
        self.watchdog.progress(step + 1, "training", armed=self._steps_this_start > 0)

    def loss_hook(self, loss: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """``TrainStep``'s hook: the loss to backpropagate (see ``nonfinite.NonFiniteGuard``)."""
        return self.guard.loss_for_backward(loss, batch.get("__key__", [])) if self.guard is not None else loss

    def step_ends(self, step: int, applied: bool) -> None:
        self._steps_this_start += 1
        self.watchdog.progress(step + 1, "between steps")
        if self.guard is not None:
            self.skipped = self.guard.after_update(step, applied)

    def saving(self, step: int) -> None:
        self.watchdog.progress(step, "saving a checkpoint")

    def after_step(self, done: int, total: int, saved: bool, save: Callable[[int], None],
                   device: torch.device) -> None:
        """After step ``done`` was logged (and saved, ``saved``). Raises ``NonFiniteLimit`` after too many
        skipped steps, or -- when any rank received a preemption signal (collective) -- saves step ``done``
        and raises ``Preempted``."""
        if self.guard is not None:
            self.guard.check_limit(done)
        if done >= total or not self.signals.agreed(device):
            return
        if not saved:
            save(done)
        name = self.signals.received.name if self.signals.received is not None else "a signal on another rank"
        raise Preempted(f"preempted by {name}: stopped after step {done} with a checkpoint of it in "
                        f"{Path(self.cfg.run.dir) / 'checkpoints'}; run the same command again to resume")

    # ------------------------------------------------------------------ metrics
    def metrics(self, data_stats: dict[str, int], owner: bool) -> dict[str, Any]:
        """Collective: the run's non-finite step count, the skipped step's sample keys, and the data skip
        counters summed over the data-parallel ranks (``owner``: this rank counts its streams' data)."""
        counts = data_stats if owner else {}
        if dist.is_initialized() and self.world > 1:
            parts: list[Any] = [None] * self.world
            dist.all_gather_object(parts, counts)
        else:
            parts = [counts]
        total: dict[str, int] = {}
        for p in parts:
            for k, v in p.items():
                total[k] = total.get(k, 0) + int(v)
        out: dict[str, Any] = {f"data_{k}": v for k, v in sorted(total.items())}
        if self.guard is not None:
            out["nonfinite_steps"] = self.guard.total
            out["step_skipped"] = self.skipped is not None
            if self.skipped:
                out["nonfinite_samples"] = self.skipped
        return out

    def close(self) -> None:
        self.watchdog.close()
