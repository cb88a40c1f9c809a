"""Materialise a model built on the meta device, one module at a time, with the model's own initialiser.

A large model is built without memory under `torch.device("meta")` or accelerate's
`init_empty_weights()`; `sparsify` then gives each sparsified layer real weights one
layer at a time (keeping only this rank's shard of them) and the remaining modules
(embeddings, norms, dense layers) theirs. Each module is initialised by what the model
itself would run: a Hugging Face model's `_init_weights` on the module and on its
ancestors up to the model, in that order (what `initialize_weights` does: GPT-2's
attention block, for one, rescales its `c_proj`), else the module's `reset_parameters()`.
The random generator is seeded per module from (seed, module name), so the weights do not
depend on the world size or on the order modules are visited. Materialised tensors start
as NaN: an initialiser that leaves one untouched is caught instead of training on garbage.
Once initialised they are flagged `_is_hf_initialized`, the flag transformers' init
functions honour, so an ancestor's `_init_weights` run for a later module leaves them be.
"""
from __future__ import annotations

import zlib
from typing import Iterable

import torch
from torch import Tensor, nn

from ds_topkast.core.seeds import SEED_STRIDE
from ds_topkast.errors import TopKASTConfigError


def is_meta(tensor: Tensor | None) -> bool:
    return tensor is not None and tensor.device.type == "meta"


def module_seed(seed: int, name: str) -> int:
    """The generator seed of one module's initialisation: fixed by the run's seed and the module's name."""
    return (seed * SEED_STRIDE + zlib.crc32(name.encode())) % 2**63


class MetaMaterializer:
    """Gives a meta-device model's tensors real (host) storage and initial values, module by module.

    Tensors shared between modules (tied weights) are materialised once and stay shared.
    """

    def __init__(self, model: nn.Module, seed: int):
        self.model = model
        self.seed = seed
        self._modules = dict(model.named_modules(remove_duplicate=False))

    def materialize(self, name: str, module: nn.Module) -> None:
        """Real host storage and initial values for `module`'s own meta parameters (and float buffers)."""
        fresh = self._allocate(name, module)
        if not fresh:
            return
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(module_seed(self.seed, name))
            self._initialise(name, module)
        unset = [f"{name}.{key}" for key, tensor in fresh if torch.isnan(tensor).any()]
        for _, tensor in fresh:
            tensor._is_hf_initialized = True  # an ancestor's _init_weights, run for a later module, skips it
        if unset:
            raise TopKASTConfigError(
                f"The model's initialiser left {unset} unset after materialising them from the meta device (its "
                f"_init_weights / reset_parameters does not cover {type(module).__name__}). Initialise the model "
                "yourself, or load its weights: sparsify(model, config, pretrained=<safetensors file or folder>).")

    def materialize_rest(self, skip: Iterable[str] = ()) -> None:
        """Materialise every module still holding meta tensors, except those named in `skip`."""
        skipped = set(skip)
        for name, module in list(self._modules.items()):
            if name not in skipped and _own_meta_tensors(module):
                self.materialize(name, module)

    def _allocate(self, name: str, module: nn.Module) -> list[tuple[str, Tensor]]:
        fresh = []
        for key, param in list(module._parameters.items()):
            if is_meta(param):  # replaced in every module holding it, so a tied tensor is materialised once
                real = nn.Parameter(torch.full(param.shape, float("nan"), dtype=param.dtype),
                                    requires_grad=param.requires_grad)
                fresh.append((key, real))
                replace_everywhere(self._modules.values(), param, real)
        for key, buffer in list(module._buffers.items()):
            if not is_meta(buffer):
                continue
            if not buffer.is_floating_point():
                raise TopKASTConfigError(
                    f"Buffer {name}.{key} is on the meta device and its value cannot be recomputed. Build the model "
                    "under accelerate's init_empty_weights() (which keeps buffers real) instead of "
                    "torch.device('meta').")
            module._buffers[key] = torch.full(buffer.shape, float("nan"), dtype=buffer.dtype)
            fresh.append((key, module._buffers[key]))
        return fresh

    def _initialise(self, name: str, module: nn.Module) -> None:
        """The model's own initialisation of `module`: HF `_init_weights` up the ancestry, or `reset_parameters`."""
        chain = [module] + [self._modules[prefix] for prefix in _ancestors(name)]
        owner = next((m for m in reversed(chain) if hasattr(m, "_init_weights")), None)
        if owner is not None:
            for member in chain[:chain.index(owner) + 1]:
                owner._init_weights(member)
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()
        else:
            raise TopKASTConfigError(
                f"Module {name or '<model>'} ({type(module).__name__}) is on the meta device, has no "
                "reset_parameters() and the model has no _init_weights, so ds_topkast cannot initialise it. "
                "Build the model in memory, or load its weights: sparsify(model, config, pretrained=...).")


def replace_everywhere(modules: Iterable[nn.Module], old: Tensor, new: Tensor) -> None:
    """Put `new` wherever a module holds `old` as a parameter or buffer, so that tied tensors stay tied."""
    for module in modules:
        for slots in (module._parameters, module._buffers):
            for key, held in slots.items():
                if held is old:
                    slots[key] = new


def _ancestors(name: str) -> list[str]:
    """Dotted prefixes of `name`, innermost first, ending with the model itself ("")."""
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)]


def _own_meta_tensors(module: nn.Module) -> bool:
    return any(is_meta(t) for t in (*module._parameters.values(), *module._buffers.values()))


def meta_tensor_names(model: nn.Module) -> list[str]:
    """Names of the model's parameters and buffers still on the meta device."""
    return [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if is_meta(tensor)]
