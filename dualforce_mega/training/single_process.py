"""Loss-only training in one process (no DeepSpeed): for tests, debugging and quick learnability checks.

    python -m dualforce_mega.training.single_process --steps 200 --set train.lr=1e-3 --set data.window=3

builds the configured model, prepares it like the trainer (``parallel.parallelize``), draws in-memory
synthetic clips (``data.synthetic_*``), cuts random windows with ``data.windowing.slice_window``
(docs/INTERFACES.md, Batches), and runs the trainer's training step (``training.step``) with torch's
AdamW (warmup + cosine learning rate as in the trainer), logging every ``train.log_every`` steps.
Each optimizer step takes one batch of ``train.global_batch`` samples (no gradient accumulation).
"""
from __future__ import annotations

import argparse
import logging
from typing import Iterable, Iterator, Optional, Sequence

import torch

from ..config import Config, add_config_arguments, config_from_args
from ..data.schema import ShardSchema
from ..data.synthetic import make_synthetic_clip
from ..data.normalization import Normalizer, parse_fields
from ..data.norm_stats import FieldStats
from ..data.windowing import reference_position, slice_window, window_starts
from ..diffusion.noise import mix_seed
from ..diffusion.objective import metrics_to_floats
from ..models import DualForceModel
from ..parallel.deepspeed_config import build_optimizer, resolve_precision
from ..parallel.parallelize import parallelize
from .schedule import lr_factor
from .step import TorchUpdater, TrainStep

log = logging.getLogger(__name__)


def clip_normalizer(clips: Sequence[tuple[dict[str, torch.Tensor], dict]], cfg: Config) -> Normalizer:
    """The statistics a shard set of these clips would carry (``data.normalize`` fields), as the loader uses them."""
    stats = FieldStats()
    for tensors, _ in clips:
        stats.update(tensors)
    return Normalizer.from_stats(stats.to_json(), parse_fields(cfg.data.normalize), source="synthetic clips")


def collate(samples: Sequence[dict[str, torch.Tensor]], keys: Sequence[str], indices: Sequence[int]) -> dict:
    batch: dict = {k: torch.stack([s[k] for s in samples]).float() for k in samples[0]}
    batch["__key__"] = list(keys)
    batch["__index__"] = torch.tensor(list(indices), dtype=torch.long)
    return batch


def synthetic_clips(cfg: Config) -> list[tuple[dict[str, torch.Tensor], dict]]:
    d = cfg.data
    return [make_synthetic_clip(i, d.synthetic_frames, (d.latent_height, d.latent_width), cfg.model, d.seed)
            for i in range(d.synthetic_clips)]


def window_batches(clips: Sequence[tuple[dict[str, torch.Tensor], dict]], cfg: Config, batch_size: int
                   ) -> Iterator[dict]:
    """Endless batches of random windows of ``data.window`` latent frames, deterministic in ``data.seed``.

    Sample ``i`` of the stream (its ``__index__``) picks its clip and window start from its own seed.
    """
    window = cfg.data.window
    schema = ShardSchema.from_model(cfg.model)
    keep_text = cfg.model.text_dim > 0
    normalizer = clip_normalizer(clips, cfg)
    index = 0
    while True:
        samples, keys, indices = [], [], []
        for _ in range(batch_size):
            g = torch.Generator().manual_seed(mix_seed(cfg.data.seed, index))
            tensors, meta = clips[int(torch.randint(len(clips), (1,), generator=g))]
            starts = window_starts(tensors["video_latent"].shape[1], window, tensors.get("ref_positions"))
            t0 = starts[int(torch.randint(len(starts), (1,), generator=g))]
            refs = tensors.get("ref_positions", torch.tensor([t0])).tolist()
            ref = reference_position(cfg.data.seed, index, meta.get("key", ""), t0, refs, cfg.data.ref_elsewhere_prob)
            samples.append(normalizer.apply(slice_window(tensors, t0, window, schema, keep_text, ref)))
            keys.append(f"{meta.get('key', index)}@{t0}")
            indices.append(index)
            index += 1
        yield collate(samples, keys, indices)


def build_model(cfg: Config) -> DualForceModel:
    """The configured model, initialised from ``train.seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return DualForceModel(cfg.model)


def train_single_process(cfg: Config, batches: Iterable[dict], steps: Optional[int] = None,
                         model: Optional[DualForceModel] = None, device: str = "cpu") -> list[dict[str, float]]:
    """Run ``steps`` (default ``train.steps``) AdamW steps; returns each step's metrics
    (``step``, ``lr``, ``grad_norm`` and the objective's ``loss*`` metrics)."""
    t = cfg.train
    steps = t.steps if steps is None else steps
    dev = torch.device(device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[resolve_precision(cfg, dev.type)]
    model = model or build_model(cfg)
    prepared = parallelize(model, cfg, dev, dtype)
    model.train()
    opt = build_optimizer(model, t, dev)
    train_step = TrainStep(cfg, model, TorchUpdater(model, opt, t.grad_clip), dev, dtype, prepared.fp8)
    history: list[dict[str, float]] = []
    it = iter(batches)
    for step in range(steps):
        lr = t.lr * lr_factor(step, t.warmup_steps, steps, t.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        grad_norm = train_step([next(it)], step)
        metrics = metrics_to_floats({**train_step.last.metrics, "grad_norm": grad_norm})
        metrics.update(step=step, lr=lr)
        history.append(metrics)
        if t.log_every and step % t.log_every == 0:
            log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step"))
    return history


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_arguments(p)
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tail", type=int, default=20, help="steps averaged for the first/last summary")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    clips = synthetic_clips(cfg)
    history = train_single_process(cfg, window_batches(clips, cfg, cfg.train.global_batch), args.steps,
                                   device=args.device)
    if not history:
        return
    k = max(1, min(args.tail, len(history) // 2))
    for name in sorted(n for n in history[0] if n.startswith("loss") and "sigma" not in n):
        first = sum(h[name] for h in history[:k]) / k
        last = sum(h[name] for h in history[-k:]) / k
        print(f"{name}: first{k} {first:.4f} last{k} {last:.4f} change {100 * (last - first) / first:+.1f}%")


if __name__ == "__main__":
    main()
