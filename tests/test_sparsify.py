"""Conversion of GPT-2, Llama, GPT-NeoX and plain nn.Module models; exact k per layer; ERK."""
import pytest
import torch
from models import MLP, VOCAB, tiny_gpt2, tiny_llama, tiny_neox
from reference_topkast import dense_alpha, topk_by_sort
from torch import nn

import ds_topkast
from ds_topkast.core.distributions import layer_densities
from ds_topkast.core.layers import TopKASTLinear, sparse_layers

FAMILIES = {
    "gpt2": (tiny_gpt2, 8, "Conv1D"),
    "llama": (tiny_llama, 14, "Linear"),  # q,k,v,o + gate,up,down per block
    "gpt_neox": (tiny_neox, 8, "Linear"),  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h
    "plain": (MLP, 2, "Linear"),  # fc1, fc2 (embed and head excluded below)
}


def dense_weights(model):
    """(out, in) weights of every Linear/Conv1D by module name."""
    from transformers.pytorch_utils import Conv1D
    return {n: (m.weight.t() if isinstance(m, Conv1D) else m.weight).detach().clone()
            for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_conversion_keeps_top_k_and_matches_masked_dense_model(family):
    build, expected_layers, source = FAMILIES[family]
    model = build()
    dense_model = build()
    weights = dense_weights(model)
    section = {"forward_sparsity": 0.75, "backward_sparsity": 0.5}
    if family == "plain":
        section["exclude"] = ["embed", "head"]
    ds_topkast.sparsify(model, section)
    layers = sparse_layers(model)
    assert len(layers) == expected_layers
    for name, layer in layers.items():
        w = weights[name]
        assert layer.source_type == source
        assert layer.k_forward == round(0.25 * w.numel()) and layer.k_backward == round(0.5 * w.numel())
        assert torch.equal(layer.indices.long(), topk_by_sort(w.abs(), layer.k_backward).nonzero().squeeze(1))
        alpha = dense_alpha(layer.values.detach(), layer.indices, layer.forward_mask, layer.shape)
        torch.testing.assert_close(alpha, w * topk_by_sort(w.abs(), layer.k_forward).view_as(w))
        assert torch.equal(model.topkast_state.store.read(name), w.reshape(-1))
        # Write α into the dense twin; the two models must then compute the same thing.
        module = dense_model.get_submodule(name)
        module.weight.data.copy_(alpha.t() if source == "Conv1D" else alpha)
    x = torch.randint(0, VOCAB, (2, 8))
    out, ref = model(input_ids=x), dense_model(input_ids=x)
    logits = lambda o: o["logits"] if isinstance(o, dict) else o.logits
    torch.testing.assert_close(logits(out), logits(ref), rtol=1e-5, atol=1e-5)


def test_bias_parameter_is_kept_not_copied():
    model = MLP()
    bias = model.fc1.bias
    ds_topkast.sparsify(model, {"exclude": ["embed", "head"]})
    assert model.fc1.bias is bias


def test_refuses_to_sparsify_twice():
    model = ds_topkast.sparsify(MLP(), {"exclude": ["embed", "head"]})
    with pytest.raises(ds_topkast.TopKASTConfigError, match="already sparsified"):
        ds_topkast.sparsify(model, {"exclude": ["embed", "head"]})


def test_erk_spends_the_uniform_budget_and_favours_small_layers():
    shapes = [(64, 64), (256, 64), (64, 256), (8, 8)]
    densities = layer_densities(shapes, 0.1, "erk")
    sizes = [a * b for a, b in shapes]
    assert sum(d * n for d, n in zip(densities, sizes)) == pytest.approx(0.1 * sum(sizes))
    assert densities[3] == 1.0  # the tiny layer would exceed density 1: kept dense
    assert densities[0] > densities[1] == pytest.approx(densities[2])


def test_erk_config_converts_with_per_layer_k():
    model = ds_topkast.sparsify(tiny_gpt2(), {"distribution": "erk", "forward_sparsity": 0.9,
                                              "backward_sparsity": 0.8})
    layers = sparse_layers(model)
    total = sum(l.in_features * l.out_features for l in layers.values())
    assert sum(l.k_forward for l in layers.values()) == pytest.approx(0.1 * total, rel=0.01)
    assert len({round(l.k_forward / (l.in_features * l.out_features), 3) for l in layers.values()}) > 1
    assert all(isinstance(l, TopKASTLinear) and l.k_forward <= l.k_backward for l in layers.values())


def test_global_distribution_puts_one_threshold_across_layers():
    """Per-layer counts from one magnitude threshold over all layers: exactly the budget, ties to earlier layers."""
    from ds_topkast.core.distributions import global_kept_counts

    gen = torch.Generator().manual_seed(0)
    layers = [torch.randn(300, generator=gen) * scale for scale in (1.0, 1.5, 0.7)]
    layers[2][:50] = layers[0][0]  # ties with an entry of layer 0 across the threshold's neighbourhood
    numels = [t.numel() for t in layers]
    forward, backward = global_kept_counts(lambda: iter(layers), numels, [0.1, 0.3])
    for counts, density in ((forward, 0.1), (backward, 0.3)):
        assert sum(counts) == round(density * sum(numels))
        threshold = torch.cat(layers).abs().sort(descending=True).values[sum(counts) - 1]
        for layer, count in zip(layers, counts):
            assert (layer.abs() > threshold).sum() <= count <= (layer.abs() >= threshold).sum()
    assert forward[1] > forward[0] > forward[2], "the layer of the largest weights keeps the most"


def test_sparsify_with_the_global_distribution():
    model = ds_topkast.sparsify(tiny_gpt2(), {"forward_sparsity": 0.9, "backward_sparsity": 0.7, "distribution": "global",
                                   "exclude": ["*wte*", "*wpe*", "*lm_head*"]})
    layers = sparse_layers(model).values()
    total = sum(l.in_features * l.out_features for l in layers)
    assert sum(l.k_forward for l in layers) == round(0.1 * total)
    assert sum(l.k_backward for l in layers) == round(0.3 * total)
    assert len({l.forward_density for l in layers}) > 1, "densities differ per layer"
