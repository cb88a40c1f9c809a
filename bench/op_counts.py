"""Counting what a training step asks of the accelerator's host side: ATen ops, kernel launches and host syncs.

At the sizes users train, a GPU step is often bound by the host: each op the Python side
dispatches costs microseconds of CPU time whatever its size, and each op that copies a
result back to the host (`.item()`, `nonzero`, boolean indexing, ...) stalls the queue.
Both are properties of the code, not of the device, so they can be counted on the CPU
accelerator and compared side by side with dense DeepSpeed (docs/DESIGN.md, Section 6:
"Launches count as much as bytes").

`OpCounter` is a TorchDispatchMode that sees every op after autograd and the composite
decompositions, as the CUDA backend would receive it:
- `ops`: every dispatched op;
- `kernels`: those that launch a kernel on CUDA (not views, which only make a new
  tensor header, and not bare allocations);
- `syncs`: those whose CUDA kernel copies a result to the host before returning.
A ds_topkast custom op (`torch.ops.ds_topkast.*`, kernels.py) counts once: on CUDA it is
one Triton kernel; its CPU implementation's own ops are not what a GPU would dispatch
(the mode does not see inside an op it has already counted).
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops whose CUDA kernels copy a result to the host before returning.
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
           aten.bincount.default, aten.equal.default, aten.is_nonzero.default,
           aten._unique.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
           aten.masked_scatter.default, aten.argwhere.default, aten.histc.default}
# Indexing ops that synchronise when an index is a boolean mask (it is turned into positions first).
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
# Ops that allocate (or describe) memory without launching a kernel, and views whose schema does not say so.
NO_KERNEL = {aten.empty.memory_format, aten._unsafe_view.default, aten.empty_strided.default, aten.empty_like.default,
             aten.new_empty.default, aten.new_empty_strided.default, aten.lift_fresh.default,
             aten.set_.source_Storage, aten.set_.source_Storage_storage_offset, aten.resize_.default,
             aten.is_same_size.default, aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int,
             aten.sym_storage_offset.default}


def synchronises(func, args, kwargs) -> bool:
    """Whether this call, on CUDA, blocks the host until the device has produced a result."""
    if func in SYNCING:
        return True
    if func is aten.repeat_interleave.Tensor:  # reads the output's size from the device unless told it
        return (args[1] if len(args) > 1 else kwargs.get("output_size")) is None
    if func in INDEXING:
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
    return False


def is_view(func) -> bool:
    """A view or other alias of an input: a new tensor header, no kernel."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return False
    return any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)


def launches_kernel(func) -> bool:
    return not is_view(func) and func not in NO_KERNEL


class OpCounter(TorchDispatchMode):
    """Counts, by op, what is dispatched under it: all ops, kernel-launching ones, host-syncing ones."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.kernels: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        self.ops[name] += 1
        if launches_kernel(func):
            self.kernels[name] += 1
        if synchronises(func, args, kwargs):
            self.syncs[name] += 1
        return func(*args, **kwargs)

    def totals(self) -> dict[str, int]:
        return {"ops": sum(self.ops.values()), "kernels": sum(self.kernels.values()),
                "syncs": sum(self.syncs.values())}


def count(fn, *args, **kwargs) -> OpCounter:
    """The ops of one call of fn."""
    with OpCounter() as counter:
        fn(*args, **kwargs)
    return counter


def counted_refresh(refresher, step: int) -> tuple[OpCounter, dict[str, int]]:
    """The ops of one refresh, and the host syncs no op shows (each one on a GPU): values the refresher read back
    and waits for a copy (0 where a refresher, e.g. an older checkout's, does not count them)."""
    undispatched = {"values read back": (refresher, "host_reads"),
                    "copy waits": (getattr(refresher, "copies", None), "host_waits")}
    before = {name: getattr(owner, attribute, 0) for name, (owner, attribute) in undispatched.items()}
    with OpCounter() as counter:
        refresher.refresh(step)
    return counter, {name: getattr(owner, attribute, 0) - before[name]
                     for name, (owner, attribute) in undispatched.items()}


def lm_step(engine, batch) -> None:
    """One training step of a causal LM engine on a batch of token ids (its own labels)."""
    engine.backward(engine(input_ids=batch, labels=batch).loss)
    engine.step()


def counted_steps(engine, batches, warm_up: int = 2) -> OpCounter:
    """The ops of training steps on batches[warm_up:], after `warm_up` steps (first-step allocations and optimizer
    state) that are not counted."""
    for batch in batches[:warm_up]:
        lm_step(engine, batch)
    with OpCounter() as counter:
        for batch in batches[warm_up:]:
            lm_step(engine, batch)
    return counter
