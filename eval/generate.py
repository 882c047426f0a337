"""Reference image + speech -> talking-head mp4 (with the audio muxed in), streamed chunk by chunk.

    python -m eval.generate --ref face.png --audio speech.wav --out out.mp4 --bundle BUNDLE_DIR
    python -m eval.generate --ref face.png --audio speech.wav --out out.mp4 --random-preset tiny
    python -m eval.generate --batch pairs.txt --out-dir results/ --bundle BUNDLE_DIR

See docs/SAMPLING.md for every flag and the sampling schedule.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from dualforce_mega.cli import run_main
from dualforce_mega.fsutil import refuse_overlap

from .batch import Job, check_job, parse_batch
from .pipeline import (RANDOM_PRESETS, GenerateOptions, Pipeline, PipelineSpec, build_pipeline, generate_one,
                       load_array)

log = logging.getLogger("eval.generate")


def pipeline_spec(args: argparse.Namespace) -> PipelineSpec:
    flags = dict(sample_steps=args.steps, sample_shift=args.shift, chunk_blocks=args.chunk_blocks,
                 window_blocks=args.window_blocks, ar_step=args.ar_step, cfg_audio=args.cfg_audio)
    return PipelineSpec(bundle=args.bundle, random_preset=args.random_preset, vae=args.vae,
                        audio_encoder=args.audio_encoder, audio_layer=args.audio_layer,
                        motion_extractor=args.motion_extractor, device=args.device,
                        dtype=args.dtype, height=args.height, width=args.width, weights=args.weights,
                        diffusion={k: v for k, v in flags.items() if v is not None})


def generate_options(args: argparse.Namespace, pipe: Pipeline, save_latents: Optional[Path]) -> GenerateOptions:
    m = pipe.cfg.model
    return GenerateOptions(
        frames=args.frames, seed=args.seed, use_cache=not args.no_kv_cache,
        kp_canonical=load_array(args.kp_canonical, (m.kp_dim,), "--kp-canonical") if args.kp_canonical else None,
        ref_motion=load_array(args.ref_motion, (m.motion_dim,), "--ref-motion") if args.ref_motion else None,
        text_emb=load_array(args.text_emb, (-1, m.text_dim), "--text-emb") if args.text_emb else None,
        save_latents=save_latents, progress=not args.quiet, stream=args.stream)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m eval.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    io = ap.add_argument_group("inputs / outputs")
    io.add_argument("--ref", help="reference image (frame 0)")
    io.add_argument("--audio", help="speech audio (any format PyAV reads; resampled to 16 kHz mono)")
    io.add_argument("--out", help="output mp4")
    io.add_argument("--batch", help="folder of IMAGE/AUDIO pairs with equal names, or a list file "
                                    "'IMAGE AUDIO [NAME]' per line")
    io.add_argument("--out-dir", help="output folder for --batch (NAME.mp4)")
    io.add_argument("--save-latents", help="safetensors with video_latent [16, F, h, w] and struct [N, 70]; "
                                           "with --batch a folder (NAME.safetensors)")
    io.add_argument("--kp-canonical", help="canonical keypoints of the reference (63 numbers, .npy or text); "
                                           "zeros when not given")
    io.add_argument("--ref-motion", help="motion of the reference frame (70 numbers); when not given the "
                                         "struct token of frame 0 is generated")
    io.add_argument("--text-emb", help="precomputed text embeddings [L, text_dim] (.npy) for models with text "
                                       "cross-attention; none by default")
    model = ap.add_argument_group("model")
    src = model.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", help="inference bundle directory (checkpoints_conv.export_bundle)")
    src.add_argument("--random-preset", choices=RANDOM_PRESETS, help="random weights, tiny VAE and audio "
                                                                     "encoder (smoke tests; no downloads)")
    model.add_argument("--weights", default="auto", choices=("auto", "ema", "model"),
                       help="bundle weights: auto = the EMA weights when the bundle has them, ema, or model (raw)")
    model.add_argument("--vae", help="diffusers AutoencoderKLWan folder (default: BUNDLE/vae)")
    model.add_argument("--audio-encoder", help="transformers HuBERT / wav2vec2 folder (default: BUNDLE/audio_encoder)")
    model.add_argument("--audio-layer", type=int, default=-1, help="hidden-state index of the audio encoder "
                                                                   "(-1 = last)")
    model.add_argument("--motion-extractor", help="LivePortrait motion_extractor.pth, or 'mediapipe' (FaceMesh "
                                                  "fallback): kp_canonical and the reference-frame motion from --ref "
                                                  "(explicit --kp-canonical / --ref-motion win)")
    model.add_argument("--device", help="default: cuda when available")
    model.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    samp = ap.add_argument_group("sampling (defaults: the config's diffusion section)")
    samp.add_argument("--frames", type=int, help="video frames (default: the audio's length)")
    samp.add_argument("--height", type=int)
    samp.add_argument("--width", type=int)
    samp.add_argument("--steps", type=int, help="diffusion.sample_steps")
    samp.add_argument("--shift", type=float, help="diffusion.sample_shift")
    samp.add_argument("--chunk-blocks", type=int, help="diffusion.chunk_blocks")
    samp.add_argument("--window-blocks", type=int, help="diffusion.window_blocks (-1 = the training window, 0 = unbounded)")
    samp.add_argument("--ar-step", type=int, help="diffusion.ar_step (0 = synchronous)")
    samp.add_argument("--cfg-audio", type=float, help="diffusion.cfg_audio (1 = no guidance)")
    samp.add_argument("--seed", type=int, default=0)
    samp.add_argument("--no-kv-cache", action="store_true", help="recompute the whole history every step "
                                                                 "(the reference path; slow)")
    samp.add_argument("--stream", action="store_true", help="real-time path: static-shape KV cache (CUDA graphs "
                                                            "on GPU), the mp4 written in place as a fragmented mp4 "
                                                            "playable while it grows; prints first-frame latency")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.batch:
        if not args.out_dir or args.ref or args.audio or args.out:
            ap.error("--batch needs --out-dir and excludes --ref/--audio/--out")
    elif not (args.ref and args.audio and args.out):
        ap.error("give --ref, --audio and --out (or --batch and --out-dir)")
    if args.stream and args.no_kv_cache:
        ap.error("--stream runs the static KV cache; it excludes --no-kv-cache")
    if args.frames is not None and args.frames < 1:
        ap.error("--frames must be >= 1")
    if args.random_preset and (args.vae or args.audio_encoder):
        ap.error("--vae / --audio-encoder go with --bundle; --random-preset builds random ones")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    # every input is checked before the model is built: a bad file costs no model load
    refuse_overlap({"--out": args.out, "--out-dir": args.out_dir, "--save-latents": args.save_latents},
                   {"--ref": args.ref, "--audio": args.audio, "--batch": args.batch, "--bundle": args.bundle,
                    "--vae": args.vae, "--audio-encoder": args.audio_encoder, "--kp-canonical": args.kp_canonical,
                    "--ref-motion": args.ref_motion, "--text-emb": args.text_emb})
    for path, flag in ((args.bundle, "--bundle"), (args.kp_canonical, "--kp-canonical"),
                       (args.ref_motion, "--ref-motion"), (args.text_emb, "--text-emb")):
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{flag} {path}: not found")
    failed = []
    if args.batch:
        jobs = parse_batch(args.batch)
        out_dir = Path(args.out_dir)
        targets = [(j, out_dir / f"{j.name}.mp4",
                    Path(args.save_latents) / f"{j.name}.safetensors" if args.save_latents else None) for j in jobs]
        for job, out, _ in targets:
            refuse_overlap({"--out-dir": out}, {"image": job.image, "audio": job.audio})
            try:
                check_job(job)
            except (ValueError, OSError) as e:
                log.error("%s: %s", job.name, e)  # reported now; the other jobs still run
                failed.append(job.name)
        if len(failed) == len(targets):
            raise ValueError(f"--batch {args.batch}: none of the {len(targets)} jobs has readable inputs")
    else:
        job = Job(Path(args.ref), Path(args.audio), Path(args.out).stem)
        check_job(job)
        targets = [(job, Path(args.out), Path(args.save_latents) if args.save_latents else None)]
    pipe = build_pipeline(pipeline_spec(args))
    for job, out, lat in targets:
        if job.name in failed:
            continue
        try:
            info = generate_one(pipe, job, out, generate_options(args, pipe, lat))
        except (ValueError, OSError) as e:
            if not args.batch:
                raise
            log.error("%s (%s, %s): %s", job.name, job.image, job.audio, e)  # keep going with the others
            failed.append(job.name)
            continue
        print(f"{info['out']}: {info['frames']} frames ({info['seconds']:.2f} s), "
              f"{info['latent_frames']} latent frames, {info['model_calls']} model calls")
        if args.stream:
            print(f"latency: first generated frame {info.get('first_frame_s', float('nan')):.3f} s, reference frame "
                  f"{info['reference_frame_s']:.3f} s; {info['frames'] / info['total_s']:.1f} frames/s")
    if failed:
        print(f"{len(failed)} of {len(targets)} failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
