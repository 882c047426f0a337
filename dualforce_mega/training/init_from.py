"""Staged initialisation (``train.init_from``): start a fresh run from earlier weights.

Sources, detected from the path:
  * a run directory (``checkpoints/latest`` names the tag), its ``checkpoints/`` directory, or one
    checkpoint tag directory — read with ``zero_reader`` (any ZeRO stage, any world size);
  * safetensors weights: a file, a directory (``model.safetensors`` or a sharded index) — a bundle from
    ``checkpoints_conv.export_bundle``, the output of ``zero_to_safetensors`` or ``import_wan``.

With ``train.init_from_ema`` the EMA weights are used instead: a run / tag's ``ema/`` rank files
(``training/ema.py``), or a bundle's ``ema/`` folder.

Loading happens into the full model on every rank before ``deepspeed.initialize`` partitions it, so it
works with ZeRO-3 at any world size. Parameters both sides have must match in shape (an error names
the parameter); the report lists what was loaded, what the model has that the source lacks (newly
initialised: e.g. the struct tower, bridge and audio layers of Phase 4 after Phase 2) and what the
source has that the model lacks (ignored: e.g. the struct tower of a Wan import when training Phase 2).
It is logged and written to ``<run.dir>/init_from.json``. A run that resumes from its own ``latest``
checkpoint ignores ``train.init_from``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..bundle import EMA_DIR, BundleError, iter_tensors, weight_files
from ..fsutil import atomic_write
from .ema import has_ema_shards, iter_ema_tensors
from .zero_reader import ZeroCheckpoint, ZeroCheckpointError, locate

log = logging.getLogger(__name__)

REPORT_NAME = "init_from.json"


class InitFromError(ValueError):
    """``train.init_from`` cannot be used; the message names the path or parameter."""


@dataclass
class InitReport:
    source: str
    kind: str                                           # zero_checkpoint | safetensors (+ " ema")
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)        # in the model, not in the source: kept as initialised
    ignored: list[str] = field(default_factory=list)    # in the source, not in the model

    def summary(self) -> str:
        return (f"train.init_from={self.source} ({self.kind}): loaded {len(self.loaded)} tensors, "
                f"{len(self.new)} newly initialised, {len(self.ignored)} ignored")


def _is_checkpoint_tree(p: Path) -> bool:
    return p.is_dir() and ((p / "checkpoints").is_dir() or (p / "latest").is_file() or any(p.glob("*_model_states.pt")))


def source_tensors(path: str, ema: bool) -> tuple[str, Iterator[tuple[str, torch.Tensor]]]:
    """(kind, streamed ``(name, tensor)`` pairs) of an init source (see the module doc)."""
    p = Path(path)
    if not p.exists():
        raise InitFromError(f"train.init_from: {p} does not exist")
    if _is_checkpoint_tree(p):
        try:
            loc = locate(p)
        except ZeroCheckpointError as e:
            raise InitFromError(f"train.init_from: {e}") from e
        if ema:
            if not has_ema_shards(loc.tag_dir):
                raise InitFromError(f"train.init_from_ema: checkpoint {loc.tag_dir} has no EMA ({EMA_DIR}/rank_*.safetensors)")
            return "zero_checkpoint ema", iter_ema_tensors(loc.tag_dir)
        try:
            return "zero_checkpoint", ZeroCheckpoint(loc.tag_dir).tensors()
        except ZeroCheckpointError as e:
            raise InitFromError(f"train.init_from: {e}") from e
    src = p / EMA_DIR if ema else p
    try:
        weight_files(src)
    except BundleError as e:
        what = "train.init_from_ema" if ema else "train.init_from"
        raise InitFromError(f"{what}: {e} (expected a run directory, a checkpoint tag or safetensors weights)") from e
    return "safetensors" + (" ema" if ema else ""), iter_tensors(src)


@torch.no_grad()
def init_from(model: torch.nn.Module, path: str, ema: bool = False) -> InitReport:
    """Copy the source's tensors into ``model`` (full, not yet partitioned); returns the report."""
    kind, tensors = source_tensors(path, ema)
    report = InitReport(source=str(path), kind=kind)
    expected = model.state_dict()
    for name, t in tensors:
        dst = expected.get(name)
        if dst is None:
            report.ignored.append(name)
            continue
        if tuple(t.shape) != tuple(dst.shape):
            raise InitFromError(f"train.init_from: {path}: parameter {name!r} has shape {tuple(t.shape)}, "
                                f"the model has {tuple(dst.shape)}")
        dst.copy_(t)
        report.loaded.append(name)
    report.new = sorted(set(expected) - set(report.loaded))
    if not report.loaded:
        raise InitFromError(f"train.init_from: {path}: no tensor matches a model parameter "
                            f"(source has e.g. {report.ignored[:4]})")
    return report


def write_report(report: InitReport, run_dir: Path) -> Path:
    path = Path(run_dir) / REPORT_NAME
    atomic_write(path, json.dumps(asdict(report), indent=1), path.with_name(f".{REPORT_NAME}.partial"))
    return path


def log_report(report: InitReport, limit: Optional[int] = 12) -> None:
    log.info("%s", report.summary())
    for what, names in (("newly initialised", report.new), ("ignored", report.ignored)):
        if names:
            shown = names if limit is None else names[:limit]
            log.info("init_from %s: %s%s", what, ", ".join(shown), " ..." if len(names) > len(shown) else "")


@torch.no_grad()
def restore_fp32_master(model: torch.nn.Module, report: InitReport, ema: bool) -> None:
    """After ``deepspeed.initialize`` in a low-precision run: set the optimizer's fp32 master weights of
    every loaded parameter to the source's values (DeepSpeed built them from the bf16 copy, which would
    round the source weights). Streams the source once more; this rank writes only its own piece."""
    import torch.distributed as dist
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

    from .ema import partition

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    params = dict(model.named_parameters())
    loaded = set(report.loaded)
    _, tensors = source_tensors(report.source, ema)
    for name, t in tensors:
        p = params.get(name)
        if name not in loaded or p is None or not p.requires_grad:
            continue
        value = t.float().to(p.device)
        if hasattr(p, "ds_id"):   # ZeRO-3: this rank's partition (DeepSpeed's full setter fails on padding)
            safe_set_local_fp32_param(p, partition(value.flatten(), rank, world))
        else:
            safe_set_full_fp32_param(p, value)
    log.info("fp32 master weights restored from %s", report.source)
