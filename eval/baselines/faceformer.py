"""FaceFormer baseline, inference: per-frame FLAME meshes of every test record in the evaluation's layout
(docs/BASELINES.md).

    DATA_ROOT=/data python -m eval.baselines.faceformer --run runs/faceformer \\
        [--exp-name NAME] [--out results/metrics/faceformer_run/test] [--weights FILE] \\
        [--gt-out DIR] [--flame-masks FLAME_masks.pkl | --lip-vertices FILE [--upper-vertices FILE]]

Writes {out}/{exp_name}/{DATASET}/{STYLE_ID}_passionate/{i}.npy ((V, 3) float32 per frame) and
{out}/{exp_name}/manifest.jsonl; a rerun skips finished records. LVE / FDD go to {out}/{exp_name}/metrics.json
when lip vertices are given. Exit status 1 when a record was skipped or failed.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from dualforce_mega.baselines.faceformer.build import build_flame
from dualforce_mega.baselines.faceformer.config import TASK
from dualforce_mega.baselines.faceformer.best import BEST_DIR, WEIGHTS_FILE
from dualforce_mega.baselines.faceformer.inference import load_faceformer, run_inference
from dualforce_mega.config import ConfigError, load_config
from dualforce_mega.preprocess.flame_import import load_pickle
from dualforce_mega.preprocess.netutil import resolve_device
from eval.metrics.lve import load_indices

DEFAULT_OUT = "results/metrics/faceformer_run/test"
LIP_KEY = "lips"
UPPER_KEYS = ("forehead", "eye_region")

log = logging.getLogger("eval.baselines.faceformer")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m eval.baselines.faceformer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the training run directory (its config.yaml and best/ weights)")
    ap.add_argument("--exp-name", help="output sub-folder (default: the run directory's name)")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--weights", help=f"model weights (default: RUN/{BEST_DIR}/{WEIGHTS_FILE}, the best by val loss)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a key of the run's config (e.g. data.test=[a.json], data.root=/data)")
    ap.add_argument("--max-frames", type=int, help="cut test clips to this many frames (default: whole clips)")
    ap.add_argument("--gt-out", help="also write the ground-truth meshes in the same layout (+ template.npy)")
    ap.add_argument("--flame-masks", help=f"FLAME_masks.pkl: LVE over '{LIP_KEY}', FDD over {'+'.join(UPPER_KEYS)}")
    ap.add_argument("--lip-vertices", help="lip vertex indices (.npy or text) for LVE")
    ap.add_argument("--upper-vertices", help="upper-face vertex indices (.npy or text) for FDD")
    ap.add_argument("--render", action="store_true", help="also an mp4 per new record (needs pyrender + trimesh)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    if args.flame_masks and (args.lip_vertices or args.upper_vertices):
        ap.error("--flame-masks or --lip-vertices / --upper-vertices, not both")
    if args.upper_vertices and not args.lip_vertices:
        ap.error("--upper-vertices needs --lip-vertices")
    return args


def vertex_sets(args: argparse.Namespace) -> tuple[Optional[list[int]], Optional[list[int]]]:
    if args.flame_masks:
        masks = load_pickle(args.flame_masks)
        missing = [k for k in (LIP_KEY, *UPPER_KEYS) if k not in masks]
        if missing:
            raise ValueError(f"{args.flame_masks}: no {missing} (found {sorted(masks)})")
        upper = np.unique(np.concatenate([np.asarray(masks[k]).reshape(-1) for k in UPPER_KEYS]))
        return [int(i) for i in np.asarray(masks[LIP_KEY]).reshape(-1)], [int(i) for i in upper]
    lips = load_indices(Path(args.lip_vertices)) if args.lip_vertices else None
    upper = load_indices(Path(args.upper_vertices)) if args.upper_vertices else None
    return lips, upper


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    run = Path(args.run)
    try:
        cfg = load_config(str(run / "config.yaml"), args.overrides)
        if getattr(cfg.run, "task", None) != TASK:
            raise ConfigError(f"{run / 'config.yaml'}: run.task is {cfg.run.task!r}, not a FaceFormer run")
        weights = Path(args.weights) if args.weights else run / BEST_DIR / WEIGHTS_FILE
        if not weights.is_file():
            raise ConfigError(f"{weights}: no weights (train the run first, or pass --weights)")
        lips, upper = vertex_sets(args)
        device = resolve_device(args.device)
        flame = build_flame(cfg.model)
        summary = run_inference(cfg, lambda: load_faceformer(cfg, weights, device), flame, Path(args.out),
                                args.exp_name or run.resolve().name, device,
                                Path(args.gt_out) if args.gt_out else None, lips, upper, args.max_frames,
                                args.render)
    except (ConfigError, ValueError, OSError) as e:
        log.error("%s", e)
        return 2
    print("\n".join(summary.lines()))
    return 1 if summary.problems else 0


if __name__ == "__main__":
    sys.exit(main())
