"""LVE (lip vertex error) and FDD (upper-face dynamics deviation) of predicted meshes against ground truth.

    python -m eval.metrics.lve --pred PRED_DIR --gt GT_DIR --lip-vertices lve.txt \
        [--upper-vertices fdd.txt --template TEMPLATE.npy|TEMPLATE_DIR] [--out results.json]

A sequence is ``NAME.npy`` ([T, V, 3] or [T, V*3]) or a folder ``NAME/`` of per-frame ``0.npy, 1.npy, ...``
([V, 3]; FaceFormer's evaluation layout); predictions and ground truth pair by NAME and are cut to the
shorter length. Vertex index files: ``.npy`` or text with comma / whitespace separated integers.
``--template`` is one [V, 3] mesh for all sequences or a folder with ``NAME.npy`` per sequence.
Definitions: ``dualforce_mega.metrics.lve`` and docs/EVAL.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from dualforce_mega.cli import run_main
from dualforce_mega.fsutil import atomic_write, refuse_overlap
from dualforce_mega.metrics.lve import fdd, lve

log = logging.getLogger("eval.metrics.lve")


def load_sequence(path: Path) -> np.ndarray:
    if path.is_dir():
        frames = sorted((p for p in path.glob("*.npy") if p.stem.isdigit()), key=lambda p: int(p.stem))
        if not frames:
            raise ValueError(f"{path}: no per-frame 0.npy, 1.npy, ... files")
        arr = np.stack([np.load(p, allow_pickle=False) for p in frames])
    else:
        arr = np.load(path, allow_pickle=False)
    arr = np.asarray(arr, np.float64)
    if arr.ndim == 2 and arr.shape[1] % 3 == 0:
        arr = arr.reshape(len(arr), -1, 3)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"{path}: expected [T, V, 3] vertices, found {arr.shape}")
    return arr


def load_indices(path: Path) -> list[int]:
    if path.suffix == ".npy":
        return [int(i) for i in np.load(path, allow_pickle=False).reshape(-1)]
    return [int(t) for t in re.split(r"[\s,]+", path.read_text().strip()) if t]


def sequences(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: mesh folder not found")
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_dir() or p.suffix == ".npy"}


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="python -m eval.metrics.lve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pred", required=True)
    ap.add_argument("--gt", required=True)
    ap.add_argument("--lip-vertices", required=True, help="lip vertex indices (e.g. FaceFormer's lve.txt)")
    ap.add_argument("--upper-vertices", help="upper-face vertex indices for FDD (e.g. CodeTalker's fdd.txt)")
    ap.add_argument("--template", help="neutral mesh [V, 3] (.npy) or a folder of NAME.npy, for FDD")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if bool(args.upper_vertices) != bool(args.template):
        ap.error("FDD needs both --upper-vertices and --template")
    refuse_overlap({"--out": args.out}, {"--pred": args.pred, "--gt": args.gt, "--lip-vertices": args.lip_vertices,
                                         "--upper-vertices": args.upper_vertices, "--template": args.template})
    try:
        pred, gt = sequences(Path(args.pred)), sequences(Path(args.gt))
        names = sorted(set(pred) & set(gt))
        if not names:
            raise ValueError(f"no sequence names in common between {args.pred} and {args.gt}")
        preds, gts = [], []
        for n in names:
            p, g = load_sequence(pred[n]), load_sequence(gt[n])
            t = min(len(p), len(g))
            preds.append(p[:t])
            gts.append(g[:t])
        result = {"sequences": len(names), "frames": int(sum(len(g) for g in gts)),
                  "lve": lve(preds, gts, load_indices(Path(args.lip_vertices))),
                  "unmatched": sorted(set(pred) ^ set(gt))}
        if args.upper_vertices:
            tpath = Path(args.template)
            templates = [load_sequence(tpath / f"{n}.npy")[0] if tpath.is_dir() else
                         np.asarray(np.load(tpath, allow_pickle=False), np.float64).reshape(-1, 3) for n in names]
            result["fdd"] = fdd(preds, gts, templates, load_indices(Path(args.upper_vertices)))
    except (ValueError, FileNotFoundError, OSError) as e:
        log.error("%s", e)
        return 2
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        atomic_write(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
