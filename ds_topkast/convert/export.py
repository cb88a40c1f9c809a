"""`ds_topkast.export`: give a trained model back its own architecture with plain dense weights.

    model = ds_topkast.export(engine)                    # α: what the sparse model computes
    model = ds_topkast.export(engine, weights="theta")   # θ: the dense store with B's latest values

Every TopKASTLinear becomes the module it replaced (nn.Linear, or transformers' Conv1D
with its (in, out) weight) holding a dense weight in the model's dtype, and the Top-KAST
state is dropped, so the result saves and loads with its own library (e.g.
`save_pretrained` / `from_pretrained`) like the model before `sparsify`. The model is
converted in place and the engine is finished afterwards: its hooks are removed from the
model (`engine.destroy()` and the engine's forward hooks), so the model runs, trains and
is freed on its own. With an engine, call it on every rank: it gathers the fp32 master
and, for "theta", the store shards.

Under ZeRO-3 every parameter is partitioned, so the model is converted one module at a
time: a module's own parameters are gathered, copied whole to the host (a dense
replacement for a Top-KAST layer) and released, so the accelerator never holds more than
one module in full. Every rank gets the same plain model on the host (CPU): parameters
without DeepSpeed's attributes, no ZeRO-3 hooks. A model partitioned by `zero.Init` whose
ds_topkast engine is not at hand (the Trainer's) is refused: its masters are the engine's.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from ds_topkast.convert.plain_save import stop_saving_plain
from ds_topkast.convert.sparsify import set_submodule
from ds_topkast.core.kernels import ops
from ds_topkast.core.layers import TopKASTLinear, alpha_from_sets, module_layout, sparse_layers
from ds_topkast.parallel.collectives import require_every_rank
from ds_topkast.parallel.zero3 import forget_partitions, gathered, is_partitioned, partition_group
from ds_topkast.runtime.state import topkast_state

WEIGHTS = ("forward", "theta")


def _dense_module(layer: TopKASTLinear, weight: Tensor, bias: nn.Parameter | None) -> nn.Module:
    """The replaced layer type with this (out, in) weight and `bias` (the layer's own Parameter, or its whole copy)."""
    if layer.source_type == "Conv1D":
        from transformers.pytorch_utils import Conv1D

        module = Conv1D(layer.out_features, layer.in_features)  # (nf, nx): weight is (in, out)
    else:
        module = nn.Linear(layer.in_features, layer.out_features, bias=False)
    module.weight = nn.Parameter(module_layout(weight, layer.source_type).contiguous())
    if bias is not None:
        module.bias = bias
    return module


def _dense_weight(model: nn.Module, name: str, layer: TopKASTLinear, engine, weights: str) -> Tensor:
    """The layer's dense (out, in) weight, α or θ, in fp32 from the master (a collective with an engine)."""
    values = engine.topkast.master(layer) if engine is not None else layer.values.detach().float()
    if weights == "forward":
        return alpha_from_sets(values, layer.backward_bits, layer.forward_bits, layer.shape)
    weight = (engine.topkast.full_theta(name) if engine is not None else topkast_state(model).store.read(name))
    weight = weight.to(values.device)
    ops.scatter_bits_(weight, values, layer.backward_bits.to(values.device), layer.block_counts.to(values.device), 0)
    return weight.view(layer.shape)


def _whole(module: nn.Module, keys: Iterable[str], copies: dict[int, nn.Parameter]) -> dict[str, nn.Parameter]:
    """The module's own parameters `keys`, whole: a ZeRO-3 partitioned one as a host copy of it (gathered with the
    module's other parameters, then released), any other as it is.

    The copies are plain Parameters (no DeepSpeed attributes), one per partitioned
    parameter in `copies`, so weights tied across modules stay tied and are gathered once.
    """
    own = {key: module._parameters[key] for key in keys if module._parameters.get(key) is not None}
    missing = [param for param in own.values() if is_partitioned(param) and id(param) not in copies]
    if missing:
        with gathered(module):
            for param in missing:
                copies[id(param)] = nn.Parameter(param.detach().cpu().clone(), requires_grad=param.requires_grad)
    return {key: copies.get(id(param), param) for key, param in own.items()}


def _unpartition(model: nn.Module, copies: dict[int, nn.Parameter]) -> None:
    """Put the whole host copies in place of every remaining partitioned parameter, and drop ZeRO-3's containers
    (its `_parameters` dict type, and the references to the partitioned parameters it keeps), so that nothing holds
    a partition."""
    for module in model.modules():
        for key, param in _whole(module, list(module._parameters), copies).items():
            if param is not module._parameters[key]:
                setattr(module, key, param)
        forget_partitions(module)


@torch.no_grad()
def export(engine_or_model, weights: str = "forward") -> nn.Module:
    """Replace the Top-KAST layers of a trained engine's (or sparsified model's) module by dense ones; under ZeRO-3
    also make every other parameter whole, on the host (see the module docstring)."""
    if weights not in WEIGHTS:
        raise ValueError(f"export(weights={weights!r}): use one of {WEIGHTS}.")
    engine = engine_or_model if hasattr(engine_or_model, "topkast") else None
    model = engine.module if engine is not None else engine_or_model
    partitioned = any(is_partitioned(p) for p in model.parameters())
    if partitioned and engine is None:
        raise ValueError("export does not gather ZeRO-3 partitioned parameters without the ds_topkast engine that "
                         "holds their fp32 masters: call ds_topkast.export(engine) on every rank with the engine "
                         "ds_topkast.initialize returned, or save the plain model with trainer.save_model() or "
                         "engine.save_16bit_model(dir) (with "
                         "zero_optimization.stage3_gather_16bit_weights_on_model_save).")
    if engine is not None:  # its masters (and under ZeRO-3 every parameter) are gathered across the ranks
        require_every_rank("export", "Call ds_topkast.export(engine) on every rank (each gets the model; save it on "
                           "rank 0 only).", partition_group(model))
    copies: dict[int, nn.Parameter] = {}
    for name, layer in sparse_layers(model).items():
        bias = _whole(layer, ["bias"], copies).get("bias")
        weight = _dense_weight(model, name, layer, engine, weights).to(layer.values.dtype)
        set_submodule(model, name, _dense_module(layer, weight.cpu() if partitioned else weight, bias))
    if partitioned:
        _unpartition(model, copies)
        model.cpu()  # the buffers: the parameters are on the host already
    if engine is not None:
        engine.detach_from_module()
    del model.topkast_state
    stop_saving_plain(model)
    return model
