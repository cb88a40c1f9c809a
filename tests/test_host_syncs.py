"""Between refreshes, a ds_topkast step makes no device-to-host sync that dense DeepSpeed does not make.

On a GPU every `.item()`, `nonzero`, boolean-mask index or `bincount` of a device tensor
blocks the CPU until the GPU's queue drains, which stalls the kernel queue and ZeRO-3's
prefetch. The CPU accelerator cannot feel that, so this test counts, under a
TorchDispatchMode, the ATen ops that synchronise on CUDA during whole training steps
(forward, backward, optimizer step, re-selection of A) of ds_topkast and of dense
DeepSpeed on the same model and config: ds_topkast may not make more. The GPU check
(tests/test_gpu.py) does the same with CUDA's own sync detector.
"""
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ds_topkast
from models import batches, ds_config, tiny_gpt2

aten = torch.ops.aten

# Ops whose CUDA kernels copy a result to the host before returning.
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
           aten.bincount.default, aten.equal.default, aten.is_nonzero.default,
           aten._unique.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
           aten.masked_scatter.default, aten.argwhere.default, aten.histc.default}
# Indexing ops that synchronise when an index is a boolean mask (it is turned into positions first).
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def synchronises(func, args, kwargs) -> bool:
    if func in SYNCING:
        return True
    if func is aten.repeat_interleave.Tensor:  # reads the output's size from the device unless told it
        return (args[1] if len(args) > 1 else kwargs.get("output_size")) is None
    if func in INDEXING:
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
    return False


class SyncCounter(TorchDispatchMode):
    """Counts, by op, the ATen calls that would block the host on CUDA."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if synchronises(func, args, kwargs or {}):
            self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def syncs_per_step(engine, steps: int = 3) -> Counter:
    """Syncs of `steps` whole training steps after two warm-up steps (first-step allocations and state)."""
    data = batches(steps + 2)

    def step(batch):
        engine.backward(engine(input_ids=batch, labels=batch).loss)
        engine.step()

    for batch in data[:2]:
        step(batch)
    with SyncCounter() as counter:
        for batch in data[2:]:
            step(batch)
    return counter.counts


@pytest.mark.parametrize("stage,bf16,l2", [(0, False, 0.0), (2, True, 1e-3), (3, True, 1e-3)])
def test_no_more_host_syncs_than_dense_deepspeed_between_refreshes(stage, bf16, l2):
    import deepspeed

    cfg = ds_config(stage=stage, bf16=bf16, refresh_interval=1000, forward_interval=1, exploration_l2=l2)
    sparse, *_ = ds_topkast.initialize(model=tiny_gpt2(), config=cfg)
    assert len(sparse.topkast.refresher.layers) == 8
    sparse_syncs = syncs_per_step(sparse)
    dense_cfg = {key: value for key, value in cfg.items() if key != "topkast"}
    model = tiny_gpt2()
    dense, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=dense_cfg)
    dense_syncs = syncs_per_step(dense)
    assert sum(sparse_syncs.values()) <= sum(dense_syncs.values()), (
        f"ds_topkast: {dict(sparse_syncs)}, dense DeepSpeed: {dict(dense_syncs)}")
    assert not sparse.topkast.refresher.history, "the steps counted must be steps between refreshes"
