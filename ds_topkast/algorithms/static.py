"""Static masks: chosen once, at the start, by magnitude or uniformly at random; A = B; masked.

With refresh_interval and forward_interval 0 under "topkast" the same sparsity trains
unmasked; this is the masked static baseline of the sparse-training literature.
"""
from __future__ import annotations

from ds_topkast.algorithms.base import Algorithm
from ds_topkast.core.select import shard_positions, shard_topk_bits, uniform_hash


def trains_forward_set_only(cls: type[Algorithm], cfg) -> None:
    """Refuse a backward sparsity other than the forward one for an algorithm that trains A = B."""
    if cfg.backward_sparsity != cfg.forward_sparsity:
        raise ValueError(f"algorithm {cls.name!r} trains A = B: set backward_sparsity equal to forward_sparsity "
                         f"({cfg.forward_sparsity}) or leave it out.")


class Static(Algorithm):
    """Masks chosen once, at the start, by magnitude or uniformly at random; A = B."""

    name = "static"
    settings = ("mask_init",)
    masked = True
    adds_entries = False

    @classmethod
    def fill_defaults(cls, section):
        section.setdefault("backward_sparsity", section.get("forward_sparsity", 0.9))  # A = B
        return section

    @classmethod
    def check(cls, cfg) -> None:
        trains_forward_set_only(cls, cfg)

    def updates_at(self, step: int) -> bool:
        return False

    def initial_backward(self, theta, offset, numel, k_forward, k_backward, seed, comm):
        scores = uniform_hash(shard_positions(theta, offset), seed) if self.cfg.mask_init == "random" else theta
        return shard_topk_bits(scores, offset, numel, k_backward, comm)
