"""Diffusion Forcing training noise: one sigma per causal block, drawn per sample from its own seed.

Every random draw for a sample comes from ``torch.Generator`` objects seeded only by that sample's
seed, so a global batch split over any number of ranks (or micro batches) sees identical noise.
The video and struct streams use separate generators, so switching e.g. ``diffusion.struct_sigma``
never changes the video noise of a sample.

Latent frame 0 is the clean reference image: its sigma is always 0 (it is excluded from the loss).
Frames of one causal block (``latent frame // causal_block_size``) share their block's sigma.

Besides the per-block sigmas, every sample draws what makes training match sampling (the sampler is
the contract): with probability ``diffusion.history_prob`` a prefix of blocks becomes clean / lightly
noised history (sigma ~ U[0, history_sigma_max], both streams), as the sampler's committed history is
(at ``sample_history_sigma``); and its conditions are dropped (audio with ``audio_drop_prob``, text with
``text_drop_prob``) in the form CFG's unconditional branch uses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..config import DiffusionConfig
from ..seeding import mix_seed
from ..timeline import Timeline
from .schedules import shift_sigma

# independent random streams of one sample
STREAM_VIDEO = 0
STREAM_STRUCT = 1
STREAM_HISTORY = 2
STREAM_CONDITION = 3


def sample_seeds(train_seed: int, step: int, indices: torch.Tensor) -> torch.Tensor:
    """Per-sample noise seeds ``f(train.seed, step, global sample index)`` as a LongTensor [B]."""
    return torch.tensor([mix_seed(train_seed, step, int(i)) for i in indices.reshape(-1).tolist()],
                        dtype=torch.long)


def base_sigmas(n: int, cfg: DiffusionConfig, generator: torch.Generator) -> torch.Tensor:
    """``n`` i.i.d. sigmas in [0, 1] from ``diffusion.sigma_sampler``."""
    if cfg.sigma_sampler == "uniform":
        return torch.rand(n, generator=generator, dtype=torch.float64).float()
    if cfg.sigma_sampler == "logit_normal":
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        return torch.sigmoid(cfg.logit_mean + cfg.logit_std * z).float()
    if cfg.sigma_sampler == "shifted":
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return shift_sigma(u, cfg.shift).float()
    raise ValueError(f"diffusion.sigma_sampler: {cfg.sigma_sampler!r} is not one of uniform, logit_normal, shifted")


def block_sigmas(num_blocks: int, cfg: DiffusionConfig, generator: torch.Generator) -> torch.Tensor:
    """Per-block sigmas [num_blocks]; sorted ascending (non-decreasing in time) if ``diffusion.monotonic``."""
    s = base_sigmas(num_blocks, cfg, generator)
    return torch.sort(s).values if cfg.monotonic else s


def struct_sigma_of(video_sigma: torch.Tensor, cfg: DiffusionConfig) -> torch.Tensor:
    """Struct sigma tied to the video sigma (``diffusion.struct_sigma: tied``: ``clamp(k * s, 0, 1)``);
    training and the sampler both couple the streams through this function."""
    return (cfg.struct_sigma_k * video_sigma).clamp(0.0, 1.0)


def history_prefix(num_blocks: int, cfg: DiffusionConfig, generator: torch.Generator) -> int:
    """Blocks 0..n-1 of the window are history (n = 0: none). Drawn with probability ``history_prob``:
    n uniform in 1..num_blocks-1, so at least the last block keeps a training sigma."""
    use = float(torch.rand(1, generator=generator, dtype=torch.float64)) < cfg.history_prob
    if not use or num_blocks < 2:
        return 0
    return 1 + int(torch.randint(num_blocks - 1, (1,), generator=generator))


def history_sigmas(n: int, cfg: DiffusionConfig, generator: torch.Generator) -> torch.Tensor:
    """``n`` clean / lightly noised history sigmas, U[0, history_sigma_max]."""
    return (torch.rand(n, generator=generator, dtype=torch.float64) * cfg.history_sigma_max).float()


def with_history(per_block: torch.Tensor, n: int, cfg: DiffusionConfig, generator: torch.Generator) -> torch.Tensor:
    """Blocks 0..n-1 set to history sigmas (kept non-decreasing under ``diffusion.monotonic``)."""
    if n == 0:
        return per_block
    out = per_block.clone()
    out[:n] = history_sigmas(n, cfg, generator)
    return torch.sort(out).values if cfg.monotonic else out


def frame_sigmas(per_block: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Per-block [..., K] -> per-latent-frame [..., F], with frame 0 (the clean reference) at 0."""
    s = per_block[..., blocks].clone()
    s[..., 0] = 0.0
    return s


@dataclass
class SampleNoise:
    """The noise of one sample (unbatched)."""
    sigma_video: torch.Tensor                    # [F]
    eps_video: torch.Tensor                      # same shape as the video latent [C, F, h, w]
    sigma_struct: Optional[torch.Tensor] = None  # [F]
    eps_struct: Optional[torch.Tensor] = None    # [N, motion_dim]
    history_blocks: Optional[torch.Tensor] = None  # [] int: blocks 0..n-1 are history
    audio_drop: Optional[torch.Tensor] = None      # [] bool: audio dropped for this sample
    text_drop: Optional[torch.Tensor] = None       # [] bool: text dropped for this sample


def draw_sample_noise(seed: int, video_shape: Sequence[int], struct_shape: Optional[Sequence[int]],
                      cfg: DiffusionConfig, causal_block_size: int) -> SampleNoise:
    """All noise of one sample. ``video_shape`` is [C, F, h, w]; ``struct_shape`` [N, D] or None."""
    num_frames = int(video_shape[1])
    blocks = Timeline(block=causal_block_size).block_of(torch.arange(num_frames))
    num_blocks = int(blocks[-1]) + 1

    g = torch.Generator().manual_seed(mix_seed(seed, STREAM_VIDEO))
    video_blocks = block_sigmas(num_blocks, cfg, g)
    eps_video = torch.randn(tuple(video_shape), generator=g)
    gh = torch.Generator().manual_seed(mix_seed(seed, STREAM_HISTORY))
    n_hist = history_prefix(num_blocks, cfg, gh)
    video_blocks = with_history(video_blocks, n_hist, cfg, gh)
    gc = torch.Generator().manual_seed(mix_seed(seed, STREAM_CONDITION))
    drops = torch.rand(2, generator=gc, dtype=torch.float64)
    noise = SampleNoise(sigma_video=frame_sigmas(video_blocks, blocks), eps_video=eps_video,
                        history_blocks=torch.tensor(n_hist),
                        audio_drop=drops[0] < cfg.audio_drop_prob, text_drop=drops[1] < cfg.text_drop_prob)
    if struct_shape is None:
        return noise

    g = torch.Generator().manual_seed(mix_seed(seed, STREAM_STRUCT))
    if cfg.struct_sigma == "tied":
        struct_blocks = struct_sigma_of(video_blocks, cfg)
    elif cfg.struct_sigma == "independent":
        struct_blocks = block_sigmas(num_blocks, cfg, g)
        struct_blocks = with_history(struct_blocks, n_hist, cfg, gh)
    else:
        raise ValueError(f"diffusion.struct_sigma: {cfg.struct_sigma!r} is not one of independent, tied")
    noise.sigma_struct = frame_sigmas(struct_blocks, blocks)
    noise.eps_struct = torch.randn(tuple(struct_shape), generator=g)
    return noise


def draw_batch_noise(seeds: torch.Tensor, video_shape: Sequence[int], struct_shape: Optional[Sequence[int]],
                     cfg: DiffusionConfig, causal_block_size: int) -> SampleNoise:
    """Per-sample noise stacked over the batch: sigma [B, F], eps [B, ...] (CPU tensors)."""
    draws = [draw_sample_noise(int(s), video_shape, struct_shape, cfg, causal_block_size)
             for s in seeds.reshape(-1).tolist()]
    out = SampleNoise(sigma_video=torch.stack([d.sigma_video for d in draws]),
                      eps_video=torch.stack([d.eps_video for d in draws]),
                      history_blocks=torch.stack([d.history_blocks for d in draws]),
                      audio_drop=torch.stack([d.audio_drop for d in draws]),
                      text_drop=torch.stack([d.text_drop for d in draws]))
    if struct_shape is not None:
        out.sigma_struct = torch.stack([d.sigma_struct for d in draws])
        out.eps_struct = torch.stack([d.eps_struct for d in draws])
    return out
