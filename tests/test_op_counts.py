"""What a ds_topkast step asks of the accelerator's host side, counted against dense DeepSpeed's and kept there.

At the sizes users train, a GPU step is bound by the host: every ATen op dispatched costs
microseconds of CPU time whatever its size, and every op that copies a result back to the
host (`.item()`, `nonzero`, boolean indexing, `bincount`) stalls the queue and ZeRO-3's
prefetch. Both are properties of the code, so they are counted here on the CPU accelerator
(bench/op_counts.py: a TorchDispatchMode that sees each op as CUDA would receive it) and
held to the targets of docs/RESULTS.md: per sparsified layer, a forward and a backward of
one fused kernel each more than nn.Linear's; a whole step within 1.10x dense DeepSpeed's
ops and kernels at the 96-layer proxy; no more host syncs than dense between refreshes; at
most 4 per sparsified layer in a refresh. The GPU check (tests/test_gpu.py) counts syncs
with CUDA's own detector.
"""
import pytest
import torch
from models import batches, ds_config, tiny_gpt2
from op_counts import OpCounter, counted_refresh, counted_steps
from torch import nn

import ds_topkast
from ds_topkast.core.layers import TopKASTLinear


def step_counts(engine, steps: int = 3, micro_batch: int = 4) -> OpCounter:
    """Ops of `steps` whole training steps (forward, backward, optimizer step, A's re-selection) after two warm-up
    steps."""
    return counted_steps(engine, batches(steps + 2, micro_batch=micro_batch))


def dense_engine(cfg: dict, model: nn.Module):
    import deepspeed

    dense_cfg = {key: value for key, value in cfg.items() if key != "topkast"}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=dense_cfg)
    return engine


@pytest.mark.parametrize("stage,bf16,l2", [(0, False, 0.0), (2, True, 1e-3), (3, True, 1e-3)])
def test_no_more_host_syncs_than_dense_deepspeed_between_refreshes(stage, bf16, l2):
    cfg = ds_config(stage=stage, bf16=bf16, refresh_interval=1000, forward_interval=1, exploration_l2=l2)
    sparse, *_ = ds_topkast.initialize(model=tiny_gpt2(), config=cfg)
    assert len(sparse.topkast.refresher.layers) == 8
    sparse_syncs = step_counts(sparse).syncs
    dense_syncs = step_counts(dense_engine(cfg, tiny_gpt2())).syncs
    assert sum(sparse_syncs.values()) <= sum(dense_syncs.values()), (
        f"ds_topkast: {dict(sparse_syncs)}, dense DeepSpeed: {dict(dense_syncs)}")
    assert not sparse.topkast.refresher.history, "the steps counted must be steps between refreshes"


def sparse_layer(dense: nn.Linear, l2: float) -> TopKASTLinear:
    """dense's weight as a Top-KAST layer at 90/80 (B: the first 20% of entries, A: every other one of them)."""
    numel = dense.weight.numel()
    indices = torch.arange(numel // 5)
    return TopKASTLinear.from_indices(dense.in_features, dense.out_features, dense.weight.detach().reshape(-1)[indices],
                                      indices, torch.arange(numel // 5) % 2 == 0, nn.Parameter(dense.bias.detach()),
                                      k_forward=numel // 10, exploration_l2=l2)


def pass_counts(layer: nn.Module, x: torch.Tensor, autocast: bool) -> tuple[OpCounter, OpCounter]:
    """Ops of one forward and of its backward (the loss is the output's sum, outside both counts), into a fresh
    input gradient."""
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with OpCounter() as forward:
            y = layer(x)
        loss = y.float().sum()
    with OpCounter() as backward:
        loss.backward()
    return forward, backward


class TorchLinear(nn.Linear):
    """nn.Linear as torch runs it: DeepSpeed's zero.Init replaces F.linear for the rest of the process (with an
    autograd function of its own), and an earlier test in this process may have run one."""

    def forward(self, x):
        return torch.ops.aten.linear(x, self.weight, self.bias)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("l2", [0.0, 1e-3])
def test_a_sparse_layer_costs_one_fused_kernel_more_than_nn_linear_per_pass(autocast, l2):
    """Forward: α built by one kernel from the bitmaps (no indices, no bool tensors, no zero-fill), the bias inside
    the matmul. Backward: α again, and dL/dv with the regulariser's gradient gathered at B by one kernel."""
    torch.manual_seed(0)
    dense = TorchLinear(48, 40)
    sparse = sparse_layer(dense, l2)
    x = torch.randn(6, 48)
    dense_forward, dense_backward = pass_counts(dense, x, autocast)
    sparse_forward, sparse_backward = pass_counts(sparse, x, autocast)
    fused = {"ds_topkast.expand_bits_into_.default": 1}
    assert sparse_forward.kernels - dense_forward.kernels == fused, (dense_forward.kernels, sparse_forward.kernels)
    # dL/dα is the same matmul as nn.Linear's weight gradient, written into the layers' shared buffer (mm.out)
    assert sparse_backward.kernels - dense_backward.kernels == {**fused, "ds_topkast.gather_bits_.default": 1,
                                                                "aten.mm.out": 1}, (
        dense_backward.kernels, sparse_backward.kernels)
    assert dense_backward.kernels["aten.mm.default"] - sparse_backward.kernels["aten.mm.default"] == 1
    for passes in ((dense_forward, sparse_forward), (dense_backward, sparse_backward)):
        dense_ops, sparse_ops = (p.totals()["ops"] for p in passes)
        assert sparse_ops <= dense_ops + 4, (passes[0].ops, passes[1].ops)
    assert not sparse_forward.syncs and not sparse_backward.syncs


def test_the_sparse_layer_keeps_its_fused_matmul_after_deepspeeds_zero_init():
    """zero.Init leaves F.linear replaced for the whole process; the layer does not go through it."""
    import deepspeed

    linear = torch.nn.functional.linear
    try:
        with deepspeed.zero.Init(config_dict_or_path=ds_config(stage=3)):
            nn.Linear(4, 4)
        assert torch.nn.functional.linear is not torch._C._nn.linear, "zero.Init no longer replaces F.linear"
        torch.manual_seed(0)
        sparse = sparse_layer(TorchLinear(48, 40), 0.0)
        forward, _ = pass_counts(sparse, torch.randn(6, 48), autocast=False)
    finally:
        torch.nn.functional.linear = linear
    assert forward.kernels == {"ds_topkast.expand_bits_into_.default": 1, "aten.addmm.default": 1}, forward.kernels


def proxy_counts(n_layer: int, sparse: bool, micro_batch: int = 2) -> OpCounter:
    """docs/RESULTS.md's host-bound proxy (GPT-2 at width 64, 4 sparsified layers per block, 90/80, ZeRO-2 bf16,
    A re-selected every step), one step."""
    cfg = ds_config(stage=2, bf16=True, micro_batch=micro_batch, forward_sparsity=0.9, backward_sparsity=0.8,
                    refresh_interval=1000, forward_interval=1)
    model = tiny_gpt2(n_layer=n_layer, n_embd=64)
    engine = ds_topkast.initialize(model=model, config=cfg)[0] if sparse else dense_engine(cfg, model)
    counter = step_counts(engine, steps=1, micro_batch=micro_batch)
    engine.destroy()
    return counter


def test_a_step_dispatches_within_ten_percent_of_dense_deepspeeds_ops_and_kernels():
    dense, sparse = proxy_counts(24, sparse=False), proxy_counts(24, sparse=True)
    (dense_ops, dense_kernels, _), (sparse_ops, sparse_kernels, _) = (c.totals().values() for c in (dense, sparse))
    extra = (sparse.kernels - dense.kernels).most_common(8)
    assert sparse_ops <= 1.10 * dense_ops, f"{sparse_ops} ops against dense's {dense_ops}; most added: {extra}"
    assert sparse_kernels <= 1.10 * dense_kernels, f"{sparse_kernels} kernels against {dense_kernels}: {extra}"


def test_re_selecting_a_costs_the_same_ops_for_any_number_of_layers():
    """One radix select over every layer's masters: a fixed number of launches, not a sort per layer."""
    def reselection_ops(n_layer: int) -> int:
        cfg = ds_config(stage=2, bf16=True, refresh_interval=1000, forward_interval=1)
        engine, *_ = ds_topkast.initialize(model=tiny_gpt2(n_layer=n_layer), config=cfg)
        step_counts(engine, steps=1)  # optimizer state exists
        with OpCounter() as counter:
            engine.topkast.refresher.reselect_forward_sets()
        engine.destroy()
        return counter.totals()["ops"]

    assert reselection_ops(2) == reselection_ops(6)


@pytest.mark.parametrize("stage", [2, 3])
def test_a_refresh_makes_at_most_four_host_syncs_per_sparsified_layer(stage):
    """Syncing ops dispatched, plus values the refresher reads back and copies it waits for, over one refresh."""
    cfg = ds_config(stage=stage, bf16=True, refresh_interval=1000, forward_interval=1)
    engine, *_ = ds_topkast.initialize(model=tiny_gpt2(n_layer=4), config=cfg)
    step_counts(engine, steps=1)
    refresher = engine.topkast.refresher
    counter, undispatched = counted_refresh(refresher, engine.global_steps)
    syncs = counter.totals()["syncs"] + sum(undispatched.values())
    layers = len(refresher.layers)
    assert syncs <= 4 * layers, (f"{syncs} host syncs for {layers} layers: dispatched {dict(counter.syncs)}, "
                                 f"{undispatched}")
    engine.destroy()
