"""Image + speech -> mp4 generation as a library: ``build_pipeline`` once, ``generate_one`` per pair.

``eval.generate`` is the command line around it; ``eval/run_eval`` can call it directly.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from dualforce_mega.config import Config, build_config
from dualforce_mega.diffusion.ar_schedule import plan_chunks
from dualforce_mega.data.normalization import Normalizer, parse_fields
from dualforce_mega.diffusion.sampler import ARSampler, SampleInputs
from dualforce_mega.encoders import AUDIO_SAMPLE_RATE, SpeechEncoder, WanVAE, tiny_audio_encoder, tiny_vae
from dualforce_mega.models.dualforce import DualForceModel
from dualforce_mega.preprocess.motion import MEDIAPIPE, MotionExtractorFn, build_motion_extractor, reference_motion
from dualforce_mega.timeline import Timeline

from .batch import Job
from dualforce_mega.media import Mp4Writer, fit_length, load_audio, load_image, to_uint8_frames

log = logging.getLogger(__name__)

RANDOM_PRESETS = ("tiny",)
BUNDLE_VAE_DIR = "vae"                 # optional sub-folders of a bundle
BUNDLE_AUDIO_DIR = "audio_encoder"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class PipelineSpec:
    bundle: Optional[str] = None           # inference bundle directory, or
    random_preset: Optional[str] = None    # random weights + tiny VAE / audio encoder (smoke tests)
    vae: Optional[str] = None              # AutoencoderKLWan folder (default: BUNDLE/vae)
    audio_encoder: Optional[str] = None    # HuBERT / wav2vec2 folder (default: BUNDLE/audio_encoder)
    audio_layer: int = -1                  # hidden-state index of the audio encoder
    motion_extractor: Optional[str] = None  # LivePortrait motion_extractor.pth or "mediapipe": kp_canonical
                                            # and the reference-frame motion from the reference image
    device: Optional[str] = None           # default: cuda when available
    dtype: str = "auto"                    # auto (bf16 on cuda, fp32 on cpu) | fp32 | bf16 | fp16
    height: Optional[int] = None           # pixels; default data.latent_height * vae stride
    width: Optional[int] = None
    diffusion: dict[str, Any] = field(default_factory=dict)  # DiffusionConfig field overrides
    weights: str = "auto"                  # bundle weights: auto (EMA when present) | ema | model (raw)


@dataclass
class Pipeline:
    model: DualForceModel
    cfg: Config
    vae: WanVAE
    speech: SpeechEncoder
    height: int
    width: int
    motion: Optional[MotionExtractorFn] = None
    normalizer: Normalizer = field(default_factory=Normalizer)   # the training data's motion statistics


@dataclass
class GenerateOptions:
    frames: Optional[int] = None                  # video frames; default: the audio's length
    seed: int = 0
    use_cache: bool = True                        # False: recompute reference path
    kp_canonical: Optional[torch.Tensor] = None   # [kp_dim]; zeros when unknown
    ref_motion: Optional[torch.Tensor] = None     # [motion_dim]; generated when unknown
    text_emb: Optional[torch.Tensor] = None       # [L, text_dim]
    save_latents: Optional[Path] = None           # safetensors: video_latent [C, F, h, w], struct [N, 70]
    progress: bool = True
    # write the mp4 in place as a fragmented mp4 (playable while it grows), sample with the static-shape
    # KV cache (CUDA graphs, captured by a short warm-up on CUDA) and report first-frame latency
    stream: bool = False
    on_chunk: Optional[Callable[[int], None]] = None  # called with the frames written so far after each chunk


def build_pipeline(spec: PipelineSpec) -> Pipeline:
    device = torch.device(spec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if spec.dtype != "auto" and spec.dtype not in DTYPES:
        raise ValueError(f"dtype={spec.dtype!r} is not one of auto, {', '.join(DTYPES)}")
    dtype = DTYPES[spec.dtype] if spec.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    if (spec.bundle is None) == (spec.random_preset is None):
        raise ValueError("give exactly one of bundle, random_preset")
    if spec.random_preset:
        if spec.random_preset not in RANDOM_PRESETS:
            raise ValueError(f"random_preset={spec.random_preset!r} is not one of {RANDOM_PRESETS}")
        if spec.vae or spec.audio_encoder:
            raise ValueError("vae / audio_encoder paths go with a bundle; a random preset builds random ones")
        torch.manual_seed(0)  # fixed random weights: outputs then depend on the sampling seed only
        cfg = build_config({"model": {"preset": spec.random_preset}})
        model = DualForceModel(cfg.model).to(device, dtype).eval()
        vae = WanVAE(tiny_vae(z_dim=cfg.model.in_channels).to(device, dtype))
        speech = SpeechEncoder(tiny_audio_encoder(cfg.model.audio_dim).to(device, dtype))
        normalizer = Normalizer()
    else:
        from dualforce_mega.bundle import load_bundle

        model, cfg, stats = load_bundle(spec.bundle, device, dtype, weights=spec.weights)
        fields = parse_fields(cfg.data.normalize)
        if stats is None and fields:
            log.warning("%s: no stats.json, but the model was trained on standardised %s: motion inputs and "
                        "outputs stay in the model's standardised units", spec.bundle, ", ".join(fields))
            fields = ()
        normalizer = Normalizer.from_stats(stats, fields, source=f"{spec.bundle}/stats.json")
        vae = WanVAE.from_pretrained(spec.vae or _bundle_part(spec.bundle, BUNDLE_VAE_DIR, "vae"), device, dtype)
        speech = SpeechEncoder.from_pretrained(
            spec.audio_encoder or _bundle_part(spec.bundle, BUNDLE_AUDIO_DIR, "audio_encoder"), device, dtype,
            layer=spec.audio_layer)
    if speech.dim != cfg.model.audio_dim:
        raise ValueError(f"audio encoder hidden size {speech.dim} != model.audio_dim={cfg.model.audio_dim}")
    if vae.z_dim != cfg.model.in_channels:
        raise ValueError(f"VAE z_dim={vae.z_dim} != model.in_channels={cfg.model.in_channels}")
    unknown = sorted(set(spec.diffusion) - set(cfg.diffusion.__dataclass_fields__))
    if unknown:
        raise ValueError(f"diffusion overrides: unknown keys {unknown}")
    cfg.diffusion = replace(cfg.diffusion, **spec.diffusion)
    s = cfg.model.vae_spatial_stride
    height = spec.height or cfg.data.latent_height * s
    width = spec.width or cfg.data.latent_width * s
    _, ph, pw = cfg.model.patch_size
    if height % (s * ph) or width % (s * pw):
        raise ValueError(f"height x width {height}x{width} must be multiples of {s * ph}x{s * pw} "
                         f"(VAE stride x patch size)")
    motion = None
    if spec.motion_extractor:
        motion = build_motion_extractor(None if spec.motion_extractor == MEDIAPIPE else spec.motion_extractor,
                                        device=str(device))
        if (motion.layout.dim, motion.layout.kp_dim) != (cfg.model.motion_dim, cfg.model.kp_dim):
            raise ValueError(f"motion extractor gives {motion.layout.dim}-d motion / {motion.layout.kp_dim}-d keypoints; "
                             f"the model needs motion_dim={cfg.model.motion_dim}, kp_dim={cfg.model.kp_dim}")
    return Pipeline(model, cfg, vae, speech, height, width, motion, normalizer)


def _bundle_part(bundle: str, sub: str, what: str) -> str:
    p = Path(bundle) / sub
    if not p.is_dir():
        raise FileNotFoundError(f"{bundle}: no {sub}/ folder in the bundle; give the {what} path explicitly")
    return str(p)


def load_array(path: str, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """A ``.npy`` array or a whitespace-separated text file with exactly ``prod(shape)`` numbers;
    a -1 in ``shape`` takes whatever is left."""
    arr = np.load(path, allow_pickle=False) if path.endswith(".npy") else np.loadtxt(path, ndmin=1)
    arr = np.asarray(arr, dtype=np.float32)
    try:
        return torch.from_numpy(arr.reshape(shape).copy())
    except ValueError:
        raise ValueError(f"{path}: {what} needs shape {shape}, found {arr.shape}") from None


def _batched(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t[None]


def generate_one(pipe: Pipeline, job: Job, out: Path, opts: GenerateOptions) -> dict:
    """Generates one video, streaming chunk by chunk. The mp4 is written under a temporary name
    and renamed when complete, so a failure never leaves (or overwrites with) a broken file; with
    ``opts.stream`` it is written in place, playable while it grows (fragmented mp4).

    Returned timings (s, from the start of sampling): ``reference_frame_s`` (chunk 0 written),
    ``first_frame_s`` (the first generated frames written), ``total_s``."""
    mcfg = pipe.cfg.model
    wave = load_audio(job.audio, AUDIO_SAMPLE_RATE)
    frames = opts.frames or max(1, int(wave.numel() * mcfg.fps // AUDIO_SAMPLE_RATE))
    tl = Timeline.of(mcfg)
    n_latent = tl.latent_frames_covering(frames)
    n_covered = tl.video_frames(n_latent)  # >= frames
    covered = fit_length(wave, n_covered * AUDIO_SAMPLE_RATE // mcfg.fps)
    feats = pipe.speech.encode(covered, n_covered, mcfg.fps, tl.audio_per_video_frame)
    image = load_image(job.image, pipe.height, pipe.width)
    reference = pipe.vae.encode_image(image[None])
    if pipe.motion is not None and (opts.kp_canonical is None or opts.ref_motion is None):
        # struct frame 0 and kp_canonical from the reference image (raw units; the sampler standardises)
        ref_motion, kp = reference_motion(pipe.motion, to_uint8_frames(image[:, None])[0])
        opts = replace(opts, kp_canonical=opts.kp_canonical if opts.kp_canonical is not None else torch.from_numpy(kp),
                       ref_motion=opts.ref_motion if opts.ref_motion is not None else torch.from_numpy(ref_motion))
    inputs = SampleInputs(reference=reference, num_latent=n_latent, seeds=[opts.seed], audio=feats[None],
                          kp_canonical=_batched(opts.kp_canonical), ref_motion=_batched(opts.ref_motion),
                          text_emb=_batched(opts.text_emb))
    sampler = ARSampler(pipe.model, pipe.cfg.diffusion, use_cache=opts.use_cache, static=opts.stream,
                        training_window=pipe.cfg.data.window, normalizer=pipe.normalizer)
    if opts.stream and next(pipe.model.parameters()).is_cuda:
        # the chunk forward is captured on the first chunk after the sink: do it before the clock starts
        warm = 1 + mcfg.causal_block_size * pipe.cfg.diffusion.chunk_blocks
        for _ in sampler.generate(replace(inputs, num_latent=min(n_latent, warm))):
            pass
    decoder = pipe.vae.decoder()
    track = fit_length(wave, frames * AUDIO_SAMPLE_RATE // mcfg.fps)
    out.parent.mkdir(parents=True, exist_ok=True)
    target = out if opts.stream else out.with_name(out.stem + ".partial" + out.suffix)
    latents, motion = [], []
    written = 0
    latency = {}
    chunks = plan_chunks(n_latent, mcfg.causal_block_size, pipe.cfg.diffusion.chunk_blocks)
    fragment = (chunks[1].end - chunks[1].start) * mcfg.vae_temporal_stride if opts.stream and len(chunks) > 1 else 0
    try:
        with Mp4Writer(target, mcfg.fps, pipe.height, pipe.width, audio=track, sample_rate=AUDIO_SAMPLE_RATE,
                       fragment_frames=fragment) as writer:
            start = time.perf_counter()
            for chunk in tqdm(sampler.generate(inputs), total=len(chunks), desc=job.name, unit="chunk",
                              disable=not opts.progress):
                rgb = to_uint8_frames(decoder.decode(chunk.video)[0])[:frames - written]
                writer.write(rgb)
                written += len(rgb)
                latency.setdefault("reference_frame_s" if chunk.start == 0 else "first_frame_s",
                                   time.perf_counter() - start)
                if opts.save_latents is not None:
                    latents.append(chunk.video[0].float().cpu())
                    if chunk.struct is not None:
                        motion.append(chunk.struct[0].float().cpu())
                if opts.on_chunk is not None:
                    opts.on_chunk(written)
            latency["total_s"] = time.perf_counter() - start
        if not opts.stream:
            os.replace(target, out)
    except BaseException:
        if opts.stream:  # the fragments written so far stay playable
            log.warning("%s: generation stopped after %d frames; the file holds them", out, written)
        else:
            target.unlink(missing_ok=True)
        raise
    if opts.save_latents is not None:
        tensors = {"video_latent": torch.cat(latents, dim=1).contiguous()}
        if motion:
            tensors["struct"] = torch.cat(motion)[:frames].contiguous()
        opts.save_latents.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(opts.save_latents))
    return {"out": str(out), "frames": written, "latent_frames": n_latent,
            "seconds": written / mcfg.fps, "model_calls": sampler.stats.model_calls, **latency}
