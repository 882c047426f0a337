"""The training loop on a DeepSpeed engine (ZeRO stage from ``parallel.zero_stage``).

One optimizer step = ``grad_accum`` micro batches per data-parallel rank. The global batch is the same
set of samples whatever the split (``data_feed.GlobalBatchFeed``) and every sample's noise comes from
``sample_seeds(train.seed, step, global sample index)``, so runs that differ only in world size see
identical data and noise.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import deepspeed
import torch

from ..config import Config
from ..diffusion.noise import sample_seeds
from ..flops import forward_flops
from ..models import DualForceModel
from ..models.fp8 import fp8_autocast
from ..parallel.deepspeed_config import (build_deepspeed_config, grad_accum_steps, optimizer_param_groups,
                                         resolve_precision)
from ..parallel.groups import Groups
from .checkpoint import CheckpointManager, Resumed
from .metrics import MetricAccumulator, MetricsWriter
from .monitor import GpuMonitor, measure_peak_flops, memory_mb, mfu
from .recipe import recipe_for
from .rng import capture_rng, restore_rng
from .schedule import build_lr_scheduler

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_TERA = 1e12


def build_model(cfg: Config) -> DualForceModel:
    """Same seed on every rank -> identical initial weights before ZeRO partitions them."""
    torch.manual_seed(cfg.train.seed)
    model = DualForceModel(cfg.model)
    # the single place activation checkpointing is switched (per transformer layer)
    model.gradient_checkpointing = cfg.train.activation_checkpointing
    return model


def tokens_in(inputs: dict[str, torch.Tensor], patch_size: tuple) -> int:
    """Transformer tokens of a micro batch: video patches plus struct frames."""
    b, _, f, h, w = inputs["video_latent"].shape
    tokens = b * f * (h // patch_size[1]) * (w // patch_size[2])
    if "struct" in inputs:
        tokens += inputs["struct"].shape[0] * inputs["struct"].shape[1]
    return tokens


def sample_training_flops(cfg: Config, inputs: dict[str, torch.Tensor]) -> float:
    """Model FLOPs (forward + backward, no recomputation) of one sample of this batch's shape."""
    _, _, frames, h, w = inputs["video_latent"].shape
    text_len = inputs["text_emb"].shape[1] if "text_emb" in inputs else 0
    count = forward_flops(cfg.model, 1, frames, (h, w), text_len=text_len, with_struct="struct" in inputs,
                          with_audio="audio" in inputs, return_aux=True, attention="causal")
    return count.training


class Trainer:
    """``recipe`` (default: the one of ``run.task``, DualForce unless configured) supplies the model, the
    objective, the data and any per-step work (training/recipe.py); the engine, batch layout, checkpoints
    and metrics are the same for every task."""

    def __init__(self, cfg: Any, groups: Groups, device: torch.device, rank: int, world_size: int,
                 recipe: Any = None):
        self.cfg, self.groups, self.device = cfg, groups, device
        self.rank, self.world_size = rank, world_size
        self.recipe = recipe or recipe_for(cfg)
        self.run_dir = Path(cfg.run.dir)
        self.precision = resolve_precision(cfg, device.type)
        self.dtype = _DTYPES[self.precision]
        self.accum = grad_accum_steps(cfg, groups.dp_size)
        self.objective = self.recipe.objective(cfg, device)
        self.model_kwargs = self.recipe.model_kwargs(cfg)

        torch.manual_seed(cfg.train.seed)   # identical initial weights on every rank before ZeRO partitions them
        model = self.recipe.build_model(cfg)
        self.fp8 = self.recipe.parallelize(model, cfg, device, self.dtype, groups)
        ds_config = build_deepspeed_config(cfg, groups.dp_size, device.type)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=optimizer_param_groups(model, cfg.train.weight_decay),
            config=ds_config, lr_scheduler=lambda opt: build_lr_scheduler(opt, cfg.train),
            dist_init_required=False)
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.train.keep_last, rank, world_size)
        self.data = self.recipe.feed(cfg, groups.dp_rank, groups.dp_size, self.accum)
        self.gpu = GpuMonitor(device)
        self.peak_flops: Optional[float] = None
        self.flops_per_sample: Optional[float] = None
        if device.type == "cuda":
            self.peak_flops = measure_peak_flops(device, self.dtype)
            log.info("measured matmul peak %.1f TFLOP/s (%s)", self.peak_flops / _TERA, self.precision)
        n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
        log.info("%s: %.2fM parameters, precision %s, ZeRO-%d, dp=%d sp=%d, micro_batch=%d, "
                 "grad_accum=%d, global_batch=%d", self.recipe.describe(cfg), n_params / 1e6, self.precision,
                 cfg.parallel.zero_stage, groups.dp_size, groups.sp_size, cfg.train.micro_batch,
                 self.accum, cfg.train.global_batch)

    # ------------------------------------------------------------------ state
    def _resume(self) -> int:
        resumed: Optional[Resumed] = self.checkpoints.load(self.engine)
        if resumed is None:
            log.info("fresh run in %s", self.run_dir)
            return 0
        self.data.load_state_dict(resumed.rank_state["data"])
        restore_rng(resumed.rank_state["rng"])
        log.info("resuming %s at step %d", self.run_dir, resumed.step)
        return resumed.step

    def _save(self, step: int) -> None:
        rank_state = {"data": self.data.state_dict(), "rng": capture_rng()}
        self.checkpoints.save(self.engine, step, client_state={}, rank_state=rank_state)

    # ------------------------------------------------------------------ loop
    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def _model_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        # data streams in the engine's dtype; sigmas stay fp32 (the model's modulation math is fp32)
        return {k: v.to(self.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                and not k.startswith("sigma") else v for k, v in inputs.items()}

    def _micro_step(self, batch: dict[str, Any], step: int, acc: MetricAccumulator) -> None:
        batch = self._to_device(batch)
        seeds = sample_seeds(self.cfg.train.seed, step, batch["__index__"].cpu())
        inputs, targets = self.objective.prepare(batch, seeds)
        inputs = self._model_inputs(inputs)
        if self.flops_per_sample is None:
            self.flops_per_sample = self.recipe.flops_per_sample(self.cfg, inputs)
        with fp8_autocast(self.fp8):
            out = self.engine(**inputs, **self.model_kwargs)
        loss, metrics = self.objective.losses(out, targets.to(self.device))
        self.engine.backward(loss)
        self.engine.step()    # DeepSpeed only updates at the accumulation boundary
        # ranks of one sequence-parallel group share a sample: count its data once
        owner = self.groups.sp_rank == 0
        acc.add(metrics, self.recipe.tokens(self.cfg, inputs) if owner else 0,
                batch["__index__"].tolist() if owner else [])

    def fit(self) -> None:
        cfg = self.cfg
        start = self._resume()
        writer = MetricsWriter(self.run_dir, cfg.run.tensorboard, start, cfg.run.log_samples) \
            if self.rank == 0 else None
        if start >= cfg.train.steps:
            log.info("nothing to do: checkpoint step %d >= train.steps=%d", start, cfg.train.steps)
        self.engine.train()
        for step in range(start, cfg.train.steps):
            lr = self.scheduler.get_last_lr()[0]
            acc = MetricAccumulator()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            for micro in range(self.accum):
                self._micro_step(self.data.next(micro), step, acc)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            step_time = time.perf_counter() - t0
            done = step + 1
            extra = self.recipe.after_step(cfg, done, self.engine, self.objective, self.device, self.dtype,
                                           self.rank, self.world_size)
            if done % cfg.train.log_every == 0 or done == cfg.train.steps or extra:
                self._log(writer, done, lr, step_time, acc, extra)
            if done % cfg.train.save_every == 0 or done == cfg.train.steps:
                self._save(done)
        if writer is not None:
            writer.close()

    def _log(self, writer: Optional[MetricsWriter], step: int, lr: float, step_time: float,
             acc: MetricAccumulator, extra: Optional[dict[str, float]] = None) -> None:
        reduced = acc.reduce()     # collective: every rank takes part
        grad_norm = self.engine.get_global_grad_norm()
        if writer is None:
            return
        record: dict[str, Any] = {"step": step}
        record.update({k: v for k, v in reduced.items() if k.startswith("loss")})
        record.update({
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": reduced["tokens"] / step_time,
            "step_time_s": step_time,
            "memory_mb": memory_mb(self.device),
            "samples": reduced["samples"],
            "sample_ids": reduced["sample_ids"],
        })
        if self.flops_per_sample:
            record["model_tflops_per_s"] = self.flops_per_sample * reduced["samples"] / step_time / _TERA
        value = mfu(self.flops_per_sample, reduced["samples"], step_time, self.world_size, self.peak_flops)
        if value is not None:
            record["mfu"] = value
        record.update(self.gpu.read())
        record.update(extra or {})
        writer.write(record, self.cfg.train.steps)
