"""Loss terms of the DualForce objective, as plain functions of tensors.

The flow-matching losses are exposed as (sum, count) pieces (``masked_mse_sum_count``) so that a
sequence-parallel trainer can all-reduce both over token shards and divide once: the result is the
same mean as on one rank.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F


def masked_mse_sum_count(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of squared errors over the elements selected by ``mask`` and how many there are.

    ``mask`` (bool or 0/1) broadcasts against ``pred``; computed in fp32.
    """
    w = mask.to(torch.float32).expand(pred.shape)
    sq = (pred.float() - target.float()).pow(2)
    return (sq * w).sum(), w.sum()


def mean_from_sum_count(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``total / count``; an empty selection gives 0 (not NaN), so a loss term can be absent."""
    return total / count.clamp_min(1.0)


def per_frame_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Video [B, C, F, H, W] -> mean squared error per latent frame [B, F] (fp32)."""
    return (pred.float() - target.float()).pow(2).mean(dim=(1, 3, 4))


def sigma_bucket_edges(num_buckets: int) -> torch.Tensor:
    return torch.linspace(0.0, 1.0, num_buckets + 1, dtype=torch.float64)


def sigma_bucket_index(sigma: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Equal bins over [0, 1]; sigma = 1 falls into the last bin."""
    return (sigma.double() * num_buckets).floor().long().clamp(0, num_buckets - 1)


BUCKET_LOSS_PREFIX = "loss_video_sigma_"
BUCKET_COUNT_PREFIX = "frames_video_sigma_"   # how many frames a bucket's mean is over (its weight)


def bucket_metric_name(lo: float, hi: float) -> str:
    return f"{BUCKET_LOSS_PREFIX}{lo:.2f}_{hi:.2f}"


def bucket_count_name(loss_name: str) -> str:
    """The metric holding the frame count of a sigma-bucket loss metric."""
    return BUCKET_COUNT_PREFIX + loss_name[len(BUCKET_LOSS_PREFIX):]


def sigma_bucket_stats(frame_loss: torch.Tensor, sigma: torch.Tensor, valid: torch.Tensor, num_buckets: int
                       ) -> dict[str, tuple[float, int]]:
    """Per sigma bin: (mean of ``frame_loss`` over the valid frames in it, number of such frames).

    frame_loss, sigma [B, F]; valid [F] or [B, F] bool. Empty bins are omitted.
    """
    valid = valid.expand(sigma.shape)
    idx = sigma_bucket_index(sigma, num_buckets)[valid]
    vals = frame_loss.detach().float()[valid]
    edges = sigma_bucket_edges(num_buckets).tolist()
    stats: dict[str, tuple[float, int]] = {}
    for b in range(num_buckets):
        sel = idx == b
        n = int(sel.sum())
        if n:
            stats[bucket_metric_name(edges[b], edges[b + 1])] = (float(vals[sel].mean()), n)
    return stats


def pool_blocks(emb: torch.Tensor, valid: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-latent-frame embeddings [B, F, D] -> per causal block [B, K, D] (mean over the block's valid
    frames) and the blocks that have any valid frame [K]. ``block`` 1 returns the input."""
    if block == 1:
        return emb, valid
    f = emb.shape[1]
    # the membership matrix is built where ``valid`` lives (the host in training: no device sync)
    member = F.one_hot(torch.arange(f, device=valid.device) // block).float() * valid[:, None].float()
    count = member.sum(0)                                                   # [K]
    weights = (member / count.clamp_min(1)[None, :]).to(emb.device, emb.dtype, non_blocking=True)
    return torch.einsum("bfd,fk->bkd", emb, weights), count > 0


def gather_with_local_grad(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> tuple[torch.Tensor, int]:
    """Rows [M, D] of every rank of ``group``, concatenated in rank order, and this rank's offset in it.
    Other ranks' rows are constants; this rank's rows keep their gradient (each rank back-propagates
    its own part, and the data-parallel gradient average combines them)."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return x, 0
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device), group=group)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    padded = torch.zeros(longest, *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[:x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    rows = [x if r == rank else parts[r][:sizes[r]] for r in range(world)]
    return torch.cat(rows), sum(sizes[:rank])


def info_nce(audio_emb: torch.Tensor, struct_emb: torch.Tensor, valid: torch.Tensor, temperature: float,
             group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Symmetric InfoNCE between audio and struct embeddings of the same (clip, time step).

    audio_emb, struct_emb [B, T, D] (T = latent frames, or causal blocks after ``pool_blocks``);
    valid [T] or [B, T] bool. Every valid (clip, step) pair is a positive; all other valid steps of the
    same clip, of the other clips, and — with a data-parallel ``group`` — of every clip of the group's
    other ranks are its negatives. Embeddings are L2-normalised; logits are cosine similarities /
    temperature. The loss averages the audio->struct and struct->audio cross-entropies over this
    rank's positives.
    """
    valid = valid.expand(audio_emb.shape[:2])
    a = F.normalize(audio_emb.float()[valid], dim=-1)      # [M, D]
    s = F.normalize(struct_emb.float()[valid], dim=-1)
    a_all, offset = gather_with_local_grad(a, group)
    s_all, _ = gather_with_local_grad(s, group)
    labels = offset + torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(a @ s_all.t() / temperature, labels)
                  + F.cross_entropy(s @ a_all.t() / temperature, labels))
