"""What the runtime, the checkpoints and export ask of a dense store, whichever medium holds it.

A store holds, per sparsified layer (by module name), this rank's contiguous fp32 range
of the layer's full weights θ (shards.py's rule). Between refreshes nothing writes it;
a refresh streams every shard through the accelerator once (`stream`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Mapping

from torch import Tensor

from ds_topkast.store.shards import LayerShard


class DenseStore:
    """The interface CPUDenseStore (host memory) and NVMeDenseStore (files) share, and their checkpoint state."""

    rank: int
    world: int
    shards_independent: bool  # `stream` hands out independent tensors (a caller may hold several at once)
    streamed_bytes: int  # read + written by refresh passes: the store's only traffic with the engine

    def names(self) -> list[str]:
        raise NotImplementedError

    def numel(self, name: str) -> int:
        """Entries of the whole layer (all shards)."""
        raise NotImplementedError

    def layout(self, name: str) -> tuple[int, int]:
        """(global offset, entries held by this rank) of a layer."""
        raise NotImplementedError

    def add_shard(self, name: str, shard: Tensor, numel: int) -> None:
        """Take this rank's range of a new layer of `numel` entries."""
        raise NotImplementedError

    def read(self, name: str) -> Tensor:
        """A copy of this rank's flat fp32 range of a layer."""
        raise NotImplementedError

    def stream(self, names: Iterable[str]) -> Iterator[LayerShard]:
        """The shards one after another for a read-modify-write pass (the caller records each new checksum)."""
        raise NotImplementedError

    def load_shard(self, name: str, theta: Tensor) -> None:
        """Replace this rank's range of a layer; its size must match."""
        raise NotImplementedError

    def checkpoint_entries(self, folder: Path) -> dict[str, Tensor | str]:
        """What a checkpoint keeps of each layer: its range as a tensor, or the name of a file put in `folder`."""
        raise NotImplementedError

    def recorded_checksums(self) -> dict[str, int]:
        """The checksum recorded for each layer's range at its last legitimate write."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Host bytes this store holds."""
        raise NotImplementedError

    def state_dict(self, folder: Path) -> dict:
        """This rank's store for a checkpoint in `folder`: its place among the ranks, each layer's size and range,
        its entries (`checkpoint_entries`) and their recorded checksums."""
        names = self.names()
        return {"rank": self.rank, "world": self.world, "shards": self.checkpoint_entries(folder),
                "numel": {name: self.numel(name) for name in names},
                "offsets": {name: self.layout(name)[0] for name in names},
                "lengths": {name: self.layout(name)[1] for name in names},
                "checksums": self.recorded_checksums()}

    def load_state_dict(self, shards: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> None:
        """Take this rank's range of every layer from a checkpoint (one at a time when given as pairs, so a resharded
        restore never holds more than one layer's assembled range)."""
        for name, theta in (shards.items() if isinstance(shards, Mapping) else shards):
            self.load_shard(name, theta)
