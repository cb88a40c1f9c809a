"""What a refresh needs of an optimizer: one compact parameter's fp32 master, its per-entry state and the
low-precision copy the forward pass reads, read and rewritten whole.

Where those live depends on who steps the optimizer (DeepSpeed's ZeRO and bf16 wrappers,
a plain torch optimizer), so each has one small adapter (engine/optimizer_adapters.py);
the runtime sees only this interface.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from ds_topkast.errors import UnsupportedOptimizerError


@dataclass(frozen=True)
class MasterFragment:
    """A piece of a parameter's fp32 master that this rank holds: `length` entries of the flat tensor `source`
    from `offset`, which are the parameter's flat entries from `position`."""

    source: Tensor
    offset: int
    length: int
    position: int


@dataclass
class MasterViews:
    """This rank's fragments of several parameters' fp32 masters, read in place every step.

    `partitioned`: each entry is held by one rank (ZeRO's partitions), so per-entry results
    must be combined over ranks; else every rank holds every entry. `valid()` says, with no
    device work, whether the views still point at the masters (DeepSpeed or a `.to()` may
    have replaced a tensor); `prepare()` orders reads after the optimizer's last write.
    """

    fragments: list[list[MasterFragment]]
    partitioned: bool
    valid: Callable[[], bool]
    prepare: Callable[[], None] = field(default=lambda: None)


class OptimizerStateAdapter:
    """Full (unpartitioned) views of a compact parameter's training state, for a refresh."""

    def __init__(self, state_keys: tuple[str, ...], basic_optimizer: torch.optim.Optimizer,
                 param_groups: list[list[nn.Parameter]] | None = None):
        self.state_keys = state_keys
        self.basic_optimizer = basic_optimizer
        # The model parameters of each of the basic optimizer's groups, in its group order.
        self.param_groups = param_groups if param_groups is not None else [g["params"] for g in
                                                                           basic_optimizer.param_groups]
        self._group_of = {id(p): index for index, params in enumerate(self.param_groups) for p in params}

    def param_group(self, param: nn.Parameter) -> dict:
        """The basic optimizer's settings (lr, betas, eps, ...) for a model parameter."""
        if id(param) in self._group_of:
            return self.basic_optimizer.param_groups[self._group_of[id(param)]]
        raise UnsupportedOptimizerError(f"A compact parameter of shape {tuple(param.shape)} is in no param group of "
                                        "the optimizer; build the optimizer over the sparsified model's parameters.")

    def refuse_unknown_state(self) -> None:
        """Stop before a refresh would leave per-weight state it does not know stale (checked at every refresh).

        The optimizer's type and settings were checked at start; this catches state that
        only appears once it steps (a subclass, or a setting that adds a buffer).
        """
        for state in self.basic_optimizer.state.values():
            unknown = sorted(key for key, value in state.items() if torch.is_tensor(value) and value.numel() > 1
                             and key not in self.state_keys)
            if unknown:
                raise UnsupportedOptimizerError(
                    f"Optimizer {type(self.basic_optimizer).__name__} keeps per-weight state {unknown} that ds_topkast "
                    f"does not know how to move at a refresh (it moves {list(self.state_keys)}). Use Adam, AdamW "
                    "(amsgrad off) or SGD.")

    def get_master(self, param: nn.Parameter) -> Tensor:
        raise NotImplementedError

    def get_masters(self, params: list[nn.Parameter]) -> Tensor:
        """The full fp32 masters of several parameters, flat and concatenated in order (the same on every rank)."""
        return torch.cat([self.get_master(param) for param in params])

    def master_views(self, params: list[nn.Parameter]) -> MasterViews | None:
        """Views of this rank's pieces of the parameters' fp32 masters, valid across steps; None where the masters
        cannot be read in place (then `get_masters` is the way, a copy each time)."""
        return None

    def set_master(self, param: nn.Parameter, value: Tensor) -> None:
        raise NotImplementedError

    def get_state(self, param: nn.Parameter, key: str) -> Tensor:
        raise NotImplementedError

    def set_state(self, param: nn.Parameter, key: str, value: Tensor) -> None:
        raise NotImplementedError

    def set_low_precision(self, param: nn.Parameter, value: Tensor) -> None:
        """Rewrite the copy the forward pass reads."""
        with torch.no_grad():
            param.data.copy_(value.reshape(param.shape))
