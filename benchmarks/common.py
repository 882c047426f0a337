"""Shared benchmark plumbing: timing (CUDA events or wall clock), OOM handling, table output.

Benchmarks import only torch and the repository, so they run on a bare GPU machine.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(REPO))


@dataclass
class Timing:
    median_ms: float
    samples_ms: list[float] = field(default_factory=list)


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int,
            max_seconds: float = 0.0) -> Timing:
    """Median time of ``fn()`` over ``iters`` runs after ``warmup`` runs.

    CUDA: each run is bracketed by CUDA events (GPU time, no host sync inside the run).
    CPU: wall clock. ``max_seconds`` > 0 caps warmup at half of it and stops measuring once that
    much time was spent (at least one call each), so very large shapes stay within a run's limit.
    """
    warm_start = time.perf_counter()
    for i in range(warmup):
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if max_seconds > 0 and time.perf_counter() - warm_start >= max_seconds / 2:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    samples: list[float] = []
    spent = 0.0
    for _ in range(max(1, iters)):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        samples.append(ms)
        spent += ms / 1e3
        if max_seconds > 0 and spent >= max_seconds:
            break
    return Timing(statistics.median(samples), samples)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` (CUDA), or a large number on CPU (no pre-flight skips there)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return 1 << 62


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def fmt(x: Optional[float], digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def parse_markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Every markdown table in ``text`` (runs of consecutive ``|`` lines) as lists of row dicts."""
    blocks: list[list[str]] = []
    prev = False
    for raw in text.splitlines():
        line = raw.strip()
        is_row = line.startswith("|") and line.endswith("|")
        if is_row:
            if not prev:
                blocks.append([])
            blocks[-1].append(line)
        prev = is_row
    split = lambda l: [c.strip() for c in l.strip("|").split("|")]  # noqa: E731
    tables = []
    for block in blocks:
        if len(block) < 2:
            continue
        headers = split(block[0])
        tables.append([dict(zip(headers, split(l))) for l in block[2:]])
    return tables


def dump_json(path: Optional[str], payload: Any) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1, default=lambda o: asdict(o)))


def csv_list(value: Any, cast: Callable[[str], Any] = str) -> list:
    """``"8,32,128"`` (or an already-typed value) -> ``[8, 32, 128]`` with ``cast`` applied."""
    return [cast(x) for x in str(value).split(",") if x]


def bench_device(cpu_smoke: bool) -> tuple[torch.device, torch.dtype]:
    """CUDA in bf16 when available (and not a CPU smoke run), else CPU in fp32."""
    device = torch.device("cpu" if cpu_smoke or not torch.cuda.is_available() else "cuda")
    return device, (torch.bfloat16 if device.type == "cuda" else torch.float32)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{cap[0]}{cap[1]}), torch {torch.__version__}"
    return f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"


def allow_recompiles(n_shapes: int) -> None:
    """flex is compiled once per attention shape; past dynamo's default limit it would run eagerly."""
    from torch._dynamo import config as dynamo_config

    key = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    # forward and backward graphs per shape, with slack for the masks' variants
    setattr(dynamo_config, key, max(getattr(dynamo_config, key), 4 * n_shapes))
