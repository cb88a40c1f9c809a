"""How much of each layer to keep: uniform, Erdős–Rényi-Kernel (ERK) or global-magnitude densities.

Uniform gives every layer the global density. ERK (Evci et al. 2020, used by RigL and
the Top-KAST paper's ablations) makes a layer's density proportional to
(fan_in + fan_out) / (fan_in · fan_out), scaled so the total number of kept weights
equals the uniform budget; layers that would exceed density 1 are kept dense and the
others re-scaled. Global (SparseML's default) puts one magnitude threshold across all
layers of the initial weights: a layer keeps what lies above it. Each layer's count is
fixed at the start, because B's compact size never changes.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from ds_topkast.core.select import LOCAL, Collectives, score_bits

_BINS = 1 << 16  # 16-bit halves of the float bits: two histogram passes find one threshold over every layer


def _bin_holding_rank(counts: Tensor, rank: int) -> tuple[int, int]:
    """The highest bin b with at least `rank` entries in bins >= b, and the count above b."""
    at_or_above = counts.flip(0).cumsum(0).flip(0)
    bin_index = int((at_or_above >= rank).nonzero()[-1])
    above = int(at_or_above[bin_index + 1]) if bin_index + 1 < counts.numel() else 0
    return bin_index, above


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
    raise ValueError(f"Unknown distribution {distribution!r}; use 'uniform' or 'erk' ('global' needs the weights: "
                     "global_kept_counts).")


def global_kept_counts(shards: Callable[[], Iterator[Tensor]], numels: Sequence[int], densities: Sequence[float],
                       comm: Collectives = LOCAL) -> list[list[int]]:
    """Per density, each layer's count of |θ| at or above one threshold across all layers: exactly
    round(density · Σn) in all, ties given to earlier layers, at least 1 per layer.

    `shards()` yields this rank's flat shard of each layer's weight, in layer order; it is
    called twice (two histogram passes over the float bits, as select.py does for one
    layer). Ranks hold consecutive shards; only histograms cross ranks.
    """
    high_counts = None
    for shard in shards():
        counts = torch.bincount(score_bits(shard.abs()) >> 16, minlength=_BINS).long()
        high_counts = counts if high_counts is None else high_counts + counts
    high_counts = comm.all_reduce_sum(high_counts)
    budgets = [min(sum(numels), max(1, round(d * sum(numels)))) for d in densities]
    high_bins = [_bin_holding_rank(high_counts, k) for k in budgets]
    above, low = [], []  # per layer: per density, entries above the threshold's high bin; low-bit histograms
    for shard in shards():
        bits = score_bits(shard.abs())
        high = bits >> 16
        above.append([int((high > b).sum()) for b, _ in high_bins])
        low.append([torch.bincount(bits[high == b] & 0xFFFF, minlength=_BINS).int() for b, _ in high_bins])
    above = comm.all_reduce_sum(torch.tensor(above, dtype=torch.long)).tolist()
    low = comm.all_reduce_sum(torch.stack([torch.stack(per_layer) for per_layer in low])).long()
    counts = []
    for d, (k, (_, above_high)) in enumerate(zip(budgets, high_bins)):
        low_bin, above_low = _bin_holding_rank(low[:, d].sum(0), k - above_high)
        ties_left = k - above_high - above_low
        per_layer = []
        for layer, numel in enumerate(numels):
            ties = int(low[layer, d, low_bin])
            taken = min(ties, ties_left)
            ties_left -= taken
            kept = above[layer][d] + int(low[layer, d, low_bin + 1:].sum()) + taken
            per_layer.append(min(numel, max(1, kept)))
        counts.append(per_layer)
    return counts


def kept_count(numel: int, density: float) -> int:
    """round(density · n), at least 1 and at most n, so every layer keeps a forward path."""
    return min(numel, max(1, round(density * numel)))
