"""The sparse-training family over one mechanism: which entries an update drops and grows, when, and from what.

Every algorithm here runs on the same machinery: B's compact values on the accelerator,
the full weights θ in the sharded dense store, the exact distributed top-K, the
optimizer-state remap (kept entries keep their moments, new ones start at zero),
checkpoints and data parallelism. An algorithm only says
- which entries form B at the start and at each update (`initial_backward`,
  `backward_bits`: this rank's members of B, as a bitmap of the layer, chosen by the
  exact sharded top-K `shard_topk_bits`, so every rank and world size agrees; the
  refresh joins the ranks' bitmaps),
- how many of them form A (`forward_count`) and whether A is re-selected inside B
  between updates (`reselects_forward`: Top-KAST only),
- at which steps it updates (`updates_at`),
- whether it is *masked* (`masked`): weights outside A are zero, in the store as in the
  values, and receive no gradient. A grown entry then starts at zero, because the store
  holds zero wherever an entry is not in A, and a pruned one stays zero. Top-KAST is not
  masked: θ outside B keeps its last trained value (paper, Section 2).
- whether its update needs the dense gradient of each layer (`needs_dense_gradient`:
  RigL), which the sparse layers hand over, sharded like the store, from the backward
  of the update step (dense_gradients.py).

Algorithms (names as in the "topkast" section's "algorithm"):
- topkast: Jayakumar et al. 2020. B = top k_B of |θ| (or A plus a random draw, the
  paper's random-B ablation, with "selection": "random"), A = top k_A of B.
- rigl: Evci et al. 2020. A = B; every ΔT steps until update_end_step, drop the
  ζ(t)·k smallest-magnitude active weights and grow as many inactive ones with the
  largest dense-gradient magnitude, at zero; ζ(t) = ζ0/2·(1 + cos(π t / T_end)).
- set: Mocanu et al. 2018. As rigl, growing uniformly at random.
- static: masks fixed at the start (by magnitude or at random).
- gmp: Zhu & Gupta 2017. B is the whole layer; A shrinks from dense to the target on
  the cubic schedule s_t = s_f·(1 - (1 - (t - t0)/(t_end - t0))³) every ΔT steps; pruned
  entries are zero and stay zero. It trains the dense model, so it saves no memory: it is
  the dense-to-sparse baseline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ds_topkast.bitmaps import pack_bits_at
from ds_topkast.select import (BACKWARD_SET_RULES, Collectives, shard_positions, shard_topk_bits, uniform_hash)


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
    """Top-KAST, the default: A and B re-selected by magnitude from the dense store every refresh_interval."""

    name = "topkast"
    masked = False
    reselects_forward = True
    needs_dense_gradient = False

    def __init__(self, cfg):
        self.cfg = cfg

    def updates_at(self, step: int) -> bool:
        return due(step, self.cfg.refresh_interval)

    def forward_count(self, k_forward: int, numel: int, step: int) -> int:
        """k_A at `step` for a layer whose configured (final) k_A is `k_forward`."""
        return k_forward

    def initial_backward(self, theta: Tensor, offset: int, numel: int, k_forward: int, k_backward: int, seed: int,
                         comm: Collectives) -> Tensor:
        """This rank's members of the first B (a bitmap of the layer) from its fp32 shard of the initial θ."""
        return BACKWARD_SET_RULES[self.cfg.selection](theta, offset, numel, k_forward, k_backward, seed, comm)

    def backward_bits(self, update: LayerUpdate, step: int) -> Tensor:
        """This rank's members of the new B (a bitmap of the layer), exactly k_backward over all ranks."""
        return self.initial_backward(update.theta, update.offset, update.numel, update.k_forward, update.k_backward,
                                     update.seed, update.comm)


class Static(Algorithm):
    """Masks chosen once, at the start, by magnitude or uniformly at random; A = B."""

    name = "static"
    masked = True
    reselects_forward = False

    def updates_at(self, step: int) -> bool:
        return False

    def initial_backward(self, theta, offset, numel, k_forward, k_backward, seed, comm):
        scores = uniform_hash(shard_positions(theta, offset), seed) if self.cfg.mask_init == "random" else theta
        return shard_topk_bits(scores, offset, numel, k_backward, comm)


class RigL(Static):
    """Evci et al. 2020: drop the smallest active weights, grow the inactive ones of largest dense gradient.

    The first masks are chosen as static's are (`mask_init`: by magnitude, the default, or
    at random, as the RigL paper does from scratch).
    """

    name = "rigl"
    needs_dense_gradient = True

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


class SET(RigL):
    """Mocanu et al. 2018: as RigL, growing uniformly at random (the same draw on every rank and world size).

    The drop fraction decays as RigL's (the SET baseline of Evci et al.); Mocanu's constant
    ζ until the end is drop_fraction with update_end_step beyond the run's last step only
    approximately (the cosine still decays).
    """

    name = "set"
    needs_dense_gradient = False

    def grow_scores(self, update: LayerUpdate) -> Tensor:
        return uniform_hash(update.positions(), update.seed)


class GradualMagnitudePruning(Algorithm):
    """Zhu & Gupta 2017: B is the whole layer; A = top k_A(t) of |θ|, k_A(t) on the cubic schedule."""

    name = "gmp"
    masked = True
    reselects_forward = False

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

    def backward_bits(self, update: LayerUpdate, step: int) -> Tensor:
        return self.initial_backward(update.theta, update.offset, update.numel, update.k_forward,
                                     update.k_backward, update.seed, update.comm)


ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (Algorithm, RigL, SET, Static,
                                                                     GradualMagnitudePruning)}


def algorithm_for(cfg) -> Algorithm:
    """The algorithm a validated "topkast" section names."""
    return ALGORITHMS[getattr(cfg.algorithm, "value", cfg.algorithm)](cfg)


# The keys that only some algorithms read, and which ones: setting one for another algorithm is an error.
_OWN_SETTINGS = {
    "drop_fraction": ("rigl", "set"), "update_end_step": ("rigl", "set"), "mask_init": ("static", "rigl", "set"),
    "prune_start_step": ("gmp",), "prune_end_step": ("gmp",), "exploration_l2": ("topkast",),
    "selection": ("topkast",),
}


def fill_defaults(section: dict) -> dict:
    """Defaults that depend on the algorithm: A = B for rigl/set/static, B = the whole layer for gmp."""
    name = section.get("algorithm", "topkast")
    if name in ("rigl", "set", "static"):
        section.setdefault("backward_sparsity", section.get("forward_sparsity", 0.9))
    elif name == "gmp":
        section.setdefault("backward_sparsity", 0.0)
    return section


def check_settings(cfg) -> None:
    """Refuse settings the chosen algorithm cannot honour, naming the fix (run at config validation)."""
    name = cfg.algorithm
    for key, owners in _OWN_SETTINGS.items():
        if name not in owners and cfg.explicitly_set(key) and getattr(cfg, key) != type(cfg).model_fields[key].default:
            raise ValueError(f'{key} applies to algorithm {" / ".join(owners)} only, not {name!r}; remove it.')
    if name != "topkast" and cfg.explicitly_set("forward_interval") and cfg.forward_interval != 0:
        raise ValueError(f"forward_interval re-selects A inside B, which only topkast does; remove it for {name!r}.")
    if name in ("rigl", "set", "static") and cfg.backward_sparsity != cfg.forward_sparsity:
        raise ValueError(f"algorithm {name!r} trains A = B: set backward_sparsity equal to forward_sparsity "
                         f"({cfg.forward_sparsity}) or leave it out.")
    if name in ("rigl", "set") and cfg.update_end_step is None:
        raise ValueError(f"algorithm {name!r} needs update_end_step, the last step at which masks change (RigL "
                         "stops at 75% of training), e.g. \"update_end_step\": 7500.")
    if name == "gmp":
        if cfg.backward_sparsity != 0.0:
            raise ValueError("algorithm 'gmp' prunes a dense model, so B is the whole layer: set backward_sparsity "
                             "to 0 or leave it out.")
        if cfg.prune_end_step is None or cfg.prune_end_step <= cfg.prune_start_step:
            raise ValueError("algorithm 'gmp' needs prune_end_step after prune_start_step "
                             f"({cfg.prune_start_step}): the step at which the forward sparsity is reached.")
    if name in ("rigl", "set", "gmp") and cfg.refresh_interval == 0:
        raise ValueError(f"algorithm {name!r} updates its masks every refresh_interval steps; set it >= 1 "
                         "(e.g. 100).")
    if name in ("rigl", "set") and cfg.update_end_step <= cfg.refresh_interval:
        raise ValueError(f"update_end_step ({cfg.update_end_step}) must exceed refresh_interval "
                         f"({cfg.refresh_interval}): masks change at multiples of refresh_interval before it, so none "
                         "would. Raise update_end_step or lower refresh_interval.")
    if cfg.new_entries == "per_entry_bias_correction" and name in ("static", "gmp"):
        raise ValueError(f"new_entries 'per_entry_bias_correction' changes nothing for {name!r}, which never adds "
                         "entries to B; remove it.")
