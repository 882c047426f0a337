"""Raw videos -> training shards (steps 01..07; see docs/DATA.md).

    python -m data_tools.prepare --src RAW_DIR --out OUT_DIR [--vae PATH] [--audio-encoder PATH]
        [--motion-extractor PATH] [--flame-dir DIR] [--size 512] [--workers N] [--device auto]
        [--mode talking-head|video] [--aligned] [--random-models tiny] [--config prepare.yaml]

Writes OUT_DIR/shards (train; val/ and test/ inside), OUT_DIR/manifest.jsonl, OUT_DIR/work/ and
prints a summary. Re-running the same command continues an interrupted run. The per-step CLIs
(``python -m data_tools.step01_clips`` ...) take the same options and run one step.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from dualforce_mega.cli import run_main
from dualforce_mega.fsutil import refuse_overlap
from dualforce_mega.preprocess.config import MODES, PrepareConfig
from dualforce_mega.preprocess.manifest import format_summary
from dualforce_mega.preprocess.pipeline import STEPS, PrepareOptions
from dualforce_mega.preprocess.prepare import run_prepare


def build_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--src", type=Path, required=True, help="folder of raw videos (searched recursively)")
    ap.add_argument("--out", type=Path, required=True, help="output folder (shards/, manifest.jsonl, work/)")
    ap.add_argument("--config", type=Path, help="YAML with PrepareConfig overrides (clip.*, quality.*, ...)")
    ap.add_argument("--vae", help="diffusers AutoencoderKLWan directory (Wan2.1 VAE)")
    ap.add_argument("--audio-encoder", help="transformers HuBERT / wav2vec2 directory")
    ap.add_argument("--audio-layer", type=int, default=-1, help="hidden layer of the audio encoder (-1 = last)")
    ap.add_argument("--motion-extractor", help="LivePortrait motion_extractor.pth (else the MediaPipe fallback)")
    ap.add_argument("--flame-dir", help="precomputed EMOCA outputs, <video stem>.npz/.pkl/... or per-frame folders")
    ap.add_argument("--emoca", help="EMOCA checkpoint: FLAME from the crops where --flame-dir has none "
                                    "(without both, clips are marked has_flame=false)")
    ap.add_argument("--flame-fps", type=float, default=25.0, help="frame rate of FLAME files that do not say")
    ap.add_argument("--syncnet", help="SyncNet v2 weights (syncnet_v2.model): Sync-C as a quality score in step 02")
    ap.add_argument("--text-encoder", help="umT5 folder (Wan's text_encoder + tokenizer): caption embeddings")
    ap.add_argument("--size", type=int, help="crop side in pixels (default 512)")
    ap.add_argument("--workers", type=int, default=1, help="processes for the CPU steps 01 / 02")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] for the networks")
    ap.add_argument("--mode", choices=MODES, help="talking-head (default) or video (Phase 2: no face / audio)")
    ap.add_argument("--face-detector", choices=["haar", "s3fd"], help="haar (default, offline) or s3fd")
    ap.add_argument("--face-weights", help="S3FD weights (s3fd-619a316812.pth) for --face-detector s3fd")
    ap.add_argument("--aligned", action="store_true", help="inputs are aligned face crops (VFHQ-512): no detection")
    ap.add_argument("--dataset", help="dataset name for the metadata (default: first folder under --src)")
    ap.add_argument("--preset", default=None, help="model preset whose dims the shards match (default lite; "
                                                   "tiny with --random-models tiny)")
    ap.add_argument("--random-models", choices=["tiny"], help="random tiny networks for smoke tests (logged loudly)")
    return ap


def options_from_args(args: argparse.Namespace, steps: Sequence[str]) -> PrepareOptions:
    overrides: dict = {}
    if args.mode:
        overrides["mode"] = args.mode
    if args.dataset:
        overrides["dataset"] = args.dataset
    cfg = PrepareConfig.from_yaml(args.config, **overrides) if args.config else PrepareConfig.from_dict(overrides)
    if args.size:
        cfg.clip.size = args.size
    if args.aligned:
        cfg.clip.aligned = True
    if args.face_detector:
        cfg.clip.detector = args.face_detector
    if args.face_weights:
        cfg.clip.detector_weights = args.face_weights
    preset = args.preset or ("tiny" if args.random_models else "lite")
    return PrepareOptions(src=args.src, out=args.out, config=cfg, vae=args.vae, audio_encoder=args.audio_encoder,
                          audio_layer=args.audio_layer, motion_extractor=args.motion_extractor,
                          flame_dir=args.flame_dir, emoca=args.emoca, flame_fps=args.flame_fps, workers=args.workers, device=args.device,
                          syncnet=args.syncnet, text_encoder=args.text_encoder, random_models=args.random_models, preset=preset, steps=tuple(steps))


def main(argv: Optional[Sequence[str]] = None, steps: Sequence[str] = STEPS, description: str = __doc__) -> int:
    args = build_parser(description.split("\n\n")[0]).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    refuse_overlap({"--out": args.out}, {"--src": args.src, "--config": args.config, "--vae": args.vae,
                                         "--audio-encoder": args.audio_encoder, "--motion-extractor": args.motion_extractor,
                                         "--flame-dir": args.flame_dir, "--emoca": args.emoca, "--syncnet": args.syncnet,
                                         "--text-encoder": args.text_encoder, "--face-weights": args.face_weights})
    summary = run_prepare(options_from_args(args, steps))
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
