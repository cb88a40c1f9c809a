"""Convert a model for Top-KAST after it is built: the model never knows it is sparse.

`sparsify(model, cfg)` picks modules by include/exclude name patterns, computes each
layer's k_A and k_B (uniform or ERK), and one layer at a time moves this rank's shard of
its full weight into the dense store and replaces it with a `TopKASTLinear` holding only
the top-k_B values. The weights may come from the model in memory, from a model built on
the meta device (initialised here, module by module), from one built under
`deepspeed.zero.Init` (gathered one layer at a time) or from safetensors files, so a
model larger than one rank's memory is never held whole. Supported layer types are
torch's nn.Linear and transformers' Conv1D (GPT-2).
"""
from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ds_topkast.algorithms import algorithm_for
from ds_topkast.config import TopKASTConfig, resolved_config
from ds_topkast.convert.layer_weights import LayerWeights, linear_shape
from ds_topkast.convert.meta_init import meta_tensor_names
from ds_topkast.convert.plain_save import save_plain
from ds_topkast.core.distributions import global_kept_counts, kept_count, layer_densities
from ds_topkast.core.kernels import ops
from ds_topkast.core.layers import TopKASTLinear, sparse_layers
from ds_topkast.core.seeds import selection_seed
from ds_topkast.core.select import Collectives, LayerSets, assemble_sets
from ds_topkast.errors import TopKASTConfigError
from ds_topkast.parallel.collectives import job_collectives
from ds_topkast.runtime.state import TopKASTState
from ds_topkast.store.cpu import CPUDenseStore
from ds_topkast.store.nvme import NVMeDenseStore
from ds_topkast.store.protocol import DenseStore
from ds_topkast.store.shards import shard_range


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


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


def _new_store(cfg: TopKASTConfig, comm: Collectives) -> DenseStore:
    """The store this rank fills: on NVMe when configured and the job's ranks are known, else in host memory.

    A host-memory store is pinned, if asked, once placed (DeepSpeed has not set the device
    yet). Before the process group exists a multi-rank job's store is built whole in host
    memory and sharded at placement, so the NVMe files are written only for a known rank.
    """
    ranks_known = comm.world > 1 or int(os.environ.get("WORLD_SIZE", "1")) == 1
    if cfg.dense_store.device != "nvme" or not ranks_known:
        return CPUDenseStore(comm.rank, comm.world)
    return NVMeDenseStore.configured(cfg.dense_store, comm.rank, comm.world)


def return_freed_host_memory() -> None:
    """Give freed host memory back to the OS (glibc's `malloc_trim`) so that it no longer counts as resident.

    After a large block is freed, glibc raises its mmap threshold and serves later
    layer-sized blocks from the heap, where the freed ones between kept store shards stay
    resident: building the store layer by layer then held about a second full copy of the
    model (measured: 1.54 GiB resident for a 0.77 GiB store). Trimming after each layer
    keeps the resident size at the store plus one layer. A no-op without glibc.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _refuse_non_finite(name: str, shard: Tensor, comm: Collectives) -> None:
    """Selection by magnitude is meaningless on NaN or infinite weights: every rank refuses the layer together."""
    bad = comm.all_reduce_sum(torch.tensor([0 if bool(torch.isfinite(shard).all()) else 1]))
    if int(bad):
        raise TopKASTConfigError(f"Layer {name!r} holds NaN or infinite weights, so its top-k cannot be selected; "
                                 "initialise or load the model correctly before sparsifying it.")


def _kept_counts(chosen: Mapping[str, nn.Module], shapes: list[tuple[int, int]], cfg: TopKASTConfig,
                 weights: LayerWeights | None, comm: Collectives | None) -> list[tuple[int, int]]:
    """(k_A, k_B) of every chosen layer under the configured distribution; k_A is the final one under gmp."""
    numels = [o * i for o, i in shapes]
    if cfg.distribution == "global":
        if weights.checkpoint is None and any(meta_tensor_names(module) for module in chosen.values()):
            raise TopKASTConfigError(
                'distribution "global" sets each layer\'s density from one magnitude threshold over the initial '
                "weights, which a model on the meta device does not have yet (its initialiser would draw them "
                "twice). Build the model in memory, under deepspeed.zero.Init or with pretrained=, or use "
                '"erk" or "uniform".')

        def shards():
            for (name, module), numel in zip(chosen.items(), numels):
                start, end = shard_range(numel, comm.rank, comm.world)
                with weights.full(name, module) as weight:
                    yield weight.detach().reshape(-1)[start:end]

        forward, backward = global_kept_counts(shards, numels, [cfg.forward_density, cfg.backward_density], comm)
    else:
        forward = [kept_count(n, d) for n, d in zip(numels, layer_densities(shapes, cfg.forward_density,
                                                                             cfg.distribution))]
        backward = [kept_count(n, d) for n, d in zip(numels, layer_densities(shapes, cfg.backward_density,
                                                                              cfg.distribution))]
    return [(k_f, max(k_f, k_b)) for k_f, k_b in zip(forward, backward)]


@dataclass
class LayerPlan:
    """The layers sparsify would replace (by name) and each one's (weights, k_B)."""

    modules: dict[str, nn.Module]
    counts: list[tuple[int, int]]


def planned_layers(model: nn.Module, cfg: TopKASTConfig) -> LayerPlan:
    """What sparsify(model, cfg) would do to each layer, without doing it (memory_accounting.estimate_memory).

    The "global" distribution is refused: its k per layer depends on the weights' values.
    """
    if cfg.distribution == "global":
        raise TopKASTConfigError('The "global" distribution sets each layer\'s k from the initial weights\' values, '
                                 "so it cannot be planned before they exist; estimate with \"erk\" or \"uniform\" "
                                 "(the same total), or build the engine and call memory_report.")
    chosen = _choose_modules(model, cfg)
    shapes = [linear_shape(m) for m in chosen.values()]
    counts = _kept_counts(chosen, shapes, cfg, weights=None, comm=None)
    return LayerPlan(chosen, [(o * i, k_backward) for (o, i), (_, k_backward) in zip(shapes, counts)])


def selection_device() -> torch.device:
    """Where sparsify selects each layer's sets: this rank's GPU when there is one, else the CPU.

    The selection is exact (ties by index) and its kernels equal their torch references, so
    the sets are the same on either; on a GPU a layer's selection is the refresh's kernels,
    on the CPU the references cost about 0.2 s per million weights on 2 cores (docs/RESULTS.md,
    issue 27), which at 7B would be most of the start-up. One layer's shard is on the GPU at a
    time. The GPU is LOCAL_RANK's (modulo the visible devices, as when CUDA_VISIBLE_DEVICES
    gives each rank one); DS_ACCELERATOR=cpu keeps it on the CPU.
    """
    if not torch.cuda.is_available() or os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def _on_host(sets: LayerSets) -> LayerSets:
    """The sets in host memory, where sparsify leaves the model (the engine moves it to its device)."""
    return LayerSets(*(t.cpu() for t in (sets.backward_bits, sets.counts, sets.values, sets.forward_bits)))


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted path `name` of `model`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def sparsify(model: nn.Module, config: TopKASTConfig | Mapping[str, Any] | str | os.PathLike, *,
             pretrained: str | os.PathLike | None = None, comm: Collectives | None = None) -> nn.Module:
    """Replace the selected layers of `model` with Top-KAST layers, in place; returns `model`.

    `config` is a TopKASTConfig, a "topkast" section, or a DeepSpeed config (dict or
    JSON path) that holds one; None means the DeepSpeed config file `accelerate launch`
    was given (ACCELERATE_DEEPSPEED_CONFIG_FILE), as under a Trainer launched that way.
    The model may be built in memory, on the meta device (its modules are then
    initialised one at a time by the model's own initialiser, see
    meta_init.py) or under `deepspeed.zero.Init`; `pretrained` (a safetensors file or
    folder) loads its weights, layer by layer. Layers are converted one at a time: each
    rank keeps only its shard of each layer's full weight in the dense store
    (`model.topkast_state`) and A and B start as the top-K of the initial weights
    (paper, Section 2), selected over the shards. `comm` defaults to the job's process
    group when one is initialised (call `deepspeed.init_distributed()` first for a model
    too large for one rank's memory; `ds_topkast.initialize` and `TrainingArguments` do),
    else a world of one whose store is sharded when the engine is built.
    """
    if config is None:  # run_clm.py passes training_args.deepspeed: None under `accelerate launch --use_deepspeed`
        config = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
    if config is None:
        raise TopKASTConfigError("sparsify(model, config) needs a config: a DeepSpeed config (path or dict) with a "
                                 "\"topkast\" section, the section itself, or a TopKASTConfig. (With the Trainer: "
                                 "give --deepspeed CONFIG, or launch with accelerate's --deepspeed_config_file.)")
    cfg = resolved_config(config)
    if sparse_layers(model):
        raise TopKASTConfigError("This model is already sparsified; call ds_topkast.sparsify once per model.")
    if meta_tensor_names(model) and hasattr(model, "tie_weights"):
        model.tie_weights()  # accelerate's init_empty_weights unties a Hugging Face model's tied weights
    chosen = _choose_modules(model, cfg)
    _refuse_shared_weights(model, chosen)
    comm = job_collectives() if comm is None else comm
    weights = LayerWeights(model, cfg, pretrained)
    shapes = [linear_shape(m) for m in chosen.values()]
    counts = _kept_counts(chosen, shapes, cfg, weights, comm)
    algorithm = algorithm_for(cfg)
    store = _new_store(cfg, comm)
    store.require_room(sum(4 * (end - start) for start, end in (shard_range(o * i, comm.rank, comm.world)
                                                                for o, i in shapes)))
    state = TopKASTState(config=cfg, store=store, layer_names=list(chosen), algorithm=algorithm)
    device = selection_device()
    layers = {}
    for index, ((name, module), (out_f, in_f), (k_target, k_backward)) in enumerate(zip(chosen.items(), shapes,
                                                                                         counts)):
        numel = out_f * in_f
        k_forward = algorithm.forward_count(k_target, numel, 0)
        start, end = shard_range(numel, comm.rank, comm.world)
        replaced = module.weight
        with weights.full(name, module) as weight:
            shard = weight.detach().reshape(-1)[start:end].float()
            _refuse_non_finite(name, shard, comm)
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                selected = shard.to(device)  # Triton launches on the current device: make it this one
                local = algorithm.initial_backward(selected, start, numel, k_forward, k_backward,
                                                   selection_seed(cfg.seed, 0, index), comm)
                sets = _on_host(assemble_sets(local, selected, start, numel, k_forward, k_backward, comm))
                del selected
            if algorithm.masked:  # the store holds zero outside A: grown entries start there, pruned ones stay
                shard = ops.expand_bits(sets.values, sets.backward_bits, sets.counts, sets.forward_bits, start,
                                        end - start, torch.float32)
            store.add_shard(name, shard, numel)
            dtype = weight.dtype
        del weight, shard
        layer = TopKASTLinear(in_f, out_f, sets.values.to(dtype), sets.backward_bits, sets.forward_bits, module.bias,
                              k_forward=k_forward, exploration_l2=cfg.exploration_l2,
                              source_type=type(module).__name__, layer_name=name,
                              straight_through=not algorithm.masked)
        state.forward_targets[name] = k_target
        weights.finish_layer(replaced, layer)
        state.remember_replacement(replaced, layer.values)
        layers[name] = layer
        return_freed_host_memory()
    weights.finish_rest(chosen)
    for name, layer in layers.items():  # only now: an ancestor's initialiser may still look for the old module
        set_submodule(model, name, layer)
    model.topkast_state = state
    save_plain(model)
    warn_when_trained_without_runtime(model)
    return model


def warn_when_trained_without_runtime(model: nn.Module) -> None:
    """Warn at the model's first training forward pass if nothing will refresh its masks.

    Training a sparsified model with a plain loop, `deepspeed.initialize` or a Trainer
    without `TopKASTCallback` runs, but A and B never change and checkpoints lack the dense
    store: a quietly worse run. The check runs once, then removes itself.
    """
    state = model.topkast_state

    def check(module: nn.Module, args) -> None:
        if getattr(module, "topkast_state", None) is not state:  # exported back to a dense model
            handle.remove()
            return
        if not (module.training and torch.is_grad_enabled()):
            return
        handle.remove()
        if not state.driven:
            warnings.warn("This model was sparsified by ds_topkast but is training without a Top-KAST runtime: its "
                          "masks will never be refreshed and checkpoints will lack the dense store. With the Hugging "
                          "Face Trainer pass callbacks=[ds_topkast.TopKASTCallback()]; in your own loop build the "
                          "engine with ds_topkast.initialize instead of deepspeed.initialize.", stacklevel=2)

    handle = model.register_forward_pre_hook(check)
