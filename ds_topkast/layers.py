"""The sparse layer: a linear map whose weight exists only as the compact values of set B.

Top-KAST (Jayakumar et al. 2020, Section 2): the forward pass uses α = θ on A (zero
elsewhere); the gradient is taken at α and applied to every entry of B ⊇ A, so entries
of B\\A receive the straight-through gradient while contributing nothing to the output.

Here B is held as one fixed-size parameter `values` (k_B entries, trained by DeepSpeed,
in ascending flat-index order) and two bitmaps: which entries of the (out, in) weight are
in B (one bit per weight) and which entries of B are in A (one bit per value). That is
0.15 bytes per weight at 80% backward sparsity where int32 indices and a bool mask took
1.0: replicated on every rank even under ZeRO-3, it stays below the values' own
partitioned bytes up to about 16 ranks (docs/DESIGN.md). The flat indices are unpacked
from the bitmap when needed (`torch.nonzero_static`, no host sync). The dense α of this
one layer is scattered for the matmul and rebuilt in backward; it is never saved for
backward. The exploration
regulariser's gradient is added in the same backward, so every way of calling backward
(`loss.backward()`, `engine.backward`, activation-checkpoint recompute, the HF Trainer)
applies it exactly once. The layer knows nothing about the dense store or the optimizer:
refresh.py rewrites its sets from outside, between steps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def pack_bits(mask: Tensor) -> Tensor:
    """A flat bool mask as uint8 bits, eight to a byte (bit j of byte i is entry 8i + j): 1/8 of its bytes."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = F.pad(flat, (0, -flat.numel() % 8))
    shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) << shifts).sum(1, dtype=torch.uint8)  # distinct powers of two: no carry


def unpack_bits(bits: Tensor, count: int) -> Tensor:
    """The first `count` entries of a mask packed by `pack_bits`, as bool."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.unsqueeze(1) >> shifts) & 1).view(-1)[:count].bool()


def indices_from_bits(bits: Tensor, numel: int, count: int) -> Tensor:
    """Ascending int64 positions of the `count` set bits among the first `numel`; no host sync."""
    return torch.nonzero_static(unpack_bits(bits, numel), size=count).squeeze(1)


def index_bits(indices: Tensor, numel: int) -> Tensor:
    """The bitmap of a set of flat indices into `numel` entries."""
    mask = torch.zeros(numel, dtype=torch.bool, device=indices.device)
    return pack_bits(mask.index_fill_(0, indices.long(), True))


def dense_alpha(values: Tensor, indices: Tensor, forward_mask: Tensor, shape: tuple[int, int]) -> Tensor:
    """The dense forward weight α: values of A scattered at their flat indices, zero elsewhere."""
    weight = values.new_zeros(shape[0] * shape[1])
    weight[indices] = torch.where(forward_mask, values, torch.zeros_like(values))
    return weight.view(shape)


def exploration_weights(forward_mask: Tensor, forward_density: float) -> Tensor:
    """Per-entry weight of the exploration regulariser: 1 on A, 1/D on B\\A (paper, Section 2.2)."""
    return torch.where(forward_mask, 1.0, 1.0 / forward_density)


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast would run a linear layer in on x's device, or None when autocast is off there."""
    device_type = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class SparseLinearFunction(torch.autograd.Function):
    """y = x α^T; dL/dvalues = (dL/dα) gathered at B (straight through for B\\A) plus the regulariser's gradient.

    Without `straight_through` the gradient of B\\A is zero (masked algorithms: pruned
    entries stay zero). `dense_gradient_sink`, when given, receives dL/dα of the whole
    layer, which the backward computes anyway (RigL's growth criterion takes it at an
    update step; the layer does not keep it).

    Under autocast the matmuls run in autocast's dtype, as `F.linear` would (the backward
    runs outside autocast, so it casts explicitly); the value gradient comes back in the
    values' own dtype. `l2_grad_scale` is 2λ divided by the backward passes per optimizer
    step, so that λ·(Σ_A v² + Σ_{B\\A} v²/D) is applied exactly once per step;
    `forward_density` is D, this layer's own.
    """

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, backward_bits: Tensor, forward_bits: Tensor, out_features: int,
                in_features: int, l2_grad_scale: float = 0.0, forward_density: float = 1.0,
                straight_through: bool = True, dense_gradient_sink=None) -> Tensor:
        shape = (out_features, in_features)
        autocast_dtype = _autocast_dtype(x)
        compute_dtype = autocast_dtype or values.dtype
        indices = indices_from_bits(backward_bits, out_features * in_features, values.numel())
        forward_mask = unpack_bits(forward_bits, values.numel())
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(autocast_dtype) if autocast_dtype else x
            y = F.linear(x, dense_alpha(values.to(compute_dtype), indices, forward_mask, shape))
        ctx.save_for_backward(x, values, backward_bits, forward_bits)  # the bitmaps, not the unpacked sets
        ctx.shape, ctx.compute_dtype = shape, compute_dtype
        ctx.l2_grad_scale, ctx.forward_density = l2_grad_scale, forward_density
        ctx.straight_through, ctx.dense_gradient_sink = straight_through, dense_gradient_sink
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, values, backward_bits, forward_bits = ctx.saved_tensors
        indices = indices_from_bits(backward_bits, ctx.shape[0] * ctx.shape[1], values.numel())
        forward_mask = unpack_bits(forward_bits, values.numel())
        grad_out = grad_out.to(ctx.compute_dtype)
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            alpha = dense_alpha(values.to(ctx.compute_dtype), indices, forward_mask, ctx.shape)
            grad_x = grad_out @ alpha
        if ctx.needs_input_grad[1]:
            # (out, in) = (out, tokens) @ (tokens, in); dense-then-gather (DESIGN.md, Section 2).
            grad_weight = grad_out.reshape(-1, ctx.shape[0]).t() @ x.reshape(-1, ctx.shape[1])
            if ctx.dense_gradient_sink is not None:
                ctx.dense_gradient_sink(grad_weight)
            grad_values = grad_weight.reshape(-1).index_select(0, indices)
            if not ctx.straight_through:
                grad_values = torch.where(forward_mask, grad_values, torch.zeros_like(grad_values))
            if ctx.l2_grad_scale:
                grad_values = grad_values.float() + ctx.l2_grad_scale * values.float() * exploration_weights(
                    forward_mask, ctx.forward_density)
            grad_values = grad_values.to(values.dtype)
        return grad_x, grad_values, None, None, None, None, None, None, None, None


class TopKASTLinear(nn.Module):
    """A Linear (or GPT-2 Conv1D) layer trained with Top-KAST on its compact set B.

    `values[i]` is the weight at flat index `indices[i]` of the (out, in) matrix;
    `forward_mask[i]` says whether that entry is in A. Both are unpacked on reading from
    the bitmaps `backward_bits` (n bits) and `forward_bits` (k_B bits), the buffers the
    layer keeps; write them with `assign_sets` / `assign_forward_mask`. Indices are
    ascending, so a position in `values` orders ties the same way as the flat index does.
    `forward_density` is this layer's own D = k_forward / (out * in) (it differs per layer
    under ERK); `accumulation_steps` is how many backward passes make one optimizer step
    (the runtime sets it), so the regulariser's gradient is applied once per step.
    `straight_through` (False for masked algorithms) and `dense_gradient_sink` are passed
    to `SparseLinearFunction`; the runtime sets them.
    """

    def __init__(self, in_features: int, out_features: int, values: Tensor, indices: Tensor,
                 forward_mask: Tensor, bias: nn.Parameter | None, *, k_forward: int,
                 exploration_l2: float = 0.0, source_type: str = "Linear"):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.k_forward = k_forward
        self.exploration_l2 = exploration_l2
        self.accumulation_steps = 1
        self.straight_through = True
        self.dense_gradient_sink = None
        self.source_type = source_type
        self.values = nn.Parameter(values.detach().clone())
        self.bias = bias  # the replaced layer's own Parameter: param groups naming it stay valid
        self.register_buffer("backward_bits", index_bits(indices, in_features * out_features))
        self.register_buffer("forward_bits", pack_bits(forward_mask))
        self.last_exploration_penalty: Tensor | None = None
        self.layer_name = ""  # its name in the model, for error messages (set by sparsify)

    @property
    def k_backward(self) -> int:
        return self.values.ds_numel if hasattr(self.values, "ds_numel") else self.values.numel()

    @property
    def forward_density(self) -> float:
        return self.k_forward / (self.in_features * self.out_features)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def indices(self) -> Tensor:
        """B's ascending flat indices into the (out, in) weight (int64, unpacked from `backward_bits`)."""
        return indices_from_bits(self.backward_bits, self.in_features * self.out_features, self.k_backward)

    @property
    def forward_mask(self) -> Tensor:
        """Which entries of B (in `values` order) are in A (bool, unpacked from `forward_bits`)."""
        return unpack_bits(self.forward_bits, self.k_backward)

    def assign_sets(self, indices: Tensor, forward_mask: Tensor) -> None:
        """Take new sets from a refresh; the caller rewrites `values` to match."""
        device = self.backward_bits.device
        self.backward_bits.copy_(index_bits(indices.to(device), self.in_features * self.out_features))
        self.assign_forward_mask(forward_mask)

    def assign_forward_mask(self, forward_mask: Tensor) -> None:
        """Take a new A (a mask over B), as A's re-selection between refreshes does."""
        self.forward_bits.copy_(pack_bits(forward_mask.to(self.forward_bits.device)))

    def exploration_penalty(self) -> Tensor:
        """λ·(Σ_A v² + Σ_{B\\A} v² / D): the paper's exploration regulariser for this layer (a value, for logs)."""
        with torch.no_grad():
            squares = self.values.float().square()
            return self.exploration_l2 * (squares * exploration_weights(self.forward_mask, self.forward_density)).sum()

    def forward(self, x: Tensor) -> Tensor:
        exploring = self.exploration_l2 > 0 and self.training and torch.is_grad_enabled()
        if exploring:  # for logs only: the gradient is added in backward (values are gathered here under ZeRO-3)
            self.last_exploration_penalty = self.exploration_penalty()
        l2_grad_scale = 2 * self.exploration_l2 / self.accumulation_steps if exploring else 0.0
        y = SparseLinearFunction.apply(x, self.values, self.backward_bits, self.forward_bits, self.out_features,
                                       self.in_features, l2_grad_scale, self.forward_density, self.straight_through,
                                       self.dense_gradient_sink if self.training else None)
        return y if self.bias is None else y + self.bias.to(y.dtype)  # under autocast, as nn.Linear: y's dtype

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Also take a plain dense `weight` (what a sparsified model's save_pretrained writes): the sets stay, the
        values become the weight's entries on B. A dict with the layer's own entries loads as usual."""
        dense = state_dict.pop(prefix + "weight", None)
        if dense is not None and prefix + "values" not in state_dict:
            expected = self.shape[::-1] if self.source_type == "Conv1D" else self.shape
            if tuple(dense.shape) != expected:
                error_msgs.append(f"size mismatch for {prefix}weight: copying a param with shape {tuple(dense.shape)}, "
                                  f"the layer it replaced has shape {expected}.")
                return
            if self.source_type == "Conv1D":
                dense = dense.t()
            state_dict[prefix + "values"] = dense.reshape(-1).to(self.values.device)[self.indices]
            for key in ("backward_bits", "forward_bits"):
                state_dict.setdefault(prefix + key, getattr(self, key))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"k_forward={self.k_forward}, k_backward={self.k_backward}, from={self.source_type}")


def sparse_layers(model: nn.Module) -> dict[str, TopKASTLinear]:
    """The model's Top-KAST layers by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, TopKASTLinear)}


def exploration_penalty(model: nn.Module) -> Tensor | float:
    """The exploration regulariser's value at the model's latest training forward pass, for logging.

    Its gradient is already applied inside each sparse layer's backward: do not add this
    to the loss (it is detached, so doing so changes the logged loss and nothing else).
    """
    penalties = [layer.last_exploration_penalty for layer in sparse_layers(model).values()
                 if layer.last_exploration_penalty is not None]
    return torch.stack(penalties).sum() if penalties else 0.0

