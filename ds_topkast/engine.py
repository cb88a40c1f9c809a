"""`ds_topkast.initialize`: `deepspeed.initialize` plus Top-KAST, with the same arguments and returns.

The returned engine is DeepSpeed's own engine with four methods extended (its class is
swapped for a subclass, so `isinstance(engine, DeepSpeedEngine)` still holds):
- `backward(loss)` adds the exploration regulariser of the latest forward pass;
- `step()` runs the refresh after every `refresh_interval`-th optimizer step and marks
  set A for re-selection every `forward_interval` steps;
- `save_checkpoint` / `load_checkpoint` also carry the dense store and the sets.
The public methods hold the guards; `TopKASTRuntime` (runtime.py) does the work.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

import torch
from torch import nn

from ds_topkast.collectives import ProcessGroupCollectives
from ds_topkast.config import TopKASTConfigError, load_deepspeed_config, topkast_section
from ds_topkast.layers import exploration_loss
from ds_topkast.optimizer_state import adapter_for, per_entry_state_keys
from ds_topkast.runtime import TopKASTRuntime
from ds_topkast.sparsify import TopKASTState, sparsify, topkast_state


def _runtime(engine, model: nn.Module, ds_config: dict[str, Any]) -> TopKASTRuntime:
    """The run's Top-KAST runtime over this engine's process group, optimizer and monitor."""
    comm = ProcessGroupCollectives()
    if engine.dp_world_size != comm.world:
        raise TopKASTConfigError(
            f"ds_topkast shards its dense store over data-parallel ranks only, but this job has "
            f"{comm.world} ranks and a data-parallel size of {engine.dp_world_size} (model, pipeline or "
            "sequence parallelism); run pure data parallelism (with any ZeRO stage).")
    return TopKASTRuntime(model, adapter_for(engine), comm, ds_config.get("aio"), getattr(engine, "monitor", None))


class TopKASTEngineMixin:
    """Extends a DeepSpeed engine class; see the module docstring."""

    topkast: TopKASTRuntime

    def backward(self, loss, *args, **kwargs):
        return super().backward(loss + exploration_loss(self.module), *args, **kwargs)

    def step(self, *args, **kwargs):
        steps_before = self.global_steps
        result = super().step(*args, **kwargs)
        if self.global_steps > steps_before:
            self.topkast.after_optimizer_step(self.global_steps)
        return result

    def save_checkpoint(self, save_dir, tag=None, client_state={}, save_latest=True, **kwargs):
        tag = f"global_step{self.global_steps}" if tag is None else tag
        self.topkast.save(os.path.join(save_dir, str(tag)))
        return super().save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=save_latest,
                                       **kwargs)

    def load_checkpoint(self, load_dir, tag=None, **kwargs):
        load_path, client_state = super().load_checkpoint(load_dir, tag=tag, **kwargs)
        if load_path is not None:
            self.topkast.load(os.path.dirname(load_path), self.global_steps)
        return load_path, client_state


_ENGINE_CLASSES: dict[type, type] = {}


def _with_topkast(engine, model: nn.Module, ds_config: dict[str, Any]):
    base = type(engine)
    if base not in _ENGINE_CLASSES:
        _ENGINE_CLASSES[base] = type(f"TopKAST{base.__name__}", (TopKASTEngineMixin, base), {})
    engine.__class__ = _ENGINE_CLASSES[base]
    engine.topkast = _runtime(engine, model, ds_config)
    return engine


def _refuse_unsupported_precision(ds_config: dict[str, Any]) -> None:
    zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if ds_config.get("fp16", {}).get("enabled", False) is True:
        raise TopKASTConfigError("fp16 is not supported by ds_topkast (its loss-scale skipped steps are untested "
                                 'here); use "bf16": {"enabled": true} or fp32.')
    if ds_config.get("bf16", {}).get("enabled", False) is True and zero_stage == 0:
        raise TopKASTConfigError(
            "ZeRO stage 0 with bf16 uses DeepSpeed's FP16_Optimizer, whose flat master weights ds_topkast cannot "
            'rewrite at a refresh. Set "zero_optimization": {"stage": 1} (or 2, 3) with bf16, or disable bf16.')


def _remap_parameters(parameters: Iterable[Any] | None, state: TopKASTState) -> list[Any] | None:
    """Swap dense weights for their compact replacements in params or param groups (keeping settings)."""
    if parameters is None:
        return None
    remapped = []
    for item in list(parameters):
        if isinstance(item, dict):
            group = dict(item)
            group["params"] = [state.replacement(p) for p in _as_list(item["params"])]
            remapped.append(group)
        else:
            remapped.append(state.replacement(item))
    return remapped


def _as_list(params: Any) -> list[Any]:
    return [params] if isinstance(params, torch.Tensor) else list(params)


def _remap_client_optimizer(optimizer: Any, state: TopKASTState) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        return
    if any(optimizer.state.values()):
        raise TopKASTConfigError("The optimizer passed to ds_topkast.initialize already has state (it has taken "
                                 "steps); build it fresh before training starts.")
    per_entry_state_keys(optimizer)
    for group in optimizer.param_groups:
        group["params"] = [state.replacement(p) for p in group["params"]]


def _config_source(args: Any, config: Any, config_params: Any) -> Any:
    source = config if config is not None else config_params
    if source is None and args is not None:
        source = getattr(args, "deepspeed_config", None)
    if source is None:
        raise TopKASTConfigError("No DeepSpeed config given: pass config=... (a path or dict with a \"topkast\" "
                                 "section) or args.deepspeed_config, as for deepspeed.initialize.")
    return source


def initialize(args=None, model: nn.Module | None = None, optimizer=None, model_parameters=None,
               training_data=None, lr_scheduler=None, config=None, config_params=None, **kwargs):
    """Like `deepspeed.initialize`, for a model trained with Top-KAST; returns the same 4-tuple.

    The DeepSpeed config must hold a "topkast" section. The model is sparsified here
    unless `ds_topkast.sparsify` already converted it; dense weights named in
    `model_parameters` (params or param groups) or in a client optimizer are replaced
    by their compact values, keeping their group settings.
    """
    import deepspeed

    if model is None:
        raise TopKASTConfigError("ds_topkast.initialize needs model=...; there is nothing to sparsify.")
    ds_config = load_deepspeed_config(_config_source(args, config, config_params))
    cfg = topkast_section(ds_config)
    _refuse_unsupported_precision(ds_config)
    if getattr(model, "topkast_state", None) is None:
        sparsify(model, cfg)
    elif topkast_state(model).config != cfg:
        raise TopKASTConfigError("The model was sparsified with a different topkast config than the DeepSpeed "
                                 "config's section; sparsify with the same section or let initialize do it.")
    state = topkast_state(model)
    model_parameters = _remap_parameters(model_parameters, state)
    _remap_client_optimizer(optimizer, state)
    engine, ds_optimizer, loader, scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
        training_data=training_data, lr_scheduler=lr_scheduler, config=config, config_params=config_params,
        **kwargs)
    return _with_topkast(engine, model, ds_config), ds_optimizer, loader, scheduler
