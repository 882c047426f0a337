"""Batches for the trainer and for validation, the same samples per optimizer step whatever the world size.

Training (the contract of ``training.data_feed.GlobalBatchFeed``: ``next(micro)``, ``state_dict``,
``load_state_dict``): global sample ``g`` is clip ``perm_e[g mod N]`` of epoch ``e = g // N``, where
``perm_e`` is a permutation of the N training clips seeded by ``(data.seed, e)``. Optimizer step ``s``
takes samples ``s*G .. s*G+G-1`` (G = global batch) as ``L = G / micro_batch`` logical streams of
``micro_batch`` consecutive samples; data-parallel rank ``r`` with ``A`` accumulation steps computes
streams ``r*A .. r*A+A-1``. The position is the number of optimizer steps served, so resuming is exact,
also on another number of ranks.

Validation: clip i goes to rank ``i mod world``; every rank runs the same number of batches (ZeRO-3's
forward is collective), padded with masked-out repeats of clip 0.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from .data import Clip, collate, load_sample


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class EpochFeed:
    def __init__(self, clips: Sequence[Clip], subjects: Sequence[str], seed: int, global_batch: int,
                 micro_batch: int, dp_rank: int, dp_size: int, accum: int):
        streams = global_batch // micro_batch
        if dp_size * accum != streams:
            raise ValueError(f"train.global_batch: dp_size={dp_size} x grad_accum={accum} x micro_batch="
                             f"{micro_batch} != global_batch={global_batch}")
        if not clips:
            raise ValueError("no training clips (every record was skipped: see the warnings above)")
        self.clips, self.subjects, self.seed = list(clips), list(subjects), seed
        self.global_batch, self.micro_batch, self.accum = global_batch, micro_batch, accum
        self.streams = [dp_rank * accum + m for m in range(accum)]
        self.taken = 0
        self._order: tuple[int, Optional[np.ndarray]] = (-1, None)

    def clip_of(self, g: int) -> int:
        n = len(self.clips)
        epoch = g // n
        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(n, self.seed, epoch))
        return int(self._order[1][g % n])

    def indices(self, step: int, micro: int) -> list[int]:
        first = step * self.global_batch + self.streams[micro] * self.micro_batch
        return list(range(first, first + self.micro_batch))

    def next(self, micro: int) -> dict[str, Any]:
        step, expected = divmod(self.taken, self.accum)
        if micro != expected:
            raise RuntimeError(f"micro batch {micro} asked for, {expected} is next")
        self.taken += 1
        ids = self.indices(step, micro)
        return collate([load_sample(self.clips[self.clip_of(g)], self.subjects) for g in ids], ids)

    def close(self) -> None:
        """Nothing to release (samples are read in the training process)."""

    def state_dict(self) -> dict[str, Any]:
        """Each owned logical stream's position: the optimizer steps it has served (the trainer's layout,
        so a checkpoint of another world size can be merged and resumed, ``training/elastic.py``)."""
        steps = self.taken // self.accum
        return {"streams": list(self.streams), "loaders": [{"steps": steps} for _ in self.streams]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = dict(zip(state["streams"], state["loaders"]))
        missing = [s for s in self.streams if s not in saved]
        if missing:
            raise ValueError(f"data state: the checkpoint holds logical data streams {sorted(saved)}, this rank "
                             f"owns {self.streams} (train.global_batch / train.micro_batch changed?)")
        steps = {int(saved[s]["steps"]) for s in self.streams}
        if len(steps) != 1:
            raise ValueError(f"data state: logical streams {self.streams} saved at different steps {sorted(steps)}")
        self.taken = steps.pop() * self.accum


def validation_batches(clips: Sequence[Clip], subjects: Sequence[str], rank: int, world: int, batch: int,
                       fallback: str = "") -> list[dict[str, Any]]:
    """This rank's share of the validation clips as batches; every rank gets the same number."""
    per_rank = math.ceil(math.ceil(len(clips) / world) / batch) * batch
    mine = list(range(rank, len(clips), world))
    mine += [None] * (per_rank - len(mine))
    out = []
    for lo in range(0, per_rank, batch):
        ids = mine[lo:lo + batch]
        samples = [load_sample(clips[i if i is not None else 0], subjects, fallback) for i in ids]
        out.append(collate(samples, [-1 if i is None else i for i in ids], [i is not None for i in ids]))
    return out
