"""Resume on a different number of ranks (GPUs, nodes, or sequence-parallel degree): reshard the checkpoint.

Batches and noise do not depend on the world size (``data_feed``), so a run continues exactly if the
state is the same: fp32 master weights, Adam moments and step, LR schedule, data position of every
logical stream. ZeRO-3 partitions each parameter over the world, so a checkpoint of W ranks does not fit
an engine of W' ranks; DeepSpeed itself refuses ("DP world size of W but the current world size is W'").

Here every rank reads the full tensors from the checkpoint (``zero_reader``, through the safe loader,
memory-mapped, one parameter at a time), cuts its own ZeRO-3 partition of each parameter in the order of
the new engine's optimizer sub-groups, and hands DeepSpeed the state dict it would have saved itself at
this world size (``optimizer.load_state_dict``), which also refreshes the model's partitions. The rank
states (RNG, loader positions) of all saved ranks are merged: a rank takes the loader positions of the
logical streams it owns now.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .zero_reader import SOURCES, ZeroCheckpoint

log = logging.getLogger(__name__)


def merge_rank_states(states: list[dict[str, Any]], rank: int) -> dict[str, Any]:
    """This rank's resumed state from every saved rank's: the loader positions of all logical streams
    (``GlobalBatchFeed`` picks its own), and the RNG state of the same rank (of rank mod the saved count
    after a resize; no training computation draws from these generators: noise is seeded per sample)."""
    streams, loaders = [], []
    for state in states:
        for s, loader in zip(state["data"]["streams"], state["data"]["loaders"]):
            if s not in streams:          # ranks of one sequence-parallel group save the same streams
                streams.append(s)
                loaders.append(loader)
    merged = dict(states[rank % len(states)])
    merged["data"] = {"streams": streams, "loaders": loaders}
    return merged


def _partition(full: torch.Tensor, rank: int, world: int, k: int) -> torch.Tensor:
    """ZeRO-3's slice of one parameter: padded to ``k * world`` elements, rank r holds [r*k, (r+1)*k)."""
    flat = full.reshape(-1)
    if flat.numel() < k * world:
        flat = torch.cat([flat, flat.new_zeros(k * world - flat.numel())])
    return flat[rank * k:(rank + 1) * k]


def load_resharded(engine: Any, tag_dir: Path) -> dict[str, Any]:
    """Collective. Load ``tag_dir`` (written by any number of ranks) into a ZeRO-3 ``engine``; returns the
    checkpoint's client state (``step``, ``world_size``)."""
    stage = engine.zero_optimization_stage()
    if stage != 3:
        raise ValueError(f"{tag_dir}: resuming on a different number of ranks needs parallel.zero_stage=3 "
                         f"(this run has {stage}); resume with the world size it was written with")
    opt = engine.optimizer
    rank, world = dist.get_rank(group=opt.dp_process_group), dist.get_world_size(group=opt.dp_process_group)
    readers = {src: ZeroCheckpoint(tag_dir, source=src) for src in SOURCES}
    streams = {src: reader.params() for src, reader in readers.items()}
    names = {id(p): n for n, p in engine.module.named_parameters()}
    flats: dict[str, list[torch.Tensor]] = {src: [] for src in SOURCES}
    for sub_group in opt.fp16_groups:
        parts: dict[str, list[torch.Tensor]] = {src: [] for src in SOURCES}
        for p in sub_group:
            for src in SOURCES:
                name, full = next(streams[src], (None, None))
                if name != names[id(p)]:
                    raise ValueError(f"{tag_dir}: parameter {names[id(p)]!r} of the model is {name!r} in the "
                                     "checkpoint (a different model or parameter grouping)")
                parts[src].append(_partition(full.float(), rank, world, p.partition_numel()))
        for src in SOURCES:
            flats[src].append(torch.cat(parts[src]) if parts[src] else torch.zeros(0))
    leftover = next(streams["fp32"], None)
    if leftover is not None:
        raise ValueError(f"{tag_dir}: holds parameter {leftover[0]!r}, which the model does not train")

    saved = readers["fp32"].optimizer_state
    base = saved["optimizer_state_dict"]
    step = next(iter(base["state"].values()))["step"]
    # torch numbers the base optimizer's parameters group by group; DeepSpeed appends each sub-group's
    # fp32 partition to its parameter group in sub-group order
    order = sorted(range(len(opt.fp16_groups)), key=lambda sg: (opt.sub_group_to_group_id[sg], sg))
    index = {sg: i for i, sg in enumerate(order)}
    groups = [dict(g, params=[index[sg] for sg in order if opt.sub_group_to_group_id[sg] == gi])
              for gi, g in enumerate(base["param_groups"])]
    state = {index[sg]: {"step": step.clone() if torch.is_tensor(step) else step, "exp_avg": flats["exp_avg"][sg],
                         "exp_avg_sq": flats["exp_avg_sq"][sg]} for sg in range(len(opt.fp16_groups))}
    # the loss scaler is the engine's own (static 1 for fp32 / bf16; the reader keeps DeepSpeed objects inert)
    mine = {"loss_scaler": opt.loss_scaler, "dynamic_loss_scale": opt.dynamic_loss_scale, "overflow": False,
            "zero_stage": saved["zero_stage"], "partition_count": world, "fp32_flat_groups": flats["fp32"],
            "optimizer_state_dict": {"state": state, "param_groups": groups}}
    opt.load_state_dict([mine if r == rank else None for r in range(world)], load_optimizer_states=True)

    model0 = readers["fp32"].model0
    for name in model0.get("buffer_names") or []:
        engine.module.get_buffer(name).copy_(model0["module"][name])
    if engine.lr_scheduler is not None and model0.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(model0["lr_scheduler"])
    engine.global_steps = model0.get("global_steps", engine.global_steps)
    engine.global_samples = model0.get("global_samples", engine.global_samples)
    engine.skipped_steps = model0.get("skipped_steps", engine.skipped_steps)
    log.info("resharded %s from %d to %d ranks (%d parameters)", tag_dir, readers["fp32"].world, world, len(names))
    return {"step": model0["step"], "world_size": model0.get("world_size")}
