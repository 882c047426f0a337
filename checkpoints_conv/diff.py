"""Compare two checkpoints tensor by tensor.

    python -m checkpoints_conv.diff A B [--atol 0] [--json] [--tag TAG]

A and B: a ``.safetensors`` file, an ``*.index.json``, a directory of safetensors (bundle, converted
checkpoint, diffusers folder), or a DeepSpeed ZeRO checkpoint (run directory / ``checkpoints/`` /
tag directory, read with ``zero_reader``; materialised in memory). Reports keys only in A
(``missing`` from B), only in B (``extra``), shape and dtype mismatches, and per-tensor max abs
difference (computed in float64). Exit status 0 when the key sets and shapes match and every
difference is <= atol, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open

from dualforce_mega.bundle import weight_files
from dualforce_mega.cli import run_main

from dualforce_mega.training.zero_reader import ZeroCheckpoint, locate


@dataclass
class DiffResult:
    a: str
    b: str
    atol: float
    compared: int = 0
    missing: list[str] = field(default_factory=list)          # in A, not in B
    extra: list[str] = field(default_factory=list)            # in B, not in A
    shape_mismatch: dict[str, list] = field(default_factory=dict)   # name -> [shape A, shape B]
    dtype_mismatch: dict[str, list] = field(default_factory=dict)   # name -> [dtype A, dtype B] (values still compared)
    max_abs: dict[str, float] = field(default_factory=dict)   # every compared tensor
    over_atol: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not (self.missing or self.extra or self.shape_mismatch or self.over_atol)

    @property
    def max_abs_overall(self) -> float:
        return max(self.max_abs.values(), default=0.0)


class _Source:
    """Random access to the tensors of one side: safetensors lazily, ZeRO checkpoints from memory."""

    def __init__(self, path: Path, tag: Optional[str] = None):
        self.path = Path(path)
        self._mem: Optional[dict[str, torch.Tensor]] = None
        self._files: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        if self.path.is_dir() and _is_zero(self.path):
            self._mem = dict(ZeroCheckpoint(locate(self.path, tag).tag_dir).tensors())
        else:
            self._files = weight_files(self.path)

    def names(self) -> list[str]:
        return list(self._mem) if self._mem is not None else list(self._files)

    def get(self, name: str) -> torch.Tensor:
        if self._mem is not None:
            return self._mem[name]
        f = self._files[name]
        if f not in self._handles:
            self._handles[f] = safe_open(str(f), framework="pt")
        return self._handles[f].get_tensor(name)


def _is_zero(p: Path) -> bool:
    return any(p.glob("*_model_states.pt")) or (p / "checkpoints").is_dir() or \
        ((p / "latest").is_file() and not any(p.glob("*.safetensors")))


def _max_abs(x: torch.Tensor, y: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    if x.is_floating_point() or y.is_floating_point():
        return float((x.double() - y.double()).abs().max())
    return float((x.long() - y.long()).abs().max())


def diff_checkpoints(a: Path, b: Path, atol: float = 0.0, tag: Optional[str] = None,
                     rename: Optional[Callable[[str], str]] = None) -> DiffResult:
    """``rename`` maps A's names into B's namespace (e.g. a key map) before matching."""
    sa, sb = _Source(a, tag), _Source(b, tag)
    rename = rename or (lambda n: n)
    res = DiffResult(str(a), str(b), atol)
    names_b = set(sb.names())
    seen = set()
    for name in sa.names():
        nb = rename(name)
        if nb not in names_b:
            res.missing.append(name)
            continue
        seen.add(nb)
        x, y = sa.get(name), sb.get(nb)
        if tuple(x.shape) != tuple(y.shape):
            res.shape_mismatch[name] = [list(x.shape), list(y.shape)]
            continue
        if x.dtype != y.dtype:
            res.dtype_mismatch[name] = [str(x.dtype), str(y.dtype)]
        d = _max_abs(x, y)
        res.max_abs[name] = d
        res.compared += 1
        if not d <= atol:  # NaN counts as a difference
            res.over_atol.append(name)
    res.extra = sorted(names_b - seen)
    return res


def format_text(r: DiffResult, limit: int = 40) -> str:
    lines = [f"A: {r.a}", f"B: {r.b}",
             f"compared {r.compared} tensors; max abs diff {r.max_abs_overall:.3e} (atol {r.atol:g})"]
    for title, items in (("only in A (missing from B)", r.missing), ("only in B (extra)", r.extra)):
        if items:
            lines.append(f"{title}: {len(items)}")
            lines += [f"  {n}" for n in items[:limit]]
    if r.shape_mismatch:
        lines.append(f"shape mismatches: {len(r.shape_mismatch)}")
        lines += [f"  {n}: {sa} vs {sb}" for n, (sa, sb) in list(r.shape_mismatch.items())[:limit]]
    if r.dtype_mismatch:
        lines.append(f"dtype differences: {len(r.dtype_mismatch)}")
    if r.over_atol:
        lines.append(f"tensors differing by more than atol: {len(r.over_atol)}")
        worst = sorted(r.over_atol, key=lambda n: -r.max_abs[n])[:limit]
        lines += [f"  {n}: {r.max_abs[n]:.3e}" for n in worst]
    lines.append("EQUAL" if r.equal else "DIFFERENT")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m checkpoints_conv.diff", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--atol", type=float, default=0.0)
    ap.add_argument("--tag", default=None, help="tag for DeepSpeed checkpoint inputs (default: latest)")
    ap.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = ap.parse_args(argv)
    r = diff_checkpoints(args.a, args.b, args.atol, args.tag)
    if args.json:
        print(json.dumps(dict(asdict(r), equal=r.equal, max_abs_overall=r.max_abs_overall), indent=1))
    else:
        print(format_text(r))
    return 0 if r.equal else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
