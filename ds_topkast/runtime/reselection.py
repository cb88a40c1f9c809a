"""A's re-selection between refreshes: the top k_A of each layer's fp32 master inside B, on the accelerator.

DESIGN.md ("A is re-selected right after the optimizer step"): after every
`forward_interval`-th optimizer step A becomes, in every layer, the top k_A of B's fp32
master values, ties by lower index, identically on every rank and with nothing read back
to the host. The master decides, not the low-precision copy: under bf16 many values tie
and rounding would pick members.

All layers are one radix select (select.radix_topk_bits_) over the masters where the
optimizer keeps them: ZeRO's flat fp32 partitions are read in place (each rank its own
fragments; the ranks all-reduce each pass's histograms, 2,048 int32 per layer, and then
the bitmaps of A, k_B / 8 bytes per layer), so no master is gathered or copied and a step
adds a fixed number of launches whatever the number of layers: about four per radix pass
(one histogram per flat partition, its all-reduce, one step) and three to write every
layer's A. Where the masters cannot be read in place (offloaded or swapped), they are
gathered whole first (`get_masters`, a copy each step).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ds_topkast.core.layers import TopKASTLinear
from ds_topkast.core.select import Collectives, padded_bitmap, position_bits, radix_topk_bits_, union_over_ranks
from ds_topkast.runtime.optimizer_state import MasterViews, OptimizerStateAdapter


@dataclass
class _Plan:
    """What every re-selection reuses until a layer or the optimizer's tensors change."""

    adapter: OptimizerStateAdapter
    views: MasterViews | None  # None: masters gathered each time
    sources: list[tuple[Tensor, list[int]]]  # with views: the flat fp32 tensors and their rows
    snapshot_rows: list[int]  # without views: the rows of the gathered masters
    ks: Tensor  # k_A per layer, on the masters' device
    k_forward: tuple[int, ...]
    targets: list[Tensor]  # each layer's forward_bits
    sizes: list[int]  # their bytes
    total_bits: int  # of the output bitmap (whole int32 words)


class ForwardReselection:
    """Re-selects A inside B in every layer at once; `run` is a collective when the masters are partitioned."""

    def __init__(self, layers: dict[str, TopKASTLinear], comm: Collectives):
        self.layers = list(layers.values())
        self.comm = comm
        self._plan: _Plan | None = None

    def run(self, adapter: OptimizerStateAdapter) -> None:
        plan = self._current_plan(adapter)
        out = padded_bitmap(plan.total_bits, plan.ks.device)
        if plan.views is not None:
            plan.views.prepare()
            sources = plan.sources
        else:
            sources = [(adapter.get_masters([layer.values for layer in self.layers]), plan.snapshot_rows)]
        partitioned = plan.views is not None and plan.views.partitioned
        key_positions = position_bits(max(layer.k_backward for layer in self.layers))
        radix_topk_bits_(out, sources, plan.ks, key_positions, self.comm if partitioned else None)
        if partitioned:
            out = union_over_ranks(out, plan.total_bits, self.comm)
        parts = out[:sum(plan.sizes)].to(plan.targets[0].device).split(plan.sizes)  # less the int32 padding
        torch._foreach_copy_(plan.targets, list(parts))

    def _current_plan(self, adapter: OptimizerStateAdapter) -> _Plan:
        plan = self._plan
        if (plan is None or plan.adapter is not adapter or (plan.views is not None and not plan.views.valid())
                or any(layer.forward_bits is not target for layer, target in zip(self.layers, plan.targets))
                or tuple(layer.k_forward for layer in self.layers) != plan.k_forward):
            plan = self._plan = self._make_plan(adapter)
        return plan

    def _make_plan(self, adapter: OptimizerStateAdapter) -> _Plan:
        layers = self.layers
        sizes = [layer.forward_bits.numel() for layer in layers]
        out_offsets = [8 * sum(sizes[:i]) for i in range(len(layers))]
        views = adapter.master_views([layer.values for layer in layers])
        sources: dict[int, tuple[Tensor, list[int]]] = {}
        snapshot_rows: list[int] = []
        if views is not None:
            for segment, (fragments, out_offset) in enumerate(zip(views.fragments, out_offsets)):
                for fragment in fragments:
                    _, rows = sources.setdefault(fragment.source.untyped_storage().data_ptr(), (fragment.source, []))
                    rows += [fragment.offset, fragment.length, segment, fragment.position, 0,
                             out_offset + fragment.position]
            device = next(iter(sources.values()))[0].device if sources else layers[0].backward_bits.device
        else:
            starts = [sum(layer.k_backward for layer in layers[:i]) for i in range(len(layers))]
            for segment, (layer, start, out_offset) in enumerate(zip(layers, starts, out_offsets)):
                snapshot_rows += [start, layer.k_backward, segment, 0, 0, out_offset]
            device = layers[0].backward_bits.device
        ks = torch.tensor([layer.k_forward for layer in layers], dtype=torch.int64).to(device)
        return _Plan(adapter, views, list(sources.values()), snapshot_rows, ks,
                     tuple(layer.k_forward for layer in layers), [layer.forward_bits for layer in layers], sizes,
                     8 * sum(sizes))
