"""How much of each layer to keep: uniform or Erdős–Rényi-Kernel (ERK) densities.

Uniform gives every layer the global density. ERK (Evci et al. 2020, used by RigL and
the Top-KAST paper's ablations) makes a layer's density proportional to
(fan_in + fan_out) / (fan_in · fan_out), scaled so the total number of kept weights
equals the uniform budget; layers that would exceed density 1 are kept dense and the
others re-scaled.
"""
from __future__ import annotations

from typing import Sequence


def _erk_densities(shapes: Sequence[tuple[int, int]], density: float) -> list[float]:
    sizes = [out_f * in_f for out_f, in_f in shapes]
    raw = [(out_f + in_f) / (out_f * in_f) for out_f, in_f in shapes]
    budget = density * sum(sizes)
    dense: set[int] = set()
    while True:
        free = [i for i in range(len(shapes)) if i not in dense]
        remaining = budget - sum(sizes[i] for i in dense)
        scale = remaining / sum(raw[i] * sizes[i] for i in free) if free else 0.0
        overfull = {i for i in free if raw[i] * scale >= 1.0}
        if not overfull:
            return [1.0 if i in dense else raw[i] * scale for i in range(len(shapes))]
        dense |= overfull


def layer_densities(shapes: Sequence[tuple[int, int]], density: float, distribution: str) -> list[float]:
    """Per-layer densities for weight matrices of the given (out, in) shapes."""
    if distribution == "uniform":
        return [density] * len(shapes)
    if distribution == "erk":
        return _erk_densities(shapes, density)
    raise ValueError(f"Unknown distribution {distribution!r}; use 'uniform' or 'erk'.")


def kept_count(numel: int, density: float) -> int:
    """round(density · n), at least 1 and at most n, so every layer keeps a forward path."""
    return min(numel, max(1, round(density * numel)))
