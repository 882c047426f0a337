"""Write clips as WebDataset tar shards plus an ``index.json``.

Every sample is validated against the schema before it is written. A shard is written to
``<name>.tmp`` and renamed only when complete, so a crash never leaves a truncated file that
looks like a shard; ``index.json`` is written (atomically) last, by :meth:`ShardWriter.close`.
"""
from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from safetensors.torch import save as st_save

from ..config import ModelConfig
from .norm_stats import FieldStats
from ..fsutil import atomic_write, fsync_dir
from .schema import CRC_META_KEY, META_EXT, SCHEMA_VERSION, TENSOR_EXT, ShardSchema

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
DEFAULT_MAX_SHARD_BYTES = 1 << 30
_TAR_BLOCK = tarfile.BLOCKSIZE
_TAR_RECORD = tarfile.RECORDSIZE
_END_OF_ARCHIVE = 2 * _TAR_BLOCK  # two zero blocks close a tar
_TMP_SUFFIX = ".tmp"


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, data, path.with_name(path.name + _TMP_SUFFIX))


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int
    keys: list[str] = field(default_factory=list)


class ShardWriter:
    """Streams validated samples into ``<prefix>-NNNNNN.tar`` shards under ``out_dir``.

    A new shard starts when the current one holds ``max_shard_samples`` samples or when adding the
    next sample would make the finished tar larger than ``max_shard_bytes`` (a single sample larger
    than the limit gets a shard of its own), or when the caller asks with :meth:`next_shard`.
    ``None`` disables either limit.
    """

    def __init__(self, out_dir: Union[str, Path], model_cfg: ModelConfig, *,
                 max_shard_bytes: Optional[int] = DEFAULT_MAX_SHARD_BYTES, max_shard_samples: Optional[int] = None,
                 prefix: str = "shard", overwrite: bool = False, extra: Optional[Mapping[str, Any]] = None):
        if max_shard_bytes is not None and max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        if max_shard_samples is not None and max_shard_samples <= 0:
            raise ValueError(f"max_shard_samples must be positive, got {max_shard_samples}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.out_dir.glob(f"{prefix}-*.tar")) + sorted(self.out_dir.glob(INDEX_NAME))
        if existing and not overwrite:
            raise FileExistsError(f"{self.out_dir}: already holds {existing[0].name} "
                                  f"(pass overwrite=True / --overwrite to replace the shard set)")
        for stale in existing:
            stale.unlink()
        self.schema = ShardSchema.from_model(model_cfg)
        self.max_shard_bytes = max_shard_bytes
        self.max_shard_samples = max_shard_samples
        self.prefix = prefix
        self.extra = dict(extra or {})
        self.stats = FieldStats()
        self.shards: list[ShardInfo] = []
        self._keys: set[str] = set()
        self._tar: Optional[tarfile.TarFile] = None
        self._file: Optional[io.BufferedWriter] = None
        self._current: Optional[ShardInfo] = None
        self._closed = False

    # ------------------------------------------------------------------ public API
    def write(self, key: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        if self._closed:
            raise RuntimeError(f"{self.out_dir}: ShardWriter is closed")
        shard_name = self._current.name if self._current else self._shard_name(len(self.shards))
        self.schema.validate_sample(tensors, meta, shard=str(self.out_dir / shard_name), key=key)
        if key in self._keys:
            raise ValueError(f"{self.out_dir}: duplicate sample key {key!r}")
        blob = st_save({n: t.contiguous() for n, t in tensors.items()})
        meta_out = dict(meta)
        meta_out[CRC_META_KEY] = zlib.crc32(blob)
        meta_blob = json.dumps(meta_out, sort_keys=True).encode()
        members = [self._tarinfo(f"{key}.{TENSOR_EXT}", len(blob)), self._tarinfo(f"{key}.{META_EXT}", len(meta_blob))]
        self._roll_if_needed(members)
        assert self._tar is not None and self._current is not None
        for info, data in zip(members, (blob, meta_blob)):
            self._tar.addfile(info, io.BytesIO(data))
        self._current.samples += 1
        self._current.keys.append(key)
        self._keys.add(key)
        self.stats.update(dict(tensors))

    def next_shard(self) -> None:
        """Finish the open shard now; the next sample starts a new one."""
        self._finish_shard()

    def close(self) -> Path:
        """Finish the open shard and write ``index.json``; returns its path."""
        if self._closed:
            return self.out_dir / INDEX_NAME
        self._finish_shard()
        self._closed = True
        index = {
            "schema_version": SCHEMA_VERSION,
            "model_dims": self.schema.model_dims(),
            "total_samples": sum(s.samples for s in self.shards),
            "total_bytes": sum(s.bytes for s in self.shards),
            "shards": [{"name": s.name, "samples": s.samples, "bytes": s.bytes, "keys": s.keys} for s in self.shards],
            "stats": self.stats.to_json(),
            **({"extra": self.extra} if self.extra else {}),
        }
        path = self.out_dir / INDEX_NAME
        atomic_write_bytes(path, json.dumps(index, indent=1).encode())
        log.info("wrote %d samples in %d shards to %s", index["total_samples"], len(self.shards), self.out_dir)
        return path

    def abort(self) -> None:
        """Drop the open (incomplete) shard; finished shards stay, no index is written."""
        if self._tar is not None:
            self._tar.close()
            assert self._file is not None and self._current is not None
            self._file.close()
            (self.out_dir / (self._current.name + _TMP_SUFFIX)).unlink(missing_ok=True)
        self._tar = self._file = self._current = None
        self._closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ------------------------------------------------------------------ internals
    def _shard_name(self, i: int) -> str:
        return f"{self.prefix}-{i:06d}.tar"

    @staticmethod
    def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o644, 0  # fixed mtime: identical input -> identical shard
        return info

    def _member_bytes(self, info: tarfile.TarInfo) -> int:
        assert self._tar is not None
        header = info.tobuf(self._tar.format, self._tar.encoding, self._tar.errors)
        return len(header) + _round_up(info.size, _TAR_BLOCK)

    def _final_size(self, offset: int) -> int:
        return _round_up(offset + _END_OF_ARCHIVE, _TAR_RECORD)

    def _roll_if_needed(self, members: list[tarfile.TarInfo]) -> None:
        if self._current is not None:
            full = self.max_shard_samples is not None and self._current.samples >= self.max_shard_samples
            assert self._tar is not None
            grown = self._final_size(self._tar.offset + sum(self._member_bytes(m) for m in members))
            too_big = self.max_shard_bytes is not None and grown > self.max_shard_bytes
            if full or (self._current.samples > 0 and too_big):
                self._finish_shard()
        if self._current is None:
            self._current = ShardInfo(self._shard_name(len(self.shards)), 0, 0)
            self._file = open(self.out_dir / (self._current.name + _TMP_SUFFIX), "wb")
            self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)

    def _finish_shard(self) -> None:
        if self._current is None:
            return
        assert self._tar is not None and self._file is not None
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        tmp = self.out_dir / (self._current.name + _TMP_SUFFIX)
        final = self.out_dir / self._current.name
        os.replace(tmp, final)
        fsync_dir(self.out_dir)
        self._current.bytes = final.stat().st_size
        self.shards.append(self._current)
        log.debug("finished %s: %d samples, %d bytes", final, self._current.samples, self._current.bytes)
        self._tar = self._file = self._current = None
