"""The sparse layer: a linear map whose weight exists only as the compact values of set B.

Top-KAST (Jayakumar et al. 2020, Section 2): the forward pass uses α = θ on A (zero
elsewhere); the gradient is taken at α and applied to every entry of B ⊇ A, so entries
of B\\A receive the straight-through gradient while contributing nothing to the output.

Here B is held as one fixed-size parameter `values` (k_B entries, trained by DeepSpeed)
with a buffer of flat indices into the (out, in) weight, and a boolean mask over it
telling which entries are in A. The dense α of this one layer is scattered for the
matmul and rebuilt in backward; it is never saved for backward. The layer knows nothing
about the dense store or the optimizer: refresh.py rewrites its sets from outside.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ds_topkast.select import NonFiniteScoresError, topk_mask


class NonFiniteWeightsError(FloatingPointError):
    """A layer's trained values hold NaN or infinity, so no mask may be selected from them."""


def dense_alpha(values: Tensor, indices: Tensor, forward_mask: Tensor, shape: tuple[int, int]) -> Tensor:
    """The dense forward weight α: values of A scattered at their flat indices, zero elsewhere."""
    weight = values.new_zeros(shape[0] * shape[1])
    weight[indices.long()] = torch.where(forward_mask, values, torch.zeros_like(values))
    return weight.view(shape)


class SparseLinearFunction(torch.autograd.Function):
    """y = x α^T, with dL/dvalues = (dL/dα) gathered at B (straight through for B\\A)."""

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, indices: Tensor, forward_mask: Tensor,
                out_features: int, in_features: int) -> Tensor:
        shape = (out_features, in_features)
        ctx.save_for_backward(x, values, indices, forward_mask)
        ctx.shape = shape
        return F.linear(x, dense_alpha(values, indices, forward_mask, shape))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, values, indices, forward_mask = ctx.saved_tensors
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dense_alpha(values, indices, forward_mask, ctx.shape)
        if ctx.needs_input_grad[1]:
            # (out, in) = (out, tokens) @ (tokens, in); dense-then-gather (DESIGN.md, Section 2).
            grad_weight = grad_out.reshape(-1, ctx.shape[0]).t() @ x.reshape(-1, ctx.shape[1])
            grad_values = grad_weight.reshape(-1)[indices.long()].to(values.dtype)
        return grad_x, grad_values, None, None, None, None


class TopKASTLinear(nn.Module):
    """A Linear (or GPT-2 Conv1D) layer trained with Top-KAST on its compact set B.

    `values[i]` is the weight at flat index `indices[i]` of the (out, in) matrix;
    `forward_mask[i]` says whether that entry is in A. Indices are kept ascending, so a
    position in `values` orders ties the same way as the flat index does.
    """

    def __init__(self, in_features: int, out_features: int, values: Tensor, indices: Tensor,
                 forward_mask: Tensor, bias: nn.Parameter | None, *, k_forward: int, forward_density: float,
                 exploration_l2: float = 0.0, source_type: str = "Linear"):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.k_forward = k_forward
        self.forward_density = forward_density
        self.exploration_l2 = exploration_l2
        self.source_type = source_type
        self.values = nn.Parameter(values.detach().clone())
        self.bias = bias  # the replaced layer's own Parameter: param groups naming it stay valid
        index_dtype = torch.int32 if in_features * out_features < 2**31 else torch.int64
        self.register_buffer("indices", indices.to(index_dtype))
        self.register_buffer("forward_mask", forward_mask.clone())
        self.forward_set_stale = False
        self.last_exploration_penalty: Tensor | None = None
        self.layer_name = ""  # its name in the model, for error messages (set by sparsify)

    @property
    def k_backward(self) -> int:
        return self.values.ds_numel if hasattr(self.values, "ds_numel") else self.values.numel()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def reselect_forward_set(self) -> None:
        """A := the top k_forward of |values| inside B (DESIGN.md, Section 3, step 5); never from non-finite values."""
        with torch.no_grad():
            try:  # the selection's own pass over the scores finds non-finite values; no second pass here
                self.forward_mask.copy_(topk_mask(self.values.detach().float().abs(), self.k_forward))
            except NonFiniteScoresError:
                raise NonFiniteWeightsError(
                    f"Top-KAST layer {self.layer_name or self.extra_repr()!r} holds non-finite weights, so set A "
                    "cannot be re-selected: an optimizer step applied NaN or infinite gradients. Lower the learning "
                    "rate or enable gradient clipping, and resume from the last checkpoint.") from None
        self.forward_set_stale = False

    def assign_sets(self, indices: Tensor, forward_mask: Tensor) -> None:
        """Take new sets from a refresh; the caller rewrites `values` to match."""
        self.indices.copy_(indices.to(self.indices.dtype))
        self.forward_mask.copy_(forward_mask)
        self.forward_set_stale = False

    def exploration_penalty(self) -> Tensor:
        """λ·(Σ_A v² + Σ_{B\\A} v² / D): the paper's exploration regulariser for this layer."""
        squares = self.values.float().square()
        scale = torch.where(self.forward_mask, 1.0, 1.0 / self.forward_density)
        return self.exploration_l2 * (squares * scale).sum()

    def forward(self, x: Tensor) -> Tensor:
        # Parameters are gathered here under ZeRO-3, so set-A re-selection and the
        # penalty are computed inside forward rather than between steps.
        if self.forward_set_stale:
            self.reselect_forward_set()
        if self.exploration_l2 > 0 and self.training and torch.is_grad_enabled():
            self.last_exploration_penalty = self.exploration_penalty()
        y = SparseLinearFunction.apply(x, self.values, self.indices, self.forward_mask,
                                       self.out_features, self.in_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"k_forward={self.k_forward}, k_backward={self.k_backward}, from={self.source_type}")


def sparse_layers(model: nn.Module) -> dict[str, TopKASTLinear]:
    """The model's Top-KAST layers by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, TopKASTLinear)}


def exploration_loss(model: nn.Module) -> Tensor | float:
    """Sum of the exploration penalties from the model's latest training forward pass.

    Add it to the loss in a custom loop (`loss = loss + exploration_loss(model)`);
    ds_topkast's engine adds it inside `engine.backward`. Each penalty is used once.
    """
    total: Tensor | float = 0.0
    for layer in sparse_layers(model).values():
        if layer.last_exploration_penalty is not None:
            total = total + layer.last_exploration_penalty
            layer.last_exploration_penalty = None
    return total
