"""What the trainer trains: a recipe supplies the task-specific parts, the trainer does the rest (DeepSpeed
engine, data-parallel batch layout, checkpoints and resume, metrics, launch scripts).

A recipe (``run.task`` picks it; DualForce by default) provides

* ``check(cfg, world)``                   config-level checks before any rank starts (preflight);
* ``derived_keys``, ``known_steps(cfg)``   model keys ``prepare`` fills in from the data (left empty they
                                          are not compared with a resumed run's), and ``train.steps`` when
                                          known before the data is read (else None);
* ``prepare(cfg, rank) -> cfg``           collective: locate / read the data, return the resolved config
                                          (saved as the run's config.yaml);
* ``build_model(cfg)``                    the model (the trainer seeds it identically on every rank);
* ``parallelize(model, cfg, device, dtype, groups)`` -> FP8 state: device, dtype and the rest, before the
                                          optimizer exists;
* ``objective(cfg, device)``              ``prepare(batch, seeds) -> (inputs, targets)`` and
                                          ``loss_terms(out, targets) -> (loss, metrics as device tensors)``;
                                          the training step (training/step.py) calls the model
                                          as ``model(**inputs, **recipe.model_kwargs(cfg))``;
* ``feed(cfg, dp_rank, dp_size, accum)``  micro batches (``next(micro)``, ``state_dict``, ``load_state_dict``)
                                          with the same samples per optimizer step whatever the world size;
* ``tokens(cfg, inputs)``, ``flops_per_sample(cfg, inputs)``  throughput accounting (flops may be None);
* ``after_step(...) -> metrics``          work at an optimizer-step boundary (validation, best model);
* ``describe(cfg)``                       the start-up log line's model part.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from ..config import Config, ConfigError
from ..parallel.groups import Groups


class DualForceRecipe:
    name = "dualforce"
    derived_keys: tuple[str, ...] = ()      # model keys the recipe fills in from the data (none)
    dp_group: Any = None                    # set by ``parallelize``: the data-parallel group

    def known_steps(self, cfg: Config) -> Optional[int]:
        return cfg.train.steps

    def check(self, cfg: Config, world: int) -> None:
        from .preflight import check_shards
        check_shards(cfg)

    def prepare(self, cfg: Config, rank: int) -> Config:
        from .data_setup import ensure_data
        return ensure_data(cfg, rank)

    def build_model(self, cfg: Config) -> nn.Module:
        from .trainer import build_model
        return build_model(cfg)

    def parallelize(self, model: nn.Module, cfg: Config, device: torch.device, dtype: torch.dtype,
                    groups: Groups) -> Any:
        """parallel.parallelize: SP over the group (ranks of a group share the batch and noise, so
        DeepSpeed's world-average of gradients is exact), device and dtype, FP8 where it pays,
        activation checkpointing, regional compilation."""
        from ..parallel.parallelize import parallelize
        import torch.distributed as dist
        # lip-sync negatives come from every clip of the data-parallel group (None: the world is that group)
        self.dp_group = groups.dp_group or (dist.group.WORLD if groups.dp_size > 1 else None)
        return parallelize(model, cfg, device, dtype, groups.sp_group, world=groups.dp_size * groups.sp_size).fp8

    def objective(self, cfg: Config, device: torch.device) -> Any:
        """The objective; after ``parallelize`` (the trainer) its lip-sync negatives span the data-parallel
        group, otherwise (one process) the micro batch."""
        from ..diffusion.objective import DiffusionForcingObjective
        return DiffusionForcingObjective(cfg, self.dp_group)

    def model_kwargs(self, cfg: Config) -> dict[str, Any]:
        return {"return_aux": True}

    def feed(self, cfg: Config, dp_rank: int, dp_size: int, accum: int) -> Any:
        from .data_feed import GlobalBatchFeed
        # batches are read one ahead in a thread; pinned when they go to a GPU (asynchronous copies)
        return GlobalBatchFeed(cfg, dp_rank, dp_size, accum, pin_memory=torch.cuda.is_available())

    def tokens(self, cfg: Config, inputs: dict[str, torch.Tensor]) -> int:
        from .step import tokens_in
        return tokens_in(inputs, cfg.model.patch_size)

    def flops_per_sample(self, cfg: Config, inputs: dict[str, torch.Tensor]) -> Optional[float]:
        from .step import sample_training_flops
        return sample_training_flops(cfg, inputs)

    def after_step(self, cfg: Config, step: int, engine: Any, objective: Any, device: torch.device,
                   dtype: torch.dtype, rank: int, world: int) -> dict[str, float]:
        return {}

    def describe(self, cfg: Config) -> str:
        return f"model {cfg.model.preset}, phase {cfg.train.phase}"


def recipe_for(cfg: Any) -> Any:
    """The recipe of ``cfg.run.task``."""
    task = cfg.run.task
    if task == DualForceRecipe.name:
        return DualForceRecipe()
    if task == "faceformer":
        from ..baselines.faceformer.recipe import FaceFormerRecipe
        return FaceFormerRecipe()
    raise ConfigError(f"run.task: no trainer recipe for {task!r}")
