"""Non-finite steps: detected on every rank before the update, skipped on all ranks, counted, bounded.

Two checks run before any weight changes:

* the loss of every micro batch (here): a non-finite loss is multiplied by NaN before the backward
  (:meth:`NonFiniteGuard.loss_for_backward`), so it cannot leave finite but meaningless gradients behind
  -- an infinite MSE can have finite gradients -- and every gradient it reaches is NaN;
* the global gradient norm (DeepSpeed's ZeRO optimizer, stages 1-3, and its bf16 optimizer): all-reduced
  over the ranks, and a non-finite norm skips the update on every rank alike (no weight, moment or LR
  schedule change; ``engine.was_step_applied()`` is False everywhere).

So one bad micro batch on one rank skips the step on all ranks, with no extra collective on healthy
steps. :meth:`after_update` counts skipped steps (``nonfinite_steps`` in metrics.jsonl) and logs the data
keys of the samples whose loss was non-finite; :meth:`check_limit` stops the run with exit code 3 after
``train.nonfinite_limit`` consecutive skipped steps. Without a ZeRO optimizer and in fp32
(``parallel.zero_stage=0``), DeepSpeed cannot skip, so the first non-finite step stops the run before
the next one is taken (its update may already have been applied; the last checkpoint is clean).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.distributed as dist

from .exit_codes import NonFiniteLimit

log = logging.getLogger(__name__)


def _gather(keys: list[str]) -> list[str]:
    """Collective when distributed: every rank's keys (sample keys are unique per global batch)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return keys
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, keys)
    return sorted({k for p in parts for k in p})


class NonFiniteGuard:
    def __init__(self, limit: int, update_skips: bool, total: int = 0):
        """``limit``: consecutive skipped steps that stop the run (0 = never); ``update_skips``: the optimizer
        skips updates with a non-finite gradient norm (ZeRO >= 1, or bf16); ``total``: skipped steps so
        far (restored on resume)."""
        self.limit = limit if update_skips else 1
        self.update_skips = update_skips
        self.total = total
        self.consecutive = 0
        self.first_bad_step: Optional[int] = None
        self.last_keys: list[str] = []
        self._micro: list[tuple[torch.Tensor, list[str]]] = []

    def loss_for_backward(self, loss: torch.Tensor, keys: list[str]) -> torch.Tensor:
        """The loss to backpropagate: itself when finite, NaN (poisoning its gradients) otherwise. No host sync."""
        bad = ~torch.isfinite(loss.detach())
        self._micro.append((bad, list(keys)))
        return loss * torch.where(bad, torch.full_like(loss, float("nan")), torch.ones_like(loss))

    def after_update(self, step: int, applied: bool) -> Optional[list[str]]:
        """After the optimizer step of ``step`` (0-based). Collective when the step was skipped (every rank
        sees the same ``applied``). Returns None for an applied step, else the data keys of the samples with
        a non-finite loss on any rank (empty: only the gradient norm was non-finite)."""
        micro, self._micro = self._micro, []
        if applied and self.update_skips:
            self.consecutive, self.first_bad_step = 0, None
            return None
        if applied:      # no skipping optimizer: judge by the losses (host read, every step)
            local_bad = any(bool(bad) for bad, _ in micro)
            flag = torch.tensor([int(local_bad)], dtype=torch.int32, device=micro[0][0].device if micro else "cpu")
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if not flag.item():
                self.consecutive, self.first_bad_step = 0, None
                return None
        keys = _gather([k for bad, ks in micro if bool(bad) for k in ks])
        self.total += 1
        self.consecutive += 1
        self.first_bad_step = step + 1 if self.first_bad_step is None else self.first_bad_step
        log.warning("step %d skipped: non-finite %s (%d consecutive, %d in this run); samples: %s", step + 1,
                    "loss" if keys else "gradient norm", self.consecutive, self.total, keys or "n/a")
        self.last_keys = keys
        return keys

    def check_limit(self, step: int) -> None:
        """Raise :class:`NonFiniteLimit` (on every rank alike) once ``limit`` consecutive steps were skipped."""
        if not (self.limit and self.consecutive >= self.limit):
            return
        raise NonFiniteLimit(
            f"stopping: {self.consecutive} consecutive steps ({self.first_bad_step}..{step}) had a non-finite loss "
            f"or gradient norm (train.nonfinite_limit={self.limit}); last samples with a non-finite loss: "
            f"{self.last_keys or 'none (gradient norm only)'}. Skipped steps change no weight: the model is the one "
            f"after step {self.first_bad_step - 1}. Check the data (the loader skips non-finite samples: "
            "data_nonfinite_samples in metrics.jsonl) or lower train.lr")
