"""Evaluation outputs: ``results.json`` (everything), ``results.md`` (one table), ``results.csv`` and PNG
plots (identity drift, sync over time, a comparison chart), optionally TensorBoard scalars."""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

from dualforce_mega.fsutil import atomic_write

from .metrics.aggregate import COLUMNS, METRIC_COLUMNS

log = logging.getLogger(__name__)

KEYS = ("model", "test_set", "length")        # what identifies a row
HEADERS = {"fid": "FID", "fvd": "FVD (I3D)", "fvd_r3d18": "FVD (R3D-18)", "csim": "CSIM ↑", "acd": "ACD ↓",
           "sync_c": "Sync-C ↑", "sync_d": "Sync-D ↓", "apd": "APD (°) ↓"}
RANDOM_BANNER = "RANDOM-WEIGHT METRIC NETWORKS (--random-models): smoke run, the numbers are meaningless"
PLOT_BANNER = "random metric networks: smoke run, numbers meaningless"
FPS = 25


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def _label(row: dict) -> str:
    return " / ".join(str(row[k]) for k in KEYS if row.get(k) not in (None, ""))


def markdown(rows: Sequence[dict], columns: Sequence[str], random: Optional[str]) -> str:
    keys = [k for k in KEYS if any(r.get(k) not in (None, "") for r in rows)]
    head = keys + [HEADERS[c] for c in columns] + ["videos", "failed"]
    lines = []
    if random:
        lines += [f"> **{RANDOM_BANNER}**", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r.get(k, "")) for k in keys] + [_fmt(r.get(c)) for c in columns]
        cells += [str(r.get("videos", 0)), str(len(r.get("failed", [])))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[dict], columns: Sequence[str], random: Optional[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(list(KEYS) + list(columns) + ["videos", "failed", "random_models"])
    for r in rows:
        w.writerow([r.get(k, "") for k in KEYS] + ["" if r.get(c) is None else r[c] for c in columns]
                   + [r.get("videos", 0), len(r.get("failed", [])), random or ""])
    return buf.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _grid_legend(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _title(text: str, random: Optional[str]) -> str:
    return f"{text}\n[{PLOT_BANNER}]" if random else text


def plot_identity_drift(rows: Sequence[dict], path: Path, random: Optional[str]) -> bool:
    by_length = defaultdict(list)
    for r in rows:
        if r["curves"].get("csim"):
            by_length[r.get("length")].append(r)
    if not by_length:
        return False
    plt = _plt()
    lengths = sorted(by_length, key=lambda x: (x is None, x))
    fig, axes = plt.subplots(1, len(lengths), figsize=(max(5 * len(lengths), 6), 4), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        for r in by_length[length]:
            y = [math.nan if v is None else v for v in r["curves"]["csim"]]
            ax.plot(range(len(y)), y, label=_label({**r, "length": None}) or "generated")
        ax.set_title(f"{length} frames" if length else "all videos")
        _grid_legend(ax, "frame index", "CSIM to the reference")
    fig.suptitle(_title("Identity drift", random), fontsize=10)
    return _save(plt, fig, path)


def plot_sync_over_time(rows: Sequence[dict], path: Path, random: Optional[str]) -> bool:
    rows = [r for r in rows if r["curves"].get("sync_conf")]
    if not rows:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        y = [math.nan if v is None else v for v in r["curves"]["sync_conf"]]
        ax.plot([i / FPS for i in range(len(y))], y, label=_label(r) or "generated")
    _grid_legend(ax, "window start (s)", "Sync confidence per window")
    ax.set_title(_title("Sync over time", random), fontsize=10)
    return _save(plt, fig, path)


def plot_comparison(rows: Sequence[dict], columns: Sequence[str], path: Path, random: Optional[str]) -> bool:
    cols = [c for c in columns if any(r.get(c) is not None for r in rows)]
    if not cols:
        return False
    plt = _plt()
    labels = [_label(r) or f"row {i}" for i, r in enumerate(rows)]
    ncols = min(4, len(cols))
    nrows = -(-len(cols) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(3.5 * ncols, 6), (3.2 + 0.1 * len(rows)) * nrows),
                             squeeze=False)
    for ax in axes.flat[len(cols):]:
        ax.axis("off")
    for ax, c in zip(axes.flat, cols):
        vals = [math.nan if r.get(c) is None else r[c] for r in rows]
        ax.bar(range(len(rows)), vals, color=[f"C{i % 10}" for i in range(len(rows))])
        ax.set_title(HEADERS[c], fontsize=9)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(_title("Comparison", random), fontsize=10)
    return _save(plt, fig, path)


def tensorboard(rows: Sequence[dict], columns: Sequence[str], log_dir: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as w:
        for r in rows:
            for c in columns:
                if r.get(c) is not None:
                    w.add_scalar(f"{c}/{_label({**r, 'length': None}) or 'generated'}", r[c],
                                 global_step=int(r.get("length") or 0))


def write_results(out: Path, rows: list[dict], metrics: Sequence[str], random: Optional[str], extra: dict,
                  tb_dir: Optional[Path] = None) -> dict[str, Path]:
    """Writes every output into ``out`` (atomically per file) and returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    cols = [c for c in COLUMNS if any(c in METRIC_COLUMNS[m] for m in metrics)]
    files = {"json": out / "results.json", "md": out / "results.md", "csv": out / "results.csv"}
    payload = {"random_models": random, "warning": RANDOM_BANNER if random else None, **extra, "rows": rows}
    atomic_write(files["json"], json.dumps(payload, indent=1, default=float))
    atomic_write(files["md"], markdown(rows, cols, random))
    atomic_write(files["csv"], csv_text(rows, cols, random))
    for name, fn in (("identity_drift", lambda p: plot_identity_drift(rows, p, random)),
                     ("sync_over_time", lambda p: plot_sync_over_time(rows, p, random)),
                     ("comparison", lambda p: plot_comparison(rows, cols, p, random))):
        path = out / f"{name}.png"
        if fn(path):
            files[name] = path
    if tb_dir is not None:
        tensorboard(rows, cols, tb_dir)
    return files
