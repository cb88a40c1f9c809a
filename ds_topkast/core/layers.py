"""The sparse layer: a linear map whose weight exists only as the compact values of set B.

Top-KAST (Jayakumar et al. 2020, Section 2): the forward pass uses α = θ on A (zero
elsewhere); the gradient is taken at α and applied to every entry of B ⊇ A, so entries
of B\\A receive the straight-through gradient while contributing nothing to the output.

Here B is held as one fixed-size parameter `values` (k_B entries, trained by DeepSpeed,
in ascending flat-index order) and two bitmaps: which entries of the (out, in) weight are
in B (one bit per weight, with its per-block counts, bitmaps.py) and which entries of B
are in A (one bit per value). That is 0.15 bytes per weight at 80% backward sparsity where
int32 indices and a bool mask took 1.0: replicated on every rank even under ZeRO-3, it
stays below the values' own partitioned bytes up to about 16 ranks (docs/DESIGN.md). The
dense α of this one layer is built from the bitmaps by one fused op for the matmul and
again in backward; it is never saved for backward. The gradient's gather at B and the
exploration regulariser's gradient are one more fused op in the same backward, so every
way of calling backward (`loss.backward()`, `engine.backward`, activation-checkpoint
recompute, the HF Trainer) applies the regulariser exactly once. A step of a sparse layer
dispatches three ops more than the dense layer it replaced, whatever its size
(tests/test_op_counts.py). The layer knows nothing about the dense store or the
optimizer: refresh.py rewrites its sets from outside, between steps.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ds_topkast.core.bitmaps import block_counts, index_bits, indices_from_bits, pack_bits, unpack_bits
from ds_topkast.core.kernels import ops


def exploration_weights(forward_mask: Tensor, forward_density: float) -> Tensor:
    """Per-entry weight of the exploration regulariser: 1 on A, 1/D on B\\A (paper, Section 2.2)."""
    return torch.where(forward_mask, 1.0, 1.0 / forward_density)


def module_layout(matrix: Tensor, source_type: str) -> Tensor:
    """An (out, in) weight in the layout the module type `source_type` stores it, or such a stored weight as (out,
    in): transformers' Conv1D keeps (in, out), every other type (out, in). A transpose is its own inverse."""
    return matrix.t() if source_type == "Conv1D" else matrix


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast would run a linear layer in on x's device, or None when autocast is off there."""
    device_type = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _alpha(values: Tensor, backward_bits: Tensor, counts: Tensor, forward_bits: Tensor, shape: tuple[int, int],
           dtype: torch.dtype) -> Tensor:
    """The dense forward weight α in `dtype`: A's values at their positions, zero elsewhere (one fused op)."""
    return ops.expand_bits(values, backward_bits, counts, forward_bits, 0, shape[0] * shape[1], dtype).view(shape)


class LayerScratch:
    """Two dense buffers per (entries, dtype, device), shared by every sparse layer of that size: α and dL/dα.

    A layer's α and its dense gradient live only inside its own forward or backward (α is
    rebuilt in backward, never saved; the gradient is gathered at B at once) and layers run
    one after another on one stream, so one buffer of each serves them all. Allocated per
    layer and pass instead, they were three layer-sized blocks per layer and step: on the CPU
    accelerator glibc kept the freed ones resident between long-lived blocks (a rank's
    resident memory grew well past the accounting), and every fresh block is page faults on
    the CPU and a caching-allocator call on the host-bound GPU path. memory_report counts
    these buffers (`layer_scratch`). Not used while torch.compile traces (it sees fresh tensors),
    for a backward that builds its own graph (create_graph=True) or for meta tensors. One
    stream and one thread per device run sparse layers at a time, as in training.
    """

    def __init__(self):
        self._buffers: dict[tuple[str, int, torch.dtype, torch.device], Tensor] = {}
        self._views: dict[tuple[str, tuple[int, int], torch.dtype, torch.device], Tensor] = {}

    def buffer(self, role: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """The `role` buffer for layers of shape's size, viewed as `shape` (the view is kept too: no op per call)."""
        view_key = (role, shape, dtype, device)
        if view_key not in self._views:
            key = (role, shape[0] * shape[1], dtype, device)
            if key not in self._buffers:
                with torch.inference_mode(False):  # an ordinary tensor even if the first pass is an inference one
                    self._buffers[key] = torch.empty(shape[0] * shape[1], dtype=dtype, device=device)
            self._views[view_key] = self._buffers[key].view(shape)
        return self._views[view_key]

    def nbytes(self, device: torch.device | None = None) -> int:
        """Bytes the buffers hold (on `device`, or on every device)."""
        return sum(b.numel() * b.element_size() for (_, _, _, d), b in self._buffers.items()
                   if device is None or d == device)

    def clear(self) -> None:
        """Free every buffer (the next pass allocates again): after training, or to measure without them."""
        self._buffers.clear()
        self._views.clear()


layer_scratch = LayerScratch()


def _shared(tensor: Tensor) -> bool:
    """Whether LayerScratch's buffers may serve this pass: not while torch.compile traces, not when autograd records
    the pass (a backward with create_graph=True: out= cannot be differentiated), not for meta tensors."""
    return not (torch.compiler.is_compiling() or torch.is_grad_enabled() or tensor.device.type == "meta")


def _scratch_alpha(values: Tensor, backward_bits: Tensor, counts: Tensor, forward_bits: Tensor,
                   shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """α built into the shared α buffer (a fresh tensor where the buffer cannot serve, `_shared`)."""
    if not _shared(values):
        return _alpha(values, backward_bits, counts, forward_bits, shape, dtype)
    out = layer_scratch.buffer("alpha", shape, dtype, values.device)
    ops.expand_bits_into_(out, values, backward_bits, counts, forward_bits, 0)
    return out


def _scratch_weight_gradient(flat_grad_out: Tensor, x: Tensor, shape: tuple[int, int]) -> Tensor:
    """dL/dα = grad_out^T x, (out, in), into the shared gradient buffer (fresh where it cannot serve, `_shared`)."""
    x = x.reshape(-1, shape[1])
    if not _shared(x):
        return flat_grad_out.t() @ x
    return torch.mm(flat_grad_out.t(), x, out=layer_scratch.buffer("weight_gradient", shape, x.dtype, x.device))


def alpha_from_sets(values: Tensor, backward_bits: Tensor, forward_bits: Tensor, shape: tuple[int, int]) -> Tensor:
    """α of a layer from its values and set bitmaps (as its state dict holds them), in the values' dtype, on their
    device."""
    backward_bits, forward_bits = backward_bits.to(values.device), forward_bits.to(values.device)
    counts = block_counts(backward_bits, shape[0] * shape[1])
    return _alpha(values.reshape(-1), backward_bits, counts, forward_bits, shape, values.dtype)


class SparseLinearFunction(torch.autograd.Function):
    """y = x α^T + b; dL/dvalues = (dL/dα) gathered at B (straight through for B\\A) plus the regulariser's gradient.

    α is built from the bitmaps by one fused op in forward and again in backward (it is
    never saved: one layer's dense weight at a time, in LayerScratch's shared buffer, as is
    dL/dα); the gather of dL/dα at B, with the regulariser's gradient added, is one more. The bias goes into the matmul.
    Without `straight_through` the gradient of B\\A is zero (masked algorithms: pruned
    entries stay zero). `dense_gradient_sink`, when given, receives dL/dα of the whole
    layer, which the backward computes anyway (RigL's growth criterion takes it at an
    update step; the layer does not keep it, and neither may the sink: it is the shared buffer).

    Under autocast the matmuls run in autocast's dtype, as `F.linear` would: the input and
    bias are cast to it and α is built in it, so autocast itself has nothing left to cast
    (the backward runs outside autocast and uses the same dtype); the value gradient comes
    back in the values' own dtype. `l2_grad_scale` is 2λ divided by the backward passes
    per optimizer step, so that λ·(Σ_A v² + Σ_{B\\A} v²/D) is applied exactly once per step;
    `forward_density` is D, this layer's own.
    """

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, bias: Tensor | None, backward_bits: Tensor, counts: Tensor,
                forward_bits: Tensor, out_features: int, in_features: int, l2_grad_scale: float = 0.0,
                forward_density: float = 1.0, straight_through: bool = True, dense_gradient_sink=None) -> Tensor:
        shape = (out_features, in_features)
        compute_dtype = _autocast_dtype(x) or values.dtype
        x = x.to(compute_dtype)
        # aten's linear (addmm with the bias), not F.linear: DeepSpeed's zero.Init replaces F.linear for the rest of
        # the process with its own autograd function, which splits the bias add from the matmul.
        y = torch.ops.aten.linear(x, _scratch_alpha(values, backward_bits, counts, forward_bits, shape, compute_dtype),
                                  None if bias is None else bias.to(compute_dtype))
        ctx.save_for_backward(x, values, backward_bits, counts, forward_bits)  # the bitmaps, not α
        ctx.shape, ctx.compute_dtype = shape, compute_dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.l2_grad_scale, ctx.forward_density = l2_grad_scale, forward_density
        ctx.straight_through, ctx.dense_gradient_sink = straight_through, dense_gradient_sink
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, values, backward_bits, counts, forward_bits = ctx.saved_tensors
        grad_out = grad_out.to(ctx.compute_dtype)
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ _scratch_alpha(values, backward_bits, counts, forward_bits, ctx.shape,
                                               ctx.compute_dtype)
        flat_grad_out = grad_out.reshape(-1, ctx.shape[0])
        if ctx.needs_input_grad[1]:
            # (out, in) = (out, tokens) @ (tokens, in); dense-then-gather (DESIGN.md, Section 2).
            grad_weight = _scratch_weight_gradient(flat_grad_out, x, ctx.shape)
            if ctx.dense_gradient_sink is not None:
                ctx.dense_gradient_sink(grad_weight)
            grad_values = torch.empty_like(values)
            needs_sets = bool(ctx.l2_grad_scale) or not ctx.straight_through
            ops.gather_bits_(grad_values, grad_weight.view(-1), backward_bits, counts, 0,
                             forward_bits if needs_sets else None, values, ctx.l2_grad_scale,
                             1.0 / ctx.forward_density, ctx.straight_through)
        if ctx.needs_input_grad[2]:
            grad_bias = flat_grad_out.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_values, grad_bias, None, None, None, None, None, None, None, None, None


class TopKASTLinear(nn.Module):
    """A Linear (or GPT-2 Conv1D) layer trained with Top-KAST on its compact set B.

    `values[i]` is the weight at the i-th set bit of `backward_bits` (n bits over the
    (out, in) matrix, so `values` is in ascending flat-index order and a position in it
    orders ties as the flat index does); bit i of `forward_bits` (k_B bits) says whether
    that entry is in A. `block_counts` are the bitmap's per-block counts (bitmaps.py),
    rebuilt whenever B changes; `indices` and `forward_mask` unpack the sets for reading.
    Write the sets with `assign_sets` (bitmaps) or `assign_forward_bits`.
    `forward_density` is this layer's own D = k_forward / (out * in) (it differs per layer
    under ERK); `accumulation_steps` is how many backward passes make one optimizer step
    (the runtime sets it), so the regulariser's gradient is applied once per step.
    `straight_through` (False for masked algorithms: B\\A gets no gradient) is fixed at
    construction; `dense_gradient_sink` (RigL's dense gradient hand-over) is set by the
    runtime at update steps. `layer_name` is its name in the model, for error messages.
    """

    def __init__(self, in_features: int, out_features: int, values: Tensor, backward_bits: Tensor,
                 forward_bits: Tensor, bias: nn.Parameter | None, *, k_forward: int,
                 exploration_l2: float = 0.0, source_type: str = "Linear", layer_name: str = "",
                 straight_through: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.k_forward = k_forward
        self.exploration_l2 = exploration_l2
        self.accumulation_steps = 1
        self.straight_through = straight_through
        self.dense_gradient_sink = None
        self.source_type = source_type
        self.values = nn.Parameter(values.detach().clone())
        self.k_backward = self.values.numel()  # |B|, fixed; under ZeRO-3 `values` holds only this rank's partition
        self.bias = bias  # the replaced layer's own Parameter: param groups naming it stay valid
        self.register_buffer("backward_bits", backward_bits.detach().clone())
        self.register_buffer("forward_bits", forward_bits.detach().clone())
        self.register_buffer("_block_counts", block_counts(self.backward_bits, self.numel), persistent=False)
        self._counted = self._bitmap_version()
        self.layer_name = layer_name
        self.saves_plain = True  # state_dict() gives the replaced layer's `weight`; False while checkpoints save
        self.register_state_dict_post_hook(_state_dict_as_plain)

    @classmethod
    def from_indices(cls, in_features: int, out_features: int, values: Tensor, indices: Tensor,
                     forward_mask: Tensor, bias: nn.Parameter | None = None, **kwargs) -> "TopKASTLinear":
        """A layer whose B is given as flat indices (ascending, one per value) and A as a mask over them."""
        return cls(in_features, out_features, values, index_bits(indices, in_features * out_features),
                   pack_bits(forward_mask), bias, **kwargs)

    @property
    def numel(self) -> int:
        """Entries of the dense (out, in) weight."""
        return self.in_features * self.out_features

    @property
    def forward_density(self) -> float:
        return self.k_forward / self.numel

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def indices(self) -> Tensor:
        """B's ascending flat indices into the (out, in) weight (int64, unpacked from `backward_bits`)."""
        return indices_from_bits(self.backward_bits, self.numel, self.k_backward)

    @property
    def forward_mask(self) -> Tensor:
        """Which entries of B (in `values` order) are in A (bool, unpacked from `forward_bits`)."""
        return unpack_bits(self.forward_bits, self.k_backward)

    def _bitmap_version(self) -> tuple[int, int]:
        return self.backward_bits.data_ptr(), self.backward_bits._version

    @property
    def block_counts(self) -> Tensor:
        """`backward_bits`' per-block counts, rebuilt if the bitmap changed behind `assign_sets` (a copy into it,
        a move to another device): a check of the tensor's address and version counter, no device work."""
        if self._counted != self._bitmap_version() or self._block_counts.device != self.backward_bits.device:
            self._block_counts = block_counts(self.backward_bits, self.numel)
            self._counted = self._bitmap_version()
        return self._block_counts

    def assign_sets(self, backward_bits: Tensor, forward_bits: Tensor, counts: Tensor | None = None,
                    k_forward: int | None = None) -> None:
        """Take new sets (bitmaps) from a refresh; the caller rewrites `values` to match. `counts`, when given, are
        the new bitmap's block counts (else they are computed); `k_forward`, when given, is A's new size (gmp's
        changes on its schedule)."""
        if k_forward is not None:
            self.k_forward = k_forward
        self.backward_bits.copy_(backward_bits)
        self._block_counts = block_counts(self.backward_bits, self.numel) if counts is None else counts
        self._counted = self._bitmap_version()
        self.assign_forward_bits(forward_bits)

    def assign_indices(self, indices: Tensor, forward_mask: Tensor) -> None:
        """Take new sets given as B's flat indices and A as a mask over them (A's size is the mask's count)."""
        device = self.backward_bits.device
        self.assign_sets(index_bits(indices.to(device), self.numel), pack_bits(forward_mask.to(device)),
                         k_forward=int(forward_mask.sum()))

    def assign_forward_bits(self, forward_bits: Tensor) -> None:
        """Take a new A (k_B bits over B), as A's re-selection between refreshes does."""
        self.forward_bits.copy_(forward_bits)

    def exploration_penalty(self) -> Tensor:
        """λ·(Σ_A v² + Σ_{B\\A} v² / D) at the current values: the paper's exploration regulariser for this layer (a
        value, for logs). The values must be whole: under ZeRO-3 inside a gather (runtime/regulariser.py)."""
        with torch.no_grad():
            squares = self.values.float().square()
            return self.exploration_l2 * (squares * exploration_weights(self.forward_mask, self.forward_density)).sum()

    def forward(self, x: Tensor) -> Tensor:
        exploring = self.exploration_l2 > 0 and self.training and torch.is_grad_enabled()
        l2_grad_scale = 2 * self.exploration_l2 / self.accumulation_steps if exploring else 0.0
        return SparseLinearFunction.apply(x, self.values, self.bias, self.backward_bits, self.block_counts,
                                          self.forward_bits, self.out_features, self.in_features, l2_grad_scale,
                                          self.forward_density, self.straight_through,
                                          self.dense_gradient_sink if self.training else None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Also take a plain dense `weight` (what a sparsified model's save_pretrained writes): the sets stay, the
        values become the weight's entries on B. A dict with the layer's own entries loads as usual."""
        dense = state_dict.pop(prefix + "weight", None)
        if dense is not None and prefix + "values" not in state_dict:
            expected = self.plain_shape
            if tuple(dense.shape) != expected:
                error_msgs.append(f"size mismatch for {prefix}weight: copying a param with shape {tuple(dense.shape)}, "
                                  f"the layer it replaced has shape {expected}.")
                return
            dense = module_layout(dense, self.source_type)
            state_dict[prefix + "values"] = dense.reshape(-1).to(self.values.device)[self.indices]
            for key in ("backward_bits", "forward_bits"):
                state_dict.setdefault(prefix + key, getattr(self, key))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.block_counts  # the bitmap may have been loaded: recount now, not at the next forward

    @property
    def plain_shape(self) -> tuple[int, int]:
        """The shape of the replaced module's weight: (out, in), Conv1D's (in, out)."""
        return self.shape[::-1] if self.source_type == "Conv1D" else self.shape

    def make_entries_plain(self, state_dict: dict, prefix: str) -> None:
        """Replace this layer's sparse entries of `state_dict` (`prefix` + SPARSE_ENTRIES) by the replaced module's
        `weight`: α, built on the host (never dense on the accelerator), in that module's layout, before `bias`."""
        values, backward_bits, forward_bits = (state_dict.pop(prefix + key).detach().cpu() for key in SPARSE_ENTRIES)
        weight = alpha_from_sets(values, backward_bits, forward_bits, self.shape)
        bias = state_dict.pop(prefix + "bias", None)
        state_dict[prefix + "weight"] = module_layout(weight, self.source_type).contiguous()
        if bias is not None:
            state_dict[prefix + "bias"] = bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"k_forward={self.k_forward}, k_backward={self.k_backward}, from={self.source_type}")


SPARSE_ENTRIES = ("values", "backward_bits", "forward_bits")  # a layer's state-dict entries in the sparse form


def _state_dict_as_plain(layer: TopKASTLinear, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """The layer's state-dict entries as the layer it replaced has them: `weight` (α, on the host) and `bias`.

    So that `model.state_dict()`, `torch.save` of it and everything built on it give the
    plain model. Left sparse: while a checkpoint saves (`saves_plain` False, see
    ds_topkast.convert.plain_save.state_dict_form), with `keep_vars=True` (the caller wants the
    module's own tensors), and under ZeRO-3 outside `GatheredParameters`, where the values
    are partitions that make no weight (a warning names the calls that gather and convert).
    """
    values = state_dict.get(prefix + "values")
    if not layer.saves_plain or values is None or isinstance(values, nn.Parameter):
        return
    if values.numel() != layer.k_backward:  # a ZeRO-3 partition outside GatheredParameters: empty, as DeepSpeed's
        warnings.warn(
            f"state_dict() of a ZeRO-3 partitioned Top-KAST model holds each rank's partitions, not the model (as "
            f"DeepSpeed's does for any partitioned parameter; {prefix}values is one). To save the plain model call "
            "ds_topkast.plain_state_dict(engine) or engine.save_16bit_model(dir) on every rank.", stacklevel=3)
        return
    layer.make_entries_plain(state_dict, prefix)


def sparse_layers(model: nn.Module) -> dict[str, TopKASTLinear]:
    """The model's Top-KAST layers by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, TopKASTLinear)}
