"""The dense store: the full fp32 weights θ of every sparsified layer, off the accelerator.

Top-KAST selects A and B from the magnitudes of *all* of a layer's weights, including
the reservoir C that is frozen between refreshes, so the dense θ must be kept
somewhere; here it is host memory, one flat fp32 tensor per layer (pinned when an
accelerator is present so host-to-device copies can overlap). Between refreshes the
store's copy of B is stale: the engine's fp32 master is the truth, written back at each
refresh. The store knows nothing of DeepSpeed or of the layers that use it.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor


class DenseStoreError(RuntimeError):
    """The store was asked for a layer it does not hold, or given mismatched state."""


class CPUDenseStore:
    """fp32 θ per layer, flat, in host memory. Layers are keyed by module name."""

    def __init__(self, pin_memory: bool = True):
        self._pin = pin_memory and torch.accelerator.is_available()
        self._layers: dict[str, Tensor] = {}

    def add(self, name: str, theta: Tensor) -> None:
        """Take a copy of a layer's full weight (any shape and dtype) as flat fp32."""
        flat = theta.detach().to("cpu", torch.float32).reshape(-1).clone()
        self._layers[name] = flat.pin_memory() if self._pin else flat

    def read(self, name: str) -> Tensor:
        """The layer's flat fp32 θ (a view: callers must not keep it across writes)."""
        try:
            return self._layers[name]
        except KeyError:
            raise DenseStoreError(f"The dense store holds no layer named {name!r}; it holds {self.names()}.") from None

    def write(self, name: str, indices: Tensor, values: Tensor) -> None:
        """θ[indices] = values: the write-back of a layer's compact fp32 master."""
        theta = self.read(name)
        theta[indices.to("cpu", torch.long)] = values.detach().to("cpu", torch.float32)

    def numel(self, name: str) -> int:
        return self.read(name).numel()

    def names(self) -> list[str]:
        return list(self._layers)

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        return iter(self._layers.items())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._layers.values())

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self._layers)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Replace every layer's θ from a checkpoint; layer names and sizes must match."""
        if set(state) != set(self._layers):
            raise DenseStoreError(
                f"Checkpoint store layers {sorted(state)} do not match this model's sparsified layers "
                f"{sorted(self._layers)}; load a checkpoint written by the same model and topkast include/exclude.")
        for name, theta in state.items():
            if theta.numel() != self._layers[name].numel():
                raise DenseStoreError(f"Checkpoint store layer {name!r} has {theta.numel()} entries, "
                                      f"the model's has {self._layers[name].numel()}; the model changed.")
            self._layers[name].copy_(theta.reshape(-1))
