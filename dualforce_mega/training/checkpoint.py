"""Atomic DeepSpeed checkpoints with automatic resume.

Layout under ``<run.dir>/checkpoints``::

    step00000050/            one DeepSpeed tag (model/optimizer/scheduler shards + rank_state_*.pt)
    latest                   the tag to resume from (DeepSpeed's own format: one line)
    .tmp-step00000100/       a save in progress (removed at the next start if the run died)

A save writes the temporary tag on every rank, then rank 0 renames it to its final name and only then
replaces ``latest`` (write temp file + ``os.replace``). A crash at any point leaves ``latest`` pointing
at the previous complete checkpoint. The run directory must be on a filesystem shared by all nodes.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..fsutil import atomic_write, fsync_dir

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
LATEST = "latest"
_TAG_RE = re.compile(r"^step(\d+)$")
# Fault injection for the crash-during-save test: "<step>:<rank>" makes that rank SIGKILL itself after
# DeepSpeed wrote its files into the temporary tag and before the tag is published.
FAULT_ENV = "DUALFORCE_FAULT_KILL_IN_SAVE"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int:
    m = _TAG_RE.match(tag)
    if not m:
        raise ValueError(f"checkpoint tag {tag!r} is not of the form stepNNNNNNNN")
    return int(m.group(1))


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
    def save(self, engine: Any, step: int, client_state: dict[str, Any], rank_state: dict[str, Any]) -> Path:
        """Collective: every rank calls it. Returns the final tag directory."""
        tag = tag_for(step)
        tmp_tag = f"{TMP_PREFIX}{tag}"
        tmp_dir, final_dir = self.root / tmp_tag, self.root / tag
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp_dir.exists():          # left by a save that died at this very step
                shutil.rmtree(tmp_dir)
        _barrier()
        state = dict(client_state, world_size=self.world_size, step=step)
        engine.save_checkpoint(str(self.root), tag=tmp_tag, client_state=state, save_latest=False)
        rank_file = self._rank_file(tmp_dir, self.rank)
        torch.save(rank_state, rank_file.with_suffix(".partial"))
        os.replace(rank_file.with_suffix(".partial"), rank_file)
        self._maybe_inject_fault(step)
        _barrier()                        # every rank's shards are on disk before the tag is published
        if self.rank == 0:
            self._publish(tmp_dir, final_dir, tag)
        _barrier()
        log.info("saved checkpoint %s", final_dir)
        return final_dir

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

    def load(self, engine: Any) -> Optional[Resumed]:
        """Collective. Loads the tag named by ``latest`` into ``engine``; None on a fresh run."""
        self.clean_partial()
        tag = self.latest_tag()
        if tag is None:
            return None
        tag_dir = self.root / tag
        rank_file = self._rank_file(tag_dir, self.rank)
        if not rank_file.is_file():
            saved = len(list(tag_dir.glob("rank_state_*.pt")))
            raise FileNotFoundError(f"{rank_file}: missing; checkpoint {tag_dir} was written by {saved} ranks, "
                                    f"this run has {self.world_size} (resume needs the same world size)")
        path, client_state = engine.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
        if client_state.get("world_size") != self.world_size:
            raise ValueError(f"{tag_dir}: written with world size {client_state.get('world_size')}, "
                             f"this run has {self.world_size}")
        rank_state = torch.load(rank_file, weights_only=True)
        log.info("resumed from %s (step %d)", tag_dir, client_state["step"])
        return Resumed(step=int(client_state["step"]), tag=tag, client_state=client_state, rank_state=rank_state)
