"""Crash-safe file writes: write a temporary file, fsync it, rename it over the target, fsync the
directory. A crash at any point leaves either the old file or the new one, never a torn one."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Union


def fsync_dir(path: Union[str, Path]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Union[str, Path], data: Union[bytes, str], tmp: Optional[Path] = None) -> None:
    """Replace ``path`` with ``data``; ``tmp`` (default ``<path>.tmp``) must be on the same filesystem."""
    path = Path(path)
    tmp = tmp or path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class OverlapError(ValueError):
    """An output path is, lies inside, or (when the tool replaces it) contains one of the tool's inputs."""


def _relation(out: Path, inp: Path, replaced: bool) -> Optional[str]:
    if out == inp:
        return "is"
    if inp in out.parents:
        return "is inside"
    if replaced and out in inp.parents:
        return "contains"
    return None


def refuse_overlap(outputs: Mapping[str, Union[str, Path, None]], inputs: Mapping[str, Union[str, Path, None]],
                   replaced: bool = False) -> None:
    """A tool never writes into or deletes its own input: no output may be an input or lie inside one,
    and an output the tool deletes or replaces as a whole (``replaced``) may not contain one either.
    Paths are compared after resolving symlinks (outputs need not exist yet); ``None`` entries are
    skipped; the keys name the options in the error."""
    resolved = {name: Path(p).expanduser().resolve() for name, p in inputs.items() if p}
    for out_name, out in outputs.items():
        if not out:
            continue
        out_path = Path(out).expanduser().resolve()
        for in_name, in_path in resolved.items():
            rel = _relation(out_path, in_path, replaced)
            if rel is not None:
                shown = "" if Path(out) == out_path and Path(inputs[in_name]) == in_path else \
                    f" ({out_path} vs {in_path})"
                raise OverlapError(f"{out_name} {out}: {rel} the input {in_name} {inputs[in_name]}{shown}; "
                                   "a tool never writes into or deletes its input, choose an output outside it")
