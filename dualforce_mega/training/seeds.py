"""Per-sample noise seeds that do not depend on how a global batch is split across ranks.

seed = f(train.seed, step, global sample index): the objective draws each sample's sigma and noise from
its own generator, so 1 rank x 4 micro batches and 4 ranks x 1 micro batch see identical noise.
"""
from __future__ import annotations

import numpy as np
import torch

_INT63 = (1 << 63) - 1   # torch.long is signed: keep seeds non-negative


def sample_seeds(base_seed: int, step: int, sample_index: torch.Tensor) -> torch.Tensor:
    """LongTensor [B] of seeds; ``sample_index`` is the loader's ``__index__`` (global within the stream)."""
    if sample_index.ndim != 1:
        raise ValueError(f"__index__: expected a 1-d tensor, got shape {tuple(sample_index.shape)}")
    seeds = [int(np.random.SeedSequence([base_seed, step, int(i)]).generate_state(1, np.uint64)[0]) & _INT63
             for i in sample_index.tolist()]
    return torch.tensor(seeds, dtype=torch.long)
