"""The best model by validation loss: ``RUN/best/model.safetensors``, the full model's weights (gathered
from ZeRO-3 partitions when sharded) with the step and validation loss in the file's metadata, replaced
atomically so a crash leaves the previous best intact."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ...fsutil import atomic_write, fsync_dir

BEST_DIR = "best"
WEIGHTS_FILE = "model.safetensors"

log = logging.getLogger(__name__)


def best_path(run_dir: Path) -> Path:
    return Path(run_dir) / BEST_DIR / WEIGHTS_FILE


def best_val_loss(run_dir: Path) -> Optional[float]:
    """The validation loss of the saved best model (None when there is none)."""
    path = best_path(run_dir)
    if not path.is_file():
        return None
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return float(meta["val_loss"]) if "val_loss" in meta else None


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank calls this (collective under ZeRO-3): the complete weights, float32 on the CPU."""
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def save_best(module: nn.Module, run_dir: Path, step: int, val_loss: float, rank: int) -> None:
    """Collective. Rank 0 writes the weights (temporary file + fsync + rename) and ``meta.json``."""
    state = full_state_dict(module)
    if rank == 0:
        from safetensors.torch import save_file
        path = best_path(run_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                  metadata={"step": str(step), "val_loss": repr(float(val_loss))})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
        atomic_write(path.parent / "meta.json", json.dumps({"step": step, "val_loss": float(val_loss)}))
        log.info("best model so far: step %d, val loss %.6g -> %s", step, val_loss, path)
    if dist.is_initialized():
        dist.barrier()
