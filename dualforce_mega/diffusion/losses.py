"""Loss terms of the DualForce objective, as plain functions of tensors.

The flow-matching losses are exposed as (sum, count) pieces (``masked_mse_sum_count``) so that a
sequence-parallel trainer can all-reduce both over token shards and divide once: the result is the
same mean as on one rank.
"""
from __future__ import annotations

import torch
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


def bucket_metric_name(lo: float, hi: float) -> str:
    return f"loss_video_sigma_{lo:.2f}_{hi:.2f}"


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


def info_nce(audio_emb: torch.Tensor, struct_emb: torch.Tensor, valid: torch.Tensor, temperature: float
             ) -> torch.Tensor:
    """Symmetric InfoNCE between audio and struct embeddings of the same (clip, latent frame).

    audio_emb, struct_emb [B, F, D]; valid [F] or [B, F] bool. Every valid (clip, frame) pair is a
    positive; all other valid frames of the same clip and of the other clips are its negatives.
    Embeddings are L2-normalised; logits are cosine similarities / temperature. The loss averages
    the audio->struct and struct->audio cross-entropies.
    """
    valid = valid.expand(audio_emb.shape[:2])
    a = F.normalize(audio_emb.float()[valid], dim=-1)      # [M, D]
    s = F.normalize(struct_emb.float()[valid], dim=-1)
    logits = a @ s.t() / temperature                       # [M, M]
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
