"""LatentSync lip-sync baseline, batch runner: every g-/m- video of a folder lip-synced to every audio
of the same gender, with the official checkpoints (docs/BASELINES.md).

    python -m eval.baselines.latentsync --input_dir IN --output_dir OUT \\
        --unet_config_path configs/unet/stage2.yaml --inference_ckpt_path checkpoints/latentsync_unet.pt \\
        --whisper checkpoints/whisper/tiny.pt --vae sd-vae-ft-mse/
    python -m eval.baselines.latentsync --input_dir IN --output_dir OUT \\
        --unet_config_path stage2.yaml --random-models tiny          # smoke run, random networks

Writes OUT/{video}__{audio}_out.mp4 and _mask.mp4 per pair and OUT/manifest.jsonl; a rerun skips
finished pairs. Exit status 1 when a pair failed.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from dualforce_mega.baselines.latentsync.batch import Guidance, run_batch
from dualforce_mega.cli import run_main
from dualforce_mega.fsutil import refuse_overlap
from dualforce_mega.baselines.latentsync.build import DTYPES, RANDOM_PRESETS, BuildSpec, build_lipsync


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m eval.baselines.latentsync", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input_dir", required=True, help="folder of g-*/m-* videos and audios")
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--unet_config_path", required=True, help="LatentSync UNet YAML (configs/unet/stage2.yaml)")
    ap.add_argument("--inference_ckpt_path", help="latentsync_unet.pt")
    ap.add_argument("--whisper", help="Whisper: OpenAI tiny.pt / small.pt or a transformers folder "
                                      "(tiny for cross_attention_dim 384, small for 768)")
    ap.add_argument("--vae", help="diffusers AutoencoderKL folder (stabilityai/sd-vae-ft-mse)")
    ap.add_argument("--guidance_scale", type=float, default=1.5, help="pairs that are not one gender")
    ap.add_argument("--guidance_female", type=float, default=1.8, help="g- pairs")
    ap.add_argument("--guidance_male", type=float, default=1.3, help="m- pairs")
    ap.add_argument("--seed", type=int, default=1247)
    ap.add_argument("--num_frames", type=int, help="frames per UNet window (default: the YAML's data.num_frames, 16)")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps")
    ap.add_argument("--resolution", type=int, help="aligned face size (default: the YAML's data.resolution, 256)")
    ap.add_argument("--dtype", default="float16", choices=sorted(DTYPES), help="on GPU (CPU runs float32)")
    ap.add_argument("--pairs", help="run only the pairs listed, 'VIDEO AUDIO' per line (names in --input_dir)")
    ap.add_argument("--random-models", choices=RANDOM_PRESETS, help="tiny random networks, no weights (smoke runs)")
    args = ap.parse_args(argv)
    for flag in ("num_frames", "steps", "resolution"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            ap.error(f"--{flag} must be >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    refuse_overlap({"--output_dir": args.output_dir},
                   {"--unet_config_path": args.unet_config_path,
                    "--inference_ckpt_path": args.inference_ckpt_path, "--whisper": args.whisper, "--vae": args.vae,
                    "--pairs": args.pairs})
    spec = BuildSpec(unet_config_path=args.unet_config_path, inference_ckpt_path=args.inference_ckpt_path,
                     whisper=args.whisper, vae=args.vae, random_models=args.random_models,
                     num_frames=args.num_frames, resolution=args.resolution, steps=args.steps, dtype=args.dtype)
    summary = run_batch(Path(args.input_dir), Path(args.output_dir), lambda: build_lipsync(spec),
                        Guidance(args.guidance_scale, args.guidance_female, args.guidance_male), args.seed,
                        Path(args.pairs) if args.pairs else None)
    print("\n".join(summary.lines()))
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
