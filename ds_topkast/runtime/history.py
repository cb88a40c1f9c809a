"""How the masks moved: one record per refresh, and which weights have ever been in B.

"Ever in B" rather than "ever in A": A changes every step inside B, and tracking it would
cost a host scatter per step; B ⊇ A, so it bounds the ever-active fraction from above.
Each rank keeps it as a host bitmap over its store range (one bool per weight was half a
byte per weight of the model per rank at W = 2), copied to the accelerator with the shard
at a refresh, OR-ed with the new B's bits there and copied back.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ds_topkast.core.bitmaps import range_bits
from ds_topkast.core.layers import TopKASTLinear


@dataclass
class MaskDynamics:
    """How the masks moved at one refresh, summed over layers (fractions of all of A or B)."""

    step: int
    forward_changed: float
    backward_changed: float
    forward_from_reservoir: int
    backward_from_reservoir: int
    ever_in_backward: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class MaskHistory(list):
    """The refreshes' records, oldest first (a list of MaskDynamics)."""

    def state_dict(self) -> list[dict[str, float]]:
        return [record.as_dict() for record in self]

    def load_state_dict(self, records: list[dict[str, float]]) -> None:
        self[:] = [MaskDynamics(**record) for record in records]


class EverInBackward:
    """Per layer, a bitmap over this rank's store range of the weights that have ever been in B (host memory, pinned
    where an accelerator copies it)."""

    def __init__(self, layers: dict[str, TopKASTLinear], store, device: torch.device):
        self.pinned = device.type == "cuda"
        self.bitmaps = {name: self._host(range_bits(layer.backward_bits, *store.layout(name)))
                        for name, layer in layers.items()}

    def _host(self, bits: Tensor) -> Tensor:
        host = bits.cpu()
        return host.pin_memory() if self.pinned else host

    def state_dict(self) -> dict[str, Tensor]:
        """A copy of every layer's bitmap."""
        return {name: bits.clone() for name, bits in self.bitmaps.items()}

    def load_state_dict(self, bitmaps: dict[str, Tensor]) -> None:
        """Take every layer's bitmap over this rank's range (as `state_dict` gives them, or resharded)."""
        self.bitmaps = {name: self._host(bitmaps[name]) for name in self.bitmaps}
