"""RigL (Evci et al. 2020): A = B; every ΔT steps until update_end_step, drop the ζ(t)·k smallest-magnitude active
weights and grow as many inactive ones with the largest dense-gradient magnitude, at zero; masked.

ζ(t) = ζ0/2·(1 + cos(π t / T_end)), RigL's cosine decay (Section 3). The dense gradient
of each layer is handed over by its backward at update steps, sharded like the store
(runtime/dense_gradients.py). The first masks are chosen as static's are (`mask_init`:
by magnitude, the default, or at random, as the RigL paper does from scratch).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ds_topkast.algorithms.base import LayerUpdate, due, require_updates
from ds_topkast.algorithms.static import Static
from ds_topkast.core.select import shard_topk_bits


class RigL(Static):
    """Drop the smallest active weights, grow the inactive ones of largest dense gradient."""

    name = "rigl"
    settings = ("drop_fraction", "update_end_step", "mask_init")
    needs_dense_gradient = True
    adds_entries = True

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.update_end_step is None:
            raise ValueError(f"algorithm {cls.name!r} needs update_end_step, the last step at which masks change "
                             "(RigL stops at 75% of training), e.g. \"update_end_step\": 7500.")
        require_updates(cls, cfg)
        if cfg.update_end_step <= cfg.refresh_interval:
            raise ValueError(f"update_end_step ({cfg.update_end_step}) must exceed refresh_interval "
                             f"({cfg.refresh_interval}): masks change at multiples of refresh_interval before it, so "
                             "none would. Raise update_end_step or lower refresh_interval.")

    def updates_at(self, step: int) -> bool:
        return due(step, self.cfg.refresh_interval) and step < self.cfg.update_end_step

    def drop_fraction(self, step: int) -> float:
        """ζ(t) = ζ0/2·(1 + cos(π t / T_end)): the cosine decay of RigL, Section 3."""
        return self.cfg.drop_fraction / 2 * (1 + math.cos(math.pi * step / self.cfg.update_end_step))

    def grow_scores(self, update: LayerUpdate) -> Tensor:
        return update.gradient.abs()

    def backward_bits(self, update: LayerUpdate, step: int) -> Tensor:
        """Keep the k - n largest |θ| of B, then grow the n best-scoring entries outside what was kept."""
        grown = int(self.drop_fraction(step) * update.k_backward)  # RigL's own rounding: down
        kept = shard_topk_bits(update.theta, update.offset, update.numel, update.k_backward - grown, update.comm,
                               candidates=update.old_bits)
        outside = torch.bitwise_not(kept)  # this rank's entries not kept (the just dropped ones included)
        new = shard_topk_bits(self.grow_scores(update), update.offset, update.numel, grown, update.comm,
                              candidates=outside)
        return kept | new
