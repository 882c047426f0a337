"""Resolving a shard set (dir / glob / comma list) and reading raw samples from one shard.

Reading goes through WebDataset's tar iterators. Every failure — unreadable shard, broken tar
header, truncated member, incomplete sample, a shard that ends before the sample count its
index promised — is logged with the shard (and key when known) and counted; none is raised.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from .schema import SCHEMA_VERSION, ShardSchema
from .shard_writer import INDEX_NAME

log = logging.getLogger(__name__)

_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# large sequential reads: shards are streamed front to back (tarfile itself reads in 10 KiB records)
READ_BUFFER_BYTES = 4 << 20


class ShardSetError(ValueError):
    """The shard set cannot be used; the message names the path or index field at fault."""


@dataclass(frozen=True)
class ShardRef:
    url: str
    samples: Optional[int] = None   # from index.json, when known


@dataclass
class ShardSet:
    source: str
    shards: list[ShardRef]
    index: Optional[dict[str, Any]] = None
    index_path: Optional[str] = None


@dataclass
class ReadCounters:
    """What a stream skipped; summed across streams for ``loader.stats``."""

    samples: int = 0            # valid samples read
    corrupt_shards: int = 0     # shards that failed to open/parse or ended early
    corrupt_samples: int = 0    # incomplete / unreadable / schema-violating samples
    nonfinite_samples: int = 0  # samples with NaN / Inf in a floating tensor
    too_short: int = 0          # valid clips with fewer latent frames than the window
    dropped_remainder: int = 0  # samples left in partly filled batches at an epoch's end
    epochs_started: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> "ReadCounters":
        return cls(**{f.name: int(d[f.name]) for f in dataclasses.fields(cls) if f.name in d})


def _load_index(path: Path) -> dict[str, Any]:
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ShardSetError(f"{path}: cannot read shard index: {e}") from None
    for fld in ("schema_version", "shards", "model_dims"):
        if fld not in index:
            raise ShardSetError(f"{path}: index has no {fld!r} field")
    if index["schema_version"] != SCHEMA_VERSION:
        raise ShardSetError(f"{path}: schema_version {index['schema_version']} != supported {SCHEMA_VERSION}")
    return index


def check_index_dims(index: dict[str, Any], path: str, schema: ShardSchema) -> None:
    want = schema.model_dims()
    for name, value in index["model_dims"].items():
        if name == "text_dim" and (value == 0 or want[name] == 0):
            continue  # text is optional on either side
        if name in want and want[name] != value:
            raise ShardSetError(f"{path}: model_dims.{name} = {value} but the model config has {want[name]} "
                                f"(shards were written for a different model)")


def resolve_shards(spec: str, schema: ShardSchema) -> ShardSet:
    """``spec``: a directory (uses its index.json, else its *.tar), a glob, or a comma list of paths/URLs."""
    spec = spec.strip()
    if not spec:
        raise ShardSetError("data.shards: empty (give a shard directory, a glob or a comma list)")
    index: Optional[dict[str, Any]] = None
    index_path: Optional[Path] = None
    if os.path.isdir(spec):
        index_path = Path(spec) / INDEX_NAME
        if index_path.is_file():
            index = _load_index(index_path)
            urls = [str(Path(spec) / s["name"]) for s in index["shards"]]
        else:
            index_path = None
            urls = sorted(str(p) for p in Path(spec).iterdir() if p.name.endswith(_SHARD_SUFFIXES))
    elif "," in spec or "://" in spec or spec.startswith("pipe:"):
        urls = [u.strip() for u in spec.split(",") if u.strip()]
    elif glob.has_magic(spec):
        urls = sorted(glob.glob(spec))
    else:
        if not os.path.exists(spec):
            raise ShardSetError(f"data.shards: {spec}: no such file or directory")
        urls = [spec]
    if not urls:
        raise ShardSetError(f"data.shards: {spec}: no shards found")
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing:
        raise ShardSetError(f"data.shards: {spec}: shard {missing[0]} does not exist ({len(missing)} missing)")
    if index is None and local:
        # a glob / list of shards written by ShardWriter still has the index next to them
        candidate = Path(local[0]).parent / INDEX_NAME
        if candidate.is_file() and all(Path(u).parent == candidate.parent for u in local):
            index, index_path = _load_index(candidate), candidate
    counts: dict[str, int] = {}
    if index is not None:
        assert index_path is not None
        check_index_dims(index, str(index_path), schema)
        counts = {str(index_path.parent / s["name"]): int(s["samples"]) for s in index["shards"]}
        if index.get("total_samples", 1) == 0:
            raise ShardSetError(f"data.shards: {index_path}: index lists no samples")
    refs = [ShardRef(u, counts.get(u)) for u in urls]
    return ShardSet(spec, refs, index, str(index_path) if index_path else None)


def read_shard(ref: ShardRef, counters: ReadCounters, report: bool) -> Iterator[dict[str, Any]]:
    """Raw samples ``{"__key__", "__url__", "safetensors": bytes, "json": bytes}`` of one shard.

    ``report=False`` (used while fast-forwarding a restored stream) neither logs nor counts, since
    those events were already counted before the checkpoint.
    """
    failed = False

    def handler(exn: Exception) -> bool:
        nonlocal failed
        if report and not failed:  # WebDataset's nested iterators report one failure more than once
            log.warning("shard %s: read error, skipping the rest of the shard: %s", ref.url, exn)
        failed = True
        return True  # keep going with the next shard

    opened = url_opener([{"url": ref.url}], handler=handler, bufsize=READ_BUFFER_BYTES)
    files = tar_file_expander(opened, handler=handler)
    seen = 0
    for sample in group_by_keys(files, handler=handler):
        seen += 1
        yield sample
    short = ref.samples is not None and seen < ref.samples
    if short and report:
        log.warning("shard %s: %d of %d indexed samples readable (truncated or corrupt)", ref.url, seen, ref.samples)
    if (failed or short) and report:
        counters.corrupt_shards += 1
