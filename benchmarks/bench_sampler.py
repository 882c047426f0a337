"""Sampler throughput: KV-cache vs full recomputation, side by side in one run.

    python -m benchmarks.bench_sampler --threads 1           # tiny model on CPU (~1 min)
    python -m benchmarks.bench_sampler --preset lite --device cuda --dtype bf16 --latent-hw 30 52

Generates ``--lengths`` latent frames (reference included) with random weights and prints
generated video frames per second for both history paths and their ratio. The recompute path
re-runs the whole history every step (O(L^2) work), so the ratio grows with the length.
"""
from __future__ import annotations

import argparse
import time
from typing import Optional

import torch

from dualforce_mega.config import DiffusionConfig, model_preset
from dualforce_mega.diffusion.sampler import ARSampler, SampleInputs
from dualforce_mega.models.dualforce import DualForceModel
from dualforce_mega.timeline import Timeline

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generation(model: DualForceModel, cfg: DiffusionConfig, inputs: SampleInputs, cache: bool,
                    device: torch.device) -> tuple[float, int, int]:
    """(seconds, model calls, largest history in bytes: KV cache or recomputed latents)."""
    sampler = ARSampler(model, cfg, use_cache=cache)
    _sync(device)
    t0 = time.perf_counter()
    for _ in sampler.generate(inputs):
        pass
    _sync(device)
    return time.perf_counter() - t0, sampler.stats.model_calls, max(sampler.stats.history_bytes)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="model preset (random weights)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 128], help="latent frames")
    ap.add_argument("--latent-hw", type=int, nargs=2, default=[8, 8])
    ap.add_argument("--steps", type=int, default=2, help="Euler steps per chunk (the default config uses 8)")
    ap.add_argument("--chunk-blocks", type=int, default=1)
    ap.add_argument("--window-blocks", type=int, default=0, help="0 = unbounded history")
    ap.add_argument("--ar-step", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default); "
                                                            "tiny CPU runs are fastest with 1")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    torch.manual_seed(0)
    model = DualForceModel(model_preset(args.preset)).to(device, dtype).eval()
    mcfg = model.cfg
    cfg = DiffusionConfig(sample_steps=args.steps, chunk_blocks=args.chunk_blocks,
                          window_blocks=args.window_blocks, ar_step=args.ar_step)
    h, w = args.latent_hw
    print(f"preset={args.preset} device={device} dtype={dtype} threads={torch.get_num_threads()} "
          f"latent={h}x{w} steps={args.steps} "
          f"chunk_blocks={args.chunk_blocks} window_blocks={args.window_blocks} ar_step={args.ar_step}")
    # warm-up (kernel selection, allocator) on a short clip, both paths
    warm = SampleInputs(torch.randn(1, mcfg.in_channels, h, w), 3, [0],
                        audio=torch.randn(1, Timeline.of(mcfg).audio_frames(3), mcfg.audio_dim))
    for cache in (True, False):
        time_generation(model, cfg, warm, cache, device)

    print(f"{'latent':>6} {'video':>6} | {'cache fps':>10} {'calls':>6} {'KV MiB':>7} | "
          f"{'recompute fps':>13} {'calls':>6} | ratio")
    for length in args.lengths:
        frames = Timeline.of(mcfg).video_frames(length)
        inputs = SampleInputs(torch.randn(1, mcfg.in_channels, h, w), length, [0],
                              audio=torch.randn(1, Timeline.of(mcfg).audio_frames(length), mcfg.audio_dim))
        t_c, calls_c, kv_bytes = time_generation(model, cfg, inputs, True, device)
        t_r, calls_r, _ = time_generation(model, cfg, inputs, False, device)
        print(f"{length:>6} {frames:>6} | {frames / t_c:>10.1f} {calls_c:>6} {kv_bytes / 2**20:>7.2f} | "
              f"{frames / t_r:>13.1f} {calls_r:>6} | {t_r / t_c:5.2f}x")


if __name__ == "__main__":
    main()
