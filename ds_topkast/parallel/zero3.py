"""Sparsify a model built under `deepspeed.zero.Init`: its weights are already partitioned across ranks.

DeepSpeed's convention for large models (and what `from_pretrained` / `from_config` do
under a ZeRO-3 `TrainingArguments`) builds every parameter partitioned: each rank holds
1/world of it. `sparsify` gathers one layer's weight at a time (DeepSpeed's
`GatheredParameters`), keeps this rank's store shard, and partitions the new compact
values with the same `zero.Init` settings as the weight they replace, so no rank ever
holds more than one layer in full. This module and engine/optimizer_adapters.py are where
ds_topkast touches DeepSpeed's ZeRO-3 parameters.
"""
from __future__ import annotations

import contextvars
import warnings
from contextlib import contextmanager
from typing import Iterator

from torch import nn

_quiet = contextvars.ContextVar("ds_topkast_quiet_gathers", default=False)


def is_partitioned(param: nn.Parameter | None) -> bool:
    """Whether `param` was partitioned by `deepspeed.zero.Init` (ZeRO-3)."""
    return param is not None and hasattr(param, "ds_id")


def full_shape(param: nn.Parameter) -> tuple[int, ...]:
    """A parameter's whole shape, also when ZeRO-3 holds only this rank's partition of it."""
    return tuple(getattr(param, "ds_shape", param.shape))


def full_numel(param: nn.Parameter) -> int:
    """A parameter's whole number of entries, also when ZeRO-3 holds only this rank's partition of it."""
    return getattr(param, "ds_numel", param.numel())


def partition_group(model: nn.Module):
    """The process group ZeRO-3 partitioned the model's parameters over (None, the job's, when none is partitioned)."""
    return next((getattr(p, "ds_process_group", None) for p in model.parameters() if is_partitioned(p)), None)


@contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """The module's own parameters in full on every rank inside the block, partitioned again after it."""
    import deepspeed

    with quiet_gathers(), deepspeed.zero.GatheredParameters(list(module.parameters(recurse=False)),
                                                            modifier_rank=None):
        yield


@contextmanager
def quiet_gathers() -> Iterator[None]:
    """Gathers of Top-KAST values inside the block are ds_topkast's or DeepSpeed's own: no warning (see below)."""
    token = _quiet.set(True)
    try:
        yield
    finally:
        _quiet.reset(token)


def warn_when_gathered_by_hand(name: str, values: nn.Parameter) -> None:
    """Warn when a user's `deepspeed.zero.GatheredParameters` gathers a Top-KAST layer's values (ZeRO-3).

    The usual ZeRO-3 save of a custom loop gathers `named_parameters()` one by one and
    saves them; for a sparse layer that is B's values without their positions, a file that
    is not the model and cannot be made into it, so the warning names the calls that save
    the plain model. DeepSpeed's GatheredParameters is the one caller of a parameter's
    `all_gather` that passes `param_list=` (its own fetches, persistent parameters and
    checkpoint hooks do not), which is what tells a user's gather from DeepSpeed's.
    """
    gather = values.all_gather

    def all_gather(*args, **kwargs):
        if "param_list" in kwargs and not _quiet.get():
            warnings.warn(f"{name}.values was gathered by hand (deepspeed.zero.GatheredParameters): a Top-KAST layer's "
                          "values are B's entries without their positions, so saving gathered parameters does not "
                          "save the model. Save the plain model with ds_topkast.plain_state_dict(engine) or "
                          "engine.save_16bit_model(dir), on every rank.", stacklevel=3)
        return gather(*args, **kwargs)

    values.all_gather = all_gather


def forget_partitions(module: nn.Module) -> None:
    """Drop what ZeRO-3 keeps in a module whose parameters were made whole (export): its `_parameters` dict type
    and its references to the partitioned parameters, which would hold them in accelerator memory."""
    module._parameters = dict(module._parameters)
    module.__dict__.pop("_original_parameters", None)
    getattr(module, "_external_params", {}).clear()


def partition_like(template: nn.Parameter, params: list[nn.Parameter]) -> None:
    """Partition `params` with the `zero.Init` settings (device, process group) that partitioned `template`."""
    template.convert_to_zero_parameters(param_list=params)
