"""Packed bitmaps of sets, and the per-block counts that let a kernel find an entry's rank without a scan.

A set of entries of an n-entry tensor is held as n bits, eight to a byte (bit j of byte i
is entry 8i + j): 1/8 byte per entry where int64 indices took 8 per member. The i-th set
bit's rank (its position in the compact vector of the set's values) is the number of set
bits before it. `block_counts` keeps, beside the bitmap, the number of set bits before
every block of `BLOCK_BITS` entries (int32, 4 bytes per 2,048 entries), so a kernel that
handles one block finds each rank from that count and a scan of its own block's bits: no
int64 index vector, no bool tensor, no global scan. The counts change only when the set
does (a refresh), and are rebuilt then.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BLOCK_BITS = 2048  # entries per counted block: 256 bytes of bits, one kernel program's work
_BLOCK_BYTES = BLOCK_BITS // 8


def bitmap_bytes(count: int) -> int:
    """Bytes of the bitmap of a `count`-entry set."""
    return -(-count // 8)


def pack_bits(mask: Tensor) -> Tensor:
    """A flat bool mask as uint8 bits, eight to a byte (bit j of byte i is entry 8i + j): 1/8 of its bytes."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = F.pad(flat, (0, -flat.numel() % 8))
    shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) << shifts).sum(1, dtype=torch.uint8)  # distinct powers of two: no carry


def unpack_bits(bits: Tensor, count: int, start: int = 0) -> Tensor:
    """Entries [start, start + count) of a mask packed by `pack_bits`, as bool."""
    first, last = start // 8, bitmap_bytes(start + count)
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    unpacked = ((bits[first:last].unsqueeze(1) >> shifts) & 1).view(-1)
    skip = start - 8 * first
    return unpacked[skip:skip + count].bool()


def pack_bits_at(mask: Tensor, offset: int, count: int) -> Tensor:
    """The bitmap of a `count`-entry set whose entries [offset, offset + len(mask)) are `mask`, the rest unset."""
    padded = F.pad(mask.reshape(-1).to(torch.uint8), (offset % 8, 0))
    bits = torch.zeros(bitmap_bytes(count), dtype=torch.uint8, device=mask.device)
    packed = pack_bits(padded)
    bits[offset // 8:offset // 8 + packed.numel()] = packed
    return bits


def range_bits(bits: Tensor, offset: int, length: int) -> Tensor:
    """Entries [offset, offset + length) of a bitmap, as a bitmap of their own (aligned to entry 0); bits past the
    end of `bits` read as unset. Bytewise shifts: nothing is unpacked."""
    first, shift = divmod(offset, 8)
    size = bitmap_bytes(length)
    window = bits[first:first + size + 1].to(torch.int32)
    window = F.pad(window, (0, size + 1 - window.numel()))
    out = ((window[:size] >> shift) | (window[1:] << (8 - shift))) & 0xFF
    if length % 8:
        out[-1:] &= (1 << length % 8) - 1
    return out.to(torch.uint8)


def indices_from_bits(bits: Tensor, numel: int, count: int) -> Tensor:
    """Ascending int64 positions of the `count` set bits among the first `numel`; no host sync."""
    return torch.nonzero_static(unpack_bits(bits, numel), size=count).squeeze(1)


def index_bits(indices: Tensor, numel: int) -> Tensor:
    """The bitmap of a set of flat indices into `numel` entries."""
    mask = torch.zeros(numel, dtype=torch.bool, device=indices.device)
    return pack_bits(mask.index_fill_(0, indices.long(), True))


# Set bits in each byte value, per device (made once: a copy to the accelerator per call would wait on the host).
_POPCOUNT = {torch.device("cpu"): torch.tensor([bin(b).count("1") for b in range(256)], dtype=torch.int32)}


def popcounts(bits: Tensor) -> Tensor:
    """Set bits of each byte, as int32."""
    table = _POPCOUNT.get(bits.device)
    if table is None:
        table = _POPCOUNT[bits.device] = _POPCOUNT[torch.device("cpu")].to(bits.device)
    return table[bits.int()]


def popcount(bits: Tensor) -> Tensor:
    """Set bits of a whole bitmap, as a 0-dim int64 tensor where the bits live (no host read)."""
    return popcounts(bits).sum(dtype=torch.int64)


def block_counts(bits: Tensor, numel: int) -> Tensor:
    """int32 [blocks + 1]: entry j is the number of set bits among entries [0, j·BLOCK_BITS); the last is all of them.

    Bits at or past `numel` (the last byte's padding) must be unset, as `pack_bits` leaves them.
    """
    blocks = -(-numel // BLOCK_BITS)
    used = bits[:bitmap_bytes(numel)]
    per_block = F.pad(popcounts(used), (0, blocks * _BLOCK_BYTES - used.numel())).view(blocks, _BLOCK_BYTES).sum(1)
    return F.pad(torch.cumsum(per_block, 0, dtype=torch.int32), (1, 0))
