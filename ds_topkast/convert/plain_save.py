"""A sparsified model saves as the plain model it computes, so `from_pretrained` loads it with no ds_topkast.

Every way a user saves gives the plain model: each Top-KAST layer's state-dict entries
become the `weight` of the layer it replaced (α: A's values at their positions, zeros
elsewhere, in the replaced layer's layout, Conv1D's (in, out) too, and the values' dtype):
- `model.state_dict()` itself (each layer's state-dict hook, layers.py), so `torch.save`
  of it, DDP's and accelerate's `state_dict()` and `engine.save_16bit_model()` at ZeRO 0-2;
- `save_pretrained` (made to convert the dict it is given, which may be one the caller
  gathered: the Trainer under ZeRO-3 passes DeepSpeed's consolidated 16-bit one), so the
  Trainer's `save_model` and the model files of each `checkpoint-N/`;
- `plain_state_dict(engine_or_model)` at any stage, and under ZeRO-3 DeepSpeed's
  consolidated 16-bit state dict (engine/deepspeed_engine.py).

Checkpoints that resume a run keep the sparse form (values, bitmaps): DeepSpeed's
`save_checkpoint`, the Trainer's and accelerate's `save_state` take the module's state
dict inside `state_dict_form(model, plain=False)`. The rest of the sparse state (the dense
store, the sets' history) is in `topkast_rankN.pt`. Loading a plain state dict back into a
sparsified model keeps each layer's sets and takes the weight's entries on B
(`TopKASTLinear._load_from_state_dict`): B's entries outside A come back as zeros, which
is why checkpoints do not use it.
"""
from __future__ import annotations

import types
from contextlib import contextmanager, nullcontext
from typing import Iterator

from torch import Tensor, nn

from ds_topkast.core.layers import SPARSE_ENTRIES, sparse_layers
from ds_topkast.parallel.collectives import require_every_rank
from ds_topkast.parallel.zero3 import gathered, is_partitioned, partition_group


@contextmanager
def state_dict_form(model: nn.Module, plain: bool) -> Iterator[None]:
    """Inside the block the model's Top-KAST layers give state-dict entries in the form asked: `plain` (the
    replaced layer's `weight`, as outside any block) or sparse (values and bitmaps, what checkpoints save so that a
    run resumes exactly). The form before the block comes back after it."""
    layers = list(sparse_layers(model).values())
    before = [layer.saves_plain for layer in layers]
    for layer in layers:
        layer.saves_plain = plain
    try:
        yield
    finally:
        for layer, form in zip(layers, before):
            layer.saves_plain = form


def as_plain(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state_dict` with every Top-KAST layer's entries replaced by the plain `weight` of the layer it replaced.

    Layers whose values the dict lacks (DeepSpeed's empty dict under ZeRO-3 without
    gathering) are left out, as the dense model's weights would be; a dict that is plain
    already comes back as it is.
    """
    plain = dict(state_dict)
    for name, layer in sparse_layers(model).items():
        prefix = f"{name}." if name else ""
        if not all(prefix + key in plain for key in SPARSE_ENTRIES):
            continue
        held = plain[prefix + "values"].numel()
        if held != layer.k_backward:
            raise ValueError(f"{prefix}values holds {held} of the layer's {layer.k_backward} values: a ZeRO-3 "
                             "partition, which makes no weight. Take the state dict with "
                             "ds_topkast.plain_state_dict(engine) or engine.save_16bit_model(dir) on every rank.")
        layer.make_entries_plain(plain, prefix)
    return plain


def unwrapped(engine_or_model: nn.Module) -> nn.Module:
    """The model inside a DeepSpeed engine or DDP wrapper (or the model itself)."""
    model = engine_or_model
    while isinstance(getattr(model, "module", None), nn.Module):  # DeepSpeedEngine, DistributedDataParallel
        model = model.module
    return model


def writes_on_this_rank() -> bool:
    """Whether this rank writes what every rank gathers: rank 0, or the only process."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def plain_state_dict(engine_or_model: nn.Module) -> dict[str, Tensor]:
    """The state dict of the plain model a sparsified model (or a DeepSpeed engine or DDP wrapper of one) computes:
    each Top-KAST layer's `weight` (α, in the layout of the layer it replaced) in place of its values and bitmaps,
    every other entry as the model's own `state_dict()` has it, on the host.

    Under ZeRO-3 it is a collective (every rank calls it): the model is gathered one module
    at a time and rank 0 gets the whole dict, the other ranks an empty one.
    """
    model = unwrapped(engine_or_model)
    if not any(is_partitioned(p) for p in model.parameters()):
        with state_dict_form(model, plain=True):
            return {key: value.detach().cpu() for key, value in model.state_dict().items()}
    require_every_rank("plain_state_dict", "Call it on every rank and write on rank 0 only: state = "
                       "ds_topkast.plain_state_dict(engine); then if rank == 0: torch.save(state, path).",
                       partition_group(model))
    keep = writes_on_this_rank()
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
    """The model's own save_pretrained, given the plain state dict (see ds_topkast.convert.plain_save). On a rank that does
    not write (`is_main_process=False`, as accelerate's and the Trainer's other ranks call it; their state dict is
    None or partitions under ZeRO-3) nothing is converted."""
    if not kwargs.get("is_main_process", True):  # writes nothing: the sparse form costs nothing and warns of nothing
        with state_dict_form(self, plain=False):
            return type(self).save_pretrained(self, save_directory, *args, state_dict=state_dict, **kwargs)
    state_dict = as_plain(self, self.state_dict() if state_dict is None else state_dict)
    return type(self).save_pretrained(self, save_directory, *args, state_dict=state_dict, **kwargs)


def save_plain(model: nn.Module) -> None:
    """Make `model.save_pretrained` (a Hugging Face model's) write the plain model; other models are left as they are."""
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = types.MethodType(_save_pretrained_plain, model)


def stop_saving_plain(model: nn.Module) -> None:
    """Give the model back its class's own save_pretrained (after `export`, nothing is sparse)."""
    model.__dict__.pop("save_pretrained", None)
