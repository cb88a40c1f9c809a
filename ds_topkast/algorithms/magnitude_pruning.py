"""Gradual magnitude pruning (Zhu & Gupta 2017): B is the whole layer; A = top k_A(t) of |θ|, k_A(t) on the cubic
schedule s_t = s_f·(1 - (1 - (t - t0)/(t_end - t0))³) every ΔT steps; masked.

Pruned entries are zero and stay zero. It trains the dense model, so it saves no memory:
it is the dense-to-sparse baseline.
"""
from __future__ import annotations

import torch

from ds_topkast.algorithms.base import Algorithm, due, require_updates
from ds_topkast.core.bitmaps import pack_bits_at


class GradualMagnitudePruning(Algorithm):
    """B is the whole layer; A shrinks from dense to the target on the cubic schedule."""

    name = "gmp"
    settings = ("prune_start_step", "prune_end_step")
    masked = True
    adds_entries = False

    @classmethod
    def fill_defaults(cls, section):
        section.setdefault("backward_sparsity", 0.0)  # B is the whole layer
        return section

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.backward_sparsity != 0.0:
            raise ValueError("algorithm 'gmp' prunes a dense model, so B is the whole layer: set backward_sparsity "
                             "to 0 or leave it out.")
        if cfg.prune_end_step is None or cfg.prune_end_step <= cfg.prune_start_step:
            raise ValueError("algorithm 'gmp' needs prune_end_step after prune_start_step "
                             f"({cfg.prune_start_step}): the step at which the forward sparsity is reached.")
        require_updates(cls, cfg)

    def updates_at(self, step: int) -> bool:
        """Every refresh_interval steps inside [prune_start_step, prune_end_step], and always at the end step,
        so the target is reached whatever the grid."""
        cfg = self.cfg
        inside = cfg.prune_start_step <= step <= cfg.prune_end_step
        return inside and (due(step, cfg.refresh_interval) or step == cfg.prune_end_step)

    def forward_count(self, k_forward: int, numel: int, step: int) -> int:
        """round(n·(1 - s_t)), s_t = s_f·(1 - (1 - progress)³), s_f this layer's final sparsity 1 - k_forward/n."""
        start, end = self.cfg.prune_start_step, self.cfg.prune_end_step
        progress = min(max((step - start) / (end - start), 0.0), 1.0)
        sparsity = (1 - k_forward / numel) * (1 - (1 - progress) ** 3)
        return max(k_forward, min(numel, round(numel * (1 - sparsity))))

    def initial_backward(self, theta, offset, numel, k_forward, k_backward, seed, comm):
        return pack_bits_at(torch.ones(theta.numel(), dtype=torch.bool, device=theta.device), offset, numel)
