"""The refresh: write back, re-select A and B against the sharded dense store, rebuild the compact state.

DESIGN.md, Section 3. At every update step of the algorithm (algorithms/; for Top-KAST
every `refresh_interval` optimizer steps), on every rank:
1. guard: every rank holds the same sets; then, streaming the store layer by layer:
2. guard: this rank's shard is unchanged since the last refresh, the layer's trained
   values (and, for RigL, its dense gradient) are finite: one verdict of every rank, read
   once, before anything is written (every rank raises together, naming the layer and
   the ranks); write back the fp32 master of the layer's compact values into the shard;
3. select B as the algorithm says (Top-KAST: top k_B of |θ|, or random B\\A; RigL/SET:
   drop and grow) exactly over the shards, ties by global index, join the ranks' bitmaps
   and gather θ on B on every rank, and make A the top k_A of B; a masked algorithm zeroes
   θ outside A, in the store as in the values;
4. rebuild: new values, fp32 master and low-precision copy; each per-entry optimizer
   state moves with the entries that stay in B, new entries start at zero (and, with
   per-entry bias correction, remember the step they joined);
5. guard again (every rank ends with the same sets) and record mask dynamics.
Everything stays on the accelerator and in bitmaps: the store shard is copied there (the
next layer's while this one is worked on, on a side stream, transfers.py), selected by the
sync-free radix select, checksummed there and copied back; the only host reads are the
verdict of each layer and a few per refresh (tests/test_op_counts.py counts them). Between
refreshes, `reselect_forward_sets` makes A the top k_A of B's fp32 master values
(reselection.py).
"""
from __future__ import annotations

from typing import Iterator, Mapping

import torch
from torch import Tensor

from ds_topkast.algorithms import LayerUpdate
from ds_topkast.core.bitmaps import pack_bits, popcount, range_bits, unpack_bits
from ds_topkast.core.kernels import ops
from ds_topkast.core.layers import TopKASTLinear
from ds_topkast.core.seeds import selection_seed
from ds_topkast.core.select import Collectives, assemble_sets
from ds_topkast.errors import RefreshError
from ds_topkast.runtime.bias_correction import PerEntryBiasCorrection
from ds_topkast.runtime.dense_gradients import DenseGradientShards
from ds_topkast.runtime.history import EverInBackward, MaskDynamics, MaskHistory
from ds_topkast.runtime.optimizer_state import OptimizerStateAdapter
from ds_topkast.runtime.reselection import ForwardReselection
from ds_topkast.runtime.state import TopKASTState
from ds_topkast.runtime.transfers import SideStreamCopies
from ds_topkast.store.shards import LayerShard, changed_since, checksum_where, in_range, sum64_tensor

# The guards of one layer, in the order their errors are reported.
_GUARDS = (
    "its dense-store shard changed since the last refresh (memory corruption or a stray write); resume from the "
    "last checkpoint",
    "its trained values hold NaN or infinity (nothing was written to the store); lower the learning rate or enable "
    "gradient clipping, and resume from the last checkpoint",
    "algorithm {algorithm!r} grows by the dense gradient, but no backward pass ran since the previous optimizer "
    "step; call the runtime's after_optimizer_step after every step (ds_topkast.initialize's engine and "
    "TopKASTCallback do)",
    "its dense gradient (RigL's growth score) holds NaN or infinity; lower the learning rate or enable gradient "
    "clipping, and resume from the last checkpoint",
)


class Refresher:
    """Runs refreshes of a sparsified model's layers against its (sharded) dense store."""

    def __init__(self, layers: dict[str, TopKASTLinear], state: TopKASTState, adapter: OptimizerStateAdapter,
                 comm: Collectives):
        self.layers = layers
        self.state = state
        self.adapter = adapter
        self.comm = comm
        self.device = next(iter(layers.values())).backward_bits.device
        self.ever_in_backward = EverInBackward(layers, state.store, self.device)
        self.history = MaskHistory()
        self.algorithm = state.algorithm
        self.gradients = (DenseGradientShards(layers, state.store, comm) if self.algorithm.needs_dense_gradient
                          else None)
        self.bias_correction = (PerEntryBiasCorrection(layers, adapter)
                                if state.config.new_entries == "per_entry_bias_correction" else None)
        self.reselection = ForwardReselection(layers, comm)
        self.copies = SideStreamCopies(self.device)
        self.host_reads = 0  # values read back from the accelerator by refreshes (each a host sync on a GPU)

    def use_optimizer(self, adapter: OptimizerStateAdapter) -> None:
        """Rewrite another optimizer's state from now on (a later `trainer.train()` builds a new one)."""
        self.adapter = adapter
        if self.bias_correction is not None:
            self.bias_correction = self.bias_correction.for_optimizer(adapter)

    def correct_bias(self, step: int) -> None:
        """After optimizer step `step`, with per-entry bias correction: each entry's update by its own age."""
        if self.bias_correction is not None:
            self.bias_correction.after_optimizer_step(step)

    def state_dict(self, values: bool = False) -> dict:
        """This rank's part of the sets (B as a bitmap over its store range, A as a bitmap over those entries of B),
        the mask history and, with per-entry bias correction, each entry's join step; with `values`, B's values of
        every layer (whole, as this rank holds them)."""
        store = self.state.store
        state = {"sets": {name: own_sets(layer, *store.layout(name)) for name, layer in self.layers.items()},
                 "ever_in_backward": self.ever_in_backward.state_dict(), "history": self.history.state_dict()}
        if values:
            state["values"] = {name: layer.values.detach().cpu().clone() for name, layer in self.layers.items()}
        if self.bias_correction is not None:
            state.update(self.bias_correction.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        """Take every layer's sets (`state["sets"]`: B's flat indices and A's mask over them, joined over the saved
        ranks; given as (name, sets) pairs in layer order they are built one layer at a time, so a restore never
        holds every layer's int64 indices at once), this rank's ever-in-B bitmaps, the history and, when present,
        the values and join steps."""
        sets = state["sets"]
        for name, (indices, forward_mask) in (sets.items() if isinstance(sets, Mapping) else sets):
            layer = self.layers[name]
            layer.assign_indices(indices, forward_mask)  # gmp's k_A follows its schedule; the saved A says where
            if "values" in state:
                layer.values.data.copy_(state["values"][name])
        self.ever_in_backward.load_state_dict(state["ever_in_backward"])
        self.history.load_state_dict(state["history"])
        if self.bias_correction is not None:
            self.bias_correction.load_state_dict(state)

    def reselect_forward_sets(self) -> None:
        """A := the top k_A of each layer's fp32 master values inside B, identically on every rank, no host sync."""
        self.reselection.run(self.adapter)

    def _read(self, tensor: Tensor) -> list:
        """Values of a small device tensor on the host: the refresh's only host reads (counted)."""
        self.host_reads += 1
        return tensor.tolist()

    def refresh(self, step: int) -> MaskDynamics:
        """One full refresh of every layer at optimizer step `step` (a collective: all ranks call it).

        The store is streamed layer by layer (a read-modify-write pass), so only the
        shards in hand, and whatever the store prefetches, are in host memory.
        """
        self.adapter.refuse_unknown_state()
        self.check_sets_agree(step)
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)
        try:
            for index, (shard, theta, ever) in enumerate(self._streamed()):
                totals += self._refresh_layer(index, self.layers[shard.name], shard, theta, ever, step)
        finally:
            self.copies.wait()  # every shard is back in host memory before anything reads it
        if self.gradients is not None:
            self.gradients.disarm()
        self.check_sets_agree(step)
        forward_changed, backward_changed, forward_from_reservoir, ever = self._read(
            torch.cat([totals[:3], self.comm.all_reduce_sum(totals[3:])]))
        k_forward = sum(layer.k_forward for layer in self.layers.values())
        k_backward = sum(layer.k_backward for layer in self.layers.values())
        total = sum(self.state.store.numel(name) for name in self.layers)
        dynamics = MaskDynamics(step=step, forward_changed=forward_changed / k_forward,
                                backward_changed=backward_changed / k_backward,
                                forward_from_reservoir=int(forward_from_reservoir),
                                backward_from_reservoir=int(backward_changed), ever_in_backward=int(ever) / total)
        self.history.append(dynamics)
        return dynamics

    def _streamed(self) -> Iterator[tuple[LayerShard, Tensor, Tensor]]:
        """Each store shard with its θ and ever-in-B bitmap on the accelerator, ready to use.

        A store whose shards are independent host tensors (in memory) is read one layer
        ahead, so the next copy to the device overlaps this layer's work; one that hands
        out reused buffers (NVMe) gets each buffer back only once its copy home is done.
        """
        store = self.state.store
        ahead = store.shards_independent

        def start(shard: LayerShard):
            return (shard, self.copies.to_device(shard.theta),
                    self.copies.to_device(self.ever_in_backward.bitmaps[shard.name]))

        shards = store.stream(self.layers)
        try:
            pending = next(shards, None)
            pending = start(pending) if pending is not None else None
            while pending is not None:
                following = next(shards, None) if ahead else None
                upcoming = start(following) if following is not None else None
                shard, theta, ever = pending
                yield shard, self.copies.ready(*theta), self.copies.ready(*ever)
                if not ahead:
                    self.copies.wait()  # the store writes or reuses this shard's buffer as soon as it moves on
                    following = next(shards, None)
                    upcoming = start(following) if following is not None else None
                pending = upcoming
        finally:
            shards.close()

    def _verdict(self, name: str, failed: Tensor, step: int) -> None:
        """Every rank's guard flags of one layer, summed over ranks and read once; all ranks raise together."""
        flags = torch.zeros(self.comm.world, len(_GUARDS), dtype=torch.int64, device=self.device)
        flags[self.comm.rank] = failed.to(torch.int64)
        flags = self.comm.all_reduce_sum(flags)
        if not any(self._read(flags.sum(0))):
            return
        per_guard = flags.t().cpu()
        guard = next(i for i, row in enumerate(per_guard) if row.any())
        ranks = per_guard[guard].nonzero().squeeze(1).tolist()
        why = _GUARDS[guard].format(algorithm=self.algorithm.name)
        raise RefreshError(f"Top-KAST refresh at step {step} stopped: layer {name!r} on rank(s) {ranks}: {why}.")

    def check_sets_agree(self, step: int) -> None:
        """Every rank must hold the same A and B of every layer; a mismatch is an error, never a divergence."""
        sums = torch.stack([torch.stack([sum64_tensor(layer.backward_bits), sum64_tensor(layer.forward_bits)])
                            for layer in self.layers.values()])
        low, high = self.comm.all_reduce_min_max(sums)
        differs = (low != high).any(dim=1)
        if not any(self._read(differs.any().reshape(1))):
            return
        diverged = [name for name, row in zip(self.layers, differs.tolist()) if row]
        raise RefreshError(f"Top-KAST masks differ across ranks at step {step} in layers {diverged}: the ranks "
                           "no longer train the same model. Resume every rank from the last checkpoint.")

    def collect_gradients_for(self, step: int) -> None:
        """Arm the layers' dense-gradient hand-over when the algorithm's update at `step` needs it, else disarm."""
        if self.gradients is not None:
            if self.algorithm.updates_at(step):
                self.gradients.arm()
            else:
                self.gradients.disarm()

    def _guards(self, layer: TopKASTLinear, shard: LayerShard, theta: Tensor, master: Tensor
                ) -> tuple[Tensor, Tensor | None]:
        """This rank's guard flags of a layer (as `_GUARDS`, on the device) and its dense gradient shard if needed."""
        device = self.device
        gradient = None
        missing = False
        if self.gradients is not None:
            gradient = self.gradients.take(shard.name)
            missing = gradient is None
            gradient = torch.zeros_like(theta) if missing else gradient.to(device)
        failed = torch.stack([changed_since(shard.theta, theta, shard.checksum),
                              ~torch.isfinite(master).all(),
                              torch.full((), missing, device=device),
                              torch.zeros((), dtype=torch.bool, device=device) if gradient is None
                              else ~torch.isfinite(gradient).all()])
        return failed, gradient

    def _refresh_layer(self, index: int, layer: TopKASTLinear, shard: LayerShard, theta: Tensor, ever: Tensor,
                       step: int) -> Tensor:
        """One layer's refresh; returns (A's new entries, B's new entries, A's entries from outside B, ever in B)."""
        adapter, cfg, algorithm = self.adapter, self.state.config, self.algorithm
        master = adapter.get_master(layer.values)  # a collective under ZeRO
        failed, gradient = self._guards(layer, shard, theta, master)
        self._verdict(shard.name, failed, step)
        old_bits, old_counts, old_forward_bits = layer.backward_bits, layer.block_counts, layer.forward_bits
        ops.scatter_bits_(theta, master, old_bits, old_counts, shard.offset)  # write back
        k_forward = algorithm.forward_count(self.state.forward_targets[shard.name], shard.numel, step)
        update = LayerUpdate(theta=theta, offset=shard.offset, numel=shard.numel, old_bits=old_bits,
                             k_forward=k_forward, k_backward=layer.k_backward,
                             seed=selection_seed(cfg.seed, step // cfg.refresh_interval, index), comm=self.comm,
                             gradient=gradient)
        local = algorithm.backward_bits(update, step)
        sets = assemble_sets(local, theta, shard.offset, shard.numel, k_forward, layer.k_backward, self.comm)
        new_forward = unpack_bits(sets.forward_bits, layer.k_backward)
        new_master = sets.values
        if algorithm.masked:  # zero outside A, in the values and the store: pruned entries stay zero
            new_master = torch.where(new_forward, new_master, torch.zeros_like(new_master))
            theta = ops.expand_bits(new_master, sets.backward_bits, sets.counts, None, shard.offset,
                                    theta.numel(), torch.float32)
        source = ops.remap_positions(old_bits, old_counts, sets.backward_bits, sets.counts, shard.numel,
                                     layer.k_backward)
        kept = source >= 0
        position = source.clamp(min=0)
        keeps_state = kept & new_forward if algorithm.masked else kept  # a pruned entry restarts at zero
        # An entry of the new A was in the old A if it was kept in B at a position the old
        # mask marked. Entries new to B are exactly those that came from the reservoir C.
        was_forward = kept & unpack_bits(old_forward_bits, layer.k_backward)[position]
        dynamics = torch.stack([(new_forward & ~was_forward).sum(), (~kept).sum(), (new_forward & ~kept).sum()])
        adapter.set_master(layer.values, new_master)
        for key in adapter.state_keys:
            old_state = adapter.get_state(layer.values, key)
            adapter.set_state(layer.values, key, torch.where(keeps_state, old_state[position],
                                                             torch.zeros_like(old_state)))
        adapter.set_low_precision(layer.values, new_master.to(layer.values.dtype))
        if self.bias_correction is not None:
            self.bias_correction.remap(shard.name, keeps_state, position, step)
        layer.assign_sets(sets.backward_bits, sets.forward_bits, sets.counts, k_forward=k_forward)
        ever = ever | range_bits(local, shard.offset, theta.numel())
        shard.checksum = checksum_where(theta)  # on the device: the host only copies
        self.copies.to_host(theta, shard.theta)
        self.copies.to_host(ever, self.ever_in_backward.bitmaps[shard.name])
        return torch.cat([dynamics.to(torch.float64), popcount(ever).reshape(1).to(torch.float64)])


def own_sets(layer: TopKASTLinear, offset: int, length: int) -> dict[str, Tensor]:
    """This rank's part of a layer's sets, as host bitmaps: B over its store range, A over those entries of B."""
    indices, forward_mask = layer.indices, layer.forward_mask
    mine = in_range(indices, offset, length)
    in_shard = torch.zeros(length, dtype=torch.bool, device=indices.device)
    in_shard[indices[mine] - offset] = True
    return {"backward_bits": pack_bits(in_shard).cpu(), "forward_bits": pack_bits(forward_mask[mine]).cpu()}
