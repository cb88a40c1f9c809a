"""A sparsified model saves as the plain model it computes, so `from_pretrained` loads it with no ds_topkast.

`sparsify` gives a Hugging Face model a `save_pretrained` that turns each Top-KAST layer's
entries of the state dict (values, set bitmaps) into the weight of the layer it replaced:
α, A's values at their positions and zeros elsewhere, in the replaced layer's layout
(Conv1D's (in, out) too) and the values' dtype. Everything that saves the model through
`save_pretrained` therefore writes an ordinary checkpoint: the Trainer's `save_model`, the
model files of each `checkpoint-N/`, a user's own call. The state dict may be the model's
own or one the caller gathered (the Trainer under ZeRO-3 passes DeepSpeed's consolidated
16-bit one): only its tensors are read, so partitioned parameters do not matter.

The sparse state itself (B's values outside A, the sets, the dense store, the optimizer)
is not in these files: checkpoints keep it in DeepSpeed's files and `topkast_rankN.pt`.
Loading a plain state dict back into a sparsified model (what the Trainer does when it
resumes without DeepSpeed) keeps each layer's sets and takes the weight's entries on B
(`TopKASTLinear._load_from_state_dict`); the callback then restores the saved values.
"""
from __future__ import annotations

import types
from contextlib import nullcontext

from torch import Tensor, nn

from ds_topkast.layers import TopKASTLinear, alpha_from_sets, sparse_layers
from ds_topkast.zero_init import gathered, is_partitioned


def plain_weight(layer: TopKASTLinear, values: Tensor, backward_bits: Tensor, forward_bits: Tensor) -> Tensor:
    """α of one layer from its state-dict entries, in the layout of the module it replaced."""
    weight = alpha_from_sets(values, backward_bits, forward_bits, layer.shape)
    return weight.t().contiguous() if layer.source_type == "Conv1D" else weight


def as_plain(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state_dict` with every Top-KAST layer's entries replaced by the plain `weight` of the layer it replaced.

    Layers whose values the dict lacks (DeepSpeed's empty dict under ZeRO-3 without
    gathering) are left out, as the dense model's weights would be.
    """
    plain = dict(state_dict)
    for name, layer in sparse_layers(model).items():
        prefix = f"{name}." if name else ""
        entries = [plain.pop(prefix + key, None) for key in ("values", "backward_bits", "forward_bits")]
        if all(entry is not None for entry in entries):  # built on the host: never a dense copy on the accelerator
            plain[prefix + "weight"] = plain_weight(layer, *(entry.detach().cpu() for entry in entries))
    return plain


def plain_state_dict(engine_or_model: nn.Module) -> dict[str, Tensor]:
    """The state dict of the plain model a sparsified model (or a DeepSpeed engine or DDP wrapper of one) computes:
    each Top-KAST layer's `weight` (α, in the layout of the layer it replaced) in place of its values and bitmaps,
    every other entry as the model's own `state_dict()` has it, on the host.

    Under ZeRO-3 it is a collective (every rank calls it): the model is gathered one module
    at a time and rank 0 gets the whole dict, the other ranks an empty one.
    """
    model = engine_or_model
    while isinstance(getattr(model, "module", None), nn.Module):  # DeepSpeedEngine, DistributedDataParallel
        model = model.module
    if not any(is_partitioned(p) for p in model.parameters()):
        return as_plain(model, {key: value.detach().cpu() for key, value in model.state_dict().items()})
    import torch.distributed as dist

    keep = not dist.is_initialized() or dist.get_rank() == 0
    state: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        own = list(module.parameters(recurse=False))
        with gathered(module) if any(is_partitioned(p) for p in own) else nullcontext():
            if keep:
                entries = [*module.named_parameters(recurse=False), *(
                    (key, b) for key, b in module.named_buffers(recurse=False)
                    if key not in module._non_persistent_buffers_set)]
                state.update({prefix + key: tensor.detach().cpu().clone() for key, tensor in entries})
    return as_plain(model, state) if keep else {}


def _save_pretrained_plain(self, save_directory, *args, state_dict=None, **kwargs):
    """The model's own save_pretrained, given the plain state dict (see ds_topkast.plain_save)."""
    state_dict = self.state_dict() if state_dict is None else state_dict
    return type(self).save_pretrained(self, save_directory, *args, state_dict=as_plain(self, state_dict),
                                      **kwargs)


def save_plain(model: nn.Module) -> None:
    """Make `model.save_pretrained` (a Hugging Face model's) write the plain model; other models are left as they are."""
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = types.MethodType(_save_pretrained_plain, model)


def stop_saving_plain(model: nn.Module) -> None:
    """Give the model back its class's own save_pretrained (after `export`, nothing is sparse)."""
    model.__dict__.pop("save_pretrained", None)
