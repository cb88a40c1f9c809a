"""NaN and infinity never reach the dense store or decide a mask.

A step with NaN gradients is skipped by DeepSpeed's ZeRO optimizers (their overflow check,
in bf16 and fp32), and the refresh that follows sees finite weights; without ZeRO (stage
0, fp32) DeepSpeed applies it, and the next refresh stops with an error naming the layer,
before writing anything. The re-selection of A between refreshes makes no host sync, so it
does not stop; it never touches the store, and NaN ranks above every value there.
"""
import math

import pytest
import torch
from models import batches, ds_config, gpt2_engine, tiny_gpt2

import ds_topkast
from ds_topkast.config import TopKASTConfigError
from ds_topkast.core.layers import sparse_layers
from ds_topkast.runtime.refresh import RefreshError

LAYER = "transformer.h.0.attn.c_attn"


def step(engine, batch, poison: bool = False):
    loss = engine(input_ids=batch, labels=batch).loss
    engine.backward(loss * math.nan if poison else loss)
    engine.step()
    return loss.item()


def snapshot(engine):
    store = engine.topkast.state.store
    return {name: (store.read(name).clone(), layer.indices.clone(), layer.forward_mask.clone())
            for name, layer in sparse_layers(engine.module).items()}


def assert_store_finite_and_unchanged(engine, before):
    for name, (theta, indices, forward_mask) in snapshot(engine).items():
        assert torch.isfinite(theta).all(), f"NaN written into the store of {name}"
        assert torch.equal(theta, before[name][0]) and torch.equal(indices, before[name][1]), name
        assert torch.equal(forward_mask, before[name][2]), name


def test_fp32_nan_step_stops_the_refresh_before_it_writes(tmp_path):
    engine = gpt2_engine(ds_config(stage=0, refresh_interval=2, forward_interval=0))
    data = batches(2)
    step(engine, data[0])
    before = snapshot(engine)
    with pytest.raises(RefreshError, match=f"layer '{LAYER}' on rank\\(s\\) \\[0\\]: its trained values hold NaN"):
        step(engine, data[1], poison=True)
    assert_store_finite_and_unchanged(engine, before)


def test_nan_values_reselected_into_a_between_refreshes_are_stopped_at_the_refresh(tmp_path):
    engine = gpt2_engine(ds_config(stage=0, refresh_interval=3, forward_interval=1))
    data = batches(3)
    step(engine, data[0])
    store_before = {name: theta for name, (theta, *_) in snapshot(engine).items()}
    step(engine, data[1], poison=True)  # A re-selected from NaN values: no error, no store write
    for name, (theta, *_) in snapshot(engine).items():
        assert torch.equal(theta, store_before[name]), name
    with pytest.raises(RefreshError, match=f"layer '{LAYER}' on rank\\(s\\) \\[0\\]: its trained values hold NaN"):
        step(engine, data[2])
    for name, (theta, *_) in snapshot(engine).items():
        assert torch.equal(theta, store_before[name]), name


@pytest.mark.parametrize("stage,bf16", [(1, True), (2, False)])
def test_zero_skips_the_nan_step_and_the_refresh_sees_finite_weights(stage, bf16):
    engine = gpt2_engine(ds_config(stage=stage, bf16=bf16, refresh_interval=2, forward_interval=1))
    data = batches(4)
    step(engine, data[0])
    step(engine, data[1], poison=True)  # the refresh at step 2 follows the skipped step
    assert not engine.was_step_applied() and engine.skipped_steps == 1
    assert [d.step for d in engine.topkast.refresher.history] == [2]
    for name, (theta, *_) in snapshot(engine).items():
        assert torch.isfinite(theta).all(), name
    assert all(math.isfinite(step(engine, batch)) for batch in data[2:])


def test_sparsify_refuses_non_finite_weights():
    model = tiny_gpt2(seed=0)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[3, 4] = math.inf
    with pytest.raises(TopKASTConfigError, match=r"Layer 'transformer.h.1.mlp.c_fc' holds NaN or infinite"):
        ds_topkast.sparsify(model, {"forward_sparsity": 0.8, "backward_sparsity": 0.6})
