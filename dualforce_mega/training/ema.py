"""Exponential moving average of the weights, sharded like ZeRO-3 (no rank ever holds a full copy).

Every parameter is partitioned as ZeRO-3 partitions it: flattened, padded to ``ceil(n / W) * W`` elements
and split into W equal pieces; rank r keeps piece r of the EMA in fp32. After each optimizer step

    ema <- ema + (1 - decay) * (w - ema)          (``torch.lerp``)

with ``w`` the rank's piece of the fp32 master weights (ZeRO-3: the optimizer's own partition; ZeRO 0-2:
the rank's slice of the full fp32 weights). The EMA starts at the weights training starts from (after
``train.init_from``).

Checkpoints: each rank writes ``<tag>/ema/rank_<r>.safetensors`` (its pieces, under the model's
state_dict names; metadata: world size, decay, full shapes). Resume reads the same files back (from another
world size: full tensors reassembled one at a time and cut anew). ``iter_ema_tensors`` reassembles full
tensors one at a time for conversion
(``checkpoints_conv.export_bundle`` writes them as the bundle's ``ema/``; ``train.init_from_ema`` starts
a run from them).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)

EMA_DIR = "ema"
_RANK_FILE = "rank_{:05d}.safetensors"
_RANK_RE = re.compile(r"^rank_(\d{5})\.safetensors$")


def partition(flat: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """ZeRO-3's piece ``rank`` of a flattened tensor (padded with zeros to a multiple of ``world``)."""
    k = math.ceil(flat.numel() / world)
    piece = flat[rank * k:(rank + 1) * k]
    if piece.numel() < k:
        piece = torch.cat([piece, piece.new_zeros(k - piece.numel())])
    return piece


def local_fp32(param: torch.nn.Parameter, rank: int, world: int) -> torch.Tensor:
    """This rank's piece of ``param``'s fp32 master weights (see the module doc)."""
    if hasattr(param, "ds_id"):      # ZeRO-3: the optimizer's fp32 partition, already this rank's piece
        from deepspeed.utils import safe_get_local_fp32_param
        local = safe_get_local_fp32_param(param)
        return (local if local is not None else param.ds_tensor).detach().float().flatten()
    full = None
    if hasattr(param, "_hp_mapping"):  # ZeRO 1/2 or the bf16 optimizer (collective)
        from deepspeed.utils import safe_get_full_fp32_param
        full = safe_get_full_fp32_param(param)
    full = param.detach() if full is None else full
    return partition(full.float().flatten(), rank, world)


class ShardedEMA:
    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float, rank: int, world: int):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay={decay} must be in (0, 1) (0 switches the EMA off)")
        self.params = named_params
        self.decay, self.rank, self.world = decay, rank, world
        self.shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in named_params}
        self.shadow = {n: local_fp32(p, rank, world).clone() for n, p in named_params}

    @torch.no_grad()
    def update(self) -> None:
        """Call once after every optimizer step."""
        for name, p in self.params:
            self.shadow[name].lerp_(local_fp32(p, self.rank, self.world), 1.0 - self.decay)

    # ------------------------------------------------------------------ checkpoints
    def save(self, tag_dir: Path) -> None:
        save_rank_file(tag_dir, self.rank, self.world, self.decay, self.shadow, self.shapes)

    def load(self, tag_dir: Path) -> None:
        first = Path(tag_dir) / EMA_DIR / _RANK_FILE.format(0)
        if not first.is_file():
            raise FileNotFoundError(f"{first}: missing; train.ema_decay > 0 but checkpoint {tag_dir} has no EMA "
                                    "(was it written without one?)")
        with safe_open(str(first), framework="pt") as f:
            saved_world = int((f.metadata() or {}).get("world_size", -1))
        if saved_world != self.world:   # elastic resume: cut this rank's pieces anew
            self._load_resharded(Path(tag_dir), saved_world)
            return
        path = Path(tag_dir) / EMA_DIR / _RANK_FILE.format(self.rank)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; checkpoint {tag_dir} has no EMA of this rank")
        with safe_open(str(path), framework="pt") as f:
            missing = sorted(set(self.shadow) - set(f.keys()))
            if missing:
                raise ValueError(f"{path}: EMA lacks parameters {missing[:8]}")
            for name, t in self.shadow.items():
                saved = f.get_tensor(name)
                if saved.shape != t.shape:
                    raise ValueError(f"{path}: EMA of {name!r} has {tuple(saved.shape)} elements, expected {tuple(t.shape)}")
                t.copy_(saved)
        log.info("EMA (decay %g) resumed from %s", self.decay, path.parent)

    def _load_resharded(self, tag_dir: Path, saved_world: int) -> None:
        """The EMA of a checkpoint written by another world size: every full tensor (one at a time) cut into
        this rank's piece."""
        seen = set()
        for name, full in iter_ema_tensors(tag_dir):
            if name not in self.shadow:
                continue
            if tuple(full.shape) != self.shapes[name]:
                raise ValueError(f"{tag_dir / EMA_DIR}: EMA of {name!r} has shape {tuple(full.shape)}, "
                                 f"expected {self.shapes[name]}")
            self.shadow[name].copy_(partition(full.flatten(), self.rank, self.world))
            seen.add(name)
        missing = sorted(set(self.shadow) - seen)
        if missing:
            raise ValueError(f"{tag_dir / EMA_DIR}: EMA lacks parameters {missing[:8]}")
        log.info("EMA (decay %g) resumed from %s, resharded from %d to %d ranks", self.decay,
                 tag_dir / EMA_DIR, saved_world, self.world)


def save_rank_file(tag_dir: Path, rank: int, world: int, decay: float, pieces: dict[str, torch.Tensor],
                   shapes: dict[str, tuple[int, ...]]) -> Path:
    """``<tag>/ema/rank_<r>.safetensors``: this rank's pieces (``partition``) and the full shapes."""
    out = Path(tag_dir) / EMA_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / _RANK_FILE.format(rank)
    meta = {"world_size": str(world), "rank": str(rank), "decay": repr(decay),
            "shapes": json.dumps({n: list(s) for n, s in shapes.items()})}
    tmp = path.with_name(path.name + ".partial")
    save_file({n: t.contiguous().cpu() for n, t in pieces.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def has_ema_shards(tag_dir: Path) -> bool:
    d = Path(tag_dir) / EMA_DIR
    return d.is_dir() and any(_RANK_RE.match(p.name) for p in d.iterdir())


def ema_shapes(tag_dir: Path) -> dict[str, tuple[int, ...]]:
    """Full shape of every EMA tensor of a checkpoint tag (from rank 0's file)."""
    path = Path(tag_dir) / EMA_DIR / _RANK_FILE.format(0)
    with safe_open(str(path), framework="pt") as f:
        return {n: tuple(s) for n, s in json.loads((f.metadata() or {})["shapes"]).items()}


def iter_ema_tensors(tag_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Full EMA tensors ``(name, fp32 tensor)`` of a checkpoint tag, reassembled from the rank files one
    tensor at a time (memory: one tensor)."""
    d = Path(tag_dir) / EMA_DIR
    files = sorted((p for p in d.iterdir() if _RANK_RE.match(p.name)), key=lambda p: p.name) if d.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{d}: no EMA rank files (rank_NNNNN.safetensors)")
    handles = [safe_open(str(p), framework="pt") for p in files]
    meta = handles[0].metadata() or {}
    world = int(meta.get("world_size", len(files)))
    ranks = [int(_RANK_RE.match(p.name).group(1)) for p in files]
    if ranks != list(range(world)):
        raise ValueError(f"{d}: EMA written by {world} ranks, found files of ranks {ranks}")
    shapes = json.loads(meta["shapes"])
    for name, shape in shapes.items():
        flat = torch.cat([h.get_tensor(name) for h in handles])
        yield name, flat[:math.prod(shape)].reshape(shape).clone()
