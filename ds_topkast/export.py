"""`ds_topkast.export`: give a trained model back its own architecture with plain dense weights.

    model = ds_topkast.export(engine)                    # α: what the sparse model computes
    model = ds_topkast.export(engine, weights="theta")   # θ: the dense store with B's latest values

Every TopKASTLinear becomes the module it replaced (nn.Linear, or transformers' Conv1D
with its (in, out) weight) holding a dense weight in the model's dtype, and the Top-KAST
state is dropped, so the result saves and loads with its own library (e.g.
`save_pretrained` / `from_pretrained`) like the model before `sparsify`. The model is
converted in place: the engine is finished afterwards. With an engine, call it on every
rank (it gathers the fp32 master and, for "theta", the store shards). Under ZeRO-3 the
other parameters are partitioned too; export refuses there rather than return a model
with empty weights, and says to save instead: a sparsified model's `save_pretrained`
writes the plain α model from the state dict the Trainer gathers (ds_topkast.plain_save).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ds_topkast.kernels import ops
from ds_topkast.layers import TopKASTLinear, alpha_from_sets, sparse_layers
from ds_topkast.plain_save import stop_saving_plain
from ds_topkast.sparsify import set_submodule, topkast_state

WEIGHTS = ("forward", "theta")


def _dense_module(layer: TopKASTLinear, weight: Tensor) -> nn.Module:
    """The replaced layer type with this (out, in) weight and the layer's own bias Parameter."""
    if layer.source_type == "Conv1D":
        from transformers.pytorch_utils import Conv1D

        module = Conv1D(layer.out_features, layer.in_features)  # (nf, nx): weight is (in, out)
        module.weight = nn.Parameter(weight.t().contiguous())
    else:
        module = nn.Linear(layer.in_features, layer.out_features, bias=False)
        module.weight = nn.Parameter(weight.contiguous())
    if layer.bias is not None:
        module.bias = layer.bias
    return module


def _full_theta(model: nn.Module, name: str, engine) -> Tensor:
    local = topkast_state(model).store.read(name).clone()
    if engine is None or engine.topkast.refresher.comm.world == 1:
        return local
    return engine.topkast.refresher.comm.all_gather_varlen(local)


@torch.no_grad()
def export(engine_or_model, weights: str = "forward") -> nn.Module:
    """Replace the Top-KAST layers of a trained engine's (or sparsified model's) module by dense ones."""
    if weights not in WEIGHTS:
        raise ValueError(f"export(weights={weights!r}): use one of {WEIGHTS}.")
    engine = engine_or_model if hasattr(engine_or_model, "topkast") else None
    model = engine.module if engine is not None else engine_or_model
    if (engine is not None and engine.zero_optimization_stage() == 3) or any(
            hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError("export does not gather ZeRO-3 partitioned parameters. Save the model instead: "
                         "engine.save_16bit_model(dir) on every rank, or trainer.save_model() (either with "
                         "zero_optimization.stage3_gather_16bit_weights_on_model_save), writes the plain model, as "
                         "save_pretrained does for a sparsified model; or export from an "
                         "engine with zero_optimization.stage 0-2 that loads the checkpoint, with the same world size.")
    for name, layer in sparse_layers(model).items():
        values = (engine.topkast.refresher.adapter.get_master(layer.values) if engine is not None
                  else layer.values.detach().float())
        if weights == "forward":
            weight = alpha_from_sets(values, layer.backward_bits, layer.forward_bits, layer.shape)
        else:
            weight = _full_theta(model, name, engine).to(values.device)
            ops.scatter_bits_(weight, values, layer.backward_bits.to(values.device),
                              layer.block_counts.to(values.device), 0)
            weight = weight.view(layer.shape)
        set_submodule(model, name, _dense_module(layer, weight.to(layer.values.dtype)))
    del model.topkast_state
    stop_saving_plain(model)
    return model
