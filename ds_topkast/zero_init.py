"""Sparsify a model built under `deepspeed.zero.Init`: its weights are already partitioned across ranks.

DeepSpeed's convention for large models (and what `from_pretrained` / `from_config` do
under a ZeRO-3 `TrainingArguments`) builds every parameter partitioned: each rank holds
1/world of it. `sparsify` gathers one layer's weight at a time (DeepSpeed's
`GatheredParameters`), keeps this rank's store shard, and partitions the new compact
values with the same `zero.Init` settings as the weight they replace, so no rank ever
holds more than one layer in full. This module and optimizer_state.py are where
ds_topkast touches DeepSpeed's ZeRO-3 parameters.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


def is_partitioned(param: nn.Parameter | None) -> bool:
    """Whether `param` was partitioned by `deepspeed.zero.Init` (ZeRO-3)."""
    return param is not None and hasattr(param, "ds_id")


def partition_group(model: nn.Module):
    """The process group ZeRO-3 partitioned the model's parameters over (None, the job's, when none is partitioned)."""
    return next((getattr(p, "ds_process_group", None) for p in model.parameters() if is_partitioned(p)), None)


@contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """The module's own parameters in full on every rank inside the block, partitioned again after it."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters(recurse=False)), modifier_rank=None):
        yield


def forget_partitions(module: nn.Module) -> None:
    """Drop what ZeRO-3 keeps in a module whose parameters were made whole (export): its `_parameters` dict type
    and its references to the partitioned parameters, which would hold them in accelerator memory."""
    module._parameters = dict(module._parameters)
    module.__dict__.pop("_original_parameters", None)
    getattr(module, "_external_params", {}).clear()


def partition_like(template: nn.Parameter, params: list[nn.Parameter]) -> None:
    """Partition `params` with the `zero.Init` settings (device, process group) that partitioned `template`."""
    template.convert_to_zero_parameters(param_list=params)
