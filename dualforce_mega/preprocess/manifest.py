"""``OUT/manifest.jsonl``: one row per input file and per clip for every step (status, reason,
timings), appended as the run goes (each row flushed, so a killed run keeps what it did), and the
summary printed at the end (inputs, clips kept, skipped by reason, clips/s of each step)."""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

OK, SKIPPED, FAILED, CACHED, PENDING = "ok", "skipped", "failed", "cached", "pending"


@dataclass
class StepTiming:
    done: int = 0            # items processed in this run (not cached)
    cached: int = 0
    seconds: float = 0.0     # wall time of the step in this run

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Manifest:
    path: Path
    rows: list[dict] = field(default_factory=list)    # rows of this run
    timings: dict[str, StepTiming] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, step: str, kind: str, item: str, status: str, reason: Optional[str] = None,
            detail: Optional[str] = None, seconds: Optional[float] = None, **extra: Any) -> dict:
        row = {"time": round(time.time(), 3), "step": step, "kind": kind, "id": item, "status": status,
               "reason": reason, "detail": detail, "seconds": None if seconds is None else round(seconds, 4), **extra}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)
        return row

    def timing(self, step: str) -> StepTiming:
        return self.timings.setdefault(step, StepTiming())


def read_manifest(path: Union[str, Path]) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue       # a row torn by a kill mid-write
    return rows


def summarize(manifest: Manifest, inputs: int, kept: int) -> dict[str, Any]:
    """Counts of this run: skipped/failed by reason (inputs and clips), per-step clips/s."""
    latest: dict[tuple[str, str, str], dict] = {}
    for row in manifest.rows:
        latest[(row["step"], row["kind"], row["id"])] = row
    reasons: Counter = Counter()
    for row in latest.values():
        if row["status"] in (SKIPPED, FAILED):
            reasons[f"{row['kind']}:{row['reason']}"] += 1
    steps = {name: {"done": t.done, "cached": t.cached, "seconds": round(t.seconds, 3),
                    "items_per_s": round(t.rate, 3)} for name, t in manifest.timings.items()}
    return {"inputs": inputs, "clips_kept": kept, "skipped": dict(sorted(reasons.items())), "steps": steps}


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"inputs: {s['inputs']}   clips in shards: {s['clips_kept']}"]
    if s["skipped"]:
        lines.append("skipped / failed by reason:")
        lines += [f"  {k:32s} {v}" for k, v in s["skipped"].items()]
    lines.append(f"{'step':14s} {'done':>6s} {'cached':>6s} {'seconds':>9s} {'items/s':>9s}")
    for name, t in s["steps"].items():
        lines.append(f"{name:14s} {t['done']:6d} {t['cached']:6d} {t['seconds']:9.2f} {t['items_per_s']:9.3f}")
    return "\n".join(lines)


__all__ = ["OK", "SKIPPED", "FAILED", "CACHED", "PENDING", "Manifest", "StepTiming", "read_manifest", "summarize",
           "format_summary"]
