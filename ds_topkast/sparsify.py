"""Convert a model for Top-KAST after it is built: the model never knows it is sparse.

`sparsify(model, cfg)` picks modules by include/exclude name patterns, computes each
layer's k_A and k_B (uniform or ERK), moves its full weight into the dense store and
replaces it with a `TopKASTLinear` holding only the top-k_B values. Supported layer
types are torch's nn.Linear and transformers' Conv1D (GPT-2), one converter each.
"""
from __future__ import annotations

import fnmatch
import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ds_topkast.config import SECTION, TopKASTConfig, TopKASTConfigError, load_deepspeed_config, topkast_section
from ds_topkast.distributions import kept_count, layer_densities
from ds_topkast.layers import TopKASTLinear, sparse_layers
from ds_topkast.select import select_sets
from ds_topkast.store import CPUDenseStore


@dataclass
class TopKASTState:
    """What a sparsified model carries: its config, dense store and the replaced weights."""

    config: TopKASTConfig
    store: CPUDenseStore
    layer_names: list[str]
    _replaced: dict[int, tuple[weakref.ref, nn.Parameter]] = field(default_factory=dict, repr=False)

    def replacement(self, param: Any) -> Any:
        """The compact parameter that took the place of a dense weight, else `param` itself."""
        entry = self._replaced.get(id(param))
        if entry is not None and entry[0]() is param:
            return entry[1]
        return param


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def linear_weight(module: nn.Module) -> Tensor:
    """The weight as an (out, in) matrix: Conv1D stores it transposed (in, out)."""
    if isinstance(module, nn.Linear):
        return module.weight
    return module.weight.t()


def in_module_layout(module: nn.Module, matrix: Tensor) -> Tensor:
    """An (out, in) matrix laid out as `module` stores its weight: the inverse of `linear_weight`."""
    return matrix if isinstance(module, nn.Linear) else matrix.t()


def _supported(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _choose_modules(model: nn.Module, cfg: TopKASTConfig) -> dict[str, nn.Module]:
    names = {name: m for name, m in model.named_modules() if name}
    for pattern in cfg.include:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if pattern != "*" and not any(_supported(names[n]) for n in hits):
            found = f"it matches only {sorted({type(names[n]).__name__ for n in hits})}" if hits else "it matches no module"
            raise TopKASTConfigError(
                f"topkast.include pattern {pattern!r} selects no layer ds_topkast can sparsify ({found}); "
                "supported layers are nn.Linear and transformers' Conv1D. Fix the pattern, e.g. '*attn*'.")
    if cfg.explicitly_set("exclude"):
        for pattern in cfg.exclude:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise TopKASTConfigError(f"topkast.exclude pattern {pattern!r} matches no module of this model; "
                                         "fix or remove it (module names come from model.named_modules()).")
    chosen = {n: m for n, m in names.items()
              if _supported(m) and _matches(n, cfg.include) and not _matches(n, cfg.exclude)}
    if not chosen:
        raise TopKASTConfigError(
            "topkast include/exclude select no nn.Linear or Conv1D layer of this model, so there is nothing to "
            f"sparsify (include={cfg.include}, exclude={cfg.exclude}). Widen include or narrow exclude.")
    return chosen


def _refuse_shared_weights(model: nn.Module, chosen: Mapping[str, nn.Module]) -> None:
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    for name, module in chosen.items():
        holders = owners[id(module.weight)]
        if len(holders) > 1:
            raise TopKASTConfigError(
                f"Layer {name!r} shares its weight with {[h for h in holders if not h.startswith(name + '.')]} "
                f"(tied weights); a sparse copy would untie them. Add {name!r} to topkast.exclude.")


def _refuse_non_finite(chosen: Mapping[str, nn.Module]) -> None:
    """Selection by magnitude is meaningless on NaN or infinite weights: refuse them by layer name."""
    bad = [name for name, module in chosen.items() if not bool(torch.isfinite(linear_weight(module)).all())]
    if bad:
        raise TopKASTConfigError(f"Layers {bad} hold NaN or infinite weights, so their top-k cannot be selected; "
                                 "initialise or load the model correctly before sparsifying it.")


def _convert(module: nn.Module, cfg: TopKASTConfig, k_forward: int, k_backward: int, seed: int) -> TopKASTLinear:
    weight = linear_weight(module)
    out_features, in_features = weight.shape
    indices, _, forward_mask = select_sets(weight.float(), k_forward, k_backward, cfg.selection, seed)
    values = weight.detach().reshape(-1)[indices]
    return TopKASTLinear(in_features, out_features, values, indices, forward_mask, module.bias,
                         k_forward=k_forward, exploration_l2=cfg.exploration_l2, source_type=type(module).__name__)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted path `name` of `model`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def selection_seed(cfg: TopKASTConfig, refresh_index: int, layer_index: int) -> int:
    """The random-B\\A seed of one layer at one refresh: the same on every rank and world size."""
    return cfg.seed * 1_000_003 + refresh_index * 10_007 + layer_index


def as_topkast_config(config: TopKASTConfig | Mapping[str, Any] | str | os.PathLike) -> TopKASTConfig:
    """A TopKASTConfig from itself, a "topkast" section, or a DeepSpeed config (dict or JSON path) holding one."""
    if isinstance(config, TopKASTConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        return topkast_section(load_deepspeed_config(config))
    if SECTION in config:
        return topkast_section(config)
    return TopKASTConfig.from_section(config)


def _refuse_partitioned(chosen: Mapping[str, nn.Module]) -> None:
    for name, module in chosen.items():
        if hasattr(module.weight, "ds_numel"):
            raise TopKASTConfigError(
                f"{name}.weight is already partitioned by DeepSpeed ZeRO-3 (the model was built inside "
                "zero.Init, which TrainingArguments(deepspeed=<ZeRO-3 config>) turns on for from_pretrained / "
                "from_config). Build and sparsify the model before creating the TrainingArguments.")


def sparsify(model: nn.Module, config: TopKASTConfig | Mapping[str, Any] | str | os.PathLike) -> nn.Module:
    """Replace the selected layers of `model` with Top-KAST layers, in place; returns `model`.

    `config` is a TopKASTConfig, a "topkast" section, or a DeepSpeed config (dict or
    JSON path) that holds one. The full weights go into a dense store attached as
    `model.topkast_state`; A and B start as the top-K of the model's own initial
    weights (paper, Section 2).
    """
    cfg = as_topkast_config(config)
    if sparse_layers(model):
        raise TopKASTConfigError("This model is already sparsified; call ds_topkast.sparsify once per model.")
    chosen = _choose_modules(model, cfg)
    _refuse_partitioned(chosen)
    _refuse_shared_weights(model, chosen)
    _refuse_non_finite(chosen)
    shapes = [tuple(linear_weight(m).shape) for m in chosen.values()]
    forward = layer_densities(shapes, cfg.forward_density, cfg.distribution)
    backward = layer_densities(shapes, cfg.backward_density, cfg.distribution)
    store = CPUDenseStore()  # pinned, if asked, once placed: DeepSpeed has not set the device yet
    state = TopKASTState(config=cfg, store=store, layer_names=list(chosen))
    for index, ((name, module), (out_f, in_f), d_fwd, d_bwd) in enumerate(zip(chosen.items(), shapes, forward, backward)):
        k_forward = kept_count(out_f * in_f, d_fwd)
        k_backward = max(k_forward, kept_count(out_f * in_f, d_bwd))
        layer = _convert(module, cfg, k_forward, k_backward, selection_seed(cfg, 0, index))
        layer.layer_name = name
        store.add(name, linear_weight(module))
        state._replaced[id(module.weight)] = (weakref.ref(module.weight), layer.values)
        set_submodule(model, name, layer)
    model.topkast_state = state
    return model


def topkast_state(model: nn.Module) -> TopKASTState:
    """The Top-KAST state of a sparsified model, with a clear error when there is none."""
    state = getattr(model, "topkast_state", None)
    if not isinstance(state, TopKASTState):
        raise TopKASTConfigError("This model was not converted by ds_topkast.sparsify(model, config).")
    return state


