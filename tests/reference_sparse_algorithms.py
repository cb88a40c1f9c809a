"""Independent dense, mask-based RigL, SET, static and gradual magnitude pruning, written plainly from the papers.

As reference_topkast.py is for Top-KAST: dense θ with zeros outside the mask, boolean
masks, fp32, top-K by a stable sort (ties to the lower flat index), AdamW by hand (from
ReferenceTopKAST) applied to the mask only. It shares no code with ds_topkast; the
random draws follow the same documented hash of (global index, seed) so that SET's and
random static masks can be compared entry for entry.

- RigL (Evci et al. 2020): A = B = M. At step t, a multiple of ΔT before T_end, after
  the optimizer step: n = floor(ζ(t)·k), ζ(t) = ζ0/2·(1 + cos(πt/T_end)); keep the k - n
  largest |θ| of M; grow the n largest |dL/dα| (of step t's batch) outside what was kept;
  grown weights start at zero; an entry that left M is zero, and its moments too.
- SET (Mocanu et al. 2018): as RigL, growing by the hash (uniformly at random).
- static: M fixed at the start (top-k of |θ0| or of the hash).
- GMP (Zhu & Gupta 2017): every ΔT steps in [t0, t_end], A = top k(t) of |θ| with
  k(t) = max(k_f, round(n·(1 - s_f·(1 - (1 - (t - t0)/(t_end - t0))³)))); pruned weights
  and their moments are zeroed and never updated again.
"""
from __future__ import annotations

import math

import torch
from reference_topkast import ReferenceTopKAST, seed_of, topk_by_sort, uniform_hash
from torch import Tensor


class ReferenceMasked(ReferenceTopKAST):
    """Dense mask-based RigL / SET / static / GMP; `layers` as for ReferenceTopKAST (k_forward, k_backward, transposed).

    For GMP k_forward is the final k_A; B is the whole layer.
    """

    def __init__(self, model, layers, *, algorithm: str, interval: int, drop_fraction: float = 0.3,
                 end_step: int = 0, start_step: int = 0, random_init: bool = False, seed: int = 0, **adam):
        self.algorithm, self.interval, self.drop_fraction = algorithm, interval, drop_fraction
        self.end_step, self.start_step, self.random_init = end_step, start_step, random_init
        super().__init__(model, layers, refresh_interval=interval, forward_interval=0, seed=seed, **adam)

    def _select_all(self) -> None:
        """The masks at the start; θ is zeroed outside them."""
        for index, (name, (k_a, k_b, _)) in enumerate(self.layers.items()):
            theta = self.theta[name]
            if self.algorithm == "gmp":
                mask = torch.ones_like(theta, dtype=torch.bool)
            else:
                scores = theta.abs()
                if self.random_init:
                    scores = uniform_hash(torch.arange(theta.numel()), seed_of(self.seed, 0, index))
                mask = topk_by_sort(scores, k_b).view_as(theta)
            self.A[name] = self.B[name] = mask
            theta.mul_(mask)

    def updates_at(self, step: int) -> bool:
        if self.algorithm == "static" or step % self.interval:
            return False
        if self.algorithm == "gmp":
            return self.start_step <= step <= self.end_step
        return step < self.end_step

    def prunes_at(self, step: int) -> bool:
        """GMP also prunes at its end step when that is off the interval's grid."""
        return self.algorithm == "gmp" and step == self.end_step

    def _drop_and_grow(self, index: int, name: str, grad: Tensor, step: int) -> Tensor:
        theta, old = self.theta[name].reshape(-1), self.B[name].reshape(-1)
        k = int(old.sum())
        zeta = self.drop_fraction / 2 * (1 + math.cos(math.pi * step / self.end_step))
        n = int(zeta * k)
        active = old.nonzero().squeeze(1)
        kept = active[topk_by_sort(theta[active].abs(), k - n)]
        outside = torch.ones(theta.numel(), dtype=torch.bool)
        outside[kept] = False
        candidates = outside.nonzero().squeeze(1)
        if self.algorithm == "rigl":
            scores = grad.reshape(-1).abs()
        else:
            scores = uniform_hash(torch.arange(theta.numel()), seed_of(self.seed, step // self.interval, index))
        grown = candidates[topk_by_sort(scores[candidates], n)]
        mask = torch.zeros(theta.numel(), dtype=torch.bool)
        mask[kept] = True
        mask[grown] = True
        return mask

    def _pruned(self, name: str, step: int) -> Tensor:
        theta = self.theta[name].reshape(-1)
        n = theta.numel()
        progress = min(max((step - self.start_step) / (self.end_step - self.start_step), 0.0), 1.0)
        final = 1 - self.layers[name][0] / n
        k = max(self.layers[name][0], min(n, round(n * (1 - final * (1 - (1 - progress) ** 3)))))
        return topk_by_sort(theta.abs(), k)

    def trained_set(self, name: str) -> Tensor:
        """The entries the optimizer updates: the mask (A; pruned GMP entries are zero and get no update)."""
        return self.A[name]

    def after_step(self, grads: dict[str, Tensor]) -> None:
        if not (self.updates_at(self.step_count) or self.prunes_at(self.step_count)):
            return
        for index, name in enumerate(self.layers):
            if self.algorithm == "gmp":
                new = self._pruned(name, self.step_count).view_as(self.theta[name])
                self.A[name] = new
            else:
                new = self._drop_and_grow(index, name, grads[name], self.step_count).view_as(self.theta[name])
                self.A[name] = self.B[name] = new
            self.theta[name].mul_(new)  # outside the mask: zero weights and zero moments
            self.m[name] = self.m[name] * new
            self.v[name] = self.v[name] * new
