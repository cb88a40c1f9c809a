"""SET, Sparse Evolutionary Training (Mocanu et al. 2018): as RigL, growing uniformly at random (the same draw on
every rank and world size).

The drop fraction decays as RigL's (the SET baseline of Evci et al.); Mocanu's constant ζ
until the end is drop_fraction with update_end_step beyond the run's last step only
approximately (the cosine still decays).
"""
from __future__ import annotations

from torch import Tensor

from ds_topkast.algorithms.base import LayerUpdate
from ds_topkast.algorithms.rigl import RigL
from ds_topkast.core.select import uniform_hash


class SET(RigL):
    """RigL's drop and decay, with random growth: no dense gradient."""

    name = "set"
    needs_dense_gradient = False

    def grow_scores(self, update: LayerUpdate) -> Tensor:
        return uniform_hash(update.positions(), update.seed)
