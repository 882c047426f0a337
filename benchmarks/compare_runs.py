"""Side-by-side figures of training runs from their ``metrics.jsonl`` (the real trainer's own records).

  python benchmarks/compare_runs.py --skip 2 --run base_p2=out/base_p2 --run new_p2=out/new_p2 \
      --ratio new_p2/base_p2 [--json out.json]

Per run: the median over the logged steps after the first ``--skip`` (compilation and allocator warm-up)
of step time, tokens/s, model TFLOP/s, MFU against the measured matmul peak (``mfu``) and the datasheet
peak (``mfu_datasheet``), data wait per step, peak memory. ``--ratio A/B`` prints how much faster A's
steps are than B's (B's step time / A's): both measured in the same session on the same machine.
Runs that are missing or logged too few steps are listed as such, never dropped silently.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Optional

from common import dump_json, fmt, markdown_table  # noqa: I100

FIELDS = ("step_time_s", "tokens_per_s", "model_tflops_per_s", "mfu", "mfu_datasheet", "data_wait_s",
          "data_wait_frac", "memory_mb")


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize_run(records: list[dict[str, Any]], skip: int) -> Optional[dict[str, Any]]:
    """Medians of ``FIELDS`` over the records after the first ``skip`` (None if none are left)."""
    kept = records[skip:]
    if not kept:
        return None
    out: dict[str, Any] = {"steps": len(kept), "last_step": kept[-1].get("step")}
    for key in FIELDS:
        values = [r[key] for r in kept if isinstance(r.get(key), (int, float))]
        out[key] = statistics.median(values) if values else None
    out["memory_mb"] = max((r["memory_mb"] for r in kept if r.get("memory_mb") is not None), default=None)
    out["loss"] = kept[-1].get("loss")
    return out


def parse_pairs(items: list[str], sep: str, what: str) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        if sep not in item:
            raise SystemExit(f"{what} {item!r}: expected A{sep}B")
        a, b = item.split(sep, 1)
        pairs.append((a, b))
    return pairs


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", default=[], metavar="NAME=DIR", help="a run directory (repeatable)")
    p.add_argument("--ratio", action="append", default=[], metavar="A/B", help="speed of run A over run B")
    p.add_argument("--skip", type=int, default=2, help="logged steps left out at the start (warm-up)")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    runs = parse_pairs(args.run, "=", "--run")
    stats = {name: summarize_run(read_records(Path(d)), args.skip) for name, d in runs}
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    rows = []
    for name, d in runs:
        s = stats[name]
        if s is None:
            rows.append([name, "no steps after warm-up" if read_records(Path(d)) else "no metrics.jsonl"] + ["-"] * 8)
            continue
        mem = None if s["memory_mb"] is None else s["memory_mb"] / 1024
        rows.append([name, str(s["steps"]), fmt(s["step_time_s"]), fmt(s["tokens_per_s"]), fmt(s["model_tflops_per_s"]),
                     pct(s["mfu"]), pct(s["mfu_datasheet"]), fmt(None if s["data_wait_s"] is None else
                                                              1e3 * s["data_wait_s"]),
                     pct(s["data_wait_frac"]), fmt(mem)])
    print(markdown_table(["run", "steps", "step s", "tokens/s", "TFLOP/s", "MFU (measured peak)", "MFU (datasheet)",
                          "data wait ms", "data wait %", "peak GiB"], rows))
    ratios = []
    for a, b in parse_pairs(args.ratio, "/", "--ratio"):
        sa, sb = stats.get(a), stats.get(b)
        if sa is None or sb is None or not sa["step_time_s"] or not sb["step_time_s"]:
            ratios.append([f"{a} / {b}", "not measured"])
            continue
        ratios.append([f"{a} / {b}", f"{sb['step_time_s'] / sa['step_time_s']:.2f}x faster"
                       f" ({fmt(sa['step_time_s'])} s vs {fmt(sb['step_time_s'])} s per step)"])
    if ratios:
        print()
        print(markdown_table(["ratio", "speed"], ratios))
    dump_json(args.json, {"runs": dict(runs), "stats": stats, "skip": args.skip})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
