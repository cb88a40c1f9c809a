"""The fused ops of the sparse layer and of exact selection, as `torch.library` ops: `torch.ops.ds_topkast.*`.

Each op is one Triton kernel on CUDA (triton_kernels.py) and a plain torch
implementation everywhere else, which is also the reference the kernels are tested
against (tests/test_kernels.py, on the CPU under Triton's interpreter and on a GPU). They
exist because a step of a sparse model is bound by the host's launches at the sizes users
train (docs/DESIGN.md, Section 6): building a layer's dense α from its sets took about 25
ATen ops, the gradient's gather at B about 15 more, and A's re-selection a sort of int64
keys. Here each is one launch that reads the packed bitmaps directly (bitmaps.py: the
rank of an entry in B is its block's count plus a scan of the block's own bits), with no
int64 index vector and no bool tensor.

Sets are bitmaps over a layer's flat (out, in) entries; `start` and `length` say which
range of those entries a call covers (a rank's store shard, or the whole layer), and
`counts` are `bitmaps.block_counts` of the bitmap.

Exact top-k without a sort or a host sync (`radix_histogram_`, `radix_step`,
`radix_select_bits_`; select.py drives them): every entry gets a distinct int64 key,
its magnitude's float bits (31 of them: the sign is dropped, so a key orders by |x|)
above `position_bits` bits of its position, reversed so that a lower position ranks
higher: "ties by lower index" is then simply "larger key". The k-th largest key of each
segment is found digit by digit, most significant first: a histogram of the next digit
among the entries that match the prefix found so far (histograms of shards of one
segment add up, so ranks all-reduce histograms, never values), then, on the device, the
digit whose bin holds the k-th entry. The top k are then exactly the keys at or above
that threshold.

Registered with `torch.library.Library` rather than the `custom_op` decorator: on this
host-bound path a call through `custom_op` cost about three times as much (14.5 µs against
4.8 µs on the CPU machine, one op of four tensor arguments; docs/RESULTS.md), and the
layer makes three calls per step.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from ds_topkast.core.bitmaps import BLOCK_BITS, unpack_bits

logger = logging.getLogger("ds_topkast")

# The fields of one row of a radix op's table (flattened into its `rows` argument): which entries of the
# source it reads, which segment they belong to, the position of its first entry in that segment, where its
# candidate bits start in `candidates`, and where its first output bit goes in `out_bits`.
ROW_FIELDS = ("source_offset", "length", "segment", "position_base", "candidate_offset", "out_offset")
ROW = len(ROW_FIELDS)

_lib = torch.library.Library("ds_topkast", "DEF")
_lib.define("expand_bits(Tensor values, Tensor bits, Tensor counts, Tensor? forward_bits, int start, int length, "
            "ScalarType dtype) -> Tensor")
_lib.define("expand_bits_into_(Tensor(a!) out, Tensor values, Tensor bits, Tensor counts, Tensor? forward_bits, "
            "int start) -> ()")
_lib.define("scatter_bits_(Tensor(a!) target, Tensor values, Tensor bits, Tensor counts, int start) -> ()")
_lib.define("gather_bits_(Tensor(a!) out, Tensor dense, Tensor bits, Tensor counts, int start, Tensor? forward_bits, "
            "Tensor? values, float l2_scale, float inverse_density, bool straight_through) -> ()")
_lib.define("remap_positions(Tensor old_bits, Tensor old_counts, Tensor new_bits, Tensor new_counts, int numel, "
            "int count) -> Tensor")
_lib.define("radix_histogram_(Tensor(a!) histogram, Tensor source, int[] rows, Tensor prefix, Tensor? candidates, "
            "int position_bits, int shift, int width) -> ()")
_lib.define("radix_step(Tensor histogram, Tensor prefix, Tensor remaining, int width) -> (Tensor, Tensor)")
_lib.define("radix_select_bits_(Tensor(a!) out_bits, Tensor source, int[] rows, Tensor threshold, Tensor k, "
            "Tensor? candidates, int position_bits) -> ()")


def rank_before(bits: Tensor, counts: Tensor, start: int) -> int:
    """Set bits among entries [0, start) (a host read)."""
    block_start = start - start % BLOCK_BITS
    return int(counts[start // BLOCK_BITS]) + int(unpack_bits(bits, start - block_start, block_start).sum())


def _range_members(bits: Tensor, counts: Tensor, start: int, length: int) -> tuple[Tensor, int, int]:
    """Which of entries [start, start + length) are set, the rank of the first of them, and how many there are."""
    inside = unpack_bits(bits, length, start)
    return inside, rank_before(bits, counts, start), int(inside.sum())


def _forward_members(forward_bits: Tensor | None, first: int, count: int, device) -> Tensor:
    if forward_bits is None:
        return torch.ones(count, dtype=torch.bool, device=device)
    return unpack_bits(forward_bits, count, first)


def expand_bits_reference(values, bits, counts, forward_bits, start, length, dtype):
    """Entries [start, start + length) of the dense tensor that holds `values` on the set (and, given
    `forward_bits`, only where those mark a value) and zero elsewhere, in `dtype`."""
    out = torch.empty(length, dtype=dtype, device=values.device)
    expand_bits_into_reference(out, values, bits, counts, forward_bits, start)
    return out


def expand_bits_into_reference(out, values, bits, counts, forward_bits, start):
    """expand_bits written into the contiguous `out` (entries [start, start + out.numel()), in out's dtype), every
    entry of it."""
    inside, first, members = _range_members(bits, counts, start, out.numel())
    kept = values[first:first + members].to(out.dtype)
    kept = torch.where(_forward_members(forward_bits, first, members, values.device), kept, torch.zeros_like(kept))
    flat = out.view(-1)
    flat.zero_()
    flat[inside] = kept


def scatter_bits_reference(target, values, bits, counts, start):
    """target[i] = the value of entry start + i, wherever that entry is in the set (in place)."""
    inside, first, members = _range_members(bits, counts, start, target.numel())
    target[inside] = values[first:first + members].to(target.dtype)


def gather_bits_reference(out, dense, bits, counts, start, forward_bits, values, l2_scale, inverse_density,
                          straight_through):
    """Writes into the compact vector `out` (one entry per member of the set) `dense`'s entries on the set, where
    `dense` holds entries [start, start + len(dense)); members outside that range are left as they are. Without
    `straight_through` only members that `forward_bits` marks get theirs (the others zero); `l2_scale`·v·(1 on
    marked members, `inverse_density` elsewhere) is added (the exploration regulariser's gradient, Section 2.2 of
    the paper)."""
    inside, first, members = _range_members(bits, counts, start, dense.numel())
    gathered = dense.reshape(-1)[inside].float()
    forward = _forward_members(forward_bits, first, members, dense.device)
    if not straight_through:
        gathered = torch.where(forward, gathered, torch.zeros_like(gathered))
    if l2_scale:
        weight = torch.where(forward, 1.0, inverse_density)
        gathered = gathered + l2_scale * values[first:first + members].float() * weight
    out[first:first + members] = gathered.to(out.dtype)


def remap_positions_reference(old_bits, old_counts, new_bits, new_counts, numel, count):
    """For every member of the new set (in order), its position in the old set's compact vector, or -1."""
    old, new = unpack_bits(old_bits, numel), unpack_bits(new_bits, numel)
    old_rank = torch.cumsum(old, 0) - 1
    return torch.where(old[new], old_rank[new], -1)[:count]


def row_tuples(rows: list[int]) -> list[tuple[int, ...]]:
    if len(rows) % ROW:
        raise ValueError(f"a radix table has {ROW} fields per row ({', '.join(ROW_FIELDS)}); got {len(rows)} values.")
    return [tuple(rows[i:i + ROW]) for i in range(0, len(rows), ROW)]


# Entries per piece in the references: each entry's int64 key, indices and masks are transients of about 80
# bytes, so a table is taken a piece at a time (about 10 MiB), and the start-up's peak memory follows one layer's
# weights, not a 16M-entry layer's keys (tests/test_large_start.py).
_REFERENCE_PIECE = 1 << 17


def _pieces(rows: list[int]) -> list[list[tuple[int, ...]]]:
    """The table's rows cut into pieces of at most _REFERENCE_PIECE entries in all: a long row is split over pieces,
    short ones share one."""
    pieces: list[list[tuple[int, ...]]] = [[]]
    room = _REFERENCE_PIECE
    for offset, length, segment, base, candidate_offset, out_offset in row_tuples(rows):
        start = 0
        while start < length:
            if not room:
                pieces.append([])
                room = _REFERENCE_PIECE
            take = min(room, length - start)
            pieces[-1].append((offset + start, take, segment, base + start, candidate_offset + start,
                               out_offset + start))
            start, room = start + take, room - take
    return [piece for piece in pieces if piece]


def _table_entries(source, candidates, rows, position_bits):
    """The entries of a radix table's rows, a piece at a time, the rows of a piece at once (a fixed number of ops
    per piece, however many layers it covers): (key, candidate or not, segment, output bit position) of each."""
    position_max = (1 << position_bits) - 1
    for piece in _pieces(rows):
        table = torch.tensor(piece, dtype=torch.int64, device=source.device)
        lengths = table[:, 1]
        size = sum(row[1] for row in piece)
        # Per entry e of the piece (in row order): each position field of its row less the row's start, plus e.
        entry = torch.arange(size, device=source.device).unsqueeze(1)
        fields = table[:, [0, 3, 4, 5]] - (lengths.cumsum(0) - lengths).unsqueeze(1)
        offset, position, candidate_bit, out_bit = (
            torch.repeat_interleave(fields, lengths, dim=0, output_size=size) + entry).unbind(1)
        segment = torch.repeat_interleave(table[:, 2], lengths, output_size=size)
        magnitude = (source.index_select(0, offset).float().view(torch.int32) & 0x7FFFFFFF).to(torch.int64)
        key = (magnitude << position_bits) | (position_max - position)
        if candidates is None:
            member = torch.ones_like(key, dtype=torch.bool)
        else:
            member = ((candidates.index_select(0, candidate_bit >> 3) >> (candidate_bit & 7).to(torch.uint8)) & 1
                      ).bool()
        yield key, member, segment, out_bit


def radix_histogram_reference(histogram, source, rows, prefix, candidates, position_bits, shift, width):
    """Adds, per segment, the histogram of key digit (key >> shift) & (2^width - 1) over the rows' candidate
    entries whose higher digits (key >> (shift + width)) equal the segment's prefix."""
    flat = histogram.view(-1)
    for key, member, segment, _ in _table_entries(source, candidates, rows, position_bits):
        matching = member & ((key >> (shift + width)) == prefix[segment])
        digit = (segment << width) | ((key >> shift) & ((1 << width) - 1))
        flat.index_add_(0, digit, matching.to(histogram.dtype))


def radix_step_reference(histogram, prefix, remaining, width):
    """Per segment: the digit whose bin holds the remaining-th largest entry (appended to the prefix), and how
    many of the top entries are still to be found inside that bin."""
    counts = histogram.long()
    at_or_above = counts.flip(1).cumsum(1).flip(1)
    chosen = (at_or_above >= remaining.unsqueeze(1)).sum(1) - 1
    bins = torch.arange(counts.shape[1], device=counts.device)
    above = torch.where(bins.unsqueeze(0) > chosen.unsqueeze(1), counts, 0).sum(1)
    return (prefix << width) | chosen, remaining - above


def radix_select_bits_reference(out_bits, source, rows, threshold, k, candidates, position_bits):
    """Sets bit out_offset + i of `out_bits` for every candidate entry i of a row whose key is at or above its
    segment's threshold (none for a segment with k = 0)."""
    words = torch.zeros(out_bits.numel(), dtype=torch.int32, device=out_bits.device)
    for key, member, segment, bit in _table_entries(source, candidates, rows, position_bits):
        chosen = member & (key >= threshold[segment]) & (k[segment] > 0)
        words.index_add_(0, bit >> 3, chosen.to(torch.int32) << (bit & 7).to(torch.int32))  # distinct bits: the sum is their OR
    out_bits |= words.to(torch.uint8)


REFERENCES = {"expand_bits": expand_bits_reference, "expand_bits_into_": expand_bits_into_reference,
              "scatter_bits_": scatter_bits_reference,
              "gather_bits_": gather_bits_reference, "remap_positions": remap_positions_reference,
              "radix_histogram_": radix_histogram_reference, "radix_step": radix_step_reference,
              "radix_select_bits_": radix_select_bits_reference}

for _name, _reference in REFERENCES.items():
    _lib.impl(_name, _reference, "CompositeExplicitAutograd")


def _register_fakes() -> None:
    """Shapes without data (meta tensors, torch.compile)."""
    @torch.library.register_fake("ds_topkast::expand_bits", lib=_lib)
    def _(values, bits, counts, forward_bits, start, length, dtype):
        return values.new_empty(length, dtype=dtype)

    @torch.library.register_fake("ds_topkast::remap_positions", lib=_lib)
    def _(old_bits, old_counts, new_bits, new_counts, numel, count):
        return old_bits.new_empty(count, dtype=torch.int64)

    @torch.library.register_fake("ds_topkast::radix_step", lib=_lib)
    def _(histogram, prefix, remaining, width):
        return torch.empty_like(prefix), torch.empty_like(remaining)

    for name in ("expand_bits_into_", "scatter_bits_", "gather_bits_", "radix_histogram_", "radix_select_bits_"):
        torch.library.register_fake(f"ds_topkast::{name}", lambda *args: None, lib=_lib)


_register_fakes()


def _cuda_implementation(name: str):
    """The Triton kernel of op `name`, loaded on first use; without Triton, the torch reference (with a warning:
    it reads counts back to the host, a sync per call)."""
    def run(*args):
        try:
            from ds_topkast.core import triton_kernels
        except ImportError as err:
            if not _cuda_implementation.warned:
                logger.warning("Triton is not installed (%s): ds_topkast's sparse layers and selection run their "
                               "torch reference on CUDA, with host syncs and many more launches. `pip install "
                               "triton` (it comes with PyTorch's CUDA wheels) to get the fused kernels.", err)
                _cuda_implementation.warned = True
            return REFERENCES[name](*args)
        return triton_kernels.LAUNCHERS[name](*args)
    return run


_cuda_implementation.warned = False
for _name in REFERENCES:
    _lib.impl(_name, _cuda_implementation(_name), "CUDA")

ops = torch.ops.ds_topkast
