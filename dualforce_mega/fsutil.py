"""Crash-safe file writes: write a temporary file, fsync it, rename it over the target, fsync the
directory. A crash at any point leaves either the old file or the new one, never a torn one."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union


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
