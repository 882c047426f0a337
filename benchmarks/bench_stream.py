"""Streaming generation speed: static-shape KV cache (CUDA graphs) vs the growing KV cache vs
recomputation, and first-frame latency, side by side in one run (random weights).

    python benchmarks/bench_stream.py                   # GPU: lite, 512^2 (64x64 latents), 8 steps
    python benchmarks/bench_stream.py --cpu-smoke       # tiny shapes on CPU

Rows (all the same sampler semantics; the three paths agree to rounding):
  cached     the growing per-layer ``KVCache`` (the previous configuration), eager model calls
  static     ``StaticKVCache`` + ``StaticForward``: chunk forward captured once (CUDA graphs), replayed
  recompute  the reference: the whole history re-run every pass (merged attention: no recompiles)

With ``--cfg-audio`` != 1 each path runs once per ``--cfg-modes`` entry: ``batched`` (both guidance
branches as one forward of batch 2B, one cache; the default) and ``two-call`` (a forward of batch B per
branch, a cache each; rows named ``<path> two-call``), and the batched / two-call speed-up is printed.

``fps`` counts generated video frames per second of sampling (reference chunk included, VAE decode
excluded); ``first frame`` is the time from the start of sampling to the first generated chunk's
latents (after warm-up: model load, kernel selection, graph capture); ``KV MiB`` the largest cache.
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch

from common import bench_device, device_name, dump_json, fmt, markdown_table  # noqa: I100
from dualforce_mega.config import DiffusionConfig, model_preset
from dualforce_mega.diffusion.sampler import ARSampler, SampleInputs
from dualforce_mega.models.dualforce import DualForceModel
from dualforce_mega.timeline import Timeline

log = logging.getLogger("bench_stream")


@dataclass
class Row:
    path: str
    latent_frames: int
    video_frames: int
    seconds: Optional[float] = None
    fps: Optional[float] = None
    ms_per_call: Optional[float] = None
    first_frame_s: Optional[float] = None
    kv_mib: Optional[float] = None
    note: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_inputs(model: DualForceModel, num_latent: int, hw: tuple[int, int], device: torch.device,
                  seed: int = 0) -> SampleInputs:
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    n_video = Timeline(stride=cfg.vae_temporal_stride).video_frames(num_latent)
    return SampleInputs(reference=torch.randn(1, cfg.in_channels, *hw, generator=g), num_latent=num_latent,
                        seeds=[seed],
                        audio=torch.randn(1, n_video * cfg.audio_rate // cfg.fps, cfg.audio_dim, generator=g),
                        kp_canonical=torch.randn(1, cfg.kp_dim, generator=g) if model.struct is not None else None)


def time_generation(sampler: ARSampler, inputs: SampleInputs, device: torch.device) -> tuple[Row, torch.Tensor]:
    """Seconds, first generated chunk latency, calls and cache size of one generation; the last chunk."""
    _sync(device)
    start = time.perf_counter()
    first = None
    for chunk in sampler.generate(inputs):
        if first is None and chunk.start > 0:
            _sync(device)
            first = time.perf_counter() - start
    _sync(device)
    seconds = time.perf_counter() - start
    frames = Timeline(stride=sampler.model.cfg.vae_temporal_stride).video_frames(inputs.num_latent)
    stats = sampler.stats
    return Row("", inputs.num_latent, frames, seconds, frames / seconds, 1e3 * seconds / max(stats.model_calls, 1),
               first, max(stats.history_bytes) / 2 ** 20), chunk.video


CFG_MODES = {"batched": True, "two-call": False}   # --cfg-modes entry -> diffusion.cfg_batched


def row_name(path: str, mode: str) -> str:
    return path if mode == "batched" else f"{path} {mode}"


def run_path(name: str, model: DualForceModel, cfg: DiffusionConfig, hw: tuple[int, int], num_latent: int,
             device: torch.device, **sampler_kw) -> tuple[Row, torch.Tensor]:
    sampler = ARSampler(model, cfg, **sampler_kw)
    # warm-up on a short clip with the same sampler: kernel choice, cuDNN plans, graph capture
    warm = 1 + 2 * model.cfg.causal_block_size * cfg.chunk_blocks
    time_generation(sampler, sample_inputs(model, min(warm, num_latent), hw, device, seed=1), device)
    row, last = time_generation(sampler, sample_inputs(model, num_latent, hw, device), device)
    row.path = name
    if sampler.static:
        forwards = sampler._forwards.values()
        row.note = f"{sum(f.replays for f in forwards)} graph replays"
        flat = len(set(sampler.stats.history_bytes[1:])) <= 1
        row.note += ", cache flat" if flat else ", cache GREW"
    return row, last


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="lite")
    p.add_argument("--latent-hw", type=int, nargs=2, default=[64, 64], help="latent size (512^2 video: 64 64)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--window-blocks", type=int, default=4)
    p.add_argument("--chunk-blocks", type=int, default=1)
    p.add_argument("--cfg-audio", type=float, default=1.0, help="1 = no guidance (one branch)")
    p.add_argument("--cfg-modes", default="batched",
                   help=f"with --cfg-audio != 1: comma list of {'/'.join(CFG_MODES)}, each path runs per mode")
    p.add_argument("--latent-frames", type=int, default=9, help="clip length for cached / static")
    p.add_argument("--recompute-frames", type=int, default=5, help="clip length for recompute (O(L^2))")
    p.add_argument("--paths", default="cached,static,recompute")
    p.add_argument("--json", default="")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, 8x8 latents, 2 steps, CPU")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.preset, args.latent_hw, args.steps, args.latent_frames, args.recompute_frames = "tiny", [4, 4], 1, 4, 3
        torch.set_num_threads(1)  # tiny shapes: one thread is fastest
    args.paths = [x for x in args.paths.split(",") if x]
    args.cfg_modes = [x for x in args.cfg_modes.split(",") if x] if args.cfg_audio != 1.0 else ["batched"]
    unknown = set(args.cfg_modes) - set(CFG_MODES)
    if unknown:
        p.error(f"--cfg-modes: unknown {sorted(unknown)}; choose from {list(CFG_MODES)}")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    device, dtype = bench_device(args.cpu_smoke)
    torch.manual_seed(0)
    with torch.device(device):
        model = DualForceModel(model_preset(args.preset)).to(dtype).eval()
    hw = tuple(args.latent_hw)
    cfgs = {m: DiffusionConfig(sample_steps=args.steps, chunk_blocks=args.chunk_blocks,
                               window_blocks=args.window_blocks, cfg_audio=args.cfg_audio, cfg_batched=CFG_MODES[m])
            for m in args.cfg_modes}
    print(f"# streaming generation — {device_name(device)}, {str(dtype).replace('torch.', '')}, preset {args.preset}, "
          f"latent {hw[0]}x{hw[1]}, {args.steps} steps, window {args.window_blocks} blocks, "
          f"chunk {args.chunk_blocks} block(s), cfg_audio {args.cfg_audio} ({'/'.join(args.cfg_modes)})", flush=True)
    kw = {"cached": dict(use_cache=True), "static": dict(static=True), "recompute": dict(use_cache=False)}
    rows, last = [], {}
    for path in args.paths:
        length = args.recompute_frames if path == "recompute" else args.latent_frames
        for mode in args.cfg_modes:
            name = row_name(path, mode)
            try:
                row, last[name] = run_path(name, model, cfgs[mode], hw, length, device, **kw[path])
                # same inputs (recompute runs a shorter clip): the paths and the CFG modes must agree
                peers = [row_name(path, "batched")] + ([row_name("cached", mode)] if path != "recompute" else [])
                other = next((r for r in peers if r != name and r in last), None)
                if other is not None:
                    diff = float((last[name].float() - last[other].float()).abs().max())
                    row.note = ", ".join(filter(None, [row.note, f"last chunk vs {other}: max abs diff {diff:.1e}"]))
            except RuntimeError as err:  # keep the table going (OOM, a capture failure)
                row = Row(name, length, Timeline(stride=model.cfg.vae_temporal_stride).video_frames(length),
                          note=f"failed: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
            rows.append(row)
            print(f"# {name}: {fmt(row.fps)} video frames/s, {fmt(row.ms_per_call)} ms/call, first frame "
                  f"{fmt(row.first_frame_s)} s {row.note}", flush=True)
    print(markdown_table(["path", "latent", "video", "s", "fps", "ms/call", "first frame s", "KV MiB", "note"],
                         [[r.path, str(r.latent_frames), str(r.video_frames), fmt(r.seconds), fmt(r.fps),
                           fmt(r.ms_per_call), fmt(r.first_frame_s), fmt(r.kv_mib), r.note] for r in rows]))
    by = {r.path: r for r in rows}
    if by.get("static") and by.get("cached") and by["static"].fps and by["cached"].fps:
        print(f"# static / cached speed-up: {by['static'].fps / by['cached'].fps:.2f}x")
    cfg_speedup = {}
    for path in args.paths:
        batched, two = by.get(path), by.get(row_name(path, "two-call"))
        if batched and two and batched.fps and two.fps:
            cfg_speedup[path] = batched.fps / two.fps
            print(f"# audio CFG batched / two-call speed-up, {path}: {cfg_speedup[path]:.2f}x")
    dump_json(args.json, {"device": device_name(device), "rows": rows, "cfg_speedup": cfg_speedup})


if __name__ == "__main__":
    main()
