"""Process groups: the one place that splits the world into data-parallel x sequence-parallel.

Ranks ``[i*sp, (i+1)*sp)`` form sequence-parallel group ``i`` (neighbouring ranks share a node, so the
all-to-all stays on the fast link); ranks with the same position inside their SP group form a
data-parallel group. The loader shards by ``dp_rank`` so all ranks of one SP group see the same sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist


@dataclass
class Groups:
    dp_rank: int
    dp_size: int
    sp_rank: int
    sp_size: int
    sp_group: Optional[dist.ProcessGroup]   # None when sp_size == 1
    dp_group: Optional[dist.ProcessGroup]   # None = the default (world) group when sp_size == 1


def init_groups(sp: int) -> Groups:
    """Build the groups for sequence-parallel size ``sp`` (collective: every rank must call it)."""
    if not dist.is_initialized():
        if sp != 1:
            raise ValueError(f"parallel.sp={sp} needs torch.distributed to be initialised")
        return Groups(dp_rank=0, dp_size=1, sp_rank=0, sp_size=1, sp_group=None, dp_group=None)
    world, rank = dist.get_world_size(), dist.get_rank()
    if sp < 1 or world % sp != 0:
        raise ValueError(f"parallel.sp={sp} must divide the world size {world}")
    if sp == 1:
        return Groups(dp_rank=rank, dp_size=world, sp_rank=0, sp_size=1, sp_group=None, dp_group=None)
    sp_group = dp_group = None
    # new_group is collective over the world: every rank creates every group, keeps its own.
    for start in range(0, world, sp):
        g = dist.new_group(list(range(start, start + sp)))
        if start <= rank < start + sp:
            sp_group = g
    for offset in range(sp):
        g = dist.new_group(list(range(offset, world, sp)))
        if rank % sp == offset:
            dp_group = g
    return Groups(dp_rank=rank // sp, dp_size=world // sp, sp_rank=rank % sp, sp_size=sp,
                  sp_group=sp_group, dp_group=dp_group)
