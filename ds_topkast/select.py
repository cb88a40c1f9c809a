"""Exact top-K selection, local or over a layer sharded across ranks: exactly K entries, ties by index.

Top-KAST needs the K largest scores of every layer at every refresh (set B) and the K_A
largest of B's values at every step (set A). `torch.topk` sorts and is O(n log k); a
threshold found by two 16-bit histogram passes over the float bits is O(n), and
"everything above the threshold plus the first ties by flat index" gives exactly K
entries, which "≥ threshold" alone does not under ties.

For non-negative IEEE floats the bit pattern read as a signed int32 orders like the
value, so histograms of the high and then the low 16 bits find the K-th largest value
exactly. Those histograms (and the per-rank tie counts) are the only global quantities,
so the same code runs over a layer sharded in contiguous flat ranges across ranks: sum
the histograms, let earlier ranks take their ties first, and concatenate the ranks'
chosen indices in rank order. No rank ever sees another rank's weights; traffic is two
histograms per selection plus the chosen entries. `Collectives` is that interface; the
default is a world of one, so local selection is the same code.
"""
from __future__ import annotations

import torch
from torch import Tensor

_BINS = 1 << 16


class Collectives:
    """The collectives sharded selection and the refresh guards need; this base class is a world of one."""

    rank: int = 0
    world: int = 1

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Elementwise sum over ranks (returned; may be `tensor` itself)."""
        return tensor

    def all_reduce_min_max(self, tensor: Tensor) -> tuple[Tensor, Tensor]:
        """Elementwise minimum and maximum over ranks."""
        return tensor, tensor

    def all_gather_ints(self, value: int) -> list[int]:
        """One integer from every rank, in rank order."""
        return [value]

    def broadcast(self, tensor: Tensor, source: int) -> Tensor:
        """Rank `source`'s tensor on every rank (the same shape and dtype everywhere); no host sync."""
        return tensor

    def all_gather_parts(self, tensor: Tensor) -> list[Tensor]:
        """1-D tensors of any length from every rank, in rank order."""
        return [tensor]

    def all_gather_varlen(self, tensor: Tensor) -> Tensor:
        """1-D tensors of any length from every rank, concatenated in rank order."""
        return torch.cat(self.all_gather_parts(tensor))


LOCAL = Collectives()


def _bin_holding_rank(counts: Tensor, rank: int) -> tuple[int, int]:
    """The highest bin b with at least `rank` entries in bins >= b, and the count above b."""
    at_or_above = counts.flip(0).cumsum(0).flip(0)
    bin_index = int((at_or_above >= rank).nonzero()[-1])
    above = int(at_or_above[bin_index + 1]) if bin_index + 1 < counts.numel() else 0
    return bin_index, above


def _histogram(values: Tensor, comm: Collectives) -> Tensor:
    """Counts per 16-bit bin over all ranks; int32 on the wire (a layer has < 2^31 entries)."""
    return comm.all_reduce_sum(torch.bincount(values, minlength=_BINS).int()).long()


def _kth_largest_bits(bits: Tensor, k: int, comm: Collectives) -> tuple[int, int]:
    """Bit pattern of the k-th largest entry over all ranks and how many lie strictly above it."""
    high = bits >> 16
    high_counts = _histogram(high, comm)
    high_bin, above_high = _bin_holding_rank(high_counts, k)
    low_counts = _histogram(bits[high == high_bin] & 0xFFFF, comm)
    low_bin, above_low = _bin_holding_rank(low_counts, k - above_high)
    return (high_bin << 16) | low_bin, above_high + above_low


_INFINITY_BITS = 0x7F800000


class NonFiniteScoresError(ValueError):
    """Selection was asked to rank NaN, infinite or negative scores."""


def _score_bits(scores: Tensor) -> Tensor:
    """The float32 bits as int32; one pass checks that all are finite and >= +0.0."""
    bits = scores.detach().reshape(-1).float().contiguous().view(torch.int32)
    if bits.numel():
        low, high = torch.aminmax(bits)
        if int(low) < 0 or int(high) >= _INFINITY_BITS:
            raise NonFiniteScoresError("top-K scores must be finite and non-negative (|θ| of a layer that holds NaN "
                                       "or inf?).")
    return bits


def shard_topk_indices(scores: Tensor, offset: int, k: int, comm: Collectives = LOCAL,
                       candidates: Tensor | None = None) -> Tensor:
    """Ascending global flat indices, within this rank's shard, of the global top-k scores.

    `scores` is this rank's contiguous slice starting at global index `offset`; ranks hold
    consecutive slices in rank order. Every rank must call this with the same k. With
    `candidates` (a bool mask over the slice) only those entries compete: the others rank
    below every candidate (their bits become 0, a candidate's its own bits plus one, which
    keeps the order of non-negative floats), so k must not exceed the candidates' count.
    """
    bits = _score_bits(scores)
    if candidates is not None:
        bits = torch.where(candidates, bits + 1, torch.zeros_like(bits))
    threshold, above = _kth_largest_bits(bits, k, comm) if k > 0 else (0x7FFFFFFF, 0)
    chosen = bits > threshold
    ties = (bits == threshold).nonzero().squeeze(1)
    ties_before = sum(comm.all_gather_ints(ties.numel())[:comm.rank])
    chosen[ties[:max(0, k - above - ties_before)]] = True
    return chosen.nonzero().squeeze(1) + offset


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """Ascending flat indices of the k largest entries of `scores` (>= 0), ties by lower index."""
    if not 0 <= k <= scores.numel():
        raise ValueError(f"k={k} must lie in [0, {scores.numel()}] for a tensor of {scores.numel()} entries.")
    return shard_topk_indices(scores, 0, k)


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask (shape of `scores`) of its k largest entries, ties by lower flat index."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[topk_indices(scores, k)] = True
    return mask.view(scores.shape)


def segment_topk_masks(scores: Tensor, sizes: Tensor, ks: Tensor) -> Tensor:
    """For consecutive segments of a flat tensor of scores >= 0, a mask of each segment's top k; no host sync.

    `sizes` and `ks` (int64, on the scores' device, one entry per segment) give each
    segment's length and k. Exact, ties by lower position, and nothing is read back to the
    host (the histogram selection above reads its bins). On an accelerator one stable sort
    serves every segment (`segment_topk_masks_by_sort`), so a step pays a few launches
    instead of a `torch.topk` per layer; on the CPU, where nothing syncs, `torch.topk` per
    segment's int64 keys is faster than a full sort. Non-finite scores are not refused here
    (that needs a host read): NaN and infinity rank above every finite score.
    """
    if scores.device.type != "cpu":
        return segment_topk_masks_by_sort(scores, sizes, ks)
    bits = scores.detach().reshape(-1).float().view(torch.int32).to(torch.int64)
    masks = []
    for part, k in zip(bits.split(sizes.tolist()), ks.tolist()):
        keys = (part << 32) | torch.arange(part.numel() - 1, -1, -1)  # reversed position: lower index wins ties
        chosen = torch.topk(keys, k, sorted=False).indices
        masks.append(torch.zeros(part.numel(), dtype=torch.bool).index_fill_(0, chosen, True))
    return torch.cat(masks)


def segment_topk_masks_by_sort(scores: Tensor, sizes: Tensor, ks: Tensor) -> Tensor:
    """`segment_topk_masks` by one stable sort of int64 keys (segment << 31) | (0x7FFFFFFF - float bits).

    The sort puts every segment's entries in order of falling score (the float bits of
    scores >= +0.0 order like the values) with ties in position order; an entry is chosen
    if its rank in its segment is below the segment's k.
    """
    flat = scores.detach().reshape(-1).float()
    bits = flat.view(torch.int32).to(torch.int64)
    segment = torch.repeat_interleave(torch.arange(sizes.numel(), device=flat.device), sizes,
                                      output_size=flat.numel())
    order = torch.sort((segment << 31) | (0x7FFFFFFF - bits), stable=True).indices
    del bits
    starts = torch.cumsum(sizes, 0) - sizes
    # sorted by segment first, position p of the sorted order lies in segment[p] (segments are contiguous)
    rank = torch.arange(flat.numel(), device=flat.device) - starts[segment]
    chosen = rank < ks[segment]
    return torch.empty_like(chosen).scatter_(0, order, chosen)


def shard_mask(indices: Tensor, offset: int, length: int, device: torch.device | str) -> Tensor:
    """Which of the `length` entries from global index `offset` are among the global `indices` (a bool mask)."""
    local = indices.to(device) - offset
    mask = torch.zeros(length, dtype=torch.bool, device=device)
    return mask.index_fill_(0, local[(local >= 0) & (local < length)], True)


def uniform_hash(indices: Tensor, seed: int) -> Tensor:
    """A deterministic pseudo-random value in [0, 1) per global index: the same on any world size."""
    x = ((indices & 0xFFFFFFFF) * 2654435761 + (seed & 0xFFFFFFFF) * 40503 + 12345) & 0xFFFFFFFF
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return ((x ^ (x >> 16)).double() / 2**32).float()


def _topk_backward_set(magnitude, offset, k_forward, k_backward, seed, comm):
    return shard_topk_indices(magnitude, offset, k_backward, comm)


def _random_backward_set(magnitude, offset, k_forward, k_backward, seed, comm):
    """A by magnitude; B\\A drawn uniformly from the rest (the paper's random-B ablation)."""
    forward = shard_topk_indices(magnitude, offset, k_forward, comm)
    scores = uniform_hash(torch.arange(offset, offset + magnitude.numel(), device=magnitude.device), seed)
    scores[forward - offset] = 2.0  # above every hash value: A is always in B
    return shard_topk_indices(scores, offset, k_backward, comm)


BACKWARD_SET_RULES = {"topk": _topk_backward_set, "random": _random_backward_set}


def select_sets(theta: Tensor, k_forward: int, k_backward: int, rule: str = "topk", seed: int = 0, *,
                offset: int = 0, numel: int | None = None, comm: Collectives = LOCAL) -> tuple[Tensor, Tensor, Tensor]:
    """Sets B and A of one layer whose flat fp32 θ may be sharded across ranks.

    `theta` is this rank's slice starting at `offset` of a layer of `numel` entries (the
    whole layer by default). Returns, identically on every rank: B's ascending global
    indices, θ at those indices, and A as a mask over B (the top k_forward of |θ|).
    """
    numel = theta.numel() if numel is None else numel
    if rule not in BACKWARD_SET_RULES:
        raise ValueError(f"Unknown selection rule {rule!r}; use one of {sorted(BACKWARD_SET_RULES)}.")
    if not 0 < k_forward <= k_backward <= numel:
        raise ValueError(f"Need 0 < k_forward ({k_forward}) <= k_backward ({k_backward}) <= n ({numel}).")
    flat = theta.detach().reshape(-1)
    local = BACKWARD_SET_RULES[rule](flat.abs(), offset, k_forward, k_backward, seed, comm)
    return gather_sets(local, flat, k_forward, offset, numel, comm)


def gather_sets(local: Tensor, theta: Tensor, k_forward: int, offset: int, numel: int,
                comm: Collectives = LOCAL) -> tuple[Tensor, Tensor, Tensor]:
    """Every rank's chosen B indices (`local`: this rank's, global and ascending) joined in rank order, θ at
    them, and A as the top k_forward of |θ| over B; identical on every rank."""
    wire = torch.int32 if numel < 2**31 else torch.long  # half the index traffic for every real layer
    indices = comm.all_gather_varlen(local.to(wire)).long()
    values = comm.all_gather_varlen(theta.reshape(-1)[local - offset].float())
    return indices, values, topk_mask(values.abs(), k_forward)
