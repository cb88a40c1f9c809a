"""`ds_topkast.initialize`: `deepspeed.initialize` plus Top-KAST, with the same arguments and returns.

The returned engine is DeepSpeed's own engine with five methods extended (its class is
swapped for a subclass, so `isinstance(engine, DeepSpeedEngine)` still holds):
- `step()` runs the refresh after every `refresh_interval`-th optimizer step and
  re-selects set A inside B every `forward_interval` steps;
- `save_checkpoint` / `load_checkpoint` also carry the dense store and the sets;
- `save_16bit_model` and the consolidated ZeRO-3 state dict are the plain model (each
  sparse layer's `weight`, α, in the layout of the layer it replaced), which plain PyTorch
  and transformers load; DeepSpeed's checkpoints keep the sparse form.
The public methods hold the guards; `TopKASTRuntime` (runtime/schedule.py) does the work.

Checkpoints are made safe to resume from. DeepSpeed's rank 0 writes `latest` as soon as
its own files are written, while other ranks may still be writing theirs; here `latest`
is written only after every rank has finished (DeepSpeed's closing barrier), made
durable and replaced atomically, so a job killed mid-save leaves `latest` naming the
previous complete checkpoint. Loading checks ds_topkast's files before DeepSpeed reads
anything, and DeepSpeed's own files are read with `torch.load(weights_only=True)`
(allowing only the few DeepSpeed types its files hold), so no checkpoint runs code. A ZeRO
checkpoint offered to another data-parallel world size is refused up front with the way
out (DeepSpeed would fail only after loading the module).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ds_topkast.config import load_deepspeed_config, refuse_loss_scaling, take_io_settings, topkast_section
from ds_topkast.convert.plain_save import as_plain, state_dict_form
from ds_topkast.convert.sparsify import sparsify
from ds_topkast.core.layers import sparse_layers
from ds_topkast.engine.optimizer_adapters import adapter_for, per_entry_state_keys, refuse_unknown_config_optimizer
from ds_topkast.errors import CheckpointError, TopKASTConfigError
from ds_topkast.parallel.collectives import ProcessGroupCollectives, require_every_rank
from ds_topkast.parallel.zero3 import is_partitioned, partition_group, quiet_gathers, warn_when_gathered_by_hand
from ds_topkast.runtime.checkpoint import load_file
from ds_topkast.runtime.schedule import TopKASTRuntime
from ds_topkast.runtime.state import TopKASTState, topkast_state
from ds_topkast.store.shards import fsync_path


def _runtime(engine, model: nn.Module) -> TopKASTRuntime:
    """The run's Top-KAST runtime over this engine's process group, optimizer and monitor."""
    comm = ProcessGroupCollectives()
    if engine.dp_world_size != comm.world:
        raise TopKASTConfigError(
            f"ds_topkast shards its dense store over data-parallel ranks only, but this job has "
            f"{comm.world} ranks and a data-parallel size of {engine.dp_world_size} (model, pipeline or "
            "sequence parallelism); run pure data parallelism (with any ZeRO stage).")
    return TopKASTRuntime(model, adapter_for(engine), comm, engine.gradient_accumulation_steps(),
                          getattr(engine, "monitor", None))


class TopKASTEngineMixin:
    """Extends a DeepSpeed engine class; see the module docstring."""

    topkast: TopKASTRuntime

    def step(self, *args, **kwargs):
        steps_before = self.global_steps
        result = super().step(*args, **kwargs)
        if self.global_steps > steps_before:
            self.topkast.after_optimizer_step(self.global_steps)
            self.topkast.set_accumulation_steps(self.gradient_accumulation_steps())  # set_train_batch_size may change it
        return result

    def save_checkpoint(self, save_dir, tag=None, client_state={}, save_latest=True, **kwargs):
        tag = str(f"global_step{self.global_steps}" if tag is None else tag)
        self.topkast.save(os.path.join(save_dir, tag), self.global_steps)
        with state_dict_form(self.module, plain=False):  # the module's values and sets, to resume exactly
            saved = super().save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False, **kwargs)
        if save_latest:  # DeepSpeed's save ends with a barrier: every rank's files are written by now
            import deepspeed.comm as dist

            if self.global_rank == 0:
                _commit_latest(Path(save_dir), tag)
            dist.barrier()
        return saved

    def save_16bit_model(self, save_dir, save_filename="pytorch_model.bin", exclude_frozen_parameters=False):
        """DeepSpeed's 16-bit model save (every rank calls it; under ZeRO-3 it gathers the weights), of the plain
        model: each sparse layer's values and bitmaps become its `weight`."""
        if self.zero_optimization_partition_weights() and self.zero_gather_16bit_weights_on_model_save():
            require_every_rank("save_16bit_model", "Call engine.save_16bit_model(dir) on every rank (DeepSpeed's rank "
                               "0 writes the file), not inside `if rank == 0:`.", partition_group(self.module))
        with state_dict_form(self.module, plain=True):
            return super().save_16bit_model(save_dir, save_filename, exclude_frozen_parameters)

    def _zero3_consolidated_16bit_state_dict(self, *args, **kwargs):
        """DeepSpeed's gathered ZeRO-3 state dict (None on ranks other than 0), of the plain model: every caller
        (save_16bit_model, the Trainer's and accelerate's get_state_dict) saves a model from it."""
        with quiet_gathers():
            state = super()._zero3_consolidated_16bit_state_dict(*args, **kwargs)
        return None if state is None else as_plain(self.module, state)

    def load_checkpoint(self, load_dir, tag=None, **kwargs):
        tag = _latest_tag(Path(load_dir)) if tag is None else str(tag)
        verified = self.topkast.verify(os.path.join(load_dir, tag)) if tag is not None else None
        if verified is not None:
            self._refuse_zero_state_of_another_world(verified.first["world"], os.path.join(load_dir, tag), kwargs)
        load_path, client_state = super().load_checkpoint(load_dir, tag=tag, **kwargs)
        if load_path is not None:
            self.topkast.load(os.path.dirname(load_path), self.global_steps, verified)
        return load_path, client_state

    def detach_from_module(self) -> None:
        """Take this finished engine off its module (export): ZeRO's parameter and gradient hooks (`destroy()`) and
        the engine's own forward hooks, which would otherwise run in the module's forward and keep the engine
        alive."""
        self.destroy()
        for handle in ("module_forward_pre_hook", "module_forward_post_hook"):
            hook = getattr(self, handle, None)
            if hook is not None:
                hook.remove()
                setattr(self, handle, None)

    def _refuse_zero_state_of_another_world(self, saved_world: int, tag_dir: str, kwargs: dict[str, Any]) -> None:
        """DeepSpeed cannot repartition ZeRO optimizer state; say so before it loads anything, with the way out."""
        partitioned = (self.zero_optimization_stage() > 0 and kwargs.get("load_optimizer_states", True)
                       and not kwargs.get("load_module_only", False) and not self.load_universal_checkpoint())
        if partitioned and saved_world != self.dp_world_size:
            raise CheckpointError(
                f"{tag_dir} was written by {saved_world} data-parallel ranks under ZeRO stage "
                f"{self.zero_optimization_stage()}, whose optimizer state DeepSpeed cannot repartition for "
                f"{self.dp_world_size}. Resume on {saved_world} ranks, or start a new run from its weights on any "
                "number of ranks: `ds_topkast.train ... --init-from <that folder>` or "
                "`ds_topkast.load_dense_weights(model, <that folder>)` (ds_topkast's own store reshards either way; "
                "stage 0 checkpoints resume on any world size).")


def _latest_tag(load_dir: Path) -> str | None:
    """The tag `latest` names, as DeepSpeed reads it; None when there is no `latest` (DeepSpeed then warns)."""
    latest = load_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def _commit_latest(save_dir: Path, tag: str) -> None:
    """Make the tag's files durable, then point `latest` at it by an atomic rename."""
    for path in sorted((save_dir / tag).rglob("*")):
        if path.is_file():
            fsync_path(path)
    temporary = save_dir / "latest.partial"
    temporary.write_text(tag)
    fsync_path(temporary)
    os.replace(temporary, save_dir / "latest")
    fsync_path(save_dir)


def _deepspeed_checkpoint_types() -> list[type]:
    """The non-tensor types DeepSpeed 0.19 pickles into its checkpoints: plain records, no code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [DynamicLossScaler, LossScaler, ZeroStageEnum, fragment_address]


def _load_weights_only(path, map_location=None):
    """DeepSpeed's checkpoint-engine load, without executing code from the file."""
    with torch.serialization.safe_globals(_deepspeed_checkpoint_types()):
        return load_file(path, map_location=map_location)


def _read_checkpoints_weights_only(engine) -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if type(checkpoint_engine) is TorchCheckpointEngine:
        checkpoint_engine.load = _load_weights_only


_ENGINE_CLASSES: dict[type, type] = {}


def extend_engine(engine, model: nn.Module, ds_config: dict[str, Any]):
    """Extend a DeepSpeed engine over the sparsified `model` with Top-KAST (see the module docstring), in place."""
    base = type(engine)
    if base not in _ENGINE_CLASSES:
        _ENGINE_CLASSES[base] = type(f"TopKAST{base.__name__}", (TopKASTEngineMixin, base), {})
    engine.__class__ = _ENGINE_CLASSES[base]
    take_io_settings(topkast_state(model).config, ds_config)  # before the runtime places the store
    engine.topkast = _runtime(engine, model)
    for name, layer in sparse_layers(model).items():
        if is_partitioned(layer.values):  # a custom loop's hand-gathered save would miss the positions
            warn_when_gathered_by_hand(name, layer.values)
    _read_checkpoints_weights_only(engine)
    return engine


def check_engine_config(ds_config: dict[str, Any]) -> None:
    """Refuse, before any engine is built, the DeepSpeed settings whose optimizer state ds_topkast cannot rewrite."""
    _refuse_unsupported_precision(ds_config)
    refuse_unknown_config_optimizer(ds_config)


def _refuse_unsupported_precision(ds_config: dict[str, Any]) -> None:
    zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    refuse_loss_scaling(ds_config)
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


def _init_distributed(kwargs: dict[str, Any]) -> None:
    """The process group, as `deepspeed.initialize` would create it (it then reuses it), and this rank's device.

    The device is set now, as DeepSpeed's engine sets it when it is built (LOCAL_RANK's), because
    sparsify runs first: its collectives and its selection kernels use the current device, which
    would otherwise be device 0 on every rank.
    """
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.constants import TORCH_DISTRIBUTED_DEFAULT_PORT

    dist.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                          distributed_port=kwargs.get("distributed_port", TORCH_DISTRIBUTED_DEFAULT_PORT),
                          dist_init_required=kwargs.get("dist_init_required"))
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")) % get_accelerator().device_count())


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
    check_engine_config(ds_config)
    if getattr(model, "topkast_state", None) is None:
        _init_distributed(kwargs)  # first: sparsify keeps only this rank's shard of each layer
        sparsify(model, cfg)  # resolved: an NVMe store has the config's "aio" section
    elif not topkast_state(model).config.same_settings(cfg):
        raise TopKASTConfigError("The model was sparsified with a different topkast config than the DeepSpeed "
                                 "config's section; sparsify with the same section or let initialize do it.")
    state = topkast_state(model)
    model_parameters = _remap_parameters(model_parameters, state)
    _remap_client_optimizer(optimizer, state)
    engine, ds_optimizer, loader, scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
        training_data=training_data, lr_scheduler=lr_scheduler, config=config, config_params=config_params,
        **kwargs)
    return extend_engine(engine, model, ds_config), ds_optimizer, loader, scheduler
