"""The dense gradient of each sparse layer at an update step, sharded like the dense store (RigL's growth score).

RigL grows the inactive weights whose loss gradient is largest. That gradient, dL/dα of
the whole (out, in) matrix, already exists in each sparse layer's backward (the values'
gradient is gathered from it), so nothing is recomputed and no dense gradient of the
model is ever held: when armed for an update step, each layer hands its dL/dα to
`DenseGradientShards`, which sums it over the data-parallel ranks (one all-reduce of
that layer, on the accelerator, only at update steps) and adds this rank's store range
to a host buffer; micro-batches of the step accumulate there. The refresh reads each
layer's shard next to its store shard and then drops the buffers.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from ds_topkast.core.layers import TopKASTLinear
from ds_topkast.core.select import Collectives


class DenseGradientShards:
    """This rank's store range of each layer's dense gradient, summed over one optimizer step's micro-batches."""

    def __init__(self, layers: dict[str, TopKASTLinear], store, comm: Collectives):
        self.layers, self.store, self.comm = layers, store, comm
        self.shards: dict[str, Tensor] = {}

    @property
    def armed(self) -> bool:
        return bool(self.shards)

    def arm(self) -> None:
        """Collect the gradients of the coming optimizer step (zeroed buffers; a no-op when already armed)."""
        if self.armed:
            return
        for name, layer in self.layers.items():
            shard = torch.zeros(self.store.layout(name)[1], dtype=torch.float32)
            # pinned where an accelerator reads it back at the refresh: the copy then waits for nothing
            self.shards[name] = shard.pin_memory() if layer.backward_bits.device.type == "cuda" else shard
            layer.dense_gradient_sink = partial(self._add, name)

    def disarm(self) -> None:
        """Stop collecting and free the buffers."""
        for layer in self.layers.values():
            layer.dense_gradient_sink = None
        self.shards.clear()

    def take(self, name: str) -> Tensor | None:
        """The layer's summed gradient over this rank's store range (host fp32), or None when none was collected."""
        return self.shards.pop(name, None)

    @torch.no_grad()
    def _add(self, name: str, grad_weight: Tensor) -> None:
        offset, length = self.store.layout(name)
        # A copy when it is all-reduced: the layer's backward still gathers its own rank's gradient from grad_weight.
        flat = grad_weight.reshape(-1).to(torch.float32, copy=self.comm.world > 1)
        if self.comm.world > 1:
            flat = self.comm.all_reduce_sum(flat)
        self.shards[name] += flat[offset:offset + length].cpu()
