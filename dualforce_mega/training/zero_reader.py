"""Reading DeepSpeed ZeRO (stage 1, 2, 3) checkpoints one tensor at a time.

File layout of one tag directory (written by ``engine.save_checkpoint``), per data-parallel rank r:

* ``*_model_states.pt`` — ``param_shapes`` (one ordered name -> shape dict per optimizer param group,
  in flat-buffer order), ``buffer_names`` and the ``module`` state dict (buffers; for ZeRO-3 the
  parameters there are empty placeholders), ``frozen_param_shapes`` / ``frozen_param_fragments``
  (parameters without gradients) and ``shared_params`` (tied names).
* ``*_optim_states.pt`` — ``optimizer_state_dict`` with ``zero_stage``, ``partition_count`` and the
  fp32 master weights of rank r: ``fp32_flat_groups`` (stage 3) or ``single_partition_of_fp32_groups``
  (stages 1/2), one flat tensor per param group.

Stage 3 partitions *every parameter* separately: parameter p (numel n) is padded to
``ceil(n / W) * W`` elements and rank r holds elements ``[r*k, (r+1)*k)``, k = ceil(n / W), stored at
the same offset in each rank's flat buffer (offsets accumulate k per parameter across groups).
Stages 1/2 partition each *group*: the group's flat buffer (parameters back to back, each followed by
its alignment padding) is split into W equal consecutive pieces.

Optimizer files are memory-mapped, so a tensor costs only its own bytes when read; nothing is
concatenated at the scale of a whole partition. Pages read from a mapping stay resident until it is
unmapped, so the partitions are re-mapped every ``remap_bytes`` (the converter's shard size).

Stage-1/2 ``module`` state dicts hold full tensors; parameters the optimizer does not own (frozen ones,
which stage 1 lists nowhere else) are taken from there.

The Adam moments (``optimizer_state_dict.state[i].exp_avg`` / ``exp_avg_sq``, one flat tensor per fp32
group) use the fp32 groups' layout, so ``ZeroCheckpoint(tag, source="exp_avg")`` reads them the same
way (the trainer's elastic resume, ``training/elastic.py``).
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from .safe_load import InertObject, safe_torch_load

log = logging.getLogger(__name__)

OPTIM_KEY = "optimizer_state_dict"
LATEST = "latest"
SOURCES = ("fp32", "exp_avg", "exp_avg_sq")   # what :meth:`ZeroCheckpoint.params` reads


class ZeroCheckpointError(ValueError):
    """The checkpoint directory is incomplete or not a ZeRO checkpoint; the message names the file."""


def _natural_key(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


@dataclass
class CheckpointLocation:
    tag_dir: Path
    tag: str
    run_dir: Optional[Path]   # directory holding config.yaml (the trainer's run directory), if known


def _has_states(d: Path) -> bool:
    return d.is_dir() and any(d.glob("*_model_states.pt"))


def locate(path: Path, tag: Optional[str] = None) -> CheckpointLocation:
    """Accept a run directory, its ``checkpoints/`` directory, or one tag directory."""
    p = Path(path)
    if not p.is_dir():
        raise ZeroCheckpointError(f"{p}: directory not found")
    if _has_states(p) and tag is None:
        root, tag_dir = p.parent, p
    else:
        root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        if tag is None:
            latest = root / LATEST
            if not latest.is_file():
                raise ZeroCheckpointError(f"{p}: no '{LATEST}' file in {root} and no --tag given "
                                          f"(tags: {sorted(d.name for d in root.iterdir() if _has_states(d))})")
            tag = latest.read_text().strip()
        tag_dir = root / tag
        if not _has_states(tag_dir):
            raise ZeroCheckpointError(f"{tag_dir}: not a DeepSpeed checkpoint tag (no *_model_states.pt)")
    run_dir = next((d for d in (root, root.parent, tag_dir.parent.parent) if (d / "config.yaml").is_file()), None)
    return CheckpointLocation(tag_dir, tag_dir.name, run_dir)


def _as_int(v: Any, what: str) -> int:
    if isinstance(v, InertObject):  # ZeroStageEnum pickles as ZeroStageEnum(<int>)
        v = v.args[0] if v.args else None
    if isinstance(v, (list, tuple)):  # partition_count is per group; the DP world is the largest
        v = max(v)
    if not isinstance(v, int):
        raise ZeroCheckpointError(f"{what}: expected an integer, found {v!r}")
    return int(v)


def _read_range(pieces: list[torch.Tensor], starts: list[int], lo: int, hi: int) -> list[torch.Tensor]:
    """Elements [lo, hi) of the virtual concatenation of ``pieces`` (``starts``: cumulative offsets)."""
    out = []
    for piece, s in zip(pieces, starts):
        e = s + piece.numel()
        if e <= lo or s >= hi:
            continue
        out.append(piece[max(lo, s) - s:min(hi, e) - s])
    return out


class ZeroCheckpoint:
    """One tag directory; :meth:`specs` lists the tensors, :meth:`tensors` yields them in that order."""

    def __init__(self, tag_dir: Path, source: str = "fp32"):
        if source not in SOURCES:
            raise ValueError(f"source {source!r} is not one of {SOURCES}")
        self.source = source
        self.tag_dir = Path(tag_dir)
        self.model_files = sorted(self.tag_dir.glob("*_model_states.pt"), key=_natural_key)
        self.optim_files = sorted(self.tag_dir.glob("*_optim_states.pt"), key=_natural_key)
        if not self.model_files or not self.optim_files:
            raise ZeroCheckpointError(f"{self.tag_dir}: needs *_model_states.pt and *_optim_states.pt files "
                                      f"(found {len(self.model_files)} and {len(self.optim_files)})")
        self.model0 = safe_torch_load(self.model_files[0])
        for key in ("param_shapes", "buffer_names", "module"):
            if key not in self.model0:
                raise ZeroCheckpointError(f"{self.model_files[0]}: not a DeepSpeed model-states file (no '{key}')")
        self._optim = [safe_torch_load(f, mmap=True) for f in self.optim_files]
        osd = self._optim[0].get(OPTIM_KEY)
        if not isinstance(osd, dict) or "zero_stage" not in osd:
            raise ZeroCheckpointError(f"{self.optim_files[0]}: not a ZeRO optimizer-states file "
                                      f"(no {OPTIM_KEY}.zero_stage)")
        self.stage = _as_int(osd["zero_stage"], f"{self.optim_files[0]}: {OPTIM_KEY}.zero_stage")
        self.world = _as_int(osd["partition_count"], f"{self.optim_files[0]}: {OPTIM_KEY}.partition_count")
        if self.world != len(self.optim_files):
            raise ZeroCheckpointError(f"{self.tag_dir}: written by {self.world} ranks but holds "
                                      f"{len(self.optim_files)} *_optim_states.pt files (incomplete save?)")
        if self.stage not in (1, 2, 3):
            raise ZeroCheckpointError(f"{self.optim_files[0]}: unsupported zero_stage {self.stage}")
        self.flat: list[list[torch.Tensor]] = []
        self._map_partitions(reload=False)
        # Pages of mapped files stay resident once read; re-mapping after this many bytes drops them,
        # so peak memory is one output shard plus this much (the converter sets its shard size).
        self.remap_bytes: Optional[int] = None
        self._since_remap = 0
        self.group_shapes: list[dict[str, torch.Size]] = list(self.model0["param_shapes"])
        self.paddings = self._optim[0][OPTIM_KEY].get("param_alignment_paddings")
        self._check_sizes()

    def _map_partitions(self, reload: bool = True) -> None:
        if reload:
            self._optim = self.flat = None  # unmap before mapping again
            self._optim = [safe_torch_load(f, mmap=True) for f in self.optim_files]
        key = "fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"
        flat = []
        for f, sd in zip(self.optim_files, self._optim):
            groups = sd[OPTIM_KEY].get(key)
            what = key
            if self.source != "fp32":     # the moments: one flat tensor per fp32 group, same layout
                what = f"optimizer_state_dict.state[*].{self.source}"
                state = (sd[OPTIM_KEY].get("optimizer_state_dict") or {}).get("state") or {}
                groups = [state[i].get(self.source) for i in sorted(state)] if len(state) == len(groups or ()) else None
            if not isinstance(groups, list) or not all(torch.is_tensor(t) for t in groups):
                raise ZeroCheckpointError(f"{f}: {OPTIM_KEY}.{what} is missing or not a list of tensors")
            flat.append([t.detach().reshape(-1) for t in groups])  # saved with requires_grad
        self.flat = flat

    def _account(self, t: torch.Tensor) -> bool:
        """Count bytes read; re-map the partitions (releasing their pages) past ``remap_bytes``."""
        self._since_remap += t.numel() * t.element_size()
        if self.remap_bytes is None or self._since_remap < self.remap_bytes:
            return False
        self._since_remap = 0
        self._map_partitions()
        return True

    # ------------------------------------------------------------------ metadata
    @property
    def optimizer_state(self) -> dict[str, Any]:
        """Rank 0's ZeRO optimizer state (stage, loss scaler, the base optimizer's state dict, fp32 groups)."""
        return self._optim[0][OPTIM_KEY]

    def params(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The trainable parameters (of ``source``), in flat-buffer order, one at a time."""
        return self._stage3_params() if self.stage == 3 else self._stage12_params()

    @property
    def global_steps(self) -> Optional[int]:
        return self.model0.get("global_steps")

    def _frozen(self) -> dict[str, torch.Size]:
        return dict(self.model0.get("frozen_param_shapes") or {})

    def _buffers(self) -> list[str]:
        """Tensors taken from the rank-0 ``module`` state dict: the buffers and, for stages 1/2 (whose
        ``module`` holds full tensors), parameters the optimizer does not own — frozen parameters that
        DeepSpeed lists nowhere else at stage 1 (its own zero_to_fp32 drops them)."""
        module = self.model0["module"]
        names = [n for n in self.model0["buffer_names"] if n in module]
        if self.stage <= 2:
            owned = {n for g in self.group_shapes for n in g} | set(self._frozen()) | set(names) | \
                {a for a, _ in self._shared()}
            names += [n for n in module if n not in owned]
        return names

    def _shared(self) -> list[tuple[str, str]]:
        return [(a, b) for a, b in (self.model0.get("shared_params") or {}).items()]

    def _order(self) -> list[str]:
        """Reading order: flat-buffer order of the trainable parameters (param groups, e.g. decay /
        no-decay, interleave the module order — following the buffers keeps memory at one tensor),
        then frozen parameters, buffers and tied names."""
        return [n for g in self.group_shapes for n in g] + list(self._frozen()) + self._buffers() + \
            [a for a, _ in self._shared()]

    def specs(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        fp32 = torch.float32
        for g in self.group_shapes:
            shapes.update({n: (tuple(s), fp32) for n, s in g.items()})
        shapes.update({n: (tuple(s), fp32) for n, s in self._frozen().items()})
        module = self.model0["module"]
        for n in self._buffers():
            b = module[n]
            shapes[n] = (tuple(b.shape), fp32 if b.is_floating_point() else b.dtype)
        for a, b in self._shared():
            if b in shapes:
                shapes[a] = shapes[b]
        return [(n, *shapes[n]) for n in self._order() if n in shapes]

    def _check_sizes(self) -> None:
        w = self.world
        numel = [sum(t.numel() for t in groups) for groups in self.flat]
        if self.stage == 3:  # every rank holds the same slice length of every parameter
            if len(set(numel)) != 1:
                raise ZeroCheckpointError(f"{self.tag_dir}: ranks hold fp32 partitions of different sizes {numel}")
            need = sum(math.ceil(math.prod(s) / w) for g in self.group_shapes for s in g.values())
            if need != numel[0]:
                raise ZeroCheckpointError(f"{self.optim_files[0]}: fp32_flat_groups hold {numel[0]} elements per "
                                          f"rank, param_shapes need {need} (mismatched model_states file?)")
        else:
            if len(self.flat[0]) != len(self.group_shapes):
                raise ZeroCheckpointError(f"{self.optim_files[0]}: {len(self.flat[0])} fp32 groups, "
                                          f"param_shapes lists {len(self.group_shapes)}")
            align = 2 * w  # stage 1/2 pad each group to a multiple of 2*world (DeepSpeed's NCCL alignment)
            for gi, g in enumerate(self.group_shapes):
                used = sum(math.prod(s) for s in g.values())
                if self.paddings is not None:
                    used += sum(self.paddings[gi])
                avail = sum(self.flat[r][gi].numel() for r in range(w))
                if math.ceil(used / align) * align != math.ceil(avail / align) * align:
                    raise ZeroCheckpointError(f"{self.optim_files[0]}: group {gi} holds {avail} elements, "
                                              f"its parameters need {used}")

    # ------------------------------------------------------------------ data
    def _stage3_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        starts = [0]
        for t in self.flat[0][:-1]:
            starts.append(starts[-1] + t.numel())
        off = 0
        for g in self.group_shapes:
            for name, shape in g.items():
                n = math.prod(shape)
                k = math.ceil(n / self.world)
                chunks = [c for r in range(self.world) for c in _read_range(self.flat[r], starts, off, off + k)]
                t = torch.cat(chunks)[:n].view(tuple(shape)).clone()
                del chunks
                self._account(t)
                yield name, t
                off += k

    def _stage12_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        for gi, g in enumerate(self.group_shapes):
            pieces = [self.flat[r][gi] for r in range(self.world)]
            starts = [0]
            for t in pieces[:-1]:
                starts.append(starts[-1] + t.numel())
            off = 0
            for pi, (name, shape) in enumerate(g.items()):
                n = math.prod(shape)
                t = torch.cat(_read_range(pieces, starts, off, off + n)).view(tuple(shape)).clone()
                if self._account(t):
                    pieces = [self.flat[r][gi] for r in range(self.world)]
                yield name, t
                off += n + (self.paddings[gi][pi] if self.paddings is not None else 0)

    def _frozen_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        frozen = self._frozen()
        if not frozen:
            return
        if self.stage == 3:
            states = [self.model0] + [safe_torch_load(f, mmap=True) for f in self.model_files[1:]]
        else:
            states = [self.model0]  # stages 1/2 keep frozen parameters whole on rank 0
        for name, shape in frozen.items():
            n = math.prod(shape)
            frags = [s["frozen_param_fragments"][name].reshape(-1) for s in states]
            yield name, torch.cat(frags)[:n].view(tuple(shape)).float().clone()

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield every tensor of :meth:`specs`, in that order, one at a time."""
        module = self.model0["module"]
        shared = self._shared()
        targets = {b for _, b in shared}
        kept: dict[str, torch.Tensor] = {}  # sources of tied names (normally none)
        params = self._stage3_params() if self.stage == 3 else self._stage12_params()
        buffers = ((n, module[n].float() if module[n].is_floating_point() else module[n]) for n in self._buffers())
        for src in (params, self._frozen_params(), buffers):
            for name, t in src:
                if name in targets:
                    kept[name] = t
                yield name, t
        for name, target in shared:
            if target not in kept:
                raise ZeroCheckpointError(f"{self.tag_dir}: shared parameter {name!r} ties to {target!r}, "
                                          f"which the checkpoint does not hold")
            yield name, kept[target].clone()
