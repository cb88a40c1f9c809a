"""Exact top-K selection, local or over a layer sharded across ranks: exactly K entries, ties by index, no sort.

Top-KAST needs the K largest magnitudes of every layer at every refresh (set B) and the
K_A largest of B's values at every step (set A). Both are a radix select
(kernels.py): every entry's key is its magnitude's float bits above its reversed
position, so all keys differ and "the top K, ties by lower index" is "the keys at or
above the K-th largest". That key is found digit by digit from per-segment histograms,
all on the device: nothing is read back to the host, so a step never waits for the
accelerator, and nothing is sorted, so a pass reads each entry's 4 bytes and writes
nothing but histograms.

Histograms of the shards of one segment add up, so the same code runs over a layer
sharded in contiguous flat ranges across ranks (the dense store), or over a compact
vector whose pieces live on different ranks (ZeRO's fp32 masters): the ranks all-reduce
each pass's histograms, never their values, and each writes the bits of the entries it
holds; since the pieces are disjoint, summing the bitmaps over ranks is their union.
`Collectives` is that interface; the default is a world of one, so local selection is
the same code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ds_topkast.core.bitmaps import bitmap_bytes, block_counts, unpack_bits
from ds_topkast.core.kernels import ops
from ds_topkast.errors import NonFiniteScoresError

_MAGNITUDE_BITS = 31  # a float's bits without its sign
_WIDEST_DIGIT = 11  # 2,048 histogram bins per segment and pass


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



def digit_widths(key_bits: int) -> list[int]:
    """The radix passes' digit widths, most significant first: as few passes as 2,048 bins allow, equally wide."""
    passes = -(-key_bits // _WIDEST_DIGIT)
    narrow, wide = divmod(key_bits, passes)
    return [narrow + 1] * wide + [narrow] * (passes - wide)


def position_bits(entries: int) -> int:
    """Bits of the position field of the keys of segments of up to `entries` entries."""
    return max(1, (entries - 1).bit_length())


def radix_topk_bits_(out_bits: Tensor, sources: list[tuple[Tensor, list[int]]], ks: Tensor, key_positions: int,
                     comm: Collectives | None = None, candidates: Tensor | None = None) -> None:
    """Set, in `out_bits`, the bit of every entry among its segment's top k (by magnitude, ties by lower position).

    `sources` pairs flat fp32 tensors with the rows of the table (kernels.ROW_FIELDS) of
    what this rank holds of each segment in them; `ks` (int64, on the sources' device) is
    each segment's k over all ranks; `key_positions` is `position_bits` of the longest
    segment. With `comm`, the segments' entries are spread over its ranks (each entry on
    one rank) and the histograms are summed over them; without, this rank holds them all.
    `candidates` (a bitmap each row indexes from its candidate offset) excludes the
    entries whose bit is unset; k must not exceed a segment's candidates. Every rank
    writes only its own entries' bits. Nothing is read back to the host.
    """
    widths = digit_widths(_MAGNITUDE_BITS + key_positions)
    device = ks.device
    histograms = torch.zeros(ks.numel() * sum(1 << w for w in widths), dtype=torch.int32, device=device)
    parts = histograms.split([ks.numel() << w for w in widths])
    prefix, remaining = torch.zeros_like(ks), ks
    shift = _MAGNITUDE_BITS + key_positions
    for width, histogram in zip(widths, parts):
        shift -= width
        histogram = histogram.view(ks.numel(), 1 << width)
        for source, rows in sources:
            ops.radix_histogram_(histogram, source, rows, prefix, candidates, key_positions, shift, width)
        if comm is not None and comm.world > 1:
            histogram = comm.all_reduce_sum(histogram)
        prefix, remaining = ops.radix_step(histogram, prefix, remaining, width)
    for source, rows in sources:
        ops.radix_select_bits_(out_bits, source, rows, prefix, ks, candidates, key_positions)


def _device_count(value: int, device) -> Tensor:
    """A one-entry int64 tensor on `device`, filled there (no copy from the host)."""
    return torch.full((1,), value, dtype=torch.int64, device=device)


def padded_bitmap(numel: int, device) -> Tensor:
    """A zeroed bitmap of `numel` entries, padded to whole int32 words (so that ranks can sum it)."""
    return torch.zeros(-(-numel // 32) * 4, dtype=torch.uint8, device=device)


def union_over_ranks(bits: Tensor, numel: int, comm: Collectives) -> Tensor:
    """The bitmap of `numel` entries whose members are every rank's members (disjoint across ranks): their sum,
    in int32 words (no carry: every bit is set on one rank at most)."""
    if comm.world > 1:
        words = F.pad(bits, (0, -bits.numel() % 4)).view(torch.int32)
        bits = comm.all_reduce_sum(words).view(torch.uint8)
    return bits[:bitmap_bytes(numel)]


def shard_topk_bits(scores: Tensor, offset: int, numel: int, k: int, comm: Collectives = LOCAL,
                    candidates: Tensor | None = None) -> Tensor:
    """This rank's members of the global top-k of |scores| over a layer sharded across ranks, as a bitmap.

    `scores` (fp32) is this rank's contiguous slice, from global index `offset`, of a layer
    of `numel` entries; ranks hold consecutive slices. Every rank calls this with the same
    k. The bitmap has the layer's `numel` entries (padded to int32 words) and only this
    rank's members set; `union_over_ranks` makes it the whole set. `candidates`, a bitmap of
    the layer's entries, restricts the choice to its members (k must not exceed their
    number). Ties go to the lowest global index. No host sync.
    """
    out = padded_bitmap(numel, scores.device)
    rows = [0, scores.numel(), 0, offset, offset, offset]
    sources = [(scores.detach().reshape(-1).float(), rows)] if scores.numel() else []  # an empty shard still sums
    radix_topk_bits_(out, sources, _device_count(k, scores.device), position_bits(numel), comm, candidates)
    return out


def topk_bits(scores: Tensor, k: int) -> Tensor:
    """The bitmap (`bitmap_bytes(len)` bytes) of the top k of |scores|, ties by lower index; no host sync."""
    return shard_topk_bits(scores, 0, scores.numel(), k)[:bitmap_bytes(scores.numel())]


def score_bits(scores: Tensor) -> Tensor:
    """The float32 bits of scores as int32 (ordered like the scores), after one pass that checks them all finite
    and >= +0.0 (a host read: for selections outside the training step)."""
    bits = scores.detach().reshape(-1).float().contiguous().view(torch.int32)
    if bits.numel():
        low, high = torch.aminmax(bits)
        if int(low) < 0 or int(high) >= 0x7F800000:
            raise NonFiniteScoresError("top-K scores must be finite and non-negative (|θ| of a layer that holds NaN "
                                       "or inf?).")
    return bits


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask (shape of `scores`) of its k largest entries (>= 0), ties by lower flat index."""
    if not 0 <= k <= scores.numel():
        raise ValueError(f"k={k} must lie in [0, {scores.numel()}] for a tensor of {scores.numel()} entries.")
    score_bits(scores)
    return unpack_bits(topk_bits(scores.reshape(-1), k), scores.numel()).view(scores.shape)


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """Ascending flat indices of the k largest entries of `scores` (>= 0), ties by lower index."""
    return topk_mask(scores, k).reshape(-1).nonzero().squeeze(1)


def uniform_hash(indices: Tensor, seed: int) -> Tensor:
    """A deterministic pseudo-random value in [0, 1) per global index: the same on any world size."""
    x = ((indices & 0xFFFFFFFF) * 2654435761 + (seed & 0xFFFFFFFF) * 40503 + 12345) & 0xFFFFFFFF
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return ((x ^ (x >> 16)).double() / 2**32).float()


def shard_positions(shard: Tensor, offset: int) -> Tensor:
    """The global indices of a shard's entries."""
    return torch.arange(offset, offset + shard.numel(), device=shard.device)


@dataclass
class LayerSets:
    """One layer's sets as every rank holds them: B as a bitmap with its block counts, θ on B, and A over B."""

    backward_bits: Tensor
    counts: Tensor
    values: Tensor  # fp32, B's members in index order
    forward_bits: Tensor  # k_B bits: which of B's members are in A


def assemble_sets(local: Tensor, theta: Tensor, offset: int, numel: int, k_forward: int, k_backward: int,
                  comm: Collectives = LOCAL) -> LayerSets:
    """B from every rank's members (`local`: this rank's, from `shard_topk_bits`), θ on B from the shards, and A as
    the top k_forward of |θ| over B; identical on every rank, with no host sync."""
    bits = union_over_ranks(local, numel, comm)
    counts = block_counts(bits, numel)
    values = torch.zeros(k_backward, dtype=torch.float32, device=theta.device)
    ops.gather_bits_(values, theta.detach().reshape(-1).float(), bits, counts, offset, None, None, 0.0, 1.0, True)
    values = comm.all_reduce_sum(values)
    return LayerSets(bits, counts, values, topk_bits(values, k_forward))
