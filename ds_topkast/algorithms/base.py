"""What every sparse-training algorithm is: the interface the refresh calls, and the inputs of one layer's update.

An algorithm says which entries form B at the start and at each update, how many of them
form A, at which steps it updates, whether it is masked, and which settings of the
"topkast" section it reads, with their defaults and checks; the refresh (runtime/), the
store and the checkpoints are the same for all of them. See ds_topkast.algorithms.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ds_topkast.core.select import Collectives, shard_positions


@dataclass
class LayerUpdate:
    """What an algorithm sees of one layer at an update, on this rank."""

    theta: Tensor  # this rank's shard of θ (B's trained values written back), flat fp32, on the accelerator
    offset: int  # the shard's first global index
    numel: int  # the layer's entries
    old_bits: Tensor  # B's bitmap over the layer before the update (the same on every rank)
    k_forward: int
    k_backward: int
    seed: int  # the same on every rank and world size, different per layer and update
    comm: Collectives
    gradient: Tensor | None = None  # this rank's shard of the dense gradient (algorithms that need it)

    def positions(self) -> Tensor:
        """The shard's global indices."""
        return shard_positions(self.theta, self.offset)


def due(step: int, interval: int) -> bool:
    """Whether an every-`interval`-steps event falls on `step`; interval 0 means never."""
    return interval > 0 and step % interval == 0


class Algorithm:
    """A sparse-training algorithm over the shared mechanism; subclasses set the class attributes and the methods.

    `settings` are the section's keys this algorithm reads beyond the common ones
    (sparsities, intervals, include/exclude, distribution, store, seed): a key that some
    registered algorithm declares and the chosen one does not is refused when set.
    """

    name: str = ""
    settings: tuple[str, ...] = ()
    masked = False  # weights outside A are zero, in the store as in the values, and receive no gradient
    reselects_forward = False  # A is re-selected inside B between updates (every forward_interval steps)
    needs_dense_gradient = False  # an update scores entries by each layer's dense gradient (handed over in backward)
    adds_entries = True  # updates bring entries into B (per-entry bias correction then applies)

    def __init__(self, cfg):
        self.cfg = cfg

    @classmethod
    def fill_defaults(cls, section: dict[str, Any]) -> dict[str, Any]:
        """The section with this algorithm's defaults of other keys filled in (before validation)."""
        return section

    @classmethod
    def check(cls, cfg) -> None:
        """Refuse settings this algorithm cannot honour (a ValueError naming the fix; run at validation)."""

    def updates_at(self, step: int) -> bool:
        """Whether the masks are updated after optimizer step `step`."""
        return due(step, self.cfg.refresh_interval)

    def forward_count(self, k_forward: int, numel: int, step: int) -> int:
        """k_A at `step` for a layer whose configured (final) k_A is `k_forward`."""
        return k_forward

    def initial_backward(self, theta: Tensor, offset: int, numel: int, k_forward: int, k_backward: int, seed: int,
                         comm: Collectives) -> Tensor:
        """This rank's members of the first B (a bitmap of the layer) from its fp32 shard of the initial θ."""
        raise NotImplementedError

    def backward_bits(self, update: LayerUpdate, step: int) -> Tensor:
        """This rank's members of the new B (a bitmap of the layer), exactly k_backward over all ranks."""
        return self.initial_backward(update.theta, update.offset, update.numel, update.k_forward, update.k_backward,
                                     update.seed, update.comm)


def require_updates(cls: type[Algorithm], cfg) -> None:
    """Refuse refresh_interval 0 for an algorithm whose masks change only at refreshes."""
    if cfg.refresh_interval == 0:
        raise ValueError(f"algorithm {cls.name!r} updates its masks every refresh_interval steps; set it >= 1 "
                         "(e.g. 100).")
