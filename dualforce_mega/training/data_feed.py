"""Micro batches for one data-parallel rank, with a global batch that does not depend on the world size.

A global batch is ``L = global_batch / micro_batch`` micro batches. The data is split into ``L`` logical
streams (``build_loader(cfg, l, L)``, l = 0..L-1), and every optimizer step takes the next micro batch of
each stream. Data-parallel rank ``r`` with ``A`` accumulation steps owns streams ``r*A .. r*A+A-1``. So
1 rank x 4 accumulation steps and 4 ranks x 1 see exactly the same samples in each step, with the same
``__index__`` (and so the same noise seeds); only who computes them changes.

Each logical stream reads whole shards, so a shard set needs at least
``L * max(1, data.workers)`` shards (the loader says so when it has fewer).
"""
from __future__ import annotations

from typing import Any

from ..config import Config
from ..data.loader import build_loader


def logical_streams(cfg: Config) -> int:
    return cfg.train.global_batch // cfg.train.micro_batch


class GlobalBatchFeed:
    def __init__(self, cfg: Config, dp_rank: int, dp_size: int, accum: int):
        total = logical_streams(cfg)
        if dp_size * accum != total:
            raise ValueError(f"train.global_batch: dp_size={dp_size} x grad_accum={accum} x micro_batch="
                             f"{cfg.train.micro_batch} != global_batch={cfg.train.global_batch}")
        self.streams = [dp_rank * accum + m for m in range(accum)]
        self.loaders = [build_loader(cfg, s, total) for s in self.streams]
        self.iters = [iter(loader) for loader in self.loaders]

    def next(self, micro: int) -> dict[str, Any]:
        """The micro batch for accumulation step ``micro`` of the current optimizer step."""
        return next(self.iters[micro])

    def stats(self) -> dict[str, int]:
        """Skip counters (corrupt / non-finite / short samples, corrupt shards...) summed over this rank's streams."""
        total: dict[str, int] = {}
        for loader in self.loaders:
            for k, v in loader.stats.items():
                total[k] = total.get(k, 0) + v
        return total

    def state_dict(self) -> dict[str, Any]:
        return {"streams": list(self.streams), "loaders": [loader.state_dict() for loader in self.loaders]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """``state`` holds the positions of some logical streams (of one rank, or merged from all ranks of
        a checkpoint written with another world size); this rank takes the ones it owns."""
        saved = dict(zip(state["streams"], state["loaders"]))
        missing = [s for s in self.streams if s not in saved]
        if missing:
            raise ValueError(f"loader state: the checkpoint holds logical data streams {sorted(saved)}, this rank "
                             f"owns {self.streams} (train.global_batch / train.micro_batch changed?)")
        for loader, stream in zip(self.loaders, self.streams):
            loader.load_state_dict(saved[stream])
        self.iters = [iter(loader) for loader in self.loaders]
