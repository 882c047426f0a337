"""Ulysses sequence parallelism for the DualForce model (DESIGN §6).

Only the video stream is long, so only it is sharded: the video tokens (padded to a multiple of the
group size P, padding carrying block id ``PAD_BLOCK`` so no real query sees it) are split into P
contiguous shards, one per rank; the struct stream, audio and text are replicated on every rank.

Per attention:
  video self-attention   all-to-all  [B, L/P, H, D] -> [B, L, H/P, D], block-causal attention over the
                         full sequence for H/P heads, all-to-all back (``UlyssesAttention``).
  bridge video->struct   video queries of the shard, replicated struct keys: no communication.
  bridge struct->video   replicated struct queries need every video key: all-gather K/V
                         (``GatheredKeyAttention``; backward = reduce-scatter).
  text / audio cross     local per token (audio windows follow each token's frame; ``TokenGroups``).
The output head's small per-token output (out_channels * patch = 64 values, against dim = 1536 for one
hidden all-to-all) is all-gathered, so every rank returns the full prediction and computes the full
(identical) loss: the objective, its metrics and the aux heads need no sharding and no (sum, count)
all-reduce. KV-cache inference refuses to run sequence-parallel.

Gradients. Every communication op has its exact adjoint as backward (all-to-all <-> inverse
all-to-all, all-gather <-> reduce-scatter of the sum), so the distributed backward computes the
gradient of the sum of the P ranks' losses: each rank's loss is the whole sample's loss L, hence the
parameter gradients of an SP group sum to P * dL/dtheta. The struct stream needs no special case: each
rank's replica receives its own loss' struct gradient plus the video-shard contributions routed to
it. DeepSpeed averages gradients over the whole world W = D * P (ZeRO-3 partitions over the world),
so the result is (1/D) * sum over the D data-parallel batches of dL/dtheta -- exactly the gradient of
data parallelism over D ranks without sequence parallelism. No loss or gradient is rescaled by P.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist

from ..models.attention import MaskSpec, block_attention
from ..models.dualforce import DualForceModel

log = logging.getLogger(__name__)

# newer torch names it reduce_scatter_single (reduce_scatter_tensor is deprecated); older builds lack it
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# --------------------------------------------------------------------------------------
# collectives with exact adjoints
# --------------------------------------------------------------------------------------
def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup,
                size: int) -> torch.Tensor:
    """Split ``x`` into ``size`` chunks along ``scatter_dim``, send chunk j to rank j, and concatenate
    what arrives (in rank order) along ``gather_dim``."""
    send = torch.stack([c.contiguous() for c in x.chunk(size, dim=scatter_dim)])
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup,
                size: int) -> torch.Tensor:
        ctx.dims, ctx.group, ctx.size = (scatter_dim, gather_dim), group, size
        return _all_to_all(x, scatter_dim, gather_dim, group, size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim, ctx.group, ctx.size), None, None, None, None


class _GatherSequence(torch.autograd.Function):
    """All-gather along ``dim`` (shards in rank order); backward reduce-scatters the summed gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup, size: int) -> torch.Tensor:
        ctx.dim, ctx.group, ctx.size = dim, group, size
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        chunks = torch.stack([c.contiguous() for c in grad.chunk(ctx.size, dim=ctx.dim)])  # [P, *shard]
        out = torch.empty_like(chunks[0])
        _reduce_scatter(out, chunks.flatten(0, 1), op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None, None, None


# --------------------------------------------------------------------------------------
# attention hooks (installed on ``models.blocks.Attention.sequence_parallel``)
# --------------------------------------------------------------------------------------
class _GroupBound:
    """Holds a process group; deep copies (EMA, model snapshots) share it instead of copying it."""

    def __init__(self, group: dist.ProcessGroup, size: int):
        self.group, self.size = group, size

    def __deepcopy__(self, memo: dict) -> "_GroupBound":
        return self


class UlyssesAttention(_GroupBound):
    """Video self-attention: sequence-sharded -> head-sharded, attention over all tokens, back."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec,
                 backend: str) -> torch.Tensor:
        check_heads(self.size, q.shape[2])
        # one all-to-all for q, k and v: [3, B, L/P, H, D] -> [3, B, L, H/P, D]
        qkv = _AllToAll.apply(torch.stack([q, k, v]), 3, 2, self.group, self.size)
        out = block_attention(qkv[0], qkv[1], qkv[2], spec, backend)
        return _AllToAll.apply(out, 1, 2, self.group, self.size)


class GatheredKeyAttention(_GroupBound):
    """Replicated queries over sharded keys (struct->video bridge): all-gather K/V along the sequence."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec,
                 backend: str) -> torch.Tensor:
        kv = _GatherSequence.apply(torch.stack([k, v]), 2, self.group, self.size)
        return block_attention(q, kv[0], kv[1], spec, backend)


class SequenceParallel(_GroupBound):
    """The model-level context (``DualForceModel.sequence_parallel``)."""

    def __init__(self, group: dist.ProcessGroup, size: int, rank: int):
        super().__init__(group, size)
        self.rank = rank

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return _GatherSequence.apply(x, 1, self.group, self.size)


def check_heads(sp: int, heads: int) -> None:
    if sp < 1 or heads % sp:
        raise ValueError(f"parallel.sp={sp} must divide model.heads={heads} "
                         "(Ulysses shards attention heads across the sequence-parallel group)")


def apply_sequence_parallel(model: DualForceModel, sp_group: Optional[dist.ProcessGroup]
                            ) -> Optional[SequenceParallel]:
    """Shard ``model``'s video tokens over ``sp_group`` (None or a group of one rank: turn SP off).

    Installs the model-level context and the hooks of every attention that sees sharded video
    tokens on both sides or as keys: the video tower's self-attention and the bridge's
    struct->video direction. Collective-free; call it on every rank before ``deepspeed.initialize``.
    """
    if not isinstance(model, DualForceModel):
        raise TypeError(f"apply_sequence_parallel: expected a DualForceModel, got {type(model).__name__} "
                        "(apply it before wrapping the model)")
    size = dist.get_world_size(sp_group) if sp_group is not None else 1
    video_attn = [blk.self_attn for blk in model.video.blocks]
    bridge_attn = [layer.v2s for layer in model.bridge if layer.v2s is not None]
    if size == 1:
        model.sequence_parallel = None
        for attn in video_attn + bridge_attn:
            attn.sequence_parallel = None
        return None
    check_heads(size, model.cfg.heads)
    ctx = SequenceParallel(sp_group, size, dist.get_rank(sp_group))
    model.sequence_parallel = ctx
    for attn in video_attn:
        attn.sequence_parallel = UlyssesAttention(sp_group, size)
    for attn in bridge_attn:
        attn.sequence_parallel = GatheredKeyAttention(sp_group, size)
    log.info("sequence parallel: %d ranks (rank %d); Ulysses all-to-all in %d video self-attention layers, "
             "K/V all-gather in %d struct->video bridge layers; struct stream and audio replicated",
             size, ctx.rank, len(video_attn), len(bridge_attn))
    return ctx
