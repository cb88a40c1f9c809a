"""Exact top-K: exactly K entries, ties broken by flat index, against a stable-sort reference."""
import pytest
import torch
from reference_topkast import topk_by_sort

from ds_topkast.algorithms.topkast import BACKWARD_SET_RULES
from ds_topkast.core.bitmaps import indices_from_bits, unpack_bits
from ds_topkast.core.select import LOCAL, Collectives, assemble_sets, topk_indices, topk_mask


def reference(scores, k):
    return topk_by_sort(scores, k).nonzero().squeeze(1)


def select_sets(theta, k_forward, k_backward, rule="topk", seed=0, *, offset=0, numel=None, comm=LOCAL):
    """Sets B and A of one layer whose flat θ may be sharded (this rank's slice from `offset`), as sparsify and the
    refresh select them: B's ascending global indices, θ on B, and A as a mask over B."""
    numel = theta.numel() if numel is None else numel
    flat = theta.detach().reshape(-1).float()
    local = BACKWARD_SET_RULES[rule](flat, offset, numel, k_forward, k_backward, seed, comm)
    sets = assemble_sets(local, flat, offset, numel, k_forward, k_backward, comm)
    return (indices_from_bits(sets.backward_bits, numel, k_backward), sets.values,
            unpack_bits(sets.forward_bits, k_backward))


TIED = {
    "all equal": torch.ones(1000),
    "all zero": torch.zeros(1000),
    "two values": (torch.arange(1000) % 2).float(),
    "few values": (torch.arange(997) * 7919 % 5).float(),
    "denormals and zeros": torch.tensor([0.0, 1e-45, 1e-40, 0.0, 1e-45] * 100),
    "high bits shared": 1.0 + torch.arange(4096, dtype=torch.float32) * 2**-23,
    "random": torch.rand(5000, generator=torch.Generator().manual_seed(0)),
}


@pytest.mark.parametrize("case", sorted(TIED))
@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.1, 0.5, 0.9, 1.0])
def test_exactly_k_ties_by_index(case, fraction):
    scores = TIED[case]
    k = round(fraction * scores.numel())
    chosen = topk_indices(scores, k)
    assert chosen.numel() == k
    assert torch.equal(chosen, reference(scores, k))


def test_hand_computed():
    scores = torch.tensor([0.5, 2.0, 0.5, 3.0, 0.5, 1.0])
    assert topk_indices(scores, 3).tolist() == [1, 3, 5]
    assert topk_indices(scores, 4).tolist() == [0, 1, 3, 5]  # first of the three tied 0.5s
    assert topk_mask(scores.view(2, 3), 2).tolist() == [[False, True, False], [True, False, False]]


@pytest.mark.parametrize("bad", [torch.tensor([1.0, float("nan")]), torch.tensor([1.0, float("inf")]),
                                 torch.tensor([1.0, -1.0])])
def test_refuses_non_finite_or_negative_scores(bad):
    with pytest.raises(ValueError, match="finite and non-negative"):
        topk_indices(bad, 1)


def test_k_out_of_range():
    with pytest.raises(ValueError, match="must lie in"):
        topk_indices(torch.ones(3), 4)


def test_select_sets_topk_nests_a_in_b():
    theta = torch.randn(40, 30, generator=torch.Generator().manual_seed(1))
    backward, values, forward_mask = select_sets(theta, 120, 360)
    assert torch.equal(backward, reference(theta.abs(), 360))
    assert torch.equal(values, theta.reshape(-1)[backward])
    assert torch.equal(backward[forward_mask], reference(theta.abs(), 120))
    assert torch.all(backward[1:] > backward[:-1])


def test_select_sets_random_keeps_a_and_draws_the_rest_deterministically():
    theta = torch.randn(50, 40, generator=torch.Generator().manual_seed(2))
    draw = lambda seed: select_sets(theta, 100, 500, "random", seed)
    (b1, _, a1), (b2, _, a2), (b3, _, _) = draw(7), draw(7), draw(8)
    assert torch.equal(b1, b2) and torch.equal(a1, a2)
    assert not torch.equal(b1, b3)
    assert b1.numel() == 500 and torch.equal(b1[a1], reference(theta.abs(), 100))
    assert not torch.equal(b1, reference(theta.abs(), 500))


class ThreadCollectives(Collectives):
    """Ranks as threads: enough to exercise sharded selection's collectives in one process."""

    def __init__(self, rank, world, board, barrier):
        self.rank, self.world, self.board, self.barrier = rank, world, board, barrier

    def _exchange(self, item):
        self.barrier.wait()
        self.board[self.rank] = item
        self.barrier.wait()
        items = list(self.board)
        self.barrier.wait()
        return items

    def all_reduce_sum(self, tensor):
        return sum(self._exchange(tensor.clone()))

    def all_gather_ints(self, value):
        return self._exchange(value)

    def all_gather_parts(self, tensor):
        return self._exchange(tensor.clone())


def sharded_select(theta, k_forward, k_backward, world, rule="topk"):
    import threading

    from ds_topkast.store.cpu import shard_range

    board, barrier, results = [None] * world, threading.Barrier(world), [None] * world

    def run(rank):
        start, end = shard_range(theta.numel(), rank, world)
        comm = ThreadCollectives(rank, world, board, barrier)
        results[rank] = select_sets(theta.reshape(-1)[start:end], k_forward, k_backward, rule, 3,
                                    offset=start, numel=theta.numel(), comm=comm)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("case", ["two values", "all equal", "random", "few values"])
@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize("rule", ["topk", "random"])
def test_sharded_selection_equals_local_on_every_rank(case, world, rule):
    theta = TIED[case] * torch.where(torch.arange(TIED[case].numel()) % 3 == 0, -1.0, 1.0)
    expected = select_sets(theta, 50, 300, rule, 3)
    for indices, values, forward_mask in sharded_select(theta, 50, 300, world, rule):
        assert torch.equal(indices, expected[0]) and torch.equal(values, expected[1])
        assert torch.equal(forward_mask, expected[2])
