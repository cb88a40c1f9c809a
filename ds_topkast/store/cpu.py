"""The dense store: the full fp32 weights θ of every sparsified layer, off the accelerator, sharded.

Top-KAST selects A and B from the magnitudes of *all* of a layer's weights, including
the reservoir C that is frozen between refreshes, so the dense θ must be kept
somewhere; here it is host memory. Under data parallelism each rank keeps one
contiguous flat range of every layer (about n / world entries), pinned (when asked and
an accelerator is present) once placed, because each refresh streams every shard to the
accelerator and back. Between refreshes the
store's copy of B is stale: the engine's fp32 master is the truth, written back at each
refresh. Nothing writes the store between refreshes, so each shard carries a checksum
taken after the last write; a shard that changed anyway is caught before it is used.
The store knows nothing of DeepSpeed or of the layers that use it.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import Tensor


class DenseStoreError(RuntimeError):
    """The store was asked for a layer it does not hold, or given mismatched state."""


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


class CPUDenseStore:
    """fp32 θ per layer, flat, in host memory; each rank keeps its shard. Keyed by module name."""

    shards_independent = True  # `stream` hands out the shards themselves: a caller may hold several at once

    def __init__(self, rank: int = 0, world: int = 1):
        self._pin = False
        self._layers: dict[str, LayerShard] = {}
        self.rank, self.world = rank, world
        self.streamed_bytes = 0  # read + written by refresh passes: the store's only traffic with the engine

    def _host(self, tensor: Tensor) -> Tensor:
        flat = tensor.detach().to("cpu", torch.float32).reshape(-1).clone()
        return flat.pin_memory() if self._pin else flat

    def add(self, name: str, theta: Tensor) -> None:
        """Take a copy of this rank's range of a layer's full weight (any shape and dtype) as flat fp32."""
        start, end = shard_range(theta.numel(), self.rank, self.world)
        self.add_shard(name, theta.reshape(-1)[start:end], theta.numel())

    def add_shard(self, name: str, shard: Tensor, numel: int) -> None:
        """Take a copy of this rank's range `shard_range(numel, rank, world)` of a layer of `numel` entries."""
        start, _ = owned_range(name, shard, numel, self.rank, self.world)
        self._layers[name] = LayerShard(name, self._host(shard), start, numel)
        self.seal(name)

    def require_room(self, nbytes: int) -> None:
        """Refuse a store of `nbytes` per rank that this node's free host memory cannot hold (all local ranks)."""
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
        available = available_host_memory()
        if available is not None and nbytes * local_ranks > available:
            raise DenseStoreError(
                f"The dense store needs {nbytes / 2**30:.2f} GiB of host memory per rank ({local_ranks} rank(s) on "
                f"this node: {nbytes * local_ranks / 2**30:.2f} GiB) and {available / 2**30:.2f} GiB are available. "
                'Put it on NVMe ("dense_store": {"device": "nvme", "nvme_path": ...}), use more nodes, or sparsify '
                "fewer layers.")

    def keep_shard(self, rank: int, world: int, pin_memory: bool = False) -> None:
        """Drop everything but this rank's contiguous range of every layer; pin it if asked and an accelerator exists.

        Call once the accelerator's device is set (pinning opens its context).
        """
        if self.world != 1 and (world, rank) != (self.world, self.rank):
            raise DenseStoreError(f"The store was built as rank {self.rank} of {self.world} and cannot become rank "
                                  f"{rank} of {world}; sparsify the model in the job that trains it.")
        self._pin = pin_memory and torch.accelerator.is_available()
        for name, layer in self._layers.items():
            start, end = shard_range(layer.numel, rank, world)
            if (start, end) != (layer.offset, layer.offset + layer.theta.numel()) or self._pin:
                self._layers[name] = LayerShard(name, self._host(layer.theta[start - layer.offset:end - layer.offset]),
                                                start, layer.numel)
                self.seal(name)
        self.rank, self.world = rank, world

    def layout(self, name: str) -> tuple[int, int]:
        """(global offset, entries held by this rank) of a layer."""
        shard = self.shard(name)
        return shard.offset, shard.theta.numel()

    def shard(self, name: str) -> LayerShard:
        try:
            return self._layers[name]
        except KeyError:
            raise DenseStoreError(f"The dense store holds no layer named {name!r}; it holds {self.names()}.") from None

    def read(self, name: str) -> Tensor:
        """This rank's flat fp32 slice of the layer (its global offset is `layout(name)[0]`)."""
        return self.shard(name).theta

    def stream(self, names: Iterable[str]) -> Iterator[LayerShard]:
        """The shards one after another for a read-modify-write pass.

        The caller writes θ and records its new `checksum` (computed where it worked on
        it, see `checksum_where`); the shards are the store's own tensors, so it may take
        the next before it is done with one. A pass that raises leaves its shard with the
        old checksum, so the next refresh reports it until a checkpoint is loaded.
        """
        for name in names:
            shard = self.shard(name)
            self.streamed_bytes += shard.theta.numel() * 4
            yield shard
            self.streamed_bytes += shard.theta.numel() * 4

    def seal(self, name: str) -> None:
        """Record the shard's checksum after a legitimate write."""
        layer = self.shard(name)
        layer.checksum = checksum(layer.theta)

    def numel(self, name: str) -> int:
        """Entries of the whole layer (all shards)."""
        return self.shard(name).numel

    def names(self) -> list[str]:
        return list(self._layers)

    def checkpoint_entries(self, folder) -> dict[str, Tensor]:
        """What a checkpoint keeps of each layer: a copy of this rank's slice (`folder` is unused here)."""
        return {name: layer.theta.clone() for name, layer in self._layers.items()}

    def checksums(self) -> dict[str, int]:
        """The checksum of each layer's shard as last written (what a checkpoint of it must hold): CRC-32, or sum64
        where a refresh on an accelerator sealed it."""
        return {name: as_number(layer.checksum) for name, layer in self._layers.items()}

    def nbytes(self) -> int:
        """Host bytes this rank holds."""
        return sum(layer.theta.numel() * layer.theta.element_size() for layer in self._layers.values())

    def load_shard(self, name: str, theta: Tensor) -> None:
        """Replace this rank's slice of a layer (from a checkpoint); its size must match."""
        layer = self.shard(name)
        if theta.numel() != layer.theta.numel():
            raise DenseStoreError(f"Checkpoint store shard of layer {name!r} has {theta.numel()} entries, this rank "
                                  f"holds {layer.theta.numel()}; the model or the world size changed.")
        layer.theta.copy_(theta.reshape(-1))
        self.seal(name)
