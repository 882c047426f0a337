"""The training data loader: WebDataset shards -> windowed micro-batches with exact resume.

``build_loader(cfg, dp_rank, dp_size)`` returns an infinite iterator of batches (the Batches
contract in docs/INTERFACES.md) for one data-parallel rank. Ranks of one sequence-parallel group
pass the same ``dp_rank`` and so get identical batches.

Each rank runs ``max(1, data.workers)`` independent deterministic streams (stream.py), one per
dataloader worker. PyTorch's DataLoader hands out worker outputs strictly round-robin, so
delivered batch t of a rank always comes from stream ``t % num_streams``. The resume state is
therefore tiny: per stream (epoch, batches delivered in that epoch, skip counters) plus the
rank's delivered batch / sample totals. A restored loader rotates the worker -> stream mapping so
the next batch comes from the right stream, and each stream fast-forwards without decoding.

``__index__`` of the i-th sample delivered by rank r is ``r + dp_size * i``: unique across ranks
and a pure function of the stream position (the trainer seeds per-sample noise with it).

Streams read whole shards, so a shard set needs at least ``dp_size * max(1, data.workers)``
shards. Damaged data is skipped, logged and counted in ``loader.stats`` (shard_source.py); each
sample's CRC32 is checked unless ``data.verify_checksums`` is off.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import Config
from .normalization import Normalizer, parse_fields
from .schema import ShardSchema
from .shard_source import ReadCounters, ShardRef, ShardSetError, resolve_shards
from .stream import SampleStream, StreamSpec

log = logging.getLogger(__name__)

STATE_FORMAT = 1
# fields of the saved state that must match for the continued stream to be the same stream
_LAYOUT_FIELDS = ("seed", "dp_rank", "dp_size", "num_streams", "window", "micro_batch", "shuffle_buffer",
                  "keep_text", "verify_checksums", "ref_elsewhere_prob", "shards")


@dataclass
class StreamState:
    epoch: int = 0
    batches: int = 0                      # batches delivered from this epoch
    counters: dict[str, int] = field(default_factory=dict)


class _StreamsDataset(IterableDataset):
    """Runs stream ``(worker_id + offset) % num_streams`` in each dataloader worker."""

    def __init__(self, shards: list[ShardRef], schema: ShardSchema, spec: StreamSpec,
                 states: list[StreamState], offset: int, normalizer: Normalizer):
        super().__init__()
        self.shards, self.schema, self.spec, self.states, self.offset = shards, schema, spec, states, offset
        self.normalizer = normalizer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        sid = (worker + self.offset) % self.spec.num_streams
        st = self.states[sid]
        stream = SampleStream(self.shards, self.schema, self.spec, sid, epoch=st.epoch, skip=st.batches,
                              counters=ReadCounters.from_dict(st.counters), normalizer=self.normalizer)
        return iter(stream)


class ShardLoader:
    """Infinite iterator of micro-batches for one data-parallel rank (see module docstring)."""

    def __init__(self, cfg: Config, dp_rank: int, dp_size: int):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        d = cfg.data
        self.schema = ShardSchema.from_model(cfg.model)
        self.shard_set = resolve_shards(d.shards, self.schema)
        stats = self.shard_set.index.get("stats") if self.shard_set.index else None
        self.normalizer = Normalizer.from_stats(stats, parse_fields(d.normalize),
                                                source=f"data.shards: {self.shard_set.index_path or d.shards}")
        self.workers = d.workers
        self.spec = StreamSpec(seed=d.seed, dp_rank=dp_rank, dp_size=dp_size, num_streams=max(1, d.workers),
                               window=d.window, micro_batch=cfg.train.micro_batch, shuffle_buffer=d.shuffle_buffer,
                               keep_text=cfg.model.text_dim > 0, verify_checksums=d.verify_checksums,
                               ref_elsewhere_prob=d.ref_elsewhere_prob)
        n, need = len(self.shard_set.shards), dp_size * self.spec.num_streams
        if n < need:
            raise ShardSetError(
                f"data.shards: {d.shards}: {n} shard(s) cannot feed dp_size={dp_size} x "
                f"max(1, data.workers={d.workers}) = {need} streams (each stream reads whole shards); "
                f"write at least {need} shards or lower data.workers")
        self._states = [StreamState() for _ in range(self.spec.num_streams)]
        self._delivered_batches = 0
        self._delivered_samples = 0
        self._rr_base = 0  # delivered batch count at which stream 0 was last due (changes on a re-layout)
        self._loader_iter: Optional[Iterator[dict[str, Any]]] = None

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> "ShardLoader":
        return self

    def __next__(self) -> dict[str, Any]:
        self.start()
        assert self._loader_iter is not None
        batch = next(self._loader_iter)
        sid, epoch, in_epoch, counters = batch.pop("__stream__")
        expected = (self._delivered_batches - self._rr_base) % self.spec.num_streams
        if sid != expected:  # would break the round-robin invariant that resume relies on
            raise RuntimeError(f"data loader: batch came from stream {sid}, expected stream {expected}")
        self._states[sid] = StreamState(epoch=int(epoch), batches=int(in_epoch), counters=dict(counters))
        b = len(batch["__key__"])
        local = torch.arange(self._delivered_samples, self._delivered_samples + b, dtype=torch.long)
        batch["__index__"] = self.spec.dp_rank + self.spec.dp_size * local
        self._delivered_batches += 1
        self._delivered_samples += b
        return batch

    def start(self) -> None:
        """Start the worker processes (if not running) from the current state; ``next`` does it lazily."""
        if self._loader_iter is None:
            self._start()

    def _start(self) -> None:
        offset = (self._delivered_batches - self._rr_base) % self.spec.num_streams
        dataset = _StreamsDataset(self.shard_set.shards, self.schema, self.spec,
                                  [StreamState(s.epoch, s.batches, dict(s.counters)) for s in self._states], offset,
                                  self.normalizer)
        self._dataloader = DataLoader(dataset, batch_size=None, num_workers=self.workers)
        self._loader_iter = iter(self._dataloader)

    def close(self) -> None:
        """Stop the worker processes (a later ``next`` restarts them from the current state)."""
        self._loader_iter = None
        self._dataloader = None

    def __del__(self) -> None:
        self.close()

    # ------------------------------------------------------------------ state
    @property
    def stats(self) -> dict[str, int]:
        """Skip counters summed over this rank's streams, as of the last delivered batch."""
        return self.stats_of(self.state_dict())

    @staticmethod
    def stats_of(state: dict[str, Any]) -> dict[str, int]:
        """``stats`` of the loader position ``state`` (a ``state_dict()``)."""
        total: dict[str, int] = {}
        for st in state["streams"]:
            for k, v in st["counters"].items():
                total[k] = total.get(k, 0) + v
        total["delivered_batches"] = state["delivered_batches"]
        total["delivered_samples"] = state["delivered_samples"]
        return total

    def _layout(self) -> dict[str, Any]:
        names = "\n".join(f"{Path(r.url).name}:{r.samples}" for r in self.shard_set.shards)
        return {"seed": self.spec.seed, "dp_rank": self.spec.dp_rank, "dp_size": self.spec.dp_size,
                "num_streams": self.spec.num_streams, "window": self.spec.window,
                "micro_batch": self.spec.micro_batch, "shuffle_buffer": self.spec.shuffle_buffer,
                "keep_text": self.spec.keep_text, "verify_checksums": self.spec.verify_checksums,
                "ref_elsewhere_prob": self.spec.ref_elsewhere_prob,
                "shards": hashlib.sha1(names.encode()).hexdigest()}

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, **self._layout(),
                "delivered_batches": self._delivered_batches, "delivered_samples": self._delivered_samples,
                "rr_base": self._rr_base,
                "streams": [{"epoch": s.epoch, "batches": s.batches, "counters": dict(s.counters)}
                            for s in self._states]}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Continue exactly after the last batch delivered before ``state_dict()``.

        If the data layout changed (dp size, workers, seed, shards, ...) an exact continuation does
        not exist: ``strict`` raises naming the field; otherwise every stream restarts at the
        first epoch that no stream had begun, so no sample repeats within an epoch.
        """
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"loader state: format {state.get('format')!r}, expected {STATE_FORMAT}")
        mine = self._layout()
        changed = [f for f in _LAYOUT_FIELDS if state.get(f) != mine[f]]
        self.close()
        if changed:
            detail = ", ".join(f"{f}: saved {state.get(f)!r}, now {mine[f]!r}" for f in changed)
            if strict:
                raise ValueError(f"loader state does not match this loader ({detail}); "
                                 f"exact resume needs the same data layout (load with strict=False to restart "
                                 f"at a fresh epoch)")
            next_epoch = max(int(s["epoch"]) for s in state["streams"]) + 1
            log.warning("loader state from a different data layout (%s); restarting all streams at epoch %d",
                        detail, next_epoch)
            self._states = [StreamState(epoch=next_epoch) for _ in range(self.spec.num_streams)]
        else:
            self._states = [StreamState(int(s["epoch"]), int(s["batches"]), dict(s["counters"]))
                            for s in state["streams"]]
        self._delivered_batches = int(state["delivered_batches"])
        self._delivered_samples = int(state["delivered_samples"])
        # with new streams the round robin starts over at stream 0
        self._rr_base = self._delivered_batches if changed else int(state["rr_base"])


def build_loader(cfg: Config, dp_rank: int, dp_size: int) -> ShardLoader:
    """Loader over ``cfg.data.shards`` for one data-parallel rank (see module docstring)."""
    return ShardLoader(cfg, dp_rank, dp_size)
