"""Step metrics: accumulate over micro batches and ranks, write metrics.jsonl / tensorboard / console."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..diffusion.losses import BUCKET_COUNT_PREFIX, BUCKET_LOSS_PREFIX, bucket_count_name
from ..diffusion.objective import metrics_to_floats
from ..fsutil import atomic_write

log = logging.getLogger(__name__)


class MetricAccumulator:
    """(sum, weight) per metric name, so keys missing on some micro batches (e.g. an empty sigma bucket,
    reported as NaN or absent) average over the micro batches that have them. A sigma-bucket loss is
    weighted by its frame count (``frames_video_sigma_*``, which is summed): the step's value is the mean
    over all frames in the bucket, not a mean of per-micro-batch means.

    Metrics may be floats or 0-dim device tensors: tensors are summed on their device (NaN skipped
    there too) and read only in ``reduce``, so accumulating never waits for the device."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, Any] = {}
        self.tokens = 0
        self.samples = 0
        self.sample_ids: list[int] = []

    def add(self, metrics: dict[str, Any], tokens: int, sample_ids: list[int]) -> None:
        for key, value in metrics.items():
            summed = key.startswith(BUCKET_COUNT_PREFIX)
            weight = float(metrics.get(bucket_count_name(key), 1.0)) if key.startswith(BUCKET_LOSS_PREFIX) else 1.0
            if isinstance(value, torch.Tensor):
                v = value.detach().float().reshape(())
                ok = ~torch.isnan(v)
                value, count = torch.where(ok, v, torch.zeros_like(v)), ok.to(torch.float32)
            else:
                value = float(value)
                if math.isnan(value):
                    continue
                count = 1.0
            self.sums[key] = self.sums.get(key, 0.0) + (value if summed else value * weight)
            self.counts[key] = self.counts.get(key, 0.0) + (0.0 if summed else count * weight)
        self.tokens += tokens
        self.samples += len(sample_ids)
        self.sample_ids.extend(sample_ids)

    def _local(self) -> tuple[dict[str, float], dict[str, float]]:
        """Sums and weights as Python numbers (one device read); metrics never seen are dropped."""
        keys = list(self.sums)
        floats = metrics_to_floats({k: self.sums[k] for k in keys})
        counts = metrics_to_floats({k: self.counts[k] for k in keys})
        kept = [k for k in keys if counts[k] > 0 or k.startswith(BUCKET_COUNT_PREFIX)]
        return {k: floats[k] for k in kept}, {k: counts[k] for k in kept}

    def reduce(self) -> dict[str, Any]:
        """Collective over the world: mean of every metric over all micro batches of all ranks."""
        local = (*self._local(), self.tokens, self.samples, self.sample_ids)
        parts = [local]
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, local)
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        out: dict[str, Any] = {"tokens": 0, "samples": 0, "sample_ids": []}
        for p_sums, p_counts, p_tokens, p_samples, p_ids in parts:
            for key, value in p_sums.items():
                sums[key] = sums.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + p_counts[key]
            out["tokens"] += p_tokens
            out["samples"] += p_samples
            out["sample_ids"].extend(p_ids)
        out["sample_ids"].sort()
        out.update({key: sums[key] if key.startswith(BUCKET_COUNT_PREFIX) else sums[key] / counts[key]
                    for key in sorted(sums)})
        return out


class MetricsWriter:
    """Rank 0 only: one JSON object per logged step in metrics.jsonl, tensorboard scalars, a console line."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int, log_samples: bool):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.log_samples = log_samples
        self._truncate_after(resume_step)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step drops events a crashed run logged after the checkpoint we resume from
            self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step + 1)
        self.file = open(self.path, "a")

    def _truncate_after(self, step: int) -> None:
        """A resumed run re-logs the steps after its checkpoint: drop the first attempt's records."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            if line.strip() and json.loads(line).get("step", 0) <= step:
                kept.append(line)
        atomic_write(self.path, "".join(k + "\n" for k in kept))

    def write(self, record: dict[str, Any], total_steps: int) -> None:
        record = dict(record)
        if not self.log_samples:
            record.pop("sample_ids", None)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])
            self.tb.flush()
        log.info("step %d/%d  loss %.4f  lr %.3e  grad_norm %s  %.0f tok/s  %.3fs/step  mem %.0f MB",
                 record["step"], total_steps, record.get("loss", float("nan")), record["lr"],
                 _fmt(record.get("grad_norm")), record["tokens_per_s"], record["step_time_s"],
                 record["memory_mb"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"
