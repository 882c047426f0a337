"""Evaluation: metrics of generated videos against real ones, or a whole study from a YAML.

    python -m eval.run_eval --generated GEN_DIR --real REAL_DIR --out OUT [--references IMG_DIR] \\
        [--metrics fid,fvd,csim,sync,apd] [--faces detect|full] --fid-inception P --i3d P --arcface P --syncnet P
    python -m eval.run_eval --study study.yaml [--out OUT]        # see eval/study.py for the YAML
    python -m eval.run_eval ... --random-models tiny              # smoke run: random networks, marked

Writes OUT/results.json, results.md, results.csv and PNG plots; a video that fails is reported in the
results (``failed``) and skipped. docs/EVAL.md defines every metric.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from dualforce_mega.cli import run_main
from dualforce_mega.fsutil import refuse_overlap

from .batch import IMAGE_EXTS
from .evaluate import evaluate, real_records
from .metrics.analyze import FACE_MODES, list_videos
from .metrics.models import METRICS, add_model_arguments, check_weight_paths, load_models
from .report import write_results
from .study import load_study, network_args, test_set_jobs, generate_videos

log = logging.getLogger("eval.run_eval")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m eval.run_eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generated", help="folder of generated videos")
    ap.add_argument("--real", help="folder of real videos (same names as the generated ones for APD / CSIM)")
    ap.add_argument("--references", help="folder of reference images (same names) for CSIM")
    ap.add_argument("--study", help="study YAML (models x test sets x lengths)")
    ap.add_argument("--out", help="output folder (study: overrides the YAML's out)")
    ap.add_argument("--metrics", help=f"comma list from {','.join(METRICS)} (default: all but fvd_r3d18)")
    ap.add_argument("--faces", choices=FACE_MODES, help="detect: Haar + tracking (default); full: the "
                                                        "videos are face crops already")
    ap.add_argument("--fvd-clips", type=int, default=1, help="16-frame clips per video for FVD (0 = all)")
    ap.add_argument("--tensorboard", help="also write TensorBoard scalars into this folder")
    add_model_arguments(ap)
    args = ap.parse_args(argv)
    if bool(args.study) == bool(args.generated):
        ap.error("give --generated (with --real) or --study")
    if args.generated and not args.out:
        ap.error("--generated needs --out")
    return args


def _metrics(text: Optional[str], default: list[str]) -> list[str]:
    metrics = [m.strip() for m in text.split(",") if m.strip()] if text else default
    bad = sorted(set(metrics) - set(METRICS))
    if bad:
        raise SystemExit(f"--metrics: unknown {bad}; choose from {','.join(METRICS)}")
    return metrics


def _detector(face_mode: str):
    if face_mode != "detect":
        return None
    from dualforce_mega.preprocess.face import build_detector

    return build_detector("haar")


def run_folders(args: argparse.Namespace) -> int:
    metrics = _metrics(args.metrics, [m for m in METRICS if m != "fvd_r3d18"])
    check_weight_paths(args, metrics)
    refuse_overlap({"--out": args.out, "--tensorboard": args.tensorboard},
                   {"--generated": args.generated, "--real": args.real, "--references": args.references})
    real_dir = Path(args.real) if args.real else None
    gen_dir = Path(args.generated)
    generated = list_videos(gen_dir)                      # fails before any network loads
    images = {p.stem: p for p in Path(args.references).iterdir()
              if p.suffix.lower() in IMAGE_EXTS} if args.references else {}
    models = load_models(args, metrics)
    face_mode = args.faces or "detect"
    detector = _detector(face_mode)
    real, real_failed = real_records(real_dir, models, metrics, face_mode, detector, args.fvd_clips)
    row = evaluate(generated, real, models, metrics, images, real_dir, face_mode, detector, args.fvd_clips)
    row["model"] = gen_dir.name
    files = write_results(Path(args.out), [row], metrics, models.random,
                          {"mode": "folders", "generated": str(gen_dir), "real": args.real, "metrics": metrics,
                           "faces": face_mode, "real_failed": real_failed},
                          Path(args.tensorboard) if args.tensorboard else None)
    _print_summary(files, [row])
    return 0


def run_study(args: argparse.Namespace) -> int:
    study = load_study(Path(args.study), args.out)
    inputs = {"--study": args.study}
    for ts, t in study.test_sets.items():
        inputs.update({f"test_sets.{ts}.pairs": t["pairs"], f"test_sets.{ts}.real": t["real"]})
    for name, m in study.models.items():
        inputs.update({f"models.{name}.{k}": m.get(k) for k in ("bundle", "vae", "audio_encoder")})
    refuse_overlap({"out": study.out, "--tensorboard": args.tensorboard}, inputs)
    metrics = _metrics(args.metrics, study.metrics)
    nets = network_args(study, args)
    check_weight_paths(nets, metrics)                     # before any generation
    jobs = test_set_jobs(study)
    face_mode = args.faces or study.faces
    gen_failed, folders = [], {}
    for model in study.models:
        folders[model], failed = generate_videos(study, model, jobs)
        gen_failed += failed
    models = load_models(nets, metrics)
    detector = _detector(face_mode)
    rows = []
    for ts, t in study.test_sets.items():
        real, real_failed = real_records(t["real"], models, metrics, face_mode, detector, args.fvd_clips)
        images = {j.name: j.image for j in jobs[ts]}
        for model in study.models:
            for length in study.lengths:
                folder = folders[model][(ts, length)]
                row = evaluate(list_videos(folder) if folder.is_dir() else [], real, models, metrics, images,
                               t["real"], face_mode, detector, args.fvd_clips, desc=f"{model}/{ts}/{length}")
                row.update(model=model, test_set=ts, length=length)
                row["failed"] += [f for f in gen_failed if (f["model"], f["test_set"], f["length"]) ==
                                  (model, ts, length)]
                if real_failed:
                    row["notes"].append(f"real videos skipped: {[f['name'] for f in real_failed]}")
                rows.append(row)
    files = write_results(study.out, rows, metrics, models.random,
                          {"mode": "study", "study": str(args.study), "metrics": metrics, "faces": face_mode,
                           "lengths": study.lengths}, Path(args.tensorboard) if args.tensorboard else None)
    _print_summary(files, rows)
    return 0


def _print_summary(files: dict, rows: list[dict]) -> None:
    print(files["md"].read_text())
    for r in rows:
        for f in r.get("failed", []):
            print(f"FAILED {f.get('model', r.get('model'))} {f['name']}: {f['error']}")
    print("wrote " + ", ".join(str(p) for p in files.values()))


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        return run_study(args) if args.study else run_folders(args)
    except (ValueError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(run_main(main))
