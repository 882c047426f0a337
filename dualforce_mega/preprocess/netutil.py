"""Shared by the preprocessing steps that run a network: the device choice and ``--random-models
tiny`` (tiny randomly initialised instances of the real network classes for smoke runs).

Every process (and every run) must build the SAME random weights, or features of clips prepared
by different workers would not be comparable: ``random_init`` seeds a forked RNG."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

RANDOM_PRESETS = ("tiny",)
RANDOM_MODEL_SEED = 0


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else is a torch device string."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def random_init(seed: int = RANDOM_MODEL_SEED) -> Iterator[None]:
    """Initialise modules built inside from ``seed`` without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
