"""Reference image + speech -> talking-head mp4 (with the audio muxed in), streamed chunk by chunk.

    python -m eval.generate --ref face.png --audio speech.wav --out out.mp4 --bundle BUNDLE_DIR
    python -m eval.generate --ref face.png --audio speech.wav --out out.mp4 --random-preset tiny
    python -m eval.generate --batch pairs.txt --out-dir results/ --bundle BUNDLE_DIR

See docs/SAMPLING.md for every flag and the sampling schedule.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from dualforce_mega.config import Config, build_config
from dualforce_mega.diffusion.ar_schedule import plan_chunks
from dualforce_mega.diffusion.sampler import ARSampler, SampleInputs, num_latent_frames
from dualforce_mega.models.dualforce import DualForceModel
from dualforce_mega.models.layout import num_video_frames

from .batch import Job, parse_batch
from .encoders import AUDIO_SAMPLE_RATE, SpeechEncoder, WanVAE, tiny_audio_encoder, tiny_vae
from .media import Mp4Writer, fit_length, load_audio, load_image, to_uint8_frames

log = logging.getLogger("eval.generate")

RANDOM_PRESETS = ("tiny",)
BUNDLE_VAE_DIR = "vae"                 # optional sub-folders of a bundle
BUNDLE_AUDIO_DIR = "audio_encoder"


@dataclass
class Pipeline:
    model: DualForceModel
    cfg: Config
    vae: WanVAE
    speech: SpeechEncoder
    height: int
    width: int


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def build_pipeline(args: argparse.Namespace) -> Pipeline:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _dtype(args.dtype, device)
    if args.random_preset:
        torch.manual_seed(0)  # fixed random weights: outputs then depend on --seed only
        cfg = build_config({"model": {"preset": args.random_preset}})
        model = DualForceModel(cfg.model).to(device, dtype).eval()
        vae = WanVAE(tiny_vae(z_dim=cfg.model.in_channels).to(device, dtype))
        speech = SpeechEncoder(tiny_audio_encoder(cfg.model.audio_dim).to(device, dtype))
    else:
        from dualforce_mega.bundle import load_bundle

        model, cfg, _ = load_bundle(args.bundle, device, dtype)
        vae_path = args.vae or _bundle_part(args.bundle, BUNDLE_VAE_DIR, "--vae")
        audio_path = args.audio_encoder or _bundle_part(args.bundle, BUNDLE_AUDIO_DIR, "--audio-encoder")
        vae = WanVAE.from_pretrained(vae_path, device, dtype)
        speech = SpeechEncoder.from_pretrained(audio_path, device, dtype, layer=args.audio_layer)
    if speech.dim != cfg.model.audio_dim:
        raise SystemExit(f"audio encoder hidden size {speech.dim} != model.audio_dim={cfg.model.audio_dim}")
    if vae.z_dim != cfg.model.in_channels:
        raise SystemExit(f"VAE z_dim={vae.z_dim} != model.in_channels={cfg.model.in_channels}")
    d = cfg.diffusion
    overrides = {k: v for k, v in dict(sample_steps=args.steps, chunk_blocks=args.chunk_blocks,
                                       window_blocks=args.window_blocks, ar_step=args.ar_step,
                                       cfg_audio=args.cfg_audio, sample_shift=args.shift).items() if v is not None}
    cfg.diffusion = replace(d, **overrides)
    s = cfg.model.vae_spatial_stride
    height = args.height or cfg.data.latent_height * s
    width = args.width or cfg.data.latent_width * s
    patch = cfg.model.patch_size
    if height % (s * patch[1]) or width % (s * patch[2]):
        raise SystemExit(f"--height/--width {height}x{width} must be multiples of {s * patch[1]}x{s * patch[2]}")
    return Pipeline(model, cfg, vae, speech, height, width)


def _bundle_part(bundle: str, sub: str, flag: str) -> str:
    p = Path(bundle) / sub
    if not p.is_dir():
        raise SystemExit(f"{bundle}: no {sub}/ folder in the bundle; pass {flag} PATH")
    return str(p)


def load_vector(path: Optional[str], dim: int, what: str) -> Optional[torch.Tensor]:
    """A ``.npy`` array or a text file of ``dim`` numbers -> [1, dim]."""
    if not path:
        return None
    arr = np.load(path, allow_pickle=False) if path.endswith(".npy") else np.loadtxt(path, ndmin=1)
    arr = np.asarray(arr, dtype=np.float32).reshape(-1)
    if arr.size != dim:
        raise SystemExit(f"{path}: {what} needs {dim} numbers, found {arr.size}")
    return torch.from_numpy(arr)[None]


def generate_one(pipe: Pipeline, job: Job, out: Path, args: argparse.Namespace,
                 save_latents: Optional[Path] = None) -> dict:
    """Generates one video; the mp4 is written to a temporary name and renamed when complete."""
    mcfg = pipe.cfg.model
    wave = load_audio(job.audio, AUDIO_SAMPLE_RATE)
    frames = args.frames or max(1, int(wave.numel() * mcfg.fps // AUDIO_SAMPLE_RATE))
    n_latent = num_latent_frames(frames, mcfg.vae_temporal_stride)
    n_covered = num_video_frames(n_latent, mcfg.vae_temporal_stride)  # >= frames
    covered = fit_length(wave, n_covered * AUDIO_SAMPLE_RATE // mcfg.fps)
    feats = pipe.speech.encode(covered, n_covered, mcfg.fps, mcfg.audio_rate // mcfg.fps)
    image = load_image(job.image, pipe.height, pipe.width)
    reference = pipe.vae.encode_image(image[None])
    inputs = SampleInputs(reference=reference, num_latent=n_latent, seeds=[args.seed], audio=feats[None],
                          kp_canonical=load_vector(args.kp_canonical, mcfg.kp_dim, "--kp-canonical"),
                          ref_motion=load_vector(args.ref_motion, mcfg.motion_dim, "--ref-motion"))
    sampler = ARSampler(pipe.model, pipe.cfg.diffusion, use_cache=not args.no_kv_cache)
    decoder = pipe.vae.decoder()
    track = fit_length(wave, frames * AUDIO_SAMPLE_RATE // mcfg.fps)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.stem + ".partial" + out.suffix)
    latents, motion = [], []
    written = 0
    n_chunks = len(plan_chunks(n_latent, mcfg.causal_block_size, pipe.cfg.diffusion.chunk_blocks))
    try:
        with Mp4Writer(partial, mcfg.fps, pipe.height, pipe.width, audio=track,
                       sample_rate=AUDIO_SAMPLE_RATE) as writer:
            for chunk in tqdm(sampler.generate(inputs), total=n_chunks, desc=job.name, unit="chunk",
                              disable=args.quiet):
                rgb = to_uint8_frames(decoder.decode(chunk.video)[0])[:frames - written]
                writer.write(rgb)
                written += len(rgb)
                if save_latents is not None:
                    latents.append(chunk.video[0].float().cpu())
                    if chunk.struct is not None:
                        motion.append(chunk.struct[0].float().cpu())
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if save_latents is not None:
        tensors = {"video_latent": torch.cat(latents, dim=1).contiguous()}
        if motion:
            tensors["struct"] = torch.cat(motion)[:frames].contiguous()
        save_latents.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(save_latents))
    return {"out": str(out), "frames": written, "latent_frames": n_latent,
            "seconds": written / mcfg.fps, "model_calls": sampler.stats.model_calls}


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
    model = ap.add_argument_group("model")
    src = model.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", help="inference bundle directory (checkpoints_conv.export_bundle)")
    src.add_argument("--random-preset", choices=RANDOM_PRESETS, help="random weights, tiny VAE and audio "
                                                                     "encoder (smoke tests; no downloads)")
    model.add_argument("--vae", help="diffusers AutoencoderKLWan folder (default: BUNDLE/vae)")
    model.add_argument("--audio-encoder", help="transformers HuBERT / wav2vec2 folder (default: BUNDLE/audio_encoder)")
    model.add_argument("--audio-layer", type=int, default=-1, help="hidden-state index of the audio encoder "
                                                                   "(-1 = last)")
    model.add_argument("--device", help="default: cuda when available")
    model.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    samp = ap.add_argument_group("sampling (defaults: the config's diffusion section)")
    samp.add_argument("--frames", type=int, help="video frames (default: the audio's length)")
    samp.add_argument("--height", type=int)
    samp.add_argument("--width", type=int)
    samp.add_argument("--steps", type=int, help="diffusion.sample_steps")
    samp.add_argument("--shift", type=float, help="diffusion.sample_shift")
    samp.add_argument("--chunk-blocks", type=int, help="diffusion.chunk_blocks")
    samp.add_argument("--window-blocks", type=int, help="diffusion.window_blocks (0 = unbounded)")
    samp.add_argument("--ar-step", type=int, help="diffusion.ar_step (0 = synchronous)")
    samp.add_argument("--cfg-audio", type=float, help="diffusion.cfg_audio (1 = no guidance)")
    samp.add_argument("--seed", type=int, default=0)
    samp.add_argument("--no-kv-cache", action="store_true", help="recompute the whole history every step "
                                                                 "(the reference path; slow)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.batch:
        if not args.out_dir or args.ref or args.audio or args.out:
            ap.error("--batch needs --out-dir and excludes --ref/--audio/--out")
    elif not (args.ref and args.audio and args.out):
        ap.error("give --ref, --audio and --out (or --batch and --out-dir)")
    if args.frames is not None and args.frames < 1:
        ap.error("--frames must be >= 1")
    if args.random_preset and (args.vae or args.audio_encoder):
        ap.error("--vae / --audio-encoder go with --bundle; --random-preset builds random ones")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    pipe = build_pipeline(args)
    if args.batch:
        jobs = parse_batch(args.batch)
        out_dir = Path(args.out_dir)
        targets = [(j, out_dir / f"{j.name}.mp4",
                    Path(args.save_latents) / f"{j.name}.safetensors" if args.save_latents else None) for j in jobs]
    else:
        job = Job(Path(args.ref), Path(args.audio), Path(args.out).stem)
        targets = [(job, Path(args.out), Path(args.save_latents) if args.save_latents else None)]
    failed = []
    for job, out, lat in targets:
        try:
            info = generate_one(pipe, job, out, args, lat)
        except (ValueError, OSError) as e:
            if not args.batch:
                raise
            log.error("%s (%s, %s): %s", job.name, job.image, job.audio, e)  # keep going with the others
            failed.append(job.name)
            continue
        print(f"{info['out']}: {info['frames']} frames ({info['seconds']:.2f} s), "
              f"{info['latent_frames']} latent frames, {info['model_calls']} model calls")
    if failed:
        print(f"{len(failed)} of {len(targets)} failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
