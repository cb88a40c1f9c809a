"""What a sparsified model carries (`model.topkast_state`): its config, its dense store, its algorithm, and which
compact parameter replaced which dense weight.

`sparsify` builds it; the runtime places its store for the rank that trains it and
drives it; export and the plain saves read it.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ds_topkast.algorithms import Algorithm
from ds_topkast.config import TopKASTConfig
from ds_topkast.errors import TopKASTConfigError
from ds_topkast.store.nvme import NVMeDenseStore
from ds_topkast.store.protocol import DenseStore
from ds_topkast.store.shards import refuse_another_rank


@dataclass
class TopKASTState:
    """A sparsified model's config, dense store and algorithm, and the weights its layers replaced."""

    config: TopKASTConfig
    store: DenseStore  # this rank's: CPUDenseStore or NVMeDenseStore
    layer_names: list[str]
    algorithm: Algorithm
    forward_targets: dict[str, int] = field(default_factory=dict)  # each layer's configured (final) k_A
    driven: bool = False  # a TopKASTRuntime (the engine's, the Trainer callback's, accelerate's) refreshes the masks
    _replaced: dict[int, tuple[weakref.ref, nn.Parameter]] = field(default_factory=dict, repr=False)

    def remember_replacement(self, dense: nn.Parameter, compact: nn.Parameter) -> None:
        """Record that `compact` (a layer's values) took the place of the dense weight `dense`."""
        self._replaced[id(dense)] = (weakref.ref(dense), compact)

    def replacement(self, param: Any) -> Any:
        """The compact parameter that took the place of a dense weight, else `param` itself."""
        entry = self._replaced.get(id(param))
        if entry is not None and entry[0]() is param:
            return entry[1]
        return param

    def place_store(self, rank: int, world: int) -> None:
        """Make the store this rank's, as configured, once the job's ranks are known: keep (and pin, if asked) this
        rank's shard of a store built in host memory, or write it to its files on NVMe."""
        store, cfg = self.store, self.config.dense_store
        if isinstance(store, NVMeDenseStore):
            refuse_another_rank("The NVMe store", store.rank, store.world, rank, world)
        elif cfg.device == "cpu":
            store.keep_shard(rank, world, cfg.pin_memory)
        else:
            self.store = NVMeDenseStore.from_store(NVMeDenseStore.configured(cfg, rank, world), store)

    def start_driving(self) -> None:
        """A runtime now refreshes this model's masks (silences the warning of training without one)."""
        self.driven = True


def topkast_state(model: nn.Module) -> TopKASTState:
    """The Top-KAST state of a sparsified model, with a clear error when there is none."""
    state = getattr(model, "topkast_state", None)
    if not isinstance(state, TopKASTState):
        raise TopKASTConfigError("This model was not converted by ds_topkast.sparsify(model, config).")
    return state
