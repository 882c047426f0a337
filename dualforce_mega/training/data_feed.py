"""Micro batches for one data-parallel rank, with a global batch that does not depend on the world size.

A global batch is ``L = global_batch / micro_batch`` micro batches. The data is split into ``L`` logical
streams (``build_loader(cfg, l, L)``, l = 0..L-1), and every optimizer step takes the next micro batch of
each stream. Data-parallel rank ``r`` with ``A`` accumulation steps owns streams ``r*A .. r*A+A-1``. So
1 rank x 4 accumulation steps and 4 ranks x 1 see exactly the same samples in each step, with the same
``__index__`` (and so the same noise seeds); only who computes them changes.

Each logical stream reads whole shards, so a shard set needs at least
``L * max(1, data.workers)`` shards (the loader says so when it has fewer).

Prefetch: while the model computes on one micro batch, a background thread reads the next one (the
next stream; after the last micro batch, the first stream of the next step) and, for a CUDA device,
pins it so the copy to the GPU is asynchronous. The resume state stays exact: a stream with a batch
read ahead reports its position as of the last batch handed out.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional

from ..config import Config
from ..data.loader import build_loader


def logical_streams(cfg: Config) -> int:
    return cfg.train.global_batch // cfg.train.micro_batch


def _pinned(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v.pin_memory() if hasattr(v, "pin_memory") and not k.startswith("__") else v for k, v in batch.items()}


class GlobalBatchFeed:
    def __init__(self, cfg: Config, dp_rank: int, dp_size: int, accum: int, prefetch: bool = True,
                 pin_memory: bool = False):
        total = logical_streams(cfg)
        if dp_size * accum != total:
            raise ValueError(f"train.global_batch: dp_size={dp_size} x grad_accum={accum} x micro_batch="
                             f"{cfg.train.micro_batch} != global_batch={cfg.train.global_batch}")
        self.streams = [dp_rank * accum + m for m in range(accum)]
        self.loaders = [build_loader(cfg, s, total) for s in self.streams]
        self.iters = [iter(loader) for loader in self.loaders]
        self.pin_memory = pin_memory
        # at most one read ahead at a time: (micro index, its batch, its stream's state before the read)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="data-prefetch") if prefetch else None
        self._ahead: Optional[tuple[int, Future, dict[str, Any]]] = None

    def _read(self, micro: int) -> dict[str, Any]:
        batch = next(self.iters[micro])
        return _pinned(batch) if self.pin_memory else batch

    def next(self, micro: int) -> dict[str, Any]:
        """The micro batch for accumulation step ``micro`` of the current optimizer step."""
        if self._ahead is not None and self._ahead[0] == micro:
            batch = self._ahead[1].result()
            self._ahead = None
        else:
            self._settle()
            batch = self._read(micro)
        if self._pool is not None:
            nxt = (micro + 1) % len(self.iters)
            # workers are forked here, in the main thread: a fork from the read-ahead thread while the
            # main thread holds locks (compilation, logging) leaves workers that cannot exit cleanly
            self.loaders[nxt].start()
            # no read is running now: the stream's state can be taken before the thread advances it
            self._ahead = (nxt, self._pool.submit(self._read, nxt), self.loaders[nxt].state_dict())
        return batch

    def _settle(self) -> None:
        """Wait for a read ahead that will not be used and step its stream back (reload its state)."""
        if self._ahead is None:
            return
        micro, future, state = self._ahead
        self._ahead = None
        future.result()
        self.loaders[micro].load_state_dict(state)
        self.iters[micro] = iter(self.loaders[micro])

    def close(self) -> None:
        """Finish a read ahead and stop the loader worker processes now (not at interpreter exit, where
        a worker torn down mid-read exits with an error). A failed read ahead is dropped unraised: it was
        never handed out, and close runs while another error may be on its way out."""
        if self._ahead is not None:
            self._ahead[1].exception()
            self._ahead = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for loader in self.loaders:
            loader.close()

    def stats(self) -> dict[str, int]:
        """Skip counters (corrupt / non-finite / short samples, corrupt shards...) summed over this rank's streams."""
        total: dict[str, int] = {}
        ahead = {self._ahead[0]: self._ahead[2]} if self._ahead is not None else {}
        for i, loader in enumerate(self.loaders):   # a stream read ahead: as of the batch handed out
            stats = loader.stats_of(ahead[i]) if i in ahead else loader.stats
            for k, v in stats.items():
                total[k] = total.get(k, 0) + v
        return total

    def state_dict(self) -> dict[str, Any]:
        """Positions as of the batches handed out (a batch read ahead is not counted)."""
        ahead = {self._ahead[0]: self._ahead[2]} if self._ahead is not None else {}
        return {"streams": list(self.streams),
                "loaders": [ahead.get(i) or loader.state_dict() for i, loader in enumerate(self.loaders)]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """``state`` holds the positions of some logical streams (of one rank, or merged from all ranks of
        a checkpoint written with another world size); this rank takes the ones it owns."""
        saved = dict(zip(state["streams"], state["loaders"]))
        missing = [s for s in self.streams if s not in saved]
        if missing:
            raise ValueError(f"loader state: the checkpoint holds logical data streams {sorted(saved)}, this rank "
                             f"owns {self.streams} (train.global_batch / train.micro_batch changed?)")
        self._settle()
        for loader, stream in zip(self.loaders, self.streams):
            loader.load_state_dict(saved[stream])
        self.iters = [iter(loader) for loader in self.loaders]
