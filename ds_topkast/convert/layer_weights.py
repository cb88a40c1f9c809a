"""Where a layer's full weight comes from while `sparsify` converts it, one layer at a time.

The module itself (a model built in memory); the model's own initialiser (a model on the
meta device, meta_init.py); DeepSpeed's gather (a model built under `deepspeed.zero.Init`,
parallel/zero3.py); or safetensors files (`pretrained=`, pretrained.py). Whatever the source,
the caller sees the layer's (out, in) weight for the duration of a `with` block, and only
one layer's is ever held. Weights are (out, in) matrices here whatever the module's own
layout: transformers' Conv1D stores (in, out).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn

from ds_topkast.config import TopKASTConfig, TopKASTConfigError
from ds_topkast.convert.meta_init import MetaMaterializer, is_meta, meta_tensor_names
from ds_topkast.convert.pretrained import SafetensorsCheckpoint
from ds_topkast.core.layers import TopKASTLinear, module_layout
from ds_topkast.parallel.zero3 import full_shape, gathered, is_partitioned, partition_like


def _layout_type(module: nn.Module) -> str:
    return "Linear" if isinstance(module, nn.Linear) else "Conv1D"


def linear_weight(module: nn.Module) -> Tensor:
    """The weight as an (out, in) matrix: Conv1D stores it transposed (in, out)."""
    return module_layout(module.weight, _layout_type(module))


def in_module_layout(module: nn.Module, matrix: Tensor) -> Tensor:
    """An (out, in) matrix laid out as `module` stores its weight: the inverse of `linear_weight`."""
    return module_layout(matrix, _layout_type(module))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a Linear or Conv1D, also when its weight is partitioned by ZeRO-3 or on the meta device."""
    shape = full_shape(module.weight)
    return shape if isinstance(module, nn.Linear) else shape[::-1]


class LayerWeights:
    """Where each layer's full weight comes from while it is sparsified, one layer at a time.

    Pretrained safetensors files (when given), the model's own initialiser for a model on
    the meta device, DeepSpeed's gather for a model built under zero.Init, else the
    module itself. `finish_rest` gives the modules that stay dense their weights.
    """

    def __init__(self, model: nn.Module, cfg: TopKASTConfig, pretrained: str | os.PathLike | None):
        self.model = model
        self.checkpoint = SafetensorsCheckpoint(pretrained) if pretrained is not None else None
        self.materializer = MetaMaterializer(model, cfg.seed)
        if self.checkpoint is not None and any(is_partitioned(p) for p in model.parameters()):
            raise TopKASTConfigError(
                "pretrained= loads weights into a model built in memory or on the meta device, but this model was "
                "built under deepspeed.zero.Init; load its weights there (from_pretrained does) and sparsify it "
                "without pretrained=.")

    @contextmanager
    def full(self, name: str, module: nn.Module) -> Iterator[Tensor]:
        """The layer's (out, in) weight in full for the block; only one layer's is ever held."""
        if self.checkpoint is not None:
            if module.bias is not None:
                self.checkpoint.load_into(self.model, [f"{name}.bias"])
            yield in_module_layout(module, self.checkpoint.tensor(f"{name}.weight", module.weight.shape))
        elif is_meta(module.weight):
            self.materializer.materialize(name, module)
            yield linear_weight(module)
            module._parameters["weight"] = _meta_placeholder(module.weight)  # frees the layer's full weight
        elif is_partitioned(module.weight):
            with gathered(module):
                yield linear_weight(module)
        else:
            yield linear_weight(module)

    def finish_layer(self, replaced: nn.Parameter, layer: TopKASTLinear) -> None:
        """Under zero.Init, partition the new compact values as the weight they replace was."""
        if is_partitioned(replaced):
            partition_like(replaced, [layer.values])

    def finish_rest(self, chosen: Mapping[str, nn.Module]) -> None:
        """Load or initialise whatever the sparsified layers did not cover; nothing may stay on the meta device."""
        if self.checkpoint is not None:
            skip = {f"{name}.{key}" for name in chosen for key in ("weight", "bias")}
            self.checkpoint.load_into(self.model, [k for k in self.model.state_dict(keep_vars=True) if k not in skip])
        else:
            self.materializer.materialize_rest(skip=chosen)
        left = [n for n in meta_tensor_names(self.model) if n.rpartition(".")[0] not in chosen]
        if left:
            raise TopKASTConfigError(f"{left} are still on the meta device after sparsify; give them values (load or "
                                     "initialise the model) before training.")


def _meta_placeholder(param: nn.Parameter) -> nn.Parameter:
    placeholder = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"), requires_grad=False)
    placeholder._is_hf_initialized = True
    return placeholder
