"""The sparse layer's autograd: float64 gradient checks, straight-through for B\\A, the regulariser, autocast."""
import pytest
import torch
from reference_topkast import dense_alpha

from ds_topkast.core.bitmaps import block_counts
from ds_topkast.core.layers import SparseLinearFunction, TopKASTLinear, index_bits, pack_bits, unpack_bits
from ds_topkast.core.select import radix_topk_bits_
from ds_topkast.runtime.regulariser import exploration_penalty


def layer_inputs(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    out_f, in_f = 5, 7
    indices = torch.tensor([0, 3, 4, 8, 12, 20, 21, 33, 34])
    forward_mask = torch.tensor([True, False, True, True, False, True, False, True, False])
    values = torch.randn(len(indices), generator=gen, dtype=dtype, requires_grad=True)
    x = torch.randn(2, 3, in_f, generator=gen, dtype=dtype, requires_grad=True)
    return x, values, indices, forward_mask, out_f, in_f


def sparse_linear(x, values, indices, mask, out_f, in_f, *args):
    """The layer's function on B given as indices and A as a mask (it takes them as bitmaps)."""
    bits = index_bits(indices, out_f * in_f)
    return SparseLinearFunction.apply(x, values, None, bits, block_counts(bits, out_f * in_f), pack_bits(mask), out_f,
                                      in_f, *args)


@pytest.mark.parametrize("count", [1, 7, 8, 9, 64, 1001])
def test_bitmaps_round_trip(count):
    mask = torch.rand(count, generator=torch.Generator().manual_seed(count)) < 0.3
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-count // 8)
    assert torch.equal(unpack_bits(bits, count), mask)


def test_gradcheck_float64():
    x, values, indices, mask, out_f, in_f = layer_inputs()
    # Input gradients through α; value gradients straight through: B\A entries get dL/dα there.
    assert torch.autograd.gradcheck(lambda x: sparse_linear(x, values, indices, mask, out_f, in_f),
                                    (x,))
    # Where A = B the straight-through gradient is the true one, so values can be checked too.
    everything = torch.ones_like(mask)
    assert torch.autograd.gradcheck(
        lambda x, v: sparse_linear(x, v, indices, everything, out_f, in_f), (x, values))


def test_value_gradient_is_weight_gradient_at_alpha_gathered_at_b():
    x, values, indices, mask, out_f, in_f = layer_inputs()
    y = sparse_linear(x, values, indices, mask, out_f, in_f)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    alpha = dense_alpha(values.detach(), indices, mask, (out_f, in_f)).requires_grad_()
    ref = torch.nn.functional.linear(x.detach(), alpha)
    ref.backward(grad_out)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(values.grad, alpha.grad.reshape(-1)[indices])
    assert values.grad[~mask].abs().sum() > 0, "entries of B\\A must receive the straight-through gradient"


def test_forward_ignores_b_minus_a():
    x, values, indices, mask, out_f, in_f = layer_inputs()
    changed = values.detach().clone()
    changed[~mask] += 100.0
    y1 = sparse_linear(x, values, indices, mask, out_f, in_f)
    y2 = sparse_linear(x, changed, indices, mask, out_f, in_f)
    torch.testing.assert_close(y1, y2)


def make_layer(l2: float = 0.1, dtype=torch.float32) -> TopKASTLinear:
    _, values, indices, mask, out_f, in_f = layer_inputs(dtype)
    return TopKASTLinear.from_indices(in_f, out_f, values.detach(), indices, mask, None, k_forward=3,
                                      exploration_l2=l2)


def segment_topk_masks(scores, sizes, ks):
    """Each segment's top k of |scores| by one radix select over all of them (as A's re-selection makes it), each
    segment's bits from a byte of their own."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    out_starts = [8 * sum(-(-size // 8) for size in sizes[:i]) for i in range(len(sizes))]
    rows = [value for segment, (start, size, out_start) in enumerate(zip(starts, sizes, out_starts))
            for value in (start, size, segment, 0, 0, out_start)]
    out = torch.zeros(out_starts[-1] // 8 + -(-sizes[-1] // 8), dtype=torch.uint8)
    radix_topk_bits_(out, [(scores, rows)], torch.tensor(ks), max(1, (max(sizes) - 1).bit_length()))
    return torch.cat([unpack_bits(out, size, out_start) for size, out_start in zip(sizes, out_starts)])


def test_segment_topk_is_exact_per_segment_with_ties_by_lower_position():
    scores = torch.tensor([0.5, 2.0, 0.5, 0.0, 2.0, 0.5, 1.0,   3.0, 0.0, 3.0])
    masks = segment_topk_masks(scores, [7, 3], [4, 1])
    assert torch.equal(masks, torch.tensor([True, True, False, False, True, False, True, True, False, False]))
    gen = torch.Generator().manual_seed(3)
    sizes, ks = [1000, 1, 5000, 37], [1, 1, 1234, 36]
    scores = torch.randint(-20, 20, (sum(sizes),), generator=gen).float() / 4  # many ties, and signs
    masks = segment_topk_masks(scores, sizes, ks)
    for part, mask, k in zip(scores.split(sizes), masks.split(sizes), ks):
        expected = torch.zeros(part.numel(), dtype=torch.bool)
        expected[torch.sort(-part.abs(), stable=True).indices[:k]] = True
        assert torch.equal(mask, expected), (part.numel(), k)


def test_regulariser_gradient_is_added_in_backward_with_the_layers_own_density():
    layer = make_layer(l2=0.1)
    assert layer.forward_density == pytest.approx(3 / 35)
    x = torch.randn(2, layer.in_features)
    layer(x).sum().backward()
    data_grad = layer.values.grad.clone()
    layer.values.grad = None
    layer.exploration_l2 = 0.0
    layer(x).sum().backward()
    v, mask = layer.values.detach(), layer.forward_mask
    torch.testing.assert_close(data_grad - layer.values.grad, 2 * 0.1 * v * torch.where(mask, 1.0, 35 / 3))
    layer.exploration_l2, layer.accumulation_steps = 0.1, 4  # applied once per optimizer step of 4 backward passes
    layer.values.grad = None
    layer(x).sum().backward()
    torch.testing.assert_close(layer.values.grad - (data_grad - 2 * 0.1 * v * torch.where(mask, 1.0, 35 / 3)),
                               2 * 0.1 * v * torch.where(mask, 1.0, 35 / 3) / 4)
    penalty = exploration_penalty(layer)
    torch.testing.assert_close(penalty, 0.1 * (v[mask].square().sum() + v[~mask].square().sum() * 35 / 3))
    assert not penalty.requires_grad, "the penalty is reported, not added to the loss"


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_autocast_bf16_forward_and_backward_match_nn_linear(model_dtype):
    layer = make_layer(l2=0.0, dtype=model_dtype)
    dense = torch.nn.Linear(layer.in_features, layer.out_features, bias=False, dtype=model_dtype)
    with torch.no_grad():
        dense.weight.copy_(dense_alpha(layer.values, layer.indices, layer.forward_mask, layer.shape))
    x = torch.randn(3, layer.in_features, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = layer(x), dense(x_ref)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert x.grad.dtype == torch.float32 and layer.values.grad.dtype == model_dtype
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.values.grad, dense.weight.grad.reshape(-1)[layer.indices.long()])


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_applies_the_regulariser_once(reentrant):
    """The recompute runs forward again; the regulariser lives in backward, so it is still added exactly once."""
    from torch.utils.checkpoint import checkpoint

    layer = make_layer(l2=0.1)
    x = torch.randn(2, layer.in_features, requires_grad=True)
    layer(x).square().sum().backward()
    plain = layer.values.grad.clone()
    layer.values.grad = None
    checkpoint(layer, x, use_reentrant=reentrant).square().sum().backward()
    torch.testing.assert_close(layer.values.grad, plain)
