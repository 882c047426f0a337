"""Atomic DeepSpeed checkpoints with automatic resume.

Layout under ``<run.dir>/checkpoints``::

    step00000050/            one DeepSpeed tag (model/optimizer/scheduler shards + rank_state_*.pt)
    latest                   the tag to resume from (DeepSpeed's own format: one line)
    .tmp-step00000100/       a save in progress (removed at the next start if the run died)

A save writes the temporary tag on every rank, then rank 0 renames it to its final name and only then
replaces ``latest`` (write temp file + ``os.replace``). A crash at any point leaves ``latest`` pointing
at the previous complete checkpoint. A save that fails (disk full, ...) stops the run with a message
naming the directory and its free space; the previous checkpoint stays the one to resume from. The run
directory must be on a filesystem shared by all nodes.

Resume reads every file through ``safe_load`` (weights only + the allow-listed DeepSpeed classes; DeepSpeed's
own loader included, through :class:`SafeCheckpointEngine`). Before DeepSpeed touches a tag, the ranks
check its files between them: a damaged (e.g. truncated) file is named and the previous checkpoint is
used instead (the damaged tag is kept as ``.broken-<tag>``); a file that needs anything but tensors is
refused outright. A checkpoint written by another number of ranks is resharded (``elastic.py``).
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..fsutil import atomic_write, fsync_dir
from .exit_codes import CheckpointWriteError
from .run_dir import _TAG_RE, LATEST, step_of, tag_for  # noqa: F401 (tag_for, step_of: this module's API)
from .safe_load import UnsafeCheckpointError, safe_torch_load

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
BROKEN_PREFIX = ".broken-"
RANK_STATE_GLOB = "rank_state_*.pt"
# Fault injection for the crash-during-save test: "<step>:<rank>" makes that rank SIGKILL itself after
# DeepSpeed wrote its files into the temporary tag and before the tag is published.
FAULT_ENV = "DUALFORCE_FAULT_KILL_IN_SAVE"


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text, path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}"))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@dataclass
class Resumed:
    step: int                      # optimizer steps already taken
    tag: str
    client_state: dict[str, Any]   # saved by rank 0 (same on all ranks)
    rank_state: dict[str, Any]     # this rank's own state (loader position, RNG)


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int, rank: int, world_size: int):
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size

    # ------------------------------------------------------------------ discovery
    def latest_tag(self) -> Optional[str]:
        path = self.root / LATEST
        if not path.is_file():
            return None
        tag = path.read_text().strip()
        if not (self.root / tag).is_dir():
            raise FileNotFoundError(f"{path}: points at {tag!r} but {self.root / tag} does not exist")
        step_of(tag)
        return tag

    def tags(self) -> list[str]:
        if not self.root.is_dir():
            return []
        found = [p.name for p in self.root.iterdir() if p.is_dir() and _TAG_RE.match(p.name)]
        return sorted(found, key=step_of)

    def _rank_file(self, tag_dir: Path, rank: int) -> Path:
        return tag_dir / f"rank_state_{rank:05d}.pt"

    # ------------------------------------------------------------------ save
    def save(self, engine: Any, step: int, client_state: dict[str, Any], rank_state: dict[str, Any],
             write_extra: Optional[Callable[[Path], None]] = None) -> Path:
        """Collective: every rank calls it. Returns the final tag directory. ``write_extra(tag_dir)`` adds
        this rank's own files (e.g. its EMA shard) before the tag is published."""
        tag = tag_for(step)
        tmp_tag = f"{TMP_PREFIX}{tag}"
        tmp_dir, final_dir = self.root / tmp_tag, self.root / tag
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp_dir.exists():          # left by a save that died at this very step
                shutil.rmtree(tmp_dir)
        _barrier()
        state = dict(client_state, world_size=self.world_size, step=step)
        try:
            engine.save_checkpoint(str(self.root), tag=tmp_tag, client_state=state, save_latest=False)
            rank_file = self._rank_file(tmp_dir, self.rank)
            torch.save(rank_state, rank_file.with_suffix(".partial"))
            os.replace(rank_file.with_suffix(".partial"), rank_file)
            if write_extra is not None:
                write_extra(tmp_dir)
        except (OSError, RuntimeError) as e:
            if not is_write_error(e):     # e.g. a collective inside DeepSpeed's save timed out
                raise
            raise CheckpointWriteError(self.write_error(tmp_dir, step, e)) from e
        self._maybe_inject_fault(step)
        _barrier()                        # every rank's shards are on disk before the tag is published
        if self.rank == 0:
            self._publish(tmp_dir, final_dir, tag)
        _barrier()
        log.info("saved checkpoint %s", final_dir)
        return final_dir

    def write_error(self, tmp_dir: Path, step: int, e: BaseException) -> str:
        """One line: what failed, how much space is left there (the usual cause), what is still safe."""
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        free = shutil.disk_usage(self.root).free
        previous = [t for t in self.tags() if step_of(t) < step]
        need = _dir_bytes(self.root / previous[-1]) if previous else 0
        full = free < max(need, 1) or isinstance(e, OSError) and e.errno == errno.ENOSPC
        diagnosis = (f"the disk is full ({_gib(free)} free on the filesystem of {self.root}"
                     + (f", the previous checkpoint takes {_gib(need)})" if need else ")")) if full else \
            f"{_gib(free)} free on the filesystem of {self.root}"
        keep = (f"checkpoint {previous[-1]} is intact and a restart resumes from it" if previous else
                "no earlier checkpoint exists")
        return (f"rank {self.rank}: writing checkpoint step {step} into {tmp_dir} failed: {reason} -- {diagnosis}; "
                f"{keep}. Free space (or move run.dir) and run the same command again")

    def _publish(self, tmp_dir: Path, final_dir: Path, tag: str) -> None:
        if final_dir.exists():            # an unpublished re-save of a step (run resumed from earlier)
            trash = self.root / f"{TRASH_PREFIX}{final_dir.name}"
            if trash.exists():
                shutil.rmtree(trash)
            os.rename(final_dir, trash)
            shutil.rmtree(trash)
        os.rename(tmp_dir, final_dir)
        fsync_dir(self.root)
        _atomic_write_text(self.root / LATEST, tag)
        self._prune(keep=tag)

    def _prune(self, keep: str) -> None:
        tags = [t for t in self.tags() if t != keep]
        excess = len(tags) + 1 - self.keep_last
        for old in tags[:max(excess, 0)]:
            shutil.rmtree(self.root / old)
            log.info("removed old checkpoint %s (train.keep_last=%d)", self.root / old, self.keep_last)

    def _maybe_inject_fault(self, step: int) -> None:
        spec = os.environ.get(FAULT_ENV)
        if not spec:
            return
        fault_step, fault_rank = (int(x) for x in spec.split(":"))
        if fault_step == step and fault_rank == self.rank:
            log.error("%s=%s: killing rank %d in the middle of saving step %d", FAULT_ENV, spec, self.rank, step)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)

    # ------------------------------------------------------------------ load
    def clean_partial(self) -> None:
        """Rank 0 removes temporary tags left by a save that died (collective)."""
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                    log.warning("removing incomplete checkpoint %s left by an interrupted save", p)
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        _barrier()

    def candidates(self) -> list[str]:
        """Tags to try, newest first: the one ``latest`` names, then the older complete ones."""
        path = self.root / LATEST
        if not path.is_file():
            return []
        tag = path.read_text().strip()
        try:
            newest = step_of(tag)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        if not (self.root / tag).is_dir():
            log.error("%s names %s, which does not exist; trying older checkpoints", path, self.root / tag)
        return [t for t in reversed(self.tags()) if step_of(t) <= newest]

    def _check_files(self, tag_dir: Path) -> tuple[list[str], list[str]]:
        """Collective: the ranks share the tag's files and open each through the safe loader (memory-mapped:
        reads the archive index, not the tensors). Returns (damaged, unsafe) descriptions, same on every rank."""
        files = sorted(tag_dir.glob("*.pt"))
        damaged, unsafe = [], []
        for path in files[self.rank::self.world_size]:
            try:
                safe_torch_load(path, mmap=True, deepspeed_classes=True)
            except UnsafeCheckpointError as e:
                unsafe.append(str(e))
            except Exception as e:      # noqa: BLE001 -- any failure to read makes the file unusable
                damaged.append(f"{path}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
        saved = len(list(tag_dir.glob(RANK_STATE_GLOB)))
        if self.rank == 0 and saved == 0:
            damaged.append(f"{tag_dir}: no {RANK_STATE_GLOB} files (not written by this trainer, or incomplete)")
        if dist.is_initialized() and self.world_size > 1:
            parts: list[Any] = [None] * self.world_size
            dist.all_gather_object(parts, (damaged, unsafe))
            damaged = [d for p in parts for d in p[0]]
            unsafe = [u for p in parts for u in p[1]]
        return damaged, unsafe

    def _set_aside(self, tag: str) -> None:
        """Rank 0 renames a damaged tag to ``.broken-<tag>`` (kept for inspection, never loaded or pruned)."""
        if self.rank == 0:
            target = self.root / f"{BROKEN_PREFIX}{tag}"
            if target.exists():
                shutil.rmtree(target)
            os.rename(self.root / tag, target)
            log.warning("kept the damaged checkpoint as %s", target)
        _barrier()

    def load(self, engine: Any) -> Optional[Resumed]:
        """Collective. Loads the newest usable tag into ``engine``; None on a fresh run."""
        self.clean_partial()
        if not isinstance(engine.checkpoint_engine, SafeCheckpointEngine):
            engine.checkpoint_engine = SafeCheckpointEngine(engine.checkpoint_engine)
        tried = []
        for tag in self.candidates():
            damaged, unsafe = self._check_files(self.root / tag)
            if unsafe:
                raise UnsafeCheckpointError(f"resume refused: {unsafe[0]}")
            if damaged:
                log.error("checkpoint %s is damaged, falling back to the previous one: %s", tag, "; ".join(damaged))
                tried.append(f"{tag} ({damaged[0]})")
                self._set_aside(tag)
                continue
            return self._load_tag(engine, tag)
        if tried:
            raise ValueError(f"{self.root}: no usable checkpoint to resume from; damaged: {', '.join(tried)}")
        return None

    def _load_tag(self, engine: Any, tag: str) -> Resumed:
        from .elastic import load_resharded, merge_rank_states

        tag_dir = self.root / tag
        rank_files = sorted(tag_dir.glob(RANK_STATE_GLOB))
        saved_world = len(rank_files)
        if saved_world == self.world_size:
            path, client_state = engine.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=True,
                                                        load_lr_scheduler_states=True)
            if path is None:
                raise RuntimeError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
        else:
            log.warning("%s was written by %d ranks, this run has %d: resharding it", tag_dir, saved_world,
                        self.world_size)
            client_state = load_resharded(engine, tag_dir)
        rank_state = merge_rank_states([torch.load(f, weights_only=True) for f in rank_files], self.rank)
        log.info("resumed from %s (step %d)", tag_dir, client_state["step"])
        return Resumed(step=int(client_state["step"]), tag=tag, client_state=client_state, rank_state=rank_state)


# how torch's C++ writer reports a failed write (a full disk among them): it raises RuntimeError, not OSError
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter", "inline_container", "basic_ios", "iostream", "file write failed",
                         "unexpected pos")


def is_write_error(e: BaseException) -> bool:
    return isinstance(e, OSError) or any(marker in str(e) for marker in _TORCH_WRITE_FAILURES)


class SafeCheckpointEngine:
    """DeepSpeed's checkpoint engine with a safe ``load``: every file ``engine.load_checkpoint`` reads goes
    through ``safe_torch_load`` (weights only + the allow-listed DeepSpeed classes). Everything else (saving,
    commit, ...) is the wrapped engine's."""

    def __init__(self, inner: Any):
        self.inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_torch_load(path, map_location=map_location, deepspeed_classes=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 27 else f"{n / 2 ** 20:.1f} MiB"
