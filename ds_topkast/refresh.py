"""The refresh: write back, re-select A and B against the dense store, rebuild the compact state.

DESIGN.md, Section 3. Every `refresh_interval` optimizer steps, for each layer:
1. write the fp32 master of the compact values into the store at B's indices;
2. select B (top k_B of |θ|, or random B\\A) and A (top k_A) exactly, ties by index;
3. rebuild: new values, fp32 master and low-precision copy from the store; each
   per-entry optimizer state moves with the entries that stay in B, new entries start
   at zero (paper: entries entering B have no history);
4. record mask dynamics (paper, Figure 3).
Between refreshes, `mark_forward_sets_stale` makes each layer re-select A inside B at
its next forward pass.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ds_topkast.layers import TopKASTLinear
from ds_topkast.optimizer_state import OptimizerStateAdapter
from ds_topkast.select import select_sets
from ds_topkast.sparsify import TopKASTState, selection_generator


class RefreshError(RuntimeError):
    """A refresh found state it must not act on (non-finite weights, diverged ranks)."""


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


def _positions_in(old_sorted: Tensor, new: Tensor) -> tuple[Tensor, Tensor]:
    """For each entry of `new`: whether it is in `old_sorted`, and its position there."""
    pos = torch.searchsorted(old_sorted, new).clamp(max=old_sorted.numel() - 1)
    return old_sorted[pos] == new, pos


class Refresher:
    """Runs refreshes of a sparsified model's layers against its dense store."""

    def __init__(self, layers: dict[str, TopKASTLinear], state: TopKASTState, adapter: OptimizerStateAdapter):
        self.layers = layers
        self.state = state
        self.adapter = adapter
        self.ever_in_backward = {name: self._mask_of(name, layer.indices) for name, layer in layers.items()}
        self.history: list[MaskDynamics] = []

    def _mask_of(self, name: str, indices: Tensor) -> Tensor:
        mask = torch.zeros(self.state.store.numel(name), dtype=torch.bool)
        mask[indices.cpu().long()] = True
        return mask

    def mark_forward_sets_stale(self) -> None:
        for layer in self.layers.values():
            layer.forward_set_stale = True

    def refresh(self, step: int) -> MaskDynamics:
        """One full refresh of every layer at optimizer step `step`."""
        totals = torch.zeros(3, dtype=torch.float64)
        k_forward = k_backward = 0
        for index, (name, layer) in enumerate(self.layers.items()):
            totals += self._refresh_layer(index, name, layer, step)
            k_forward += layer.k_forward
            k_backward += layer.k_backward
        ever = sum(int(m.sum()) for m in self.ever_in_backward.values())
        total = sum(m.numel() for m in self.ever_in_backward.values())
        dynamics = MaskDynamics(step=step, forward_changed=float(totals[0]) / k_forward,
                                backward_changed=float(totals[1]) / k_backward,
                                forward_from_reservoir=int(totals[2]), backward_from_reservoir=int(totals[1]),
                                ever_in_backward=ever / total)
        self.history.append(dynamics)
        return dynamics

    def _refresh_layer(self, index: int, name: str, layer: TopKASTLinear, step: int) -> Tensor:
        store, adapter, cfg = self.state.store, self.adapter, self.state.config
        old_indices = layer.indices.long()
        old_forward = old_indices[layer.forward_mask]
        store.write(name, old_indices, adapter.get_master(layer.values))
        theta = store.read(name)
        if not bool(torch.isfinite(theta).all()):
            raise RefreshError(f"Layer {name!r} holds non-finite weights at step {step}; refusing to select masks "
                               "from them. Lower the learning rate or enable gradient clipping, and resume from "
                               "the last checkpoint.")
        refresh_index = step // cfg.refresh_interval
        new_indices, new_forward_mask = select_sets(theta, layer.k_forward, layer.k_backward, cfg.selection,
                                                    selection_generator(cfg, refresh_index, index))
        device = layer.indices.device
        new_indices, new_forward_mask = new_indices.to(device), new_forward_mask.to(device)
        kept, pos = _positions_in(old_indices, new_indices)
        new_master = theta[new_indices.cpu()].to(device)
        adapter.set_master(layer.values, new_master)
        for key in adapter.state_keys:
            old_state = adapter.get_state(layer.values, key)
            new_state = torch.where(kept, old_state[pos], torch.zeros_like(old_state))
            adapter.set_state(layer.values, key, new_state)
        adapter.set_low_precision(layer.values, new_master.to(layer.values.dtype))
        new_forward = new_indices[new_forward_mask]
        layer.assign_sets(new_indices, new_forward_mask)
        self.ever_in_backward[name][new_indices.cpu()] = True
        # Entries new to B are exactly those that came from the reservoir C.
        return torch.tensor([
            (~torch.isin(new_forward, old_forward)).sum(),
            (~kept).sum(),
            (~torch.isin(new_forward, old_indices)).sum(),
        ], dtype=torch.float64)
