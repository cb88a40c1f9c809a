"""The NVMe dense store: each rank's shards in files, streamed through DeepSpeed's async I/O.

For large models the fp32 dense store (4 bytes per weight) outgrows host memory, as
dense ZeRO-Infinity's optimizer state does; like ZeRO-Infinity it goes to NVMe through
DeepSpeed's libaio handles (`AsyncIOBuilder().load().aio_handle(...)`). Each layer shard
is one file, padded to a 4 KiB multiple for O_DIRECT. θ is resident only in a ring of
`buffers` pinned, aligned host buffers (each the size of the largest shard): while the
refresh selects and rebuilds layer i, layer i+1 is being read into the next buffer, each
buffer with its own handle so waiting for one read never waits for another transfer.

Writes are crash-safe: a shard is written to `<file>.tmp`, fsynced, and renamed over the
old file, so a refresh interrupted at any point leaves every layer's file either old or
new. Checkpoints hard-link the files (a later rename replaces the directory entry, never
the linked data), falling back to a copy across filesystems.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import Tensor

from ds_topkast.config import AioConfig, DenseStoreConfig
from ds_topkast.errors import NVMeStoreError
from ds_topkast.store.cpu import CPUDenseStore
from ds_topkast.store.protocol import DenseStore
from ds_topkast.store.shards import (LayerShard, as_number, checksum, fsync_path, owned_range, piece_of,
                                     refuse_another_rank, shard_range)

ALIGN_BYTES = 4096
_FLOATS_PER_ALIGN = ALIGN_BYTES // 4



def _padded(numel: int) -> int:
    return -(-numel // _FLOATS_PER_ALIGN) * _FLOATS_PER_ALIGN


def load_aio():
    """DeepSpeed's async I/O op, or an error that says how to get it."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    builder = AsyncIOBuilder()
    if not builder.is_compatible(verbose=False):
        raise NVMeStoreError("dense_store.device 'nvme' needs DeepSpeed's async I/O op, which needs libaio: "
                             "install it (Debian/Ubuntu: `apt-get install libaio-dev`) and retry.")
    return builder.load()


class NVMeDenseStore(DenseStore):
    """fp32 θ shards in files under `nvme_path/ds_topkast_store/rank<r>/`; same interface as CPUDenseStore."""

    shards_independent = False  # `stream` reuses its buffers: a caller must be done with a shard before the next

    def __init__(self, nvme_path: str, rank: int, world: int, aio: AioConfig | None = None, buffers: int = 2):
        root = Path(nvme_path)
        if not root.is_dir():
            raise NVMeStoreError(f"dense_store.nvme_path {nvme_path} does not exist or is not a folder; create it "
                                 "on the NVMe device (or point nvme_path at an existing folder there).")
        self.root = root / "ds_topkast_store" / f"rank{rank:05d}"
        self.streamed_bytes = 0  # read + written by refresh passes: the store's only traffic with the engine
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write_probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise NVMeStoreError(f"dense_store.nvme_path {nvme_path} is not writable ({err.strerror}); give a "
                                 "folder this user can write to.") from None
        settings = aio if aio is not None else AioConfig()
        library = load_aio()
        self._handles = [library.aio_handle(settings.block_size, settings.queue_depth, settings.single_submit,
                                            settings.overlap_events, settings.intra_op_parallelism)
                         for _ in range(buffers)]
        self._buffers: list[Tensor] = []
        self._meta: dict[str, LayerShard] = {}  # theta is an empty placeholder: the data lives in files
        self._files: dict[str, Path] = {}
        self.rank, self.world = rank, world

    @classmethod
    def configured(cls, cfg: DenseStoreConfig, rank: int, world: int) -> "NVMeDenseStore":
        """An empty store under `cfg.nvme_path` with its aio settings (the DeepSpeed config's "aio" section's unless
        the store's own are given: config.topkast_section merges them)."""
        return cls(cfg.nvme_path, rank, world, cfg.aio, cfg.buffers)

    def add_shard(self, name: str, shard: Tensor, numel: int) -> None:
        """Write this rank's range `shard_range(numel, rank, world)` of a new layer to its file."""
        start, end = owned_range(name, shard, numel, self.rank, self.world)
        if self._buffers and _padded(end - start) > self._buffers[0].numel():
            self._free_buffers()  # re-made at the size of the largest shard on next use
        self._meta[name] = LayerShard(name, torch.empty(0), start, numel)
        self._files[name] = self.root / f"{len(self._files):05d}.bin"
        self.load_shard(name, shard)

    def require_room(self, nbytes: int) -> None:
        """Refuse a store of `nbytes` (this rank's shards) that the device cannot hold while a refresh rewrites it."""
        self._require_space(2 * nbytes)

    def _free_buffers(self) -> None:
        for handle, buffer in zip(self._handles, self._buffers):
            handle.free_cpu_locked_tensor(buffer)
        self._buffers = []

    @staticmethod
    def from_store(store: "NVMeDenseStore", source: CPUDenseStore) -> "NVMeDenseStore":
        """Write this rank's shard of every layer of an in-memory store (full, or already this rank's) to `store`."""
        if source.world != 1:
            refuse_another_rank("The in-memory store", source.rank, source.world, store.rank, store.world,
                                NVMeStoreError)
        ranges = {name: shard_range(source.numel(name), store.rank, store.world) for name in source.names()}
        store.require_room(sum(4 * _padded(end - start) for start, end in ranges.values()))
        for name, (start, end) in ranges.items():
            store.add_shard(name, piece_of(source.shard(name).theta, source.layout(name)[0], start, end),
                            source.numel(name))
        return store

    def _require_space(self, needed: int) -> None:
        free = shutil.disk_usage(self.root).free
        if free < needed:
            raise NVMeStoreError(f"dense_store.nvme_path {self.root.parent.parent} has {free / 2**30:.2f} GiB free; "
                                 f"this rank's store needs {needed / 2**30:.2f} GiB (its shards, twice: a refresh "
                                 "writes each new shard before replacing the old). Free space or use a larger device.")

    def _file(self, name: str) -> Path:
        return self._files[name]

    def _buffer(self, slot: int) -> Tensor:
        if not self._buffers:
            size = max(_padded(self.layout(name)[1]) for name in self._meta)
            self._buffers = [self._handles[0].new_cpu_locked_tensor(size, torch.empty(0, dtype=torch.float32))
                             for _ in self._handles]
        return self._buffers[slot]

    def names(self) -> list[str]:
        return list(self._meta)

    def numel(self, name: str) -> int:
        return self._shard_meta(name).numel

    def layout(self, name: str) -> tuple[int, int]:
        """(global offset, entries held by this rank) of a layer."""
        meta = self._shard_meta(name)
        start, end = shard_range(meta.numel, self.rank, self.world)
        return start, end - start

    def _shard_meta(self, name: str) -> LayerShard:
        try:
            return self._meta[name]
        except KeyError:
            raise NVMeStoreError(f"The NVMe store holds no layer named {name!r}; it holds {self.names()}.") from None

    def _start_read(self, slot: int, name: str) -> None:
        buffer = self._buffer(slot)[:_padded(self.layout(name)[1])]
        self._handles[slot].async_pread(buffer, str(self._file(name)))

    def _wait(self, slot: int, expected: int, what: str) -> None:
        done = self._handles[slot].wait()
        if done != expected:
            raise NVMeStoreError(f"Async I/O {what} completed {done} of {expected} operations under {self.root}; "
                                 "the device may be full or failing.")

    def _write(self, slot: int, name: str) -> None:
        """Write the slot's shard to a temporary file, make it durable, and rename it into place."""
        length = _padded(self.layout(name)[1])
        final = self._file(name)
        temporary = final.with_suffix(".tmp")
        self._require_space(4 * length)
        self._handles[slot].async_pwrite(self._buffer(slot)[:length], str(temporary))
        self._wait(slot, 1, f"write of layer {name!r}")
        written = temporary.stat().st_size
        if written != 4 * length:
            raise NVMeStoreError(f"Writing layer {name!r} to {temporary} stored {written} of {4 * length} bytes; "
                                 "the device may be full.")
        fsync_path(temporary)
        os.replace(temporary, final)
        fsync_path(self.root)

    def stream(self, names: Iterable[str]) -> Iterator[LayerShard]:
        """Read-modify-write pass: layer i+1 is read while the caller works on layer i, which is written after."""
        names = list(names)
        slots = len(self._handles)
        in_flight = None  # the slot with a read still running
        try:
            if names:
                self._start_read(0, names[0])
                in_flight = 0
            for i, name in enumerate(names):
                slot = i % slots
                self._wait(slot, 1, f"read of layer {name!r}")
                in_flight = None
                if i + 1 < len(names):
                    self._start_read((i + 1) % slots, names[i + 1])
                    in_flight = (i + 1) % slots
                meta = self._shard_meta(name)
                shard = LayerShard(name, self._buffer(slot)[:self.layout(name)[1]], meta.offset, meta.numel,
                                   meta.checksum)
                self.streamed_bytes += shard.theta.numel() * 4
                yield shard
                meta.checksum = shard.checksum  # recorded by the caller (store.CPUDenseStore.stream)
                self._write(slot, name)
                self.streamed_bytes += shard.theta.numel() * 4
        finally:
            if in_flight is not None:  # a pass that stopped early: leave no read behind on a handle
                self._handles[in_flight].wait()

    def read(self, name: str) -> Tensor:
        """A copy of this rank's slice of the layer, read synchronously (for inspection and export)."""
        length = self.layout(name)[1]
        self._start_read(0, name)
        self._wait(0, 1, f"read of layer {name!r}")
        return self._buffer(0)[:length].clone()

    def load_shard(self, name: str, theta: Tensor) -> None:
        """Replace this rank's slice of a layer (at placement or from a checkpoint); its size must match."""
        length = self.layout(name)[1]
        if theta.numel() != length:
            raise NVMeStoreError(f"Checkpoint store shard of layer {name!r} has {theta.numel()} entries, this rank "
                                 f"holds {length}; the model or the world size changed.")
        buffer = self._buffer(0)
        buffer[:length].copy_(theta.reshape(-1))
        buffer[length:_padded(length)].zero_()
        self._shard_meta(name).checksum = checksum(buffer[:length])
        self._write(0, name)

    def checkpoint_entries(self, folder: Path) -> dict[str, str]:
        """Link (or copy) every shard file into `folder`; returns the file name per layer."""
        folder.mkdir(parents=True, exist_ok=True)
        entries = {}
        for name in self._meta:
            source, target = self._file(name), folder / self._file(name).name
            target.unlink(missing_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
            entries[name] = target.name
        return entries

    def recorded_checksums(self) -> dict[str, int]:
        """The checksum recorded for each layer's shard at its last write to its file (padding excluded): CRC-32
        where the host sealed it, sum64 where a refresh on an accelerator did."""
        return {name: as_number(meta.checksum) for name, meta in self._meta.items()}

    def nbytes(self) -> int:
        """Host bytes this store holds: its I/O buffers, whatever the size of the store."""
        return sum(b.numel() * b.element_size() for b in self._buffers)
