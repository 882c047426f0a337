"""Seed mixing shared by the data (synthetic clips), the training noise and the trainer: one
integer hash so that every random stream is a pure function of a few integers."""
from __future__ import annotations

_MASK64 = (1 << 64) - 1
# torch.Generator.manual_seed takes a non-negative int64
_SEED_BITS = 63


def _splitmix64(x: int) -> int:
    """One round of splitmix64: a bijective integer mixer, so nearby seeds give unrelated streams."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of integers (order matters)."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h & ((1 << _SEED_BITS) - 1)


__all__ = ["mix_seed"]
