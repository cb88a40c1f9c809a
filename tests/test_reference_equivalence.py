"""The compact DeepSpeed Top-KAST trains exactly like the plain dense mask-based reference (fp32)."""
import pytest
import torch
from models import batches, clone, ds_config, lm_loss, tiny_gpt2
from reference_topkast import ReferenceTopKAST

import ds_topkast
from ds_topkast.core.layers import sparse_layers

LR, WD, L2 = 1e-2, 0.01, 1e-3
# Some gradients are exactly zero in exact arithmetic (GPT-2's key bias: softmax ignores a
# per-query constant), so both implementations see only rounding noise there, which Adam with
# a tiny eps turns into lr-sized steps of random sign. An eps far above that noise keeps the
# comparison about Top-KAST rather than about summation order.
EPS = 1e-4


def full_fp32(engine, param):
    from deepspeed.utils import safe_get_full_fp32_param
    value = safe_get_full_fp32_param(param)
    return (param.detach() if value is None else value).float().reshape(-1)


def assert_close_rel(actual, expected, what):
    """Equal to 1e-5 of the tensor's scale: Adam turns last-bit differences of tiny gradients into
    small absolute differences in single entries, so a per-entry relative test would flake."""
    error = (actual - expected).abs().max().item()
    assert error <= 1e-5 * expected.abs().max().item(), f"{what}: max difference {error:.3g}"


def flat_sets(layer):
    indices = layer.indices.long()
    return indices, indices[layer.forward_mask]


def assert_forward_sets_equal(engine, ref):
    for name, layer in sparse_layers(engine.module).items():
        B, A = flat_sets(layer)
        assert torch.equal(B, ref.B[name].reshape(-1).nonzero().squeeze(1)), f"B differs in {name}"
        assert torch.equal(A, ref.A[name].reshape(-1).nonzero().squeeze(1)), f"A differs in {name}"


def assert_weights_equal(engine, ref):
    adapter = engine.topkast.refresher.adapter
    for name, layer in sparse_layers(engine.module).items():
        values = adapter.get_master(layer.values)
        expected = ref.theta[name].reshape(-1)[layer.indices.long()]
        assert_close_rel(values, expected, f"B values of {name}")
        store = engine.topkast.state.store.read(name).clone()
        store[layer.indices.long()] = values
        assert_close_rel(store, ref.theta[name].reshape(-1), f"dense weights of {name}")
    params = dict(engine.module.named_parameters())
    for name, expected in ref.others.items():
        assert_close_rel(full_fp32(engine, params[name]), expected.reshape(-1), name)


@pytest.mark.parametrize("stage,gas,new_entries,selection", [
    (0, 1, "zero_moments", "topk"), (2, 2, "zero_moments", "topk"), (3, 1, "zero_moments", "topk"),
    (0, 1, "per_entry_bias_correction", "topk"), (2, 2, "per_entry_bias_correction", "topk"),
    (2, 1, "zero_moments", "random")])
def test_compact_engine_matches_dense_reference(stage, gas, new_entries, selection):
    model = tiny_gpt2()
    reference_model = clone(model)
    cfg = ds_config(stage=stage, gas=gas, lr=LR, weight_decay=WD, refresh_interval=3, forward_interval=1,
                    exploration_l2=L2, new_entries=new_entries, selection=selection, seed=11)
    cfg["optimizer"]["params"]["eps"] = EPS
    if new_entries != "zero_moments":  # a changing learning rate: the correction must use each step's own
        cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": LR,
                                                           "warmup_num_steps": 5, "warmup_type": "linear"}}
    engine, *_ = ds_topkast.initialize(model=model, config=cfg)
    layers = sparse_layers(engine.module)
    assert len(layers) == 8  # c_attn, c_proj, c_fc, mlp.c_proj in 2 blocks
    ref = ReferenceTopKAST(reference_model,
                           {n: (l.k_forward, l.k_backward, l.source_type == "Conv1D") for n, l in layers.items()},
                           lr=LR, eps=EPS, weight_decay=WD, refresh_interval=3, forward_interval=1, exploration_l2=L2,
                           per_entry_bias_correction=new_entries != "zero_moments",
                           random_backward=selection == "random", seed=11)
    data = batches(7 * gas)
    for step in range(7):
        micro = data[step * gas:(step + 1) * gas]
        ref.lr = engine.get_lr()[0]
        losses = []
        for batch in micro:
            loss = engine(input_ids=batch, labels=batch).loss
            assert_forward_sets_equal(engine, ref)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        ref_loss = ref.train_step(micro, lm_loss)
        assert sum(losses) / gas == pytest.approx(ref_loss, rel=1e-5)
        assert_weights_equal(engine, ref)
    assert [d.step for d in engine.topkast.refresher.history] == [3, 6]
    assert engine.topkast.refresher.history[0].backward_changed > 0, "the test must exercise a changing B"
