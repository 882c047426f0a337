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
from .diffusion.objective import metrics_to_floats
from .parallel.deepspeed_config import build_optimizer
from .summary import count_parameters
from .training.step import TorchUpdater, TrainStep
from .timeline import Timeline

log = logging.getLogger("dualforce_mega.smoke")


def random_batch(cfg: Config, batch: int, frames: int, height: int, width: int, text_tokens: int,
                 generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """Clean data in the batch layout of docs/INTERFACES.md (``frames`` latent frames; ``__index__``
    0..batch-1 on the host)."""
    m = cfg.model
    tl = Timeline.of(m)
    n = tl.video_frames(frames)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device)

    out = {"video_latent": rnd(batch, m.in_channels, frames, height, width), "struct": rnd(batch, n, m.motion_dim),
           "kp_canonical": rnd(batch, m.kp_dim), "audio": rnd(batch, tl.audio_frames(frames), m.audio_dim),
           "flame": rnd(batch, n, m.flame_dim)}
    if m.text_dim > 0:
        out["text_emb"] = rnd(batch, text_tokens, m.text_dim)
    out["__index__"] = torch.arange(batch)
    return out


def smoke_step(train_step: TrainStep, data: dict[str, torch.Tensor], step: int) -> dict[str, float]:
    """One step of the trainer's training step (real objective: per-block sigma, frame 0 clean, every
    weighted loss) that also checks, before the update, that every trainable parameter got a gradient
    and that the losses and the gradient norm are finite."""
    res = train_step.micro(data, step)
    missing = [name for name, p in train_step.model.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise RuntimeError(f"{len(missing)} trainable parameters got no gradient, e.g. {missing[:5]}")
    grad_norm = train_step.updater.update()
    metrics = metrics_to_floats({**res.metrics, "grad_norm": grad_norm})
    if not all(math.isfinite(v) for v in metrics.values()):
        raise RuntimeError(f"non-finite loss or gradient: {metrics}")
    return metrics


def run(cfg: Config, steps: int, batch: int, frames: int, height: int, width: int, text_tokens: int,
        device: torch.device) -> list[dict[str, float]]:
    from .models import DualForceModel
    from .parallel.parallelize import TrainShape, parallelize

    torch.manual_seed(cfg.train.seed)
    model = DualForceModel(cfg.model)
    counts = count_parameters(model.named_parameters())
    log.info("model preset=%s on %s: %s trainable parameters (%s)", cfg.model.preset, device,
             f"{counts['total_trainable']:,}", ", ".join(f"{k}={v:,}" for k, v in counts.items()
                                                        if k != "total_trainable"))
    dtype = torch.float32
    prepared = parallelize(model, cfg, device, dtype, shape=TrainShape(batch, frames, (height, width), text_tokens))
    model.train()
    optimizer = build_optimizer(model, cfg.train, device)
    train_step = TrainStep(cfg, model, TorchUpdater(model, optimizer, cfg.train.grad_clip), device, dtype,
                           prepared.fp8)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    data = random_batch(cfg, batch, frames, height, width, text_tokens, gen, device)
    history = []
    for step in range(steps):
        t0 = time.perf_counter()
        metrics = smoke_step(train_step, data, step)
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
