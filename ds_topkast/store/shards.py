"""What every dense store shares: which contiguous range of a layer each rank holds, the checksums that catch a shard
changed behind the store's back, and durable writes.

A layer of n entries is split into `world` contiguous ranges of ceil(n / world) entries
(the last shorter), the same rule for the store, its checkpoints and the dense
gradients, so any rank finds any other's range without asking it.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import torch
from torch import Tensor

from ds_topkast.errors import DenseStoreError


def shard_range(numel: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous [start, end) of a numel-entry layer that `rank` of `world` holds."""
    chunk = -(-numel // world)
    start = min(rank * chunk, numel)
    return start, min(start + chunk, numel)


# Checksums of the second kind live in [2^62, 2^63), CRC-32s below 2^32: a value says which kind it is.
_SUM64_TAG = 1 << 62
_SUM64_CHUNK = 1 << 22
_SUM64_MULTIPLIER = 0x9E3779B97F4A7C15 - (1 << 64)  # as a signed int64; products wrap modulo 2^64


def owned_range(name: str, shard: Tensor, numel: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's [start, end) of a layer of `numel` entries, checked against the shard it was given."""
    start, end = shard_range(numel, rank, world)
    if shard.numel() != end - start:
        raise DenseStoreError(f"Layer {name!r}: rank {rank} of {world} holds entries [{start}, {end}) of {numel}, "
                              f"but was given {shard.numel()}.")
    return start, end


Checksum = int | Tensor  # a recorded checksum: a number, or a sum64 still on the accelerator (not read back yet)


def checksum(values: Tensor) -> int:
    """A checksum of a tensor's bytes, computed where the tensor lives: changes if any entry or their order changes.

    On the host it is CRC-32 (zlib, about 1.5 GB/s on one core); on an accelerator it is
    `sum64`, computed there, so that a refresh checks the shard it has just copied to the
    device instead of a host pass that took longer than the transfer (2.2-2.8 s per refresh
    of GPT-2 medium on an H200 against a 0.05 s transfer floor). Use `matches` to check a
    recorded value: it recomputes with the recorded kind, wherever the tensor is.
    """
    return _crc32(values) if values.device.type == "cpu" else sum64(values)


def checksum_where(values: Tensor) -> Checksum:
    """`checksum` without a host read: CRC-32 on the host, the sum64 as a tensor on an accelerator (`as_number`
    reads it when a checkpoint needs it)."""
    return _crc32(values) if values.device.type == "cpu" else sum64_tensor(values)


def as_number(recorded: Checksum) -> int:
    return int(recorded) if isinstance(recorded, Tensor) else recorded


def matches(values: Tensor, recorded: Checksum) -> bool:
    """Whether `values` still has the checksum `recorded` (of either kind)."""
    recorded = as_number(recorded)
    return (sum64(values) if recorded >= _SUM64_TAG else _crc32(values)) == recorded


def changed_since(host: Tensor, on_device: Tensor, recorded: Checksum) -> Tensor:
    """Whether a shard no longer has its recorded checksum, as a bool tensor where `on_device` is (no host read):
    a sum64 is recomputed on the device copy, a CRC-32 on the host copy."""
    if isinstance(recorded, Tensor):
        return sum64_tensor(on_device) != recorded.to(on_device.device)
    if recorded >= _SUM64_TAG:
        return sum64_tensor(on_device) != torch.full((), recorded, dtype=torch.int64, device=on_device.device)
    return torch.full((), _crc32(host) != recorded, device=on_device.device)


def _crc32(values: Tensor) -> int:
    flat = values.detach().reshape(-1).contiguous().cpu()
    return zlib.crc32(memoryview(flat.view(torch.uint8).numpy()))


def sum64(values: Tensor) -> int:
    """Σ (w_i + 1)·m_i modulo 2^64 over the 32-bit words w_i of the bytes (single bytes when not a whole number of
    words), m_i odd and distinct per position: exact integer arithmetic, so the same on every device; any changed
    word changes the sum (an odd multiplier is invertible modulo 2^64), and so does moving one. Tagged into
    [2^62, 2^63). One read of the tensor, in chunks of 2^22 words (about 100 MiB of transient memory).
    """
    return int(sum64_tensor(values))


def sum64_tensor(values: Tensor) -> Tensor:
    """`sum64` as a 0-dim int64 tensor where `values` live: nothing is read back to the host."""
    flat = values.detach().reshape(-1).contiguous().view(torch.uint8)
    words = flat.view(torch.int32) if flat.numel() % 4 == 0 else flat
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start in range(0, words.numel(), _SUM64_CHUNK):
        part = words[start:start + _SUM64_CHUNK].to(torch.int64).add_(1)
        multipliers = torch.arange(start, start + part.numel(), dtype=torch.int64, device=flat.device)
        total += part.mul_(multipliers.mul_(_SUM64_MULTIPLIER).bitwise_or_(1)).sum()
    return torch.remainder(total.bitwise_xor_(words.numel()), _SUM64_TAG).add_(_SUM64_TAG)


def available_host_memory() -> int | None:
    """Bytes of host memory the kernel can give without swapping (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def fsync_path(path: str | os.PathLike) -> None:
    """Make a written file (or a folder's entries) durable before anything points at it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class LayerShard:
    """This rank's part of one layer: θ[offset : offset + len(theta)] of a layer of `numel` entries."""

    name: str
    theta: Tensor
    offset: int
    numel: int
    checksum: Checksum = 0


def overlap(start: int, end: int, offset: int, length: int) -> tuple[int, int]:
    """The part [lo, hi) of the global range [start, end) that a piece holding [offset, offset + length) covers
    (lo >= hi when they do not meet)."""
    return max(start, offset), min(end, offset + length)


def piece_of(piece: Tensor, offset: int, start: int, end: int) -> Tensor:
    """Entries [start, end) (global indices) of a flat piece whose first entry is global index `offset`."""
    lo, hi = overlap(start, end, offset, piece.numel())
    return piece[lo - offset:max(lo, hi) - offset]


def in_range(indices: Tensor, offset: int, length: int) -> Tensor:
    """Which of the global `indices` fall in [offset, offset + length) (a bool tensor)."""
    return (indices >= offset) & (indices < offset + length)


def refuse_another_rank(what: str, built_rank: int, built_world: int, rank: int, world: int,
                        error: type[DenseStoreError] = DenseStoreError) -> None:
    """A store built for one rank cannot serve another: refuse it (with `error`), naming both."""
    if (built_rank, built_world) != (rank, world):
        raise error(f"{what} was built as rank {built_rank} of {built_world} and cannot become rank {rank} "
                              f"of {world}; sparsify the model in the job that trains it.")
