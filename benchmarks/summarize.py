"""One table from a GPU-suite output folder: every figure of benchmarks/RESULTS.md next to its target.

  python benchmarks/summarize.py out/gpu_suite/<run>      # reads checks.json, attention.json, train_step.json,
                                                          # stream.json (whichever exist)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

from common import fmt, markdown_table  # noqa: I100

# targets (benchmarks/RESULTS.md): block-causal / best full attention, fwd+bwd, by latent frames F (P = 1)
TARGET_CAUSAL_OVER_FULL = {8: 0.75, 32: 0.6, 128: 0.6}
TARGET_STREAM_FPS = 25.0          # real time: video frames per second of sampling
TARGET_FIRST_FRAME_S = 1.0
TARGET_PHASE2_MFU = 0.50
TARGET_PHASE4_MFU = 0.45
TARGET_FP8_SPEEDUP = 1.25
FP8_MODIFIERS = ("fp8", "rowwise", "fp8all")
TARGET_FP8_LOSS_REL = 0.02


def _load(folder: Path, name: str) -> Optional[dict]:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def _met(value: Optional[float], target: float, higher_is_better: bool) -> str:
    if value is None:
        return "not measured"
    ok = value >= target if higher_is_better else value <= target
    return "yes" if ok else "NO"


def attention_rows(data: dict) -> list[list[str]]:
    rows = []
    by_case: dict[tuple, list[dict]] = {}
    for r in data["rows"]:
        by_case.setdefault((r["frames"], r["sp"]), []).append(r)
    for (frames, sp), rs in sorted(by_case.items()):
        full = [r for r in rs if r["backend"].startswith("full") and r["ms"] is not None]
        best_full = min(full, key=lambda r: r["ms"]) if full else None
        for r in rs:
            if r["backend"].startswith("full"):
                continue
            label = f"attention fwd+bwd F={frames} P={sp} {r['backend']} / full"
            if r["ms"] is None:
                rows.append([label, r["note"] or "-", "-", "-"])
                continue
            ratio = r["ratio"]
            target = TARGET_CAUSAL_OVER_FULL.get(frames) if sp == 1 else None
            measured = (f"{fmt(ratio)} ({fmt(r['ms'])} ms vs {fmt(best_full['ms'])} ms {best_full['backend']}; "
                        f"{fmt(r['tflops'])} TFLOP/s; ideal {fmt(r['ideal'])})") if best_full else fmt(r["ms"])
            rows.append([label, measured, f"<= {target}" if target else "-",
                         _met(ratio, target, False) if target else "-"])
    return rows


def stream_rows(data: dict, tag: str = "") -> list[list[str]]:
    rows = []
    for r in data["rows"]:
        label = f"sampling {r['path']}{tag}, {r['video_frames']} video frames"
        if r["fps"] is None:
            rows.append([label, r["note"] or "-", "-", "-"])
            continue
        measured = f"{fmt(r['fps'])} video fps, {fmt(r['ms_per_call'])} ms/call, {fmt(r['kv_mib'])} MiB KV"
        static = r["path"] == "static"
        rows.append([label, measured + (f"; {r['note']}" if r["note"] else ""),
                     f">= {TARGET_STREAM_FPS:g} fps" if static else "-",
                     _met(r["fps"], TARGET_STREAM_FPS, True) if static else "-"])
        rows.append([f"first-frame latency, {r['path']}{tag}", f"{fmt(r['first_frame_s'])} s",
                     f"< {TARGET_FIRST_FRAME_S:g} s" if static else "-",
                     _met(r["first_frame_s"], TARGET_FIRST_FRAME_S, False) if static else "-"])
    for path, ratio in data.get("cfg_speedup", {}).items():
        rows.append([f"audio CFG batched / two-call, {path}", f"{fmt(ratio)}x", "-", "-"])
    return rows


def bf16_counterpart(variant: str) -> str:
    """The variant label without its FP8 modifiers (``compile+fp8=torchao`` -> ``compile``)."""
    base, *mods = variant.split("+")
    return "+".join([base] + [m for m in mods if m.partition("=")[0] not in FP8_MODIFIERS])


def train_rows(data: dict) -> list[list[str]]:
    rows = [["matmul peak (measured, params dtype)", f"{fmt(data['peak_tflops'])} TFLOP/s", "-", "-"]]
    by = {(r["phase"], r["variant"]): r for r in data["rows"]}
    for r in data["rows"]:
        label = f"Phase {r['phase']} {r['variant']} step, {r['frames']} latent frames"
        if r["ms"] is None:
            rows.append([label, r["note"], "-", "-"])
            continue
        mfu = r["mfu"]
        measured = (f"{fmt(r['ms'])} ms, {fmt(r['tokens_per_s'])} tok/s, MFU {100 * mfu:.1f}%, "
                    f"peak {fmt(r['peak_gib'])} GiB")
        base = by.get((r["phase"], bf16_counterpart(r["variant"])))
        if base is not r and base is not None and base["ms"]:
            ratio = base["ms"] / r["ms"]
            rows.append([label, measured + f", {fmt(ratio)}x vs {base['variant']}", f">= {TARGET_FP8_SPEEDUP}x",
                         _met(ratio, TARGET_FP8_SPEEDUP, True)])
        else:
            target = TARGET_PHASE4_MFU if r["phase"] == 4 else TARGET_PHASE2_MFU
            rows.append([label, measured, f"MFU >= {target:.0%}", _met(mfu, target, True)])
    s = data.get("search")
    if s:
        rows.append([f"max latent frames, Phase {s['phase']}, activation checkpointing", str(s["max_fit"]),
                     "-", s["note"] or f"first OOM at {s['first_oom']}"])
    return rows


def check_rows(data: dict) -> list[list[str]]:
    checks = data["checks"]
    rows = []
    for c in checks:
        if c["name"].startswith("fp8 loss"):
            rows.append([c["name"], f"{100 * c['value']:.2f}% ({c['detail']})", f"<= {TARGET_FP8_LOSS_REL:.0%}",
                         "yes" if c["passed"] else "NO"])
    passed = sum(c["passed"] for c in checks)
    failed = [c["name"] for c in checks if not c["passed"]]
    rows.append(["GPU correctness checks", f"{passed}/{len(checks)} passed", "all",
                 "yes" if not failed else "NO: " + "; ".join(failed)])
    return rows


def summarize(folder: Path) -> str:
    rows: list[list[str]] = []
    sources: list[tuple[str, Any]] = [("checks.json", check_rows), ("attention.json", attention_rows),
                                      ("train_step.json", train_rows), ("stream.json", stream_rows),
                                      ("stream_cfg.json", lambda d: stream_rows(d, " (audio CFG)"))]
    devices = set()
    for name, fn in sources:
        data = _load(folder, name)
        if data is None:
            if not name.startswith("stream"):  # optional
                rows.append([name.replace(".json", ""), "not run", "-", "-"])
            continue
        devices.add(data.get("device", ""))
        rows += fn(data)
    head = f"# GPU suite summary ({'; '.join(d for d in devices if d) or 'unknown device'})\n"
    return head + markdown_table(["figure", "measured", "target", "met"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("folder", type=Path)
    print(summarize(p.parse_args().folder))


if __name__ == "__main__":
    main()
