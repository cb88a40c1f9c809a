"""Top-KAST (Jayakumar et al. 2020): B = top k_B of |θ| from the dense store, A = top k_A of B, re-selected often.

With "selection": "random", B is A plus a uniform draw from the rest (the paper's
random-B ablation). A is re-selected inside B from the fp32 master every
`forward_interval` steps, B from the whole store every `refresh_interval` steps. Not
masked: θ outside B keeps its last trained value (paper, Section 2).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ds_topkast.algorithms.base import Algorithm
from ds_topkast.core.bitmaps import unpack_bits
from ds_topkast.core.select import Collectives, shard_positions, shard_topk_bits, uniform_hash


def topk_backward_set(theta: Tensor, offset: int, numel: int, k_forward: int, k_backward: int, seed: int,
                      comm: Collectives) -> Tensor:
    """B = the top k_B of |θ| (this rank's members, as a bitmap of the layer)."""
    return shard_topk_bits(theta, offset, numel, k_backward, comm)


def random_backward_set(theta: Tensor, offset: int, numel: int, k_forward: int, k_backward: int, seed: int,
                        comm: Collectives) -> Tensor:
    """A by magnitude; B\\A drawn uniformly from the rest (the paper's random-B ablation)."""
    forward = shard_topk_bits(theta, offset, numel, k_forward, comm)
    scores = torch.where(unpack_bits(forward, theta.numel(), offset), 2.0,  # above every hash value: A is in B
                         uniform_hash(shard_positions(theta, offset), seed))
    return shard_topk_bits(scores, offset, numel, k_backward, comm)


BACKWARD_SET_RULES = {"topk": topk_backward_set, "random": random_backward_set}


class TopKAST(Algorithm):
    """A and B re-selected by magnitude from the dense store every refresh_interval steps."""

    name = "topkast"
    settings = ("exploration_l2", "selection")
    reselects_forward = True

    def initial_backward(self, theta, offset, numel, k_forward, k_backward, seed, comm):
        return BACKWARD_SET_RULES[self.cfg.selection](theta, offset, numel, k_forward, k_backward, seed, comm)
