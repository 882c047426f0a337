"""FaceFormer's configuration: the sections ``model / data / train / parallel / run`` of a YAML file with
``run.task: faceformer`` (``launch/configs/faceformer.yaml``), through the same loader and ``--set``
overrides as DualForce's (``dualforce_mega.config``). ``train`` / ``parallel`` / ``run`` are the trainer's
own dataclasses (FaceFormer's defaults: the reference's Adam at 1e-4, batch 1, no clipping)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...config import ConfigError, ParallelConfig, RunConfig, TrainConfig, fill_sections, validate_train
from ...models.faceformer import FaceFormerModelConfig

TASK = "faceformer"
DATA_ROOT_ENV = "DATA_ROOT"
RANDOM_AUDIO_ENCODER = "random:tiny"
SPLITS = ("train", "val", "test")


@dataclass
class FaceFormerDataConfig:
    root: str = ""                        # DATA_ROOT; "" = the DATA_ROOT environment variable
    # JSON lists of records, relative to the data root (or absolute); the dataset name is the file's
    # stem without its _train / _val / _test suffix
    train: tuple[str, ...] = ("dataset_jsons/digital_human.json", "dataset_jsons/splits/MEAD_VHAP_train.json",
                              "dataset_jsons/splits/MultiModal200_train.json")
    val: tuple[str, ...] = ("dataset_jsons/splits/MEAD_VHAP_val.json", "dataset_jsons/splits/MultiModal200_val.json")
    test: tuple[str, ...] = ("dataset_jsons/splits/MEAD_VHAP_test.json", "dataset_jsons/splits/MultiModal200_test.json")
    fps: int = 25                         # every clip is resampled to this frame rate
    max_frames: int = 300                 # training / validation clips are cut to their first max_frames
    min_frames: int = 10                  # shorter clips are reported and skipped (wav2vec2's time masking)
    seed: int = 0                         # epoch shuffling

    def resolved_root(self) -> Path:
        root = self.root or os.environ.get(DATA_ROOT_ENV, "")
        if not root:
            raise ConfigError(f"data.root: empty and ${DATA_ROOT_ENV} is not set (the folder the JSON lists, "
                              f"audio and FLAME paths are relative to)")
        return Path(root)


@dataclass
class FaceFormerTrainConfig(TrainConfig):
    epochs: int = 200                     # > 0: train.steps = ceil(epochs x training clips / global_batch)
    val_every: int = 0                    # optimizer steps between validations; 0 = once per epoch
    lr: float = 1e-4
    global_batch: int = 1
    micro_batch: int = 1
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0             # constant learning rate (the reference's Adam)
    weight_decay: float = 0.0
    grad_clip: float = 0.0


@dataclass
class FaceFormerConfig:
    model: FaceFormerModelConfig = field(default_factory=FaceFormerModelConfig)
    data: FaceFormerDataConfig = field(default_factory=FaceFormerDataConfig)
    train: FaceFormerTrainConfig = field(default_factory=FaceFormerTrainConfig)
    parallel: ParallelConfig = field(default_factory=lambda: ParallelConfig(zero_stage=2))
    run: RunConfig = field(default_factory=lambda: RunConfig(dir="runs/faceformer", name=TASK, task=TASK))

    def to_dict(self) -> dict:
        from ...config import _to_plain
        return _to_plain(dataclasses.asdict(self))


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: FaceFormerConfig) -> None:
    m, d, p = cfg.model, cfg.data, cfg.parallel
    _require(m.motion_dim >= 2, "model.motion_dim", "must be >= 2 (expression + jaw)")
    _require(m.feature_dim > 0 and m.heads > 0 and m.feature_dim % m.heads == 0, "model.heads",
             f"heads={m.heads} must divide model.feature_dim={m.feature_dim}")
    _require(m.feature_dim % 2 == 0, "model.feature_dim", "must be even (sin / cos positional channels)")
    _require(m.layers >= 1, "model.layers", "must be >= 1")
    _require(m.period >= 1, "model.period", "must be >= 1")
    _require(m.audio_per_frame >= 1, "model.audio_per_frame", "must be >= 1")
    _require(m.flame_shape_components >= 0, "model.flame_shape_components", "must be >= 0")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    _require(d.fps > 0, "data.fps", "must be positive")
    _require(1 <= d.min_frames <= d.max_frames, "data.min_frames",
             f"must be in [1, data.max_frames={d.max_frames}]")
    _require(len(d.train) > 0, "data.train", "needs at least one JSON list")
    validate_train(cfg.train)
    _require(cfg.train.epochs >= 0, "train.epochs", "must be >= 0 (0: train.steps decides)")
    _require(cfg.train.val_every >= 0, "train.val_every", "must be >= 0 (0: once per epoch)")
    _require(p.sp == 1, "parallel.sp", "FaceFormer has no sequence parallelism (clips are <= a few hundred frames)")
    _require(p.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", "must be 0, 1, 2 or 3")
    _require(cfg.run.task == TASK, "run.task", f"{cfg.run.task!r}, expected {TASK!r}")


def build_config(raw: dict[str, dict[str, Any]], source: str) -> FaceFormerConfig:
    """``dualforce_mega.config.build_config`` for ``run.task: faceformer``."""
    cfg = fill_sections(FaceFormerConfig(), raw, source)
    validate(cfg)
    return cfg
