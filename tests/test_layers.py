"""The sparse layer's autograd: float64 gradient checks, straight-through for B\\A, the penalty."""
import torch

from ds_topkast.layers import SparseLinearFunction, TopKASTLinear, dense_alpha, exploration_loss


def layer_inputs(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    out_f, in_f = 5, 7
    indices = torch.tensor([0, 3, 4, 8, 12, 20, 21, 33, 34])
    forward_mask = torch.tensor([True, False, True, True, False, True, False, True, False])
    values = torch.randn(len(indices), generator=gen, dtype=dtype, requires_grad=True)
    x = torch.randn(2, 3, in_f, generator=gen, dtype=dtype, requires_grad=True)
    return x, values, indices, forward_mask, out_f, in_f


def test_gradcheck_float64():
    x, values, indices, mask, out_f, in_f = layer_inputs()
    # Input gradients through α; value gradients straight through: B\A entries get dL/dα there.
    assert torch.autograd.gradcheck(lambda x: SparseLinearFunction.apply(x, values, indices, mask, out_f, in_f),
                                    (x,))
    # Where A = B the straight-through gradient is the true one, so values can be checked too.
    everything = torch.ones_like(mask)
    assert torch.autograd.gradcheck(
        lambda x, v: SparseLinearFunction.apply(x, v, indices, everything, out_f, in_f), (x, values))


def test_value_gradient_is_weight_gradient_at_alpha_gathered_at_b():
    x, values, indices, mask, out_f, in_f = layer_inputs()
    y = SparseLinearFunction.apply(x, values, indices, mask, out_f, in_f)
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
    y1 = SparseLinearFunction.apply(x, values, indices, mask, out_f, in_f)
    y2 = SparseLinearFunction.apply(x, changed, indices, mask, out_f, in_f)
    torch.testing.assert_close(y1, y2)


def test_layer_reselects_a_inside_b_and_adds_penalty():
    _, values, indices, mask, out_f, in_f = layer_inputs(torch.float32)
    layer = TopKASTLinear(in_f, out_f, values.detach(), indices, mask, None, k_forward=3, forward_density=0.25,
                          exploration_l2=0.1)
    layer.forward_set_stale = True
    layer(torch.randn(1, in_f))
    expected = torch.zeros(len(indices), dtype=torch.bool)
    expected[values.detach().abs().topk(3).indices] = True
    assert torch.equal(layer.forward_mask, expected)
    v = layer.values.detach()
    penalty = exploration_loss(layer)
    torch.testing.assert_close(penalty, 0.1 * (v[expected].square().sum() + v[~expected].square().sum() / 0.25))
    assert exploration_loss(layer) == 0.0, "each penalty is used once"
