"""The seeds of every random draw, derived from the run's seed: the same on every rank and world size."""
from __future__ import annotations

SEED_STRIDE = 1_000_003  # a prime: seed·stride + a smaller number tells every (seed, number) pair apart
REFRESH_STRIDE = 10_007  # a prime above any number of layers a refresh selects


def selection_seed(seed: int, refresh_index: int, layer_index: int) -> int:
    """The seed of one layer's random draws (random B\\A, SET's growth, random static masks) at one refresh (0: at
    the start)."""
    return seed * SEED_STRIDE + refresh_index * REFRESH_STRIDE + layer_index
