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
from typing import Iterable, Iterator

import torch
from torch import Tensor

from ds_topkast.errors import DenseStoreError
from ds_topkast.store.protocol import DenseStore
from ds_topkast.store.shards import (LayerShard, as_number, available_host_memory, checksum, owned_range, piece_of,
                                     refuse_another_rank, shard_range)


class CPUDenseStore(DenseStore):
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
        if self.world != 1:
            refuse_another_rank("The store", self.rank, self.world, rank, world)
        self._pin = pin_memory and torch.accelerator.is_available()
        for name, layer in self._layers.items():
            start, end = shard_range(layer.numel, rank, world)
            if (start, end) != (layer.offset, layer.offset + layer.theta.numel()) or self._pin:
                self._layers[name] = LayerShard(name, self._host(piece_of(layer.theta, layer.offset, start, end)),
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
        """A copy of this rank's flat fp32 slice of the layer (its global offset is `layout(name)[0]`), as
        NVMeDenseStore.read gives it: changing it changes nothing in the store."""
        return self.shard(name).theta.clone()

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

    def recorded_checksums(self) -> dict[str, int]:
        """The checksum recorded for each layer's shard at its last legitimate write (what a checkpoint of it must
        hold): CRC-32 where the host sealed it, sum64 where a refresh on an accelerator did."""
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
