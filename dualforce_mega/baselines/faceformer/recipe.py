"""FaceFormer as a task of the project's trainer (``training.recipe``): the same DeepSpeed engine,
checkpoints, resume, metrics and launch scripts as DualForce; this file says what differs.

* data: rank 0 reads the training and validation JSON lists once (every broken record logged as
  ``file: field: why`` and listed in ``RUN/skipped_records.jsonl``) and hands the clips to the other ranks;
  the style vocabulary (``model.subjects``) is the sorted training subjects unless configured, and
  ``train.epochs > 0`` sets ``train.steps = ceil(epochs x clips / global_batch)``. Both go into the run's
  resolved ``config.yaml``, which inference reads.
* step: teacher-forced prediction of the 51-d motion, loss on FLAME vertices (``objective.VertexLoss``).
* validation every ``train.val_every`` steps (0: once per epoch) and at the end: the teacher-forced vertex
  loss over all validation clips (split over ranks, reduced as sum / count); a new best is written to
  ``RUN/best/model.safetensors`` (``best.py``). Without validation clips the last model is the best.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ...config import ConfigError
from ...fsutil import atomic_write
from ...models.fp8 import FP8State
from .best import best_val_loss, save_best
from .build import build_flame, build_model
from .config import RANDOM_AUDIO_ENCODER, FaceFormerConfig
from .data import Clip, Problem, load_split
from .feed import EpochFeed, validation_batches
from .objective import VertexLoss

MODEL_INPUTS = ("audio", "audio_len", "frames", "motion", "style")
SKIPPED_FILE = "skipped_records.jsonl"

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Targets:
    motion: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device) -> "Targets":
        return Targets(self.motion.to(device), self.mask.to(device))


class FaceFormerObjective:
    """The training step's objective (``prepare`` / ``loss_terms``): no noise, so the per-sample seeds are
    unused; the model is called as ``model(**inputs)``; metrics stay device tensors."""

    def __init__(self, cfg: FaceFormerConfig, device: torch.device):
        self.loss = VertexLoss(build_flame(cfg.model), cfg.model.vertex_scale).to(device)

    def prepare(self, batch: dict[str, Any], seeds: Any = None) -> tuple[dict[str, torch.Tensor], Targets]:
        return {k: batch[k] for k in MODEL_INPUTS}, Targets(batch["motion"], batch["mask"])

    def loss_terms(self, out: torch.Tensor, targets: Targets) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.loss(out, targets.motion, targets.mask)



def _check_file(path: str, key: str) -> None:
    if path and path != RANDOM_AUDIO_ENCODER and not Path(path).exists():
        raise ConfigError(f"{key}: {path} not found")


class FaceFormerRecipe:
    name = "faceformer"
    derived_keys = ("model.subjects",)

    @staticmethod
    def known_steps(cfg: FaceFormerConfig) -> Optional[int]:
        return None if cfg.train.epochs > 0 else cfg.train.steps

    def __init__(self) -> None:
        self.train_clips: list[Clip] = []
        self.val_clips: list[Clip] = []
        self.best: Optional[float] = None

    # ------------------------------------------------------------------ before any rank starts
    def check(self, cfg: FaceFormerConfig, world: int) -> None:
        """Config-level checks (preflight): data root, JSON lists and weight paths exist."""
        root = cfg.data.resolved_root()
        if not root.is_dir():
            raise ConfigError(f"data.root: {root} is not a directory")
        for split in ("train", "val"):
            for name in getattr(cfg.data, split):
                p = Path(name) if Path(name).is_absolute() else root / name
                if not p.is_file():
                    raise ConfigError(f"data.{split}: {p} not found")
        _check_file(cfg.model.audio_encoder, "model.audio_encoder")
        if not cfg.model.audio_encoder:
            raise ConfigError(f"model.audio_encoder: empty (a wav2vec2 folder or {RANDOM_AUDIO_ENCODER})")
        if not cfg.model.flame_model:
            raise ConfigError("model.flame_model: empty (FLAME's generic_model.pkl or an .npz)")
        _check_file(cfg.model.flame_model, "model.flame_model")

    # ------------------------------------------------------------------ on every rank
    def prepare(self, cfg: FaceFormerConfig, rank: int) -> FaceFormerConfig:
        """Collective. Reads the data (rank 0), shares it, and returns the resolved config."""
        d, m = cfg.data, cfg.model
        payload: list[Any] = [None]
        if rank == 0:
            root = d.resolved_root()
            train, bad_train = load_split(d.train, root, d.fps, m.expr_dims, d.min_frames, d.max_frames)
            val, bad_val = load_split(d.val, root, d.fps, m.expr_dims, d.min_frames, d.max_frames)
            self._write_skipped(Path(cfg.run.dir), bad_train + bad_val)
            payload = [(train, val)]
            log.info("faceformer data: %d training clips (%d frames), %d validation clips; %d records skipped",
                     len(train), sum(c.frames for c in train), len(val), len(bad_train) + len(bad_val))
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(payload, src=0)
        self.train_clips, self.val_clips = payload[0]
        if not self.train_clips:
            raise ConfigError(f"data.train: no usable training clips in {list(d.train)} (see the skipped records)")
        subjects = tuple(sorted({c.record.subject for c in self.train_clips}))
        if m.subjects:
            unknown = sorted(set(subjects) - set(m.subjects))
            if unknown:
                raise ConfigError(f"model.subjects: training subjects {unknown} are not in the configured list")
            subjects = tuple(m.subjects)
        t = cfg.train
        steps = math.ceil(t.epochs * len(self.train_clips) / t.global_batch) if t.epochs > 0 else t.steps
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(m, subjects=subjects),
                                  train=dataclasses.replace(t, steps=steps))
        self.best = best_val_loss(Path(cfg.run.dir))
        return cfg

    @staticmethod
    def _write_skipped(run_dir: Path, problems: list[Problem]) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / SKIPPED_FILE, "".join(json.dumps(p._asdict()) + "\n" for p in problems))

    def build_model(self, cfg: FaceFormerConfig) -> nn.Module:
        return build_model(cfg.model)

    def parallelize(self, model: nn.Module, cfg: FaceFormerConfig, device: torch.device, dtype: torch.dtype,
                    groups: Any) -> FP8State:
        """No sequence parallelism or FP8 (a 1-layer, 64-wide decoder; wav2vec2-base): device and dtype."""
        model.to(device=device, dtype=dtype)
        return FP8State()

    def objective(self, cfg: FaceFormerConfig, device: torch.device) -> FaceFormerObjective:
        return FaceFormerObjective(cfg, device)

    def model_kwargs(self, cfg: FaceFormerConfig) -> dict[str, Any]:
        return {}

    def tokens(self, cfg: FaceFormerConfig, inputs: dict[str, torch.Tensor]) -> int:
        """Decoder tokens of a micro batch: its real frames."""
        return int(inputs["frames"].sum())

    def flops_per_sample(self, cfg: FaceFormerConfig, inputs: dict[str, torch.Tensor]) -> Optional[float]:
        return None     # no analytic count for wav2vec2 here: no MFU in the metrics

    def describe(self, cfg: FaceFormerConfig) -> str:
        m = cfg.model
        return (f"faceformer (layers {m.layers}, dim {m.feature_dim}, heads {m.heads}, period {m.period}, "
                f"{len(m.subjects)} styles, audio {m.audio_encoder})")

    def feed(self, cfg: FaceFormerConfig, dp_rank: int, dp_size: int, accum: int) -> EpochFeed:
        t = cfg.train
        return EpochFeed(self.train_clips, cfg.model.subjects, cfg.data.seed, t.global_batch, t.micro_batch,
                         dp_rank, dp_size, accum)

    def steps_per_epoch(self, cfg: FaceFormerConfig) -> int:
        return max(1, math.ceil(len(self.train_clips) / cfg.train.global_batch))

    def validates_at(self, cfg: FaceFormerConfig, step: int) -> bool:
        every = cfg.train.val_every or self.steps_per_epoch(cfg)
        return step % every == 0 or step == cfg.train.steps

    @torch.no_grad()
    def validation_loss(self, cfg: FaceFormerConfig, engine: Any, objective: FaceFormerObjective,
                        device: torch.device, dtype: torch.dtype, rank: int, world: int) -> Optional[float]:
        """Collective: the teacher-forced vertex loss over every validation clip (None without any)."""
        if not self.val_clips:
            return None
        m = cfg.model
        fallback = m.subjects[0]
        totals = torch.zeros(2, dtype=torch.float64, device=device)
        engine.eval()
        try:
            for batch in validation_batches(self.val_clips, m.subjects, rank, world, cfg.train.micro_batch, fallback):
                inputs, targets = objective.prepare(batch)
                inputs = {k: v.to(device).to(dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
                total, count = objective.loss.sums(engine(**inputs), *dataclasses.astuple(targets.to(device)))
                totals += torch.stack([total.double(), count.double()])
        finally:
            engine.train()
        if dist.is_initialized():
            dist.all_reduce(totals)
        return float(totals[0] / totals[1].clamp_min(1))

    def after_step(self, cfg: FaceFormerConfig, step: int, engine: Any, objective: FaceFormerObjective,
                   device: torch.device, dtype: torch.dtype, rank: int, world: int) -> dict[str, float]:
        """Validation and the best model at this step's boundary; the metrics to log."""
        if not self.validates_at(cfg, step):
            return {}
        val = self.validation_loss(cfg, engine, objective, device, dtype, rank, world)
        if val is None:
            if step == cfg.train.steps:   # nothing to compare: the final model is the one to use
                save_best(engine.module, Path(cfg.run.dir), step, math.nan, rank)
            return {}
        if self.best is None or val < self.best:
            self.best = val
            save_best(engine.module, Path(cfg.run.dir), step, val, rank)
        return {"val_loss": val, "best_val_loss": self.best}
