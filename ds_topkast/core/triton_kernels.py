"""Triton kernels of the ops in kernels.py: one launch each, on CUDA (and under Triton's interpreter, on the CPU).

Each launcher takes the op's arguments and returns what the op returns; kernels.py
registers them for CUDA and tests/test_kernels.py holds them to the torch references.
Bitmap kernels give each program one block of `BLOCK_BITS` entries: the block's count of
set bits before it (bitmaps.block_counts) plus a cumulative sum of its own bits is the
rank of each member, so a program needs nothing from any other. Radix kernels read a
table of rows (kernels.ROW_FIELDS) and a table of chunks (row, first entry) that the
launcher builds once per table and keeps on the device: A's re-selection uses the same
table every step, so after the first step nothing is copied to the device.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl
from torch import Tensor

from ds_topkast.core.bitmaps import BLOCK_BITS
from ds_topkast.core.kernels import ROW, row_tuples

CHUNK = 4096  # entries per radix program


@triton.jit
def _bit_at(bits, position, mask):
    """Bit `position` of a packed bitmap (0 where masked off)."""
    byte = tl.load(bits + (position >> 3), mask=mask, other=0).to(tl.int32)
    return (byte >> (position & 7).to(tl.int32)) & 1


@triton.jit
def _block_members(bits, counts, block, bit_count, BLOCK: tl.constexpr):
    """The entries of one block, whether each is a member, and each member's rank in the compact vector."""
    position = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    member = _bit_at(bits, position, position < bit_count)
    rank = tl.load(counts + block).to(tl.int64) + tl.cumsum(member, axis=0).to(tl.int64) - 1
    return position, member == 1, rank


@triton.jit
def _expand_kernel(values, bits, counts, forward_bits, out, start, length, bit_count,
                   HAS_FORWARD: tl.constexpr, BLOCK: tl.constexpr):
    position, member, rank = _block_members(bits, counts, start // BLOCK + tl.program_id(0), bit_count, BLOCK)
    inside = (position >= start) & (position < start + length)
    take = inside & member
    value = tl.load(values + rank, mask=take, other=0.0)
    if HAS_FORWARD:
        take = take & (_bit_at(forward_bits, rank, take) == 1)
    tl.store(out + (position - start), tl.where(take, value, 0.0).to(out.dtype.element_ty), mask=inside)


@triton.jit
def _scatter_kernel(target, values, bits, counts, start, length, bit_count, BLOCK: tl.constexpr):
    position, member, rank = _block_members(bits, counts, start // BLOCK + tl.program_id(0), bit_count, BLOCK)
    take = (position >= start) & (position < start + length) & member
    value = tl.load(values + rank, mask=take, other=0.0)
    tl.store(target + (position - start), value.to(target.dtype.element_ty), mask=take)


@triton.jit
def _gather_kernel(dense, bits, counts, forward_bits, values, out, start, length, bit_count, l2_scale,
                   inverse_density, HAS_FORWARD: tl.constexpr, STRAIGHT_THROUGH: tl.constexpr,
                   HAS_L2: tl.constexpr, BLOCK: tl.constexpr):
    position, member, rank = _block_members(bits, counts, start // BLOCK + tl.program_id(0), bit_count, BLOCK)
    take = (position >= start) & (position < start + length) & member
    gradient = tl.load(dense + (position - start), mask=take, other=0.0).to(tl.float32)
    if HAS_FORWARD:
        forward = _bit_at(forward_bits, rank, take) == 1
        if not STRAIGHT_THROUGH:
            gradient = tl.where(forward, gradient, 0.0)
        if HAS_L2:
            value = tl.load(values + rank, mask=take, other=0.0).to(tl.float32)
            gradient += l2_scale * value * tl.where(forward, 1.0, inverse_density)
    tl.store(out + rank, gradient.to(out.dtype.element_ty), mask=take)


@triton.jit
def _remap_kernel(old_bits, old_counts, new_bits, new_counts, out, count, bit_count, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    _, old, old_rank = _block_members(old_bits, old_counts, block, bit_count, BLOCK)
    _, new, new_rank = _block_members(new_bits, new_counts, block, bit_count, BLOCK)
    tl.store(out + new_rank, tl.where(old, old_rank, -1), mask=new & (new_rank < count))


@triton.jit
def _row(rows, chunks, ROW_SIZE: tl.constexpr):
    """This program's row fields and its entries' indices within the row."""
    chunk = tl.program_id(0)
    row = tl.load(chunks + 2 * chunk)
    first = tl.load(chunks + 2 * chunk + 1)
    fields = rows + ROW_SIZE * row
    return (first, tl.load(fields), tl.load(fields + 1), tl.load(fields + 2), tl.load(fields + 3),
            tl.load(fields + 4), tl.load(fields + 5))


@triton.jit
def _keys(source, offset, index, mask, position_base, position_bits, position_max):
    """Distinct int64 keys: |x|'s float bits above the reversed position (a lower position ranks higher)."""
    x = tl.load(source + offset + index, mask=mask, other=0.0).to(tl.float32)
    magnitude = (x.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)
    return (magnitude << position_bits) | (position_max - (position_base + index))


@triton.jit
def _radix_histogram_kernel(histogram, source, rows, chunks, prefix, candidates, position_bits, position_max,
                            shift, HAS_CANDIDATES: tl.constexpr, WIDTH: tl.constexpr, ROW_SIZE: tl.constexpr,
                            CHUNK_SIZE: tl.constexpr):
    first, offset, length, segment, base, candidate_offset, _ = _row(rows, chunks, ROW_SIZE)
    index = first + tl.arange(0, CHUNK_SIZE)
    mask = (index >= 0) & (index < length)
    key = _keys(source, offset, index, mask, base, position_bits, position_max)
    if HAS_CANDIDATES:
        mask = mask & (_bit_at(candidates, candidate_offset + index, mask) == 1)
    mask = mask & ((key >> (shift + WIDTH)) == tl.load(prefix + segment))
    digit = tl.where(mask, ((key >> shift) & ((1 << WIDTH) - 1)).to(tl.int32), 1 << WIDTH)  # the rest: a spare bin
    bins = tl.arange(0, 2 << WIDTH)
    counts = tl.histogram(digit, 2 << WIDTH)
    # Only the bins this chunk fills: after the first pass almost every entry misses the prefix.
    tl.atomic_add(histogram + segment * (1 << WIDTH) + bins, counts, mask=(bins < (1 << WIDTH)) & (counts > 0))


@triton.jit
def _radix_step_kernel(histogram, prefix, remaining, prefix_out, remaining_out, WIDTH: tl.constexpr):
    segment = tl.program_id(0)
    bins = tl.arange(0, 1 << WIDTH)
    counts = tl.load(histogram + segment * (1 << WIDTH) + bins).to(tl.int64)
    at_or_above = tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts
    wanted = tl.load(remaining + segment)
    chosen = tl.sum((at_or_above >= wanted).to(tl.int64), axis=0) - 1
    above = tl.sum(tl.where(bins > chosen, counts, 0), axis=0)
    tl.store(prefix_out + segment, (tl.load(prefix + segment) << WIDTH) | chosen)
    tl.store(remaining_out + segment, wanted - above)


@triton.jit
def _radix_select_kernel(out_words, source, rows, chunks, threshold, k, candidates, position_bits, position_max,
                         HAS_CANDIDATES: tl.constexpr, ROW_SIZE: tl.constexpr, CHUNK_SIZE: tl.constexpr):
    first, offset, length, segment, base, candidate_offset, out_offset = _row(rows, chunks, ROW_SIZE)
    index = first + tl.arange(0, CHUNK_SIZE)  # out_offset + first is a multiple of 32: whole output words
    mask = (index >= 0) & (index < length)
    key = _keys(source, offset, index, mask, base, position_bits, position_max)
    chosen = mask & (key >= tl.load(threshold + segment)) & (tl.load(k + segment) > 0)
    if HAS_CANDIDATES:
        chosen = chosen & (_bit_at(candidates, candidate_offset + index, mask) == 1)
    weighted = tl.reshape(chosen.to(tl.int32), (CHUNK_SIZE // 32, 32)) << tl.arange(0, 32)[None, :]
    bits = tl.sum(weighted, axis=1)  # distinct powers of two: the sum is their OR
    word = (out_offset + first) // 32 + tl.arange(0, CHUNK_SIZE // 32)
    # OR, not store: a word at a row's edge may hold another row's bits, or bits already set.
    tl.atomic_or(out_words + word, bits, mask=(bits != 0) & (word >= 0))


def _blocks(start: int, length: int) -> int:
    """Programs of BLOCK_BITS entries covering [start, start + length)."""
    return triton.cdiv(start + length, BLOCK_BITS) - start // BLOCK_BITS if length else 0


def expand_bits(values, bits, counts, forward_bits, start, length, dtype):
    out = torch.empty(length, dtype=dtype, device=values.device)
    expand_bits_into_(out, values, bits, counts, forward_bits, start)
    return out


def expand_bits_into_(out, values, bits, counts, forward_bits, start):
    if out.numel():
        _expand_kernel[(_blocks(start, out.numel()),)](
            values, bits, counts, bits if forward_bits is None else forward_bits, out, start, out.numel(),
            8 * bits.numel(), HAS_FORWARD=forward_bits is not None, BLOCK=BLOCK_BITS)


def scatter_bits_(target, values, bits, counts, start):
    if target.numel():
        _scatter_kernel[(_blocks(start, target.numel()),)](target, values, bits, counts, start, target.numel(),
                                                           8 * bits.numel(), BLOCK=BLOCK_BITS)


def gather_bits_(out, dense, bits, counts, start, forward_bits, values, l2_scale, inverse_density, straight_through):
    if (l2_scale or not straight_through) and forward_bits is None:
        raise ValueError("gather_bits_ needs forward_bits for the regulariser or a masked gradient.")
    if dense.numel():
        _gather_kernel[(_blocks(start, dense.numel()),)](
            dense, bits, counts, bits if forward_bits is None else forward_bits,
            dense if values is None else values, out, start, dense.numel(), 8 * bits.numel(), float(l2_scale),
            float(inverse_density), HAS_FORWARD=forward_bits is not None, STRAIGHT_THROUGH=straight_through,
            HAS_L2=bool(l2_scale), BLOCK=BLOCK_BITS)


def remap_positions(old_bits, old_counts, new_bits, new_counts, numel, count):
    out = torch.full((count,), -1, dtype=torch.int64, device=old_bits.device)
    if numel:
        _remap_kernel[(_blocks(0, numel),)](old_bits, old_counts, new_bits, new_counts, out, count,
                                            8 * old_bits.numel(), BLOCK=BLOCK_BITS)
    return out


_TABLES: OrderedDict[tuple, tuple[Tensor, Tensor, int]] = OrderedDict()
_TABLES_KEPT = 256


def _tables(rows: list[int], device: torch.device) -> tuple[Tensor, Tensor, int]:
    """The rows and their chunks (row, first entry; the first of a row aligned so that its output starts on an
    int32 word) on the device, made once per table and device (copied from pinned memory: no host sync)."""
    key = (device, tuple(rows))
    if key in _TABLES:
        _TABLES.move_to_end(key)
        return _TABLES[key]
    chunks = []
    for index, (_, length, _, _, _, out_offset) in enumerate(row_tuples(rows)):
        chunks += [value for first in range(-(out_offset % 32), length, CHUNK) for value in (index, first)]

    def upload(values: list[int]) -> Tensor:
        host = torch.tensor(values or [0], dtype=torch.int64)
        if device.type == "cpu":
            return host
        return host.pin_memory().to(device, non_blocking=True)

    _TABLES[key] = (upload(rows), upload(chunks), len(chunks) // 2)
    if len(_TABLES) > _TABLES_KEPT:
        _TABLES.popitem(last=False)
    return _TABLES[key]


def radix_histogram_(histogram, source, rows, prefix, candidates, position_bits, shift, width):
    row_table, chunk_table, programs = _tables(rows, source.device)
    if programs:
        _radix_histogram_kernel[(programs,)](
            histogram, source, row_table, chunk_table, prefix, source if candidates is None else candidates,
            position_bits, (1 << position_bits) - 1, shift, HAS_CANDIDATES=candidates is not None, WIDTH=width,
            ROW_SIZE=ROW, CHUNK_SIZE=CHUNK)


def radix_step(histogram, prefix, remaining, width):
    prefix_out, remaining_out = torch.empty_like(prefix), torch.empty_like(remaining)
    if prefix.numel():
        _radix_step_kernel[(prefix.numel(),)](histogram, prefix, remaining, prefix_out, remaining_out, WIDTH=width)
    return prefix_out, remaining_out


def radix_select_bits_(out_bits, source, rows, threshold, k, candidates, position_bits):
    if out_bits.numel() % 4:
        raise ValueError(f"radix_select_bits_ on CUDA ORs whole int32 words into its output; got a bitmap of "
                         f"{out_bits.numel()} bytes: pad it to whole words (select.padded_bitmap).")
    row_table, chunk_table, programs = _tables(rows, source.device)
    if programs:
        _radix_select_kernel[(programs,)](
            out_bits.view(torch.int32), source, row_table, chunk_table, threshold, k, source if candidates is None else candidates,
            position_bits, (1 << position_bits) - 1, HAS_CANDIDATES=candidates is not None, ROW_SIZE=ROW,
            CHUNK_SIZE=CHUNK)


LAUNCHERS = {"expand_bits": expand_bits, "expand_bits_into_": expand_bits_into_, "scatter_bits_": scatter_bits_, "gather_bits_": gather_bits_,
             "remap_positions": remap_positions, "radix_histogram_": radix_histogram_, "radix_step": radix_step,
             "radix_select_bits_": radix_select_bits_}
