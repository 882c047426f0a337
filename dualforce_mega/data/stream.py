"""One deterministic sample stream: (seed, epoch, dp rank, stream id) -> an infinite list of batches.

Per epoch e, the shard list is permuted with a seeded RNG; data-parallel rank r takes every
dp_size-th shard of the permutation and its stream s (one per dataloader worker) every
num_streams-th of those, so streams of one epoch never share a shard. Samples pass a seeded
shuffle buffer, get a window start that depends only on (seed, epoch, key) (among the positions with
a single-image reference encoding, when the clip has them), and are grouped into micro-batches of
equal shape (bucketing by latent size / text length). Because every decision before batching uses
only the sample's bytes, its header, its small ``ref_positions`` field and its metadata, a restored
stream fast-forwards to "batch k of epoch e" by replaying the raw stream. A sample with NaN / Inf in
any floating tensor is skipped and counted (``nonfinite_samples``): one would make every step it is in
non-finite. Decoded windows are standardised by the loader's ``Normalizer`` (the one place
normalisation happens).
"""
from __future__ import annotations

import logging
import random
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from safetensors.torch import load as st_load

from .normalization import Normalizer
from .schema import CRC_META_KEY, META_EXT, TENSOR_EXT, SchemaError, ShardSchema, check_ref_positions, parse_meta, \
    read_safetensors_layout
from .shard_source import ReadCounters, ShardRef, read_shard
from .windowing import reference_position, slice_window, window_start, window_starts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamSpec:
    seed: int
    dp_rank: int
    dp_size: int
    num_streams: int       # streams (dataloader workers) per data-parallel rank
    window: int            # latent frames per training window
    micro_batch: int
    shuffle_buffer: int
    keep_text: bool        # model has a text branch
    ref_elsewhere_prob: float = 0.0   # frame 0 from another reference position of the clip
    verify_checksums: bool = True


@dataclass
class Item:
    key: str
    url: str
    blob: bytes            # the safetensors bytes, decoded only when the batch is emitted
    latent_frames: int
    bucket: tuple
    starts: list[int]      # latent frames a window may start at
    refs: list[int]        # latent frames with a single-image reference encoding (empty: none)


class Reporter:
    """Counts and logs skipped data, except while a restored stream replays already-counted data."""

    def __init__(self, counters: ReadCounters):
        self.counters = counters
        self.active = True

    def skip(self, counter: str, msg: str, *args: Any, level: int = logging.WARNING) -> None:
        if self.active:
            setattr(self.counters, counter, getattr(self.counters, counter) + 1)
            log.log(level, msg, *args)


def epoch_shards(shards: list[ShardRef], spec: StreamSpec, epoch: int, stream: int) -> list[ShardRef]:
    order = list(range(len(shards)))
    random.Random(f"shards:{spec.seed}:{epoch}").shuffle(order)
    return [shards[i] for i in order[spec.dp_rank::spec.dp_size][stream::spec.num_streams]]


def inspect(raw: dict[str, Any], schema: ShardSchema, spec: StreamSpec, rep: Reporter) -> Optional[Item]:
    """Header-level checks of a raw sample; None (counted, logged) if it cannot be used."""
    key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
    missing = [ext for ext in (TENSOR_EXT, META_EXT) if ext not in raw]
    if missing:
        rep.skip("corrupt_samples", "shard %s: sample %s: missing %s (incomplete sample), skipped", url, key, missing)
        return None
    blob = raw[TENSOR_EXT]
    try:
        meta = parse_meta(raw[META_EXT], shard=url, key=key)
        crc = meta.get(CRC_META_KEY)
        if spec.verify_checksums and crc is not None and zlib.crc32(blob) != crc:
            raise SchemaError(url, key, f"{key}.{TENSOR_EXT}", "CRC32 mismatch (corrupt tensor data)")
        layout = read_safetensors_layout(blob, shard=url, key=key)
        frames = schema.validate_layout(layout, meta, shard=url, key=key)
        tensors = st_load(blob)
        positions = tensors.get("ref_positions")
        if positions is not None:
            check_ref_positions(positions, frames, shard=url, key=key)
    except SchemaError as e:
        rep.skip("corrupt_samples", "%s; skipped", e)
        return None
    bad = [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        rep.skip("nonfinite_samples", "shard %s: sample %s: %s contains NaN or Inf, skipped", url, key, bad[0])
        return None
    starts = window_starts(frames, spec.window, None if positions is None else positions.tolist())
    if not starts:  # a data choice, not damage
        rep.skip("too_short", "shard %s: sample %s: %d latent frames, reference positions %s: no window of "
                 "data.window %d fits, skipped", url, key, frames, None if positions is None else positions.tolist(),
                 spec.window, level=logging.INFO)
        return None
    h, w = layout["video_latent"][1][2:]
    text = layout["text_emb"][1][0] if spec.keep_text and "text_emb" in layout else None
    # video-only and talking-head clips never share a batch (their field sets differ)
    return Item(key, url, blob, frames, (h, w, text, "struct" in layout), starts,
                [] if positions is None else positions.tolist())


def shuffled(items: Iterator[Item], bufsize: int, rng: random.Random) -> Iterator[Item]:
    """Reservoir-style shuffle buffer; a pure function of the input order and rng."""
    if bufsize <= 1:
        yield from items
        return
    buf: list[Item] = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        j = rng.randrange(bufsize)
        out, buf[j] = buf[j], item
        yield out
    rng.shuffle(buf)
    yield from buf


def bucketed(items: Iterator[Item], micro_batch: int, rep: Reporter) -> Iterator[list[Item]]:
    """Micro-batches of items with equal tensor shapes; partial buckets at the end are dropped."""
    pending: dict[tuple, list[Item]] = {}
    for item in items:
        group = pending.setdefault(item.bucket, [])
        group.append(item)
        if len(group) == micro_batch:
            del pending[item.bucket]
            yield group
    for group in pending.values():
        for item in group:
            rep.skip("dropped_remainder", "shard %s: sample %s: left over in a partial batch at epoch end",
                     item.url, item.key, level=logging.DEBUG)  # routine, like drop_last


def decode_batch(group: list[Item], epoch: int, schema: ShardSchema, spec: StreamSpec,
                 normalizer: Normalizer) -> dict[str, Any]:
    windows, starts = [], []
    for item in group:
        t0 = window_start(spec.seed, epoch, item.key, item.starts)
        ref = reference_position(spec.seed, epoch, item.key, t0, item.refs, spec.ref_elsewhere_prob)
        windows.append(normalizer.apply(slice_window(st_load(item.blob), t0, spec.window, schema, spec.keep_text,
                                                     ref)))
        starts.append(t0)
    batch: dict[str, Any] = {name: torch.stack([w[name] for w in windows]) for name in windows[0]}
    batch["__key__"] = [item.key for item in group]
    batch["__window_start__"] = torch.tensor(starts, dtype=torch.long)
    return batch


class SampleStream:
    """Infinite batches of one (rank, stream), starting at batch ``skip`` of epoch ``epoch``."""

    def __init__(self, shards: list[ShardRef], schema: ShardSchema, spec: StreamSpec, stream: int,
                 epoch: int = 0, skip: int = 0, counters: Optional[ReadCounters] = None,
                 normalizer: Optional[Normalizer] = None):
        self.shards, self.schema, self.spec, self.stream = shards, schema, spec, stream
        self.normalizer = normalizer or Normalizer()
        self.epoch, self.skip = epoch, skip
        self.counters = counters or ReadCounters()

    def _raw(self, epoch: int, rep: Reporter) -> Iterator[Item]:
        for ref in epoch_shards(self.shards, self.spec, epoch, self.stream):
            for raw in read_shard(ref, self.counters, rep.active):
                item = inspect(raw, self.schema, self.spec, rep)
                if item is not None:
                    if rep.active:
                        self.counters.samples += 1
                    yield item

    def __iter__(self) -> Iterator[dict[str, Any]]:
        spec, epoch, skip = self.spec, self.epoch, self.skip
        while True:
            rep = Reporter(self.counters)
            rep.active = skip == 0
            if rep.active:
                self.counters.epochs_started += 1
            rng = random.Random(f"buffer:{spec.seed}:{epoch}:{spec.dp_rank}:{self.stream}")
            emitted = 0
            for group in bucketed(shuffled(self._raw(epoch, rep), spec.shuffle_buffer, rng), spec.micro_batch, rep):
                emitted += 1
                if emitted <= skip:
                    if emitted == skip:
                        rep.active = True  # everything after the checkpointed batch is new
                    continue
                batch = decode_batch(group, epoch, self.schema, spec, self.normalizer)
                batch["__stream__"] = (self.stream, epoch, emitted, self.counters.to_dict())
                yield batch
            if emitted == 0 or emitted < skip:
                shards = [r.url for r in epoch_shards(self.shards, spec, epoch, self.stream)]
                why = (f"only {emitted} batches, but the restored state is at batch {skip} (shards changed?)"
                       if emitted else "no batch: all samples corrupt, non-finite or too short, or fewer than "
                                       f"micro_batch={spec.micro_batch} of one shape (see warnings above)")
                raise ValueError(f"data stream {self.stream} of dp rank {spec.dp_rank}: epoch {epoch} "
                                   f"produced {why}; shards {shards}")
            epoch, skip = epoch + 1, 0
