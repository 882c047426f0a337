"""Streaming safetensors writer: tensors arrive one at a time and are flushed shard by shard.

The shard plan is made up front from names, shapes and dtypes alone, so file names
(``model-0000i-of-0000n.safetensors``) are final before any data is read, and at most one shard's
tensors are held in memory. A single shard is written as ``model.safetensors`` without an index.
Each file is written under a temporary name and renamed when complete; the index comes last.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_size(text: str) -> int:
    """``5GB`` (10^9), ``500MiB`` (2^20), ``12345`` (bytes) -> bytes."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"--max-shard-size: cannot parse {text!r} (examples: 5GB, 500MB, 2GiB, 1048576)")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()]
    if value < 1:
        raise ValueError(f"--max-shard-size: {text!r} must be at least one byte")
    return int(value)


def output_dtype(src: torch.dtype, target: Optional[torch.dtype]) -> torch.dtype:
    """Floating tensors take ``target``; integer / bool tensors keep their dtype."""
    return target if target is not None and src.is_floating_point else src


@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, order-preserving split; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards if shards[0] else []


class ShardedWriter:
    """Write tensors in plan order with :meth:`add`; :meth:`close` writes the index (when sharded)."""

    def __init__(self, out_dir: Path, specs: list[TensorSpec], max_bytes: int,
                 metadata: Optional[dict[str, str]] = None, base: str = "model"):
        """``base`` names the files: ``<base>.safetensors`` or ``<base>-0000i-of-0000n.safetensors``
        + ``<base>.safetensors.index.json`` (``diffusion_pytorch_model`` for diffusers layouts)."""
        self.out_dir = Path(out_dir)
        self.base = base
        self.index_name = f"{base}.safetensors.index.json"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.plan = plan_shards(specs, max_bytes)
        if not self.plan:
            raise ValueError(f"{out_dir}: nothing to write (no tensors)")
        n = len(self.plan)
        self.names = [f"{base}.safetensors"] if n == 1 else \
            [f"{base}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.metadata = dict(metadata or {}, format="pt")
        self._shard = 0
        self._pos = 0
        self._buf: dict[str, torch.Tensor] = {}
        self.weight_map: dict[str, str] = {}
        self.total_size = sum(s.nbytes for s in specs)
        self._remove_stale()

    def _remove_stale(self) -> None:
        """Weights of an earlier conversion into the same directory would shadow or mix with ours."""
        for p in self.out_dir.glob(f"{self.base}*.safetensors*"):
            if p.name not in self.names:
                p.unlink()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.plan[self._shard][self._pos]
        if name != spec.name:
            raise RuntimeError(f"writer: got tensor {name!r}, the shard plan expects {spec.name!r} next")
        if tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} differs from the planned {spec.shape}")
        self._buf[name] = tensor.to(spec.dtype).contiguous()
        self._pos += 1
        if self._pos == len(self.plan[self._shard]):
            self._flush()

    def _flush(self) -> None:
        fname = self.names[self._shard]
        tmp = self.out_dir / f".{fname}.partial"
        save_file(self._buf, str(tmp), metadata=self.metadata)
        os.replace(tmp, self.out_dir / fname)
        for k in self._buf:
            self.weight_map[k] = fname
        self._buf = {}
        self._shard += 1
        self._pos = 0

    def close(self) -> list[Path]:
        if self._shard != len(self.plan):
            raise RuntimeError(f"writer: closed after {self._shard} of {len(self.plan)} shards")
        index = self.out_dir / self.index_name
        if len(self.names) > 1:
            tmp = self.out_dir / f".{self.index_name}.partial"
            tmp.write_text(json.dumps({"metadata": {"total_size": self.total_size},
                                       "weight_map": self.weight_map}, indent=1))
            os.replace(tmp, index)
        elif index.exists():
            index.unlink()
        return [self.out_dir / n for n in self.names]


def write_state_dict(out_dir: Path, state: dict[str, torch.Tensor], max_bytes: int,
                     dtype: Optional[torch.dtype] = None, metadata: Optional[dict[str, str]] = None,
                     base: str = "model") -> list[Path]:
    """Write an in-memory state dict (import / export tools) through the same sharded writer."""
    specs = [TensorSpec(k, tuple(v.shape), output_dtype(v.dtype, dtype)) for k, v in state.items()]
    w = ShardedWriter(out_dir, specs, max_bytes, metadata, base)
    for k, v in state.items():
        w.add(k, v)
    return w.close()
