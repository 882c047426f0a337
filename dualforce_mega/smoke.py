"""Forward + backward smoke run of the full DualForce model on a random batch.

    python -m dualforce_mega.smoke [--preset tiny] [--steps 1] [--set model.key=value ...]

Builds the model from the config (both towers, bridge, audio, text when ``model.text_dim`` > 0),
draws one random batch in the shapes of docs/INTERFACES.md, and runs optimizer steps with the
training objective (``DiffusionForcingObjective``: every weighted loss, per-block sigma). It fails
(non-zero exit) if a loss or gradient is not finite or if a trainable parameter receives no gradient.
``run.sh`` falls back to this when the launch script is absent; it needs no data and no weights.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from typing import Optional

import torch

from .config import Config, ConfigError, add_config_arguments, config_from_args
from .diffusion.noise import sample_seeds
from .diffusion.objective import DiffusionForcingObjective
from .summary import count_parameters

log = logging.getLogger("dualforce_mega.smoke")


def random_batch(cfg: Config, batch: int, frames: int, height: int, width: int, text_tokens: int,
                 generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """Clean data in the batch layout of docs/INTERFACES.md (``frames`` latent frames)."""
    m = cfg.model
    n = 1 + m.vae_temporal_stride * (frames - 1)          # video frames covered by the latent frames
    per_video_frame = m.audio_rate // m.fps

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device)

    out = {"video_latent": rnd(batch, m.in_channels, frames, height, width), "struct": rnd(batch, n, m.motion_dim),
           "kp_canonical": rnd(batch, m.kp_dim), "audio": rnd(batch, n * per_video_frame, m.audio_dim),
           "flame": rnd(batch, n, m.flame_dim)}
    if m.text_dim > 0:
        out["text_emb"] = rnd(batch, text_tokens, m.text_dim)
    return out


def smoke_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, objective: DiffusionForcingObjective,
               data: dict[str, torch.Tensor], seeds: torch.Tensor) -> dict[str, float]:
    """One training step with the real objective (per-block sigma, frame 0 clean, every weighted loss),
    then checks that every trainable parameter got a finite gradient."""
    inputs, targets = objective.prepare(data, seeds)
    out = model(**inputs, return_aux=True)
    loss, metrics = objective.losses(out, targets.to(data["video_latent"].device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_sq = 0.0
    missing = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            missing.append(name)
            continue
        grad_sq += p.grad.float().pow(2).sum().item()
    if missing:
        raise RuntimeError(f"{len(missing)} trainable parameters got no gradient, e.g. {missing[:5]}")
    metrics["grad_norm"] = math.sqrt(grad_sq)
    if not all(math.isfinite(v) for v in metrics.values()):
        raise RuntimeError(f"non-finite loss or gradient: {metrics}")
    optimizer.step()
    return metrics


def run(cfg: Config, steps: int, batch: int, frames: int, height: int, width: int, text_tokens: int,
        device: torch.device) -> list[dict[str, float]]:
    from .models import DualForceModel

    torch.manual_seed(cfg.train.seed)
    model = DualForceModel(cfg.model).to(device)
    model.train()
    counts = count_parameters(model.named_parameters())
    log.info("model preset=%s on %s: %s trainable parameters (%s)", cfg.model.preset, device,
             f"{counts['total_trainable']:,}", ", ".join(f"{k}={v:,}" for k, v in counts.items()
                                                        if k != "total_trainable"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                  eps=cfg.train.adam_eps, weight_decay=cfg.train.weight_decay)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    data = random_batch(cfg, batch, frames, height, width, text_tokens, gen, device)
    objective = DiffusionForcingObjective(cfg)
    history = []
    for step in range(steps):
        t0 = time.perf_counter()
        seeds = sample_seeds(cfg.train.seed, step, torch.arange(batch))
        metrics = smoke_step(model, optimizer, objective, data, seeds)
        metrics["step_s"] = time.perf_counter() - t0
        history.append(metrics)
        log.info("step %d/%d: %s", step + 1, steps, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return history


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dualforce_mega.smoke", description=__doc__.split("\n")[0])
    add_config_arguments(parser, preset=True)
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps on the same batch")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--frames", type=int, default=3, help="latent frames (frame 0 is the clean reference)")
    parser.add_argument("--height", type=int, default=None, help="latent height (default: data.latent_height)")
    parser.add_argument("--width", type=int, default=None, help="latent width (default: data.latent_width)")
    parser.add_argument("--text-tokens", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.steps < 1 or args.batch < 1 or args.frames < 2:
        parser.error("--steps and --batch must be >= 1 and --frames >= 2 (reference frame + one noisy frame)")
    run(cfg, args.steps, args.batch, args.frames, args.height or cfg.data.latent_height,
        args.width or cfg.data.latent_width, args.text_tokens, torch.device(args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
