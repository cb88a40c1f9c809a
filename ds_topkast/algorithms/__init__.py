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
  of the update step (runtime/dense_gradients.py),
- and which of the section's settings it reads, with its defaults and checks.

One file per algorithm; `register` (registry.py) makes a class available by its name, so
adding an algorithm is one new file and one registration:

    from ds_topkast.algorithms import Algorithm, register

    @register
    class Mine(Algorithm):
        name = "mine"
        def initial_backward(self, theta, offset, numel, k_forward, k_backward, seed, comm): ...

and "algorithm": "mine" in the section (import the file before the config is read).

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
from ds_topkast.algorithms.base import Algorithm, LayerUpdate, due
from ds_topkast.algorithms.evolutionary import SET
from ds_topkast.algorithms.magnitude_pruning import GradualMagnitudePruning
from ds_topkast.algorithms.registry import algorithm_for, names, register
from ds_topkast.algorithms.rigl import RigL
from ds_topkast.algorithms.static import Static
from ds_topkast.algorithms.topkast import TopKAST

for _builtin in (TopKAST, RigL, SET, Static, GradualMagnitudePruning):
    register(_builtin)

__all__ = ["Algorithm", "LayerUpdate", "algorithm_for", "due", "names", "register"]
