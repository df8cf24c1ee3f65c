"""Layout-independent randomness: generators keyed by what a random number is *for*.

A mask, a Gumbel noise draw or a remasking draw is a pure function of a key such as
``(seed, iteration, sample uid, MC index)`` or ``(seed, sample uid, step)``: never of the rank,
the micro-batch, the data-parallel size or the resume point. :func:`keyed_generator` turns a key
into a fresh CPU ``torch.Generator`` through a stable 64-bit hash (splitmix64; not Python's
``hash``, which is salted per process), so every rank derives the same stream from the same key.
"""

from __future__ import annotations

import torch

_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def hash64(*values: int) -> int:
    """Stable 64-bit hash of a tuple of integers (negative values are taken mod 2**64)."""
    h = 0x6A09E667F3BCC908
    for v in values:
        h = _splitmix64(h ^ (int(v) & _M64))
    return h


def keyed_generator(*key: int) -> torch.Generator:
    """A fresh CPU generator for ``key``: the same key gives the same stream on every rank."""
    return torch.Generator(device="cpu").manual_seed(hash64(*key) & ((1 << 63) - 1))
