"""The refresh: write back, re-select A and B against the sharded dense store, rebuild the compact state.

DESIGN.md, Section 3. At every update step of the algorithm (algorithms.py; for Top-KAST
every `refresh_interval` optimizer steps), on every rank:
1. guard: every rank holds the same sets; then, streaming the store layer by layer:
2. guard: this rank's shard is unchanged since the last refresh; refuse non-finite
   trained values before anything is written (every rank raises together, naming the
   layer and the ranks); write back the fp32 master of the layer's compact values into
   the owning shards;
3. select B as the algorithm says (Top-KAST: top k_B of |θ|, or random B\\A; RigL/SET:
   drop and grow) and A (top k_A of B) exactly over the shards, ties by global index,
   and assemble B's indices and values on every rank; a masked algorithm zeroes θ
   outside A, in the store as in the values;
4. rebuild: new values, fp32 master and low-precision copy; each per-entry optimizer
   state moves with the entries that stay in B, new entries start at zero (and, with
   per-entry bias correction, remember the step they joined);
5. guard again (every rank ends with the same sets) and record mask dynamics.
Each shard is streamed through the accelerator: copied there (from pinned memory where
the store pins), checked against its checksum, written back, selected and remapped,
checksummed again and copied back, all there, so the host only moves bytes. Between refreshes, `reselect_forward_sets` makes
A the top k_A of B's fp32 master values, on the accelerator, with no host sync.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ds_topkast.algorithms import LayerUpdate
from ds_topkast.bias_correction import PerEntryBiasCorrection
from ds_topkast.collectives import ProcessGroupCollectives
from ds_topkast.dense_gradients import DenseGradientShards
from ds_topkast.layers import TopKASTLinear, pack_bits, unpack_bits
from ds_topkast.optimizer_state import OptimizerStateAdapter
from ds_topkast.select import gather_sets, segment_topk_masks
from ds_topkast.sparsify import TopKASTState, selection_seed, zero_outside
from ds_topkast.store import LayerShard, checksum, matches


# Entries of B re-selected together (one sort of int64 keys: about 50 bytes of transient memory per entry).
SELECTION_GROUP = 1 << 23


class RefreshError(RuntimeError):
    """A refresh found state it must not act on (non-finite weights, changed shards, diverged ranks)."""


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
    """Runs refreshes of a sparsified model's layers against its (sharded) dense store."""

    def __init__(self, layers: dict[str, TopKASTLinear], state: TopKASTState, adapter: OptimizerStateAdapter,
                 comm: ProcessGroupCollectives):
        self.layers = layers
        self.state = state
        self.adapter = adapter
        self.comm = comm
        # Per layer, a bitmap over this rank's store range of the weights that have ever been in B (host).
        self.ever_in_backward = {name: pack_bits(torch.zeros(state.store.layout(name)[1], dtype=torch.bool))
                                 for name in layers}
        for name, layer in layers.items():
            self._mark(name, layer.indices)
        self.history: list[MaskDynamics] = []
        self.algorithm = state.algorithm
        self.gradients = (DenseGradientShards(layers, state.store, comm) if self.algorithm.needs_dense_gradient
                          else None)
        self.bias_correction = (PerEntryBiasCorrection(layers, adapter)
                                if state.config.new_entries == "per_entry_bias_correction" else None)
        self._selection_groups: list[tuple[list[str], Tensor, Tensor]] | None = None

    def ever_in_backward_mask(self, name: str) -> Tensor:
        """The ever-in-B bitmap of a layer unpacked: one bool per entry of this rank's store range."""
        return unpack_bits(self.ever_in_backward[name], self.state.store.layout(name)[1])

    def _mark(self, name: str, indices: Tensor) -> None:
        offset, length = self.state.store.layout(name)
        mask = self.ever_in_backward_mask(name)
        local = indices.cpu().long() - offset
        mask[local[(local >= 0) & (local < length)]] = True
        self.ever_in_backward[name] = pack_bits(mask)

    def reselect_forward_sets(self) -> None:
        """A := the top k_A of each layer's fp32 master values inside B, identically on every rank, no host sync.

        The master, not the low-precision copy, decides: under bf16 many values tie and
        rounding would pick members. Layers go in groups of at most `SELECTION_GROUP`
        entries (bounding the transient memory of the sort): per group, one gather of the
        masters (one all-reduce under ZeRO-1/2, a collective every rank joins) and one
        segmented selection, made by one rank: in rounds of W groups, rank r selects the
        r-th group of the round while the others select theirs, then each owner broadcasts
        its packed masks (k_B / 8 bytes). Every rank gets the same A; the selection work
        is split W ways.
        """
        if self._selection_groups is None:
            self._selection_groups = self._group_layers()
        rank, world = self.comm.rank, self.comm.world
        groups = self._selection_groups
        for first in range(0, len(groups), world):  # a round: one group per rank, selected at the same time
            round_ = groups[first:first + world]
            mine = None
            for owner, (names, sizes, ks) in enumerate(round_):
                layers = [self.layers[name] for name in names]
                masters = self.adapter.get_masters([layer.values for layer in layers])  # a collective: every rank
                if owner == rank:
                    mine = segment_topk_masks(masters.abs(), sizes, ks)
                del masters
            for owner, (names, _, _) in enumerate(round_):
                self._broadcast_forward_masks([self.layers[name] for name in names], mine if owner == rank else None,
                                              owner)

    def _broadcast_forward_masks(self, layers: list[TopKASTLinear], masks: Tensor | None, owner: int) -> None:
        """Rank `owner`'s masks of A (one flat mask over the layers' B, None elsewhere) into every rank's layers."""
        sizes = [layer.forward_bits.numel() for layer in layers]
        if masks is not None:
            bits = torch.cat([pack_bits(mask) for mask in masks.split([layer.k_backward for layer in layers])])
        else:
            bits = torch.empty(sum(sizes), dtype=torch.uint8, device=layers[0].forward_bits.device)
        bits = self.comm.broadcast(bits, owner)
        with torch.no_grad():
            for layer, part in zip(layers, bits.split(sizes)):
                layer.forward_bits.copy_(part)

    def _group_layers(self) -> list[tuple[list[str], Tensor, Tensor]]:
        """Consecutive layers in groups of at most SELECTION_GROUP entries of B (a larger layer alone)."""
        groups: list[list[str]] = []
        total = 0
        for name, layer in self.layers.items():
            if not groups or total + layer.k_backward > SELECTION_GROUP:
                groups.append([])
                total = 0
            groups[-1].append(name)
            total += layer.k_backward
        device = next(iter(self.layers.values())).backward_bits.device
        return [(names, torch.tensor([self.layers[n].k_backward for n in names], device=device),
                 torch.tensor([self.layers[n].k_forward for n in names], device=device)) for names in groups]

    def refresh(self, step: int) -> MaskDynamics:
        """One full refresh of every layer at optimizer step `step` (a collective: all ranks call it).

        The store is streamed layer by layer (a read-modify-write pass), so only the
        shard in hand, and whatever the store prefetches, is in host memory.
        """
        self.adapter.refuse_unknown_state()
        self.check_sets_agree(step)
        totals = torch.zeros(3, dtype=torch.float64)
        for index, shard in enumerate(self.state.store.stream(self.layers)):
            layer = self.layers[shard.name]
            on_device = shard.on(layer.backward_bits.device)
            self._agree_or_fail(shard.name, not matches(on_device.theta, shard.checksum), step,
                                "its dense-store shard changed since the last refresh (memory corruption or a stray "
                                "write); resume from the last checkpoint")
            master = self.adapter.get_master(layer.values)
            self._agree_or_fail(shard.name, not bool(torch.isfinite(master).all()), step,
                                "its trained values hold NaN or infinity (nothing was written to the store); lower "
                                "the learning rate or enable gradient clipping, and resume from the last checkpoint")
            on_device.write_back(layer.indices, master)
            totals += self._refresh_layer(index, layer, on_device, step)
            shard.checksum = checksum(on_device.theta)  # on the device: the host only copies
            shard.theta.copy_(on_device.theta)  # no copy when the accelerator is the CPU
        if self.gradients is not None:
            self.gradients.disarm()
        self.check_sets_agree(step)
        k_forward = sum(layer.k_forward for layer in self.layers.values())
        k_backward = sum(layer.k_backward for layer in self.layers.values())
        ever = self.comm.all_reduce_sum(torch.tensor([sum(int(self.ever_in_backward_mask(name).sum())
                                                          for name in self.layers)]))
        total = sum(self.state.store.numel(name) for name in self.layers)
        dynamics = MaskDynamics(step=step, forward_changed=float(totals[0]) / k_forward,
                                backward_changed=float(totals[1]) / k_backward,
                                forward_from_reservoir=int(totals[2]), backward_from_reservoir=int(totals[1]),
                                ever_in_backward=int(ever) / total)
        self.history.append(dynamics)
        return dynamics

    def _agree_or_fail(self, name: str, failed: bool, step: int, why: str) -> None:
        """Share one layer's verdict of every rank, so that all ranks raise the same error together."""
        verdicts = torch.zeros(self.comm.world, dtype=torch.long)
        verdicts[self.comm.rank] = int(failed)
        verdicts = self.comm.all_reduce_sum(verdicts)
        if verdicts.any():
            ranks = verdicts.nonzero().squeeze(1).tolist()
            raise RefreshError(f"Top-KAST refresh at step {step} stopped: layer {name!r} on rank(s) {ranks}: {why}.")

    def check_sets_agree(self, step: int) -> None:
        """Every rank must hold the same A and B of every layer; a mismatch is an error, never a divergence."""
        sums = torch.tensor([[checksum(layer.backward_bits.cpu()), checksum(layer.forward_bits.cpu())]
                             for layer in self.layers.values()], dtype=torch.long)
        low, high = self.comm.all_reduce_min_max(sums)
        diverged = [name for name, row in zip(self.layers, (low != high).any(dim=1).tolist()) if row]
        if diverged:
            raise RefreshError(f"Top-KAST masks differ across ranks at step {step} in layers {diverged}: the ranks "
                               "no longer train the same model. Resume every rank from the last checkpoint.")

    def collect_gradients_for(self, step: int) -> None:
        """Arm the layers' dense-gradient hand-over when the algorithm's update at `step` needs it, else disarm."""
        if self.gradients is not None:
            if self.algorithm.updates_at(step):
                self.gradients.arm()
            else:
                self.gradients.disarm()

    def _layer_update(self, index: int, layer: TopKASTLinear, shard: LayerShard, step: int) -> LayerUpdate:
        cfg = self.state.config
        layer.k_forward = self.algorithm.forward_count(self.state.forward_targets[shard.name], shard.numel, step)
        gradient = None
        if self.gradients is not None:
            gradient = self.gradients.take(shard.name)
            self._agree_or_fail(shard.name, gradient is None, step,
                                f"algorithm {self.algorithm.name!r} grows by the dense gradient, but no backward pass "
                                "ran since the previous optimizer step; call the runtime's after_optimizer_step "
                                "after every step (ds_topkast.initialize's engine and TopKASTCallback do)")
            gradient = gradient.to(shard.theta.device)
            self._agree_or_fail(shard.name, not bool(torch.isfinite(gradient).all()), step,
                                "its dense gradient (RigL's growth score) holds NaN or infinity; lower the learning "
                                "rate or enable gradient clipping, and resume from the last checkpoint")
        return LayerUpdate(theta=shard.theta, offset=shard.offset, numel=shard.numel, old_indices=layer.indices,
                           k_forward=layer.k_forward, k_backward=layer.k_backward,
                           seed=selection_seed(cfg, step // cfg.refresh_interval, index), comm=self.comm,
                           gradient=gradient)

    def _refresh_layer(self, index: int, layer: TopKASTLinear, shard: LayerShard, step: int) -> Tensor:
        adapter = self.adapter
        old_indices = layer.indices
        old_forward_mask = layer.forward_mask
        update = self._layer_update(index, layer, shard, step)
        local = self.algorithm.backward_indices(update, step)
        new_indices, new_master, new_forward_mask = gather_sets(local, shard.theta, layer.k_forward, shard.offset,
                                                                shard.numel, self.comm)
        if self.algorithm.masked:  # zero outside A, in the values and the store: pruned entries stay zero
            new_master = torch.where(new_forward_mask, new_master, torch.zeros_like(new_master))
            zero_outside(shard.theta, new_indices[new_forward_mask], shard.offset)
        kept, pos = _positions_in(old_indices, new_indices)
        keeps_state = kept & new_forward_mask if self.algorithm.masked else kept  # a pruned entry restarts at zero
        adapter.set_master(layer.values, new_master)
        for key in adapter.state_keys:
            old_state = adapter.get_state(layer.values, key)
            adapter.set_state(layer.values, key, torch.where(keeps_state, old_state[pos], torch.zeros_like(old_state)))
        adapter.set_low_precision(layer.values, new_master.to(layer.values.dtype))
        if self.bias_correction is not None:
            self.bias_correction.remap(shard.name, keeps_state, pos, step)
        layer.assign_sets(new_indices, new_forward_mask)
        self._mark(shard.name, new_indices)
        # An entry of the new A was in the old A if it was kept in B at a position the old
        # mask marked. Entries new to B are exactly those that came from the reservoir C.
        was_forward = kept & old_forward_mask[pos]
        return torch.stack([
            (new_forward_mask & ~was_forward).sum(),
            (~kept).sum(),
            (new_forward_mask & ~kept).sum(),
        ]).to("cpu", torch.float64)
