"""The training loop on a DeepSpeed engine (ZeRO stage from ``parallel.zero_stage``).

One optimizer step = ``grad_accum`` micro batches per data-parallel rank. The global batch is the same
set of samples whatever the split (``data_feed.GlobalBatchFeed``) and every sample's noise comes from
``sample_seeds(train.seed, step, global sample index)``, so runs that differ only in world size see
identical data and noise.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import deepspeed
import torch

from ..config import Config
from ..models import DualForceModel
from ..parallel.deepspeed_config import build_deepspeed_config, build_optimizer, grad_accum_steps, resolve_precision
from ..parallel.groups import Groups
from .checkpoint import CheckpointManager, Resumed
from .ema import ShardedEMA
from .init_from import init_from, log_report, restore_fp32_master, write_report
from .metrics import MetricAccumulator, MetricsWriter
from .monitor import GpuMonitor, StepClock, datasheet_peak_flops, measure_peak_flops, memory_mb, mfu
from .recipe import recipe_for
from .rng import capture_rng, restore_rng
from .schedule import build_lr_scheduler
from .step import DeepSpeedUpdater, TrainStep, sample_training_flops, tokens_in  # noqa: F401 (this module's API)
from .supervision import Supervisor

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_TERA = 1e12


def build_model(cfg: Config) -> DualForceModel:
    """Same seed on every rank -> identical initial weights before ZeRO partitions them."""
    torch.manual_seed(cfg.train.seed)
    return DualForceModel(cfg.model)


class Trainer:
    """``recipe`` (default: the one of ``run.task``, DualForce unless configured) supplies the model, the
    objective, the data and any per-step work (training/recipe.py); the engine, batch layout, training
    step (training/step.py), checkpoints and metrics are the same for every task. ``supervisor``
    (training/supervision.py): preemption, non-finite steps, the step watchdog."""

    def __init__(self, cfg: Any, groups: Groups, device: torch.device, rank: int, world_size: int,
                 recipe: Any = None, supervisor: Optional[Supervisor] = None):
        self.cfg, self.groups, self.device = cfg, groups, device
        self.sup = supervisor
        self.rank, self.world_size = rank, world_size
        self.recipe = recipe or recipe_for(cfg)
        self.run_dir = Path(cfg.run.dir)
        self.precision = resolve_precision(cfg, device.type)
        self.dtype = _DTYPES[self.precision]
        self.accum = grad_accum_steps(cfg, groups.dp_size)

        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.train.keep_last, rank, world_size)

        torch.manual_seed(cfg.train.seed)   # identical initial weights on every rank before ZeRO partitions them
        model = self.recipe.build_model(cfg)
        # staged training: a fresh run starts from train.init_from (a resumed run from its own checkpoint)
        self.init_report = None
        if cfg.train.init_from and self.checkpoints.latest_tag() is None:
            self.init_report = init_from(model, cfg.train.init_from, cfg.train.init_from_ema)
            log_report(self.init_report)
            if rank == 0:
                write_report(self.init_report, self.run_dir)
        elif cfg.train.init_from:
            log.info("train.init_from=%s ignored: resuming from %s", cfg.train.init_from, self.checkpoints.root)
        # SP, device and dtype, FP8, activation checkpointing, compilation (DualForce: parallel.parallelize),
        # before the optimizer exists (FP8 backends may replace parameters)
        self.fp8 = self.recipe.parallelize(model, cfg, device, self.dtype, groups)
        ds_config = build_deepspeed_config(cfg, groups.dp_size, device.type)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=build_optimizer(model, cfg.train, device), config=ds_config,
            lr_scheduler=lambda opt: build_lr_scheduler(opt, cfg.train), dist_init_required=False)
        if self.sup is not None:   # DeepSpeed skips updates with a non-finite gradient norm (ZeRO >= 1, bf16)
            self.sup.attach(self.engine.zero_optimization_stage() >= 1 or self.engine.bfloat16_enabled(), 0)
        if self.init_report is not None and self.dtype != torch.float32:
            # the optimizer's fp32 master weights were made from the low-precision copy: restore them
            restore_fp32_master(self.engine.module, self.init_report, cfg.train.init_from_ema)
        self.ema = ShardedEMA(list(self.engine.module.named_parameters()), cfg.train.ema_decay, rank, world_size) \
            if cfg.train.ema_decay > 0 else None
        self.step = TrainStep(cfg, self.engine, DeepSpeedUpdater(self.engine), device, self.dtype, self.fp8,
                              self.recipe, loss_hook=self.sup.loss_hook if self.sup is not None else None)
        self.objective = self.step.objective
        self.data = self.recipe.feed(cfg, groups.dp_rank, groups.dp_size, self.accum)
        self.gpu = GpuMonitor(device)
        self.peak_flops: Optional[float] = None
        self.datasheet_flops = datasheet_peak_flops(device, self.dtype)
        self.flops_per_sample: Optional[float] = None
        if device.type == "cuda":
            self.peak_flops = measure_peak_flops(device, self.dtype)
            log.info("measured matmul peak %.1f TFLOP/s (%s); datasheet %s", self.peak_flops / _TERA,
                     self.precision, "n/a" if self.datasheet_flops is None else f"{self.datasheet_flops / _TERA:.0f}")
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
        if self.sup is not None and self.sup.guard is not None:
            self.sup.guard.total = int(resumed.client_state.get("nonfinite_steps", 0))
        if self.ema is not None:
            self.ema.load(self.checkpoints.root / resumed.tag)
        log.info("resuming %s at step %d", self.run_dir, resumed.step)
        return resumed.step

    def _save(self, step: int) -> None:
        rank_state = {"data": self.data.state_dict(), "rng": capture_rng()}
        client_state = {}
        if self.sup is not None:
            self.sup.saving(step)
            if self.sup.guard is not None:
                client_state["nonfinite_steps"] = self.sup.guard.total
        self.checkpoints.save(self.engine, step, client_state=client_state, rank_state=rank_state,
                              write_extra=self.ema.save if self.ema is not None else None)

    # ------------------------------------------------------------------ loop
    def _micro_batches(self, clock: StepClock) -> Iterator[dict[str, Any]]:
        """This step's micro batches, the time spent waiting for each charged to ``clock``."""
        for micro in range(self.accum):
            with clock.waiting():
                batch = self.data.next(micro)
            yield batch

    def fit(self, on_resumed: Optional[Callable[[], None]] = None) -> None:
        """``on_resumed``: called once the checkpoint (if any) loaded, before the first step."""
        cfg = self.cfg
        start = self._resume()
        if on_resumed is not None:
            on_resumed()
        writer = MetricsWriter(self.run_dir, cfg.run.tensorboard, start, cfg.run.log_samples) \
            if self.rank == 0 else None
        if start >= cfg.train.steps:
            log.info("nothing to do: checkpoint step %d >= train.steps=%d", start, cfg.train.steps)
        if start == cfg.train.steps == 0:
            self._save(0)   # train.steps=0: the initialised model (e.g. after train.init_from) as checkpoint step 0
        self.engine.train()
        clock = StepClock(self.device)
        # ranks of one sequence-parallel group share a sample: count its data once
        owner = self.groups.sp_rank == 0
        for step in range(start, cfg.train.steps):
            if self.sup is not None:
                self.sup.step_begins(step)
            lr = self.scheduler.get_last_lr()[0]
            acc = MetricAccumulator()
            self.step(self._micro_batches(clock), step, acc, count=owner)
            if self.ema is not None and self.engine.was_step_applied():   # a skipped step changed no weight
                self.ema.update()
            clock.tick()
            if self.flops_per_sample is None and self.step.last is not None:
                self.flops_per_sample = self.recipe.flops_per_sample(cfg, self.step.last.inputs)
            if self.sup is not None:     # counts a step the optimizer skipped (non-finite loss / gradients)
                self.sup.step_ends(step, self.engine.was_step_applied())
            done = step + 1
            extra = self.recipe.after_step(cfg, done, self.engine, self.objective, self.device, self.dtype,
                                           self.rank, self.world_size)
            if done % cfg.train.log_every == 0 or done == cfg.train.steps or extra:
                self._log(writer, done, lr, clock.read(), acc, extra)   # the only device reads of the loop
            saved = bool(cfg.train.save_every) and (done % cfg.train.save_every == 0 or done == cfg.train.steps)
            if saved:
                self._save(done)
            if self.sup is not None:     # non-finite limit, preemption (with a checkpoint of this step)
                self.sup.after_step(done, cfg.train.steps, saved, self._save, self.device)
        if writer is not None:
            writer.close()

    def _log(self, writer: Optional[MetricsWriter], step: int, lr: float, timing: dict[str, float],
             acc: MetricAccumulator, extra: Optional[dict[str, float]] = None) -> None:
        reduced = acc.reduce()     # collective: every rank takes part
        grad_norm = self.engine.get_global_grad_norm()
        supervision = {}
        if self.sup is not None:   # collective; a feed without skip counters (another task's) reports none
            stats = self.data.stats() if hasattr(self.data, "stats") else {}
            supervision = self.sup.metrics(stats, self.groups.sp_rank == 0)
        if writer is None:
            return
        step_time = timing["step_time_s"]
        record: dict[str, Any] = {"step": step}
        record.update({k: v for k, v in reduced.items() if k.startswith(("loss", "frames_"))})
        record.update({
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": reduced["tokens"] / step_time,
            "step_time_s": step_time,
            "data_wait_s": timing["data_wait_s"],
            "data_wait_frac": timing["data_wait_s"] / step_time,
            "memory_mb": memory_mb(self.device),
            "samples": reduced["samples"],
            "sample_ids": reduced["sample_ids"],
        })
        if self.device.type == "cuda":
            record["memory_reserved_mb"] = torch.cuda.max_memory_reserved(self.device) / 2 ** 20
        if self.flops_per_sample:
            record["model_tflops_per_s"] = self.flops_per_sample * reduced["samples"] / step_time / _TERA
        for key, peak in (("mfu", self.peak_flops), ("mfu_datasheet", self.datasheet_flops)):
            value = mfu(self.flops_per_sample, reduced["samples"], step_time, self.world_size, peak)
            if value is not None:
                record[key] = value
        record.update(self.gpu.read())
        record.update(extra or {})
        record.update(supervision)
        writer.write(record, self.cfg.train.steps)
