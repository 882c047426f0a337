"""Process groups: the one place that splits the world into data-parallel x sequence-parallel.

Ranks ``[i*sp, (i+1)*sp)`` form sequence-parallel group ``i`` (neighbouring ranks share a node, so the
all-to-all stays on the fast link); ranks with the same position inside their SP group form a
data-parallel group. The loader shards by ``dp_rank`` so all ranks of one SP group see the same sample.
ZeRO-3 partitions parameters over the whole world, not over these groups.

Implementations (``impl``):
  megatron  ``megatron.core.parallel_state.initialize_model_parallel`` with tensor = pipeline = 1 and
            ``context_parallel_size = sp``: its context-parallel groups have exactly the layout above
            (consecutive ranks) and serve as the Ulysses groups; its data-parallel groups (without
            context parallelism) are ours. Only its group bookkeeping is used -- its CUDA RNG helpers
            and ring-attention context parallelism are not.
  torch     the same groups from ``torch.distributed.new_group``.
  auto      megatron when it imports and initialises, else torch. The log says which one is used.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

log = logging.getLogger(__name__)

IMPLS = ("auto", "megatron", "torch")


@dataclass
class Groups:
    dp_rank: int
    dp_size: int
    sp_rank: int
    sp_size: int
    sp_group: Optional[dist.ProcessGroup]   # None when sp_size == 1
    dp_group: Optional[dist.ProcessGroup]   # None = the default (world) group when sp_size == 1
    impl: str = "none"                      # which implementation built the groups


def _megatron_groups(sp: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        if ps.get_context_parallel_world_size() != sp or ps.get_tensor_model_parallel_world_size() != 1 \
                or ps.get_pipeline_model_parallel_world_size() != 1:
            raise RuntimeError(f"megatron parallel_state is already initialised with context-parallel size "
                               f"{ps.get_context_parallel_world_size()}, not parallel.sp={sp}")
    else:
        ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                     context_parallel_size=sp)
    return ps.get_context_parallel_group(), ps.get_data_parallel_group(with_context_parallel=False)


def _torch_groups(sp: int, world: int, rank: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
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
    return sp_group, dp_group


def init_groups(sp: int, impl: str = "auto") -> Groups:
    """Build the groups for sequence-parallel size ``sp`` (collective: every rank must call it)."""
    if impl not in IMPLS:
        raise ValueError(f"init_groups: impl={impl!r} is not one of {IMPLS}")
    if not dist.is_initialized():
        if sp != 1:
            raise ValueError(f"parallel.sp={sp} needs torch.distributed to be initialised")
        return Groups(dp_rank=0, dp_size=1, sp_rank=0, sp_size=1, sp_group=None, dp_group=None)
    world, rank = dist.get_world_size(), dist.get_rank()
    if sp < 1 or world % sp != 0:
        raise ValueError(f"parallel.sp={sp} must divide the world size {world}")
    if sp == 1:
        log.info("process groups: world %d = dp %d x sp 1 (no sequence parallelism; the world is the dp group)",
                 world, world)
        return Groups(dp_rank=rank, dp_size=world, sp_rank=0, sp_size=1, sp_group=None, dp_group=None)
    used = impl
    if impl in ("auto", "megatron"):
        try:
            sp_group, dp_group = _megatron_groups(sp)
            used = "megatron"
        except Exception as e:  # not installed, or a version whose initialisation needs CUDA
            if impl == "megatron":
                raise
            # every rank takes the same branch: the failure is deterministic (import / API / device)
            log.warning("megatron.core.parallel_state unavailable (%s: %s); building groups with "
                        "torch.distributed.new_group", type(e).__name__, e)
            used = "torch"
    if used == "torch":
        sp_group, dp_group = _torch_groups(sp, world, rank)
    groups = Groups(dp_rank=rank // sp, dp_size=world // sp, sp_rank=rank % sp, sp_size=sp,
                    sp_group=sp_group, dp_group=dp_group, impl=used)
    _check(groups, world)
    log.info("process groups (%s): world %d = dp %d x sp %d; rank %d is dp rank %d, sp rank %d",
             used, world, groups.dp_size, sp, rank, groups.dp_rank, groups.sp_rank)
    return groups


def _check(groups: Groups, world: int) -> None:
    """The built groups must have the documented layout (guards against a library changing its order)."""
    rank = dist.get_rank()
    sp_ranks = dist.get_process_group_ranks(groups.sp_group)
    dp_ranks = dist.get_process_group_ranks(groups.dp_group)
    start = groups.dp_rank * groups.sp_size
    if sorted(sp_ranks) != list(range(start, start + groups.sp_size)) or \
            sorted(dp_ranks) != list(range(groups.sp_rank, world, groups.sp_size)) or \
            dist.get_rank(groups.sp_group) != groups.sp_rank or dist.get_rank(groups.dp_group) != groups.dp_rank:
        raise RuntimeError(f"rank {rank}: {groups.impl} built sequence-parallel group {sp_ranks} and data-parallel "
                           f"group {dp_ranks}, not the documented consecutive-rank layout")


def destroy_groups(groups: Groups) -> None:
    """Forget megatron's global group state (tests; a second ``init_groups`` in one process)."""
    if groups.impl == "megatron":
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
