"""Exact top-K selection: exactly K entries, ties broken by flat index (lower index wins).

Top-KAST needs the K largest |θ| of every layer at every refresh (set B) and the K_A
largest of B's values at every step (set A). `torch.topk` sorts and is O(n log k);
a threshold found by two 16-bit histogram passes over the float bits is O(n), and
selecting "everything above the threshold plus the first ties by index" gives exactly
K entries, which "≥ threshold" alone does not under ties.

For non-negative IEEE floats the bit pattern read as a signed int32 orders the same
way as the value, so histograms of the high and then the low 16 bits find the K-th
largest value exactly. The histograms are the only global quantity, which is what
makes the same procedure distributable across ranks (sum the histograms).
"""
from __future__ import annotations

import torch
from torch import Tensor

_BINS = 1 << 16


def _kth_largest_bits(bits: Tensor, k: int) -> tuple[int, int]:
    """Bit pattern of the k-th largest entry and how many entries lie strictly above it."""
    high = bits >> 16
    high_counts = torch.bincount(high, minlength=_BINS)
    high_bin, above_high = _bin_holding_rank(high_counts, k)
    low = (bits[high == high_bin] & 0xFFFF)
    low_counts = torch.bincount(low, minlength=_BINS)
    low_bin, above_low = _bin_holding_rank(low_counts, k - above_high)
    return (high_bin << 16) | low_bin, above_high + above_low


def _bin_holding_rank(counts: Tensor, rank: int) -> tuple[int, int]:
    """The highest bin b with at least `rank` entries in bins >= b, and the count above b."""
    at_or_above = counts.flip(0).cumsum(0).flip(0)
    bin_index = int((at_or_above >= rank).nonzero()[-1])
    above = int(at_or_above[bin_index + 1]) if bin_index + 1 < counts.numel() else 0
    return bin_index, above


def _score_bits(scores: Tensor) -> Tensor:
    flat = scores.detach().reshape(-1).float().contiguous()
    if not bool(torch.isfinite(flat).all()) or bool((flat < 0).any()):
        raise ValueError("top-K scores must be finite and non-negative (|θ| of a layer that holds NaN or inf?).")
    return flat.view(torch.int32)


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """Ascending flat indices of the k largest entries of `scores` (>= 0), ties by lower index."""
    n = scores.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must lie in [0, {n}] for a tensor of {n} entries.")
    if k == n:
        return torch.arange(n, device=scores.device)
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    bits = _score_bits(scores)
    threshold, above = _kth_largest_bits(bits, k)
    chosen = bits > threshold
    ties = (bits == threshold).nonzero().squeeze(1)[: k - above]
    chosen[ties] = True
    return chosen.nonzero().squeeze(1)


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask (shape of `scores`) of its k largest entries, ties by lower flat index."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[topk_indices(scores, k)] = True
    return mask.view(scores.shape)


def _topk_backward_set(magnitude: Tensor, k_forward: int, k_backward: int, generator: torch.Generator) -> Tensor:
    return topk_indices(magnitude, k_backward)


def _random_backward_set(magnitude: Tensor, k_forward: int, k_backward: int, generator: torch.Generator) -> Tensor:
    """A by magnitude; B\\A drawn uniformly from the rest (the paper's random-B ablation)."""
    forward = topk_mask(magnitude, k_forward).reshape(-1)
    rest = (~forward).nonzero().squeeze(1)
    draw = torch.randperm(rest.numel(), generator=generator, device="cpu")[: k_backward - k_forward]
    forward[rest[draw.to(rest.device)]] = True
    return forward.nonzero().squeeze(1)


BACKWARD_SET_RULES = {"topk": _topk_backward_set, "random": _random_backward_set}


def select_sets(theta: Tensor, k_forward: int, k_backward: int, rule: str = "topk",
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Sets B (ascending flat indices) and A (a mask over B) of one layer's weights θ.

    A is the top k_forward of |θ|; B ⊇ A holds k_backward entries chosen by `rule`.
    """
    if rule not in BACKWARD_SET_RULES:
        raise ValueError(f"Unknown selection rule {rule!r}; use one of {sorted(BACKWARD_SET_RULES)}.")
    if not 0 < k_forward <= k_backward <= theta.numel():
        raise ValueError(f"Need 0 < k_forward ({k_forward}) <= k_backward ({k_backward}) <= n ({theta.numel()}).")
    magnitude = theta.detach().reshape(-1).abs()
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    backward = BACKWARD_SET_RULES[rule](magnitude, k_forward, k_backward, generator)
    forward_mask = topk_mask(magnitude[backward], k_forward)
    return backward, forward_mask
