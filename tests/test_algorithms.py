"""Every algorithm of the family trains exactly like its plain dense mask-based reference (fp32, several updates), and
so does one registered from outside the package."""
import math

import pytest
import torch
from models import batches, clone, ds_config, lm_loss, tiny_gpt2
from reference_sparse_algorithms import ReferenceMasked
from test_reference_equivalence import EPS, LR, WD, assert_forward_sets_equal, assert_weights_equal

import ds_topkast
from ds_topkast import algorithms
from ds_topkast.algorithms import Algorithm, due, register, registry
from ds_topkast.config import TopKASTConfig
from ds_topkast.core.layers import sparse_layers
from ds_topkast.core.select import shard_topk_bits, uniform_hash
from ds_topkast.errors import TopKASTConfigError

STEPS = 7
CASES = {
    "rigl": dict(algorithm="rigl", forward_sparsity=0.8, drop_fraction=0.5, update_end_step=7),
    "set": dict(algorithm="set", forward_sparsity=0.8, drop_fraction=0.5, update_end_step=7, seed=3),
    "static_magnitude": dict(algorithm="static", forward_sparsity=0.8),
    "static_random": dict(algorithm="static", forward_sparsity=0.8, mask_init="random", seed=5),
    "gmp": dict(algorithm="gmp", forward_sparsity=0.9, prune_start_step=2, prune_end_step=6),
    "gmp_off_grid": dict(algorithm="gmp", forward_sparsity=0.9, prune_start_step=1, prune_end_step=5),
}


def reference_for(model, engine, section):
    cfg = TopKASTConfig.from_section(section)
    state = engine.topkast.state
    layers = {n: (state.forward_targets[n], l.k_backward, l.source_type == "Conv1D")
              for n, l in sparse_layers(engine.module).items()}
    return ReferenceMasked(model, layers, algorithm=cfg.algorithm, interval=cfg.refresh_interval,
                           drop_fraction=cfg.drop_fraction, end_step=cfg.update_end_step or cfg.prune_end_step or 0,
                           start_step=cfg.prune_start_step, random_init=cfg.mask_init == "random", seed=cfg.seed,
                           lr=LR, eps=EPS, weight_decay=WD)


@pytest.mark.parametrize("stage,gas", [(0, 1), (2, 2)])
@pytest.mark.parametrize("case", list(CASES))
def test_algorithm_matches_dense_mask_reference(case, stage, gas):
    if stage == 2 and case in ("static_random", "set", "gmp_off_grid"):
        pytest.skip("one stage-2 run per selection path is enough (rigl, gmp, static by magnitude)")
    model = tiny_gpt2()
    reference_model = clone(model)
    cfg = ds_config(stage=stage, gas=gas, lr=LR, weight_decay=WD, refresh_interval=2, **CASES[case])
    del cfg["topkast"]["backward_sparsity"]  # each algorithm's own default: A = B, or the whole layer for gmp
    cfg["optimizer"]["params"]["eps"] = EPS
    engine, *_ = ds_topkast.initialize(model=model, config=cfg)
    ref = reference_for(reference_model, engine, cfg["topkast"])
    data = batches(STEPS * gas)
    for step in range(STEPS):
        micro = data[step * gas:(step + 1) * gas]
        for batch in micro:
            loss = engine(input_ids=batch, labels=batch).loss
            assert_forward_sets_equal(engine, ref)
            engine.backward(loss)
            engine.step()
        ref.train_step(micro, lm_loss)
        assert_weights_equal(engine, ref)
    history = engine.topkast.refresher.history
    if CASES[case]["algorithm"] in ("rigl", "set"):
        assert [d.step for d in history] == [2, 4, 6] and history[0].backward_changed > 0
    if CASES[case]["algorithm"] == "gmp":
        layer = next(iter(sparse_layers(engine.module).values()))
        assert [d.step for d in history] == ([2, 4, 6] if case == "gmp" else [2, 4, 5])  # and at its end step
        assert layer.k_forward == engine.topkast.state.forward_targets[layer.layer_name] < layer.k_backward
    if CASES[case]["algorithm"] == "static":
        assert history == []


def test_rigl_grows_where_the_dense_gradient_is_largest():
    """A hand-made case: one layer, the gradient of exactly one inactive entry is huge, so it is grown."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False))
    cfg = ds_config(include=["0"], exclude=[], algorithm="rigl", forward_sparsity=0.5, backward_sparsity=0.5,
                    refresh_interval=1, drop_fraction=0.25, update_end_step=1000, lr=0.0)
    engine, *_ = ds_topkast.initialize(model=model, config=cfg)
    layer = sparse_layers(engine.module)["0"]
    inactive = torch.ones(64, dtype=torch.bool)
    inactive[layer.indices] = False
    target = int(inactive.nonzero()[0])
    x = torch.zeros(4, 8)
    x[:, target % 8] = 100.0
    out = engine(x)
    engine.backward((out[:, target // 8] * 1000).sum() + out.sum() * 1e-3)
    engine.step()
    assert target in layer.indices.tolist()
    assert float(layer.values[layer.indices.tolist().index(target)]) == 0.0, "a grown weight starts at zero"
    assert len(layer.indices) == 32


RESUMED = {**CASES, "topkast_per_entry": dict(new_entries="per_entry_bias_correction", forward_interval=1)}


@pytest.mark.parametrize("case", ["gmp", "rigl", "topkast_per_entry"])
def test_resumed_run_equals_the_uninterrupted_one(tmp_path, case):
    """Saved after step 3: RigL's next update needs step 4's dense gradient, GMP's k_A is mid-schedule, per-entry
    bias correction needs the step each entry joined B and the learning rate of the resumed schedule."""
    def run(steps, load=None, save=None):
        cfg = ds_config(stage=1, lr=LR, refresh_interval=2, **RESUMED[case])
        if "algorithm" in RESUMED[case]:
            del cfg["topkast"]["backward_sparsity"]
        cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": LR,
                                                           "warmup_num_steps": 5, "warmup_type": "linear"}}
        engine, *_ = ds_topkast.initialize(model=tiny_gpt2(), config=cfg)
        first = 0
        if load:
            engine.load_checkpoint(str(load))
            first = engine.global_steps
        for batch in batches(steps)[first:]:
            engine.backward(engine(input_ids=batch, labels=batch).loss)
            engine.step()
        if save:
            engine.save_checkpoint(str(save))
        adapter = engine.topkast.refresher.adapter
        return {n: (l.indices.clone(), l.forward_mask.clone(), l.k_forward, adapter.get_master(l.values).clone())
                for n, l in sparse_layers(engine.module).items()}

    run(3, save=tmp_path)
    resumed, uninterrupted = run(STEPS, load=tmp_path), run(STEPS)
    for name, (indices, forward_mask, k_forward, values) in uninterrupted.items():
        got = resumed[name]
        assert torch.equal(got[0], indices) and torch.equal(got[1], forward_mask) and got[2] == k_forward, name
        assert torch.equal(got[3], values), name


class ToyRegrowth(Algorithm):
    """A toy algorithm written, as a user would, in one class against the public interface only: every
    refresh_interval steps until update_end_step, drop the ζ(t)·k smallest active weights and regrow as many at
    random. That is SET, so the plain SET reference says whether the registered toy trains as it should."""

    name = "toy_regrowth"
    settings = ("drop_fraction", "update_end_step")
    masked = True

    @classmethod
    def fill_defaults(cls, section):
        section.setdefault("backward_sparsity", section.get("forward_sparsity", 0.9))
        return section

    @classmethod
    def check(cls, cfg):
        if cfg.update_end_step is None:
            raise ValueError("toy_regrowth needs update_end_step")

    def updates_at(self, step):
        return due(step, self.cfg.refresh_interval) and step < self.cfg.update_end_step

    def initial_backward(self, theta, offset, numel, k_forward, k_backward, seed, comm):
        return shard_topk_bits(theta, offset, numel, k_backward, comm)

    def backward_bits(self, update, step):
        fraction = self.cfg.drop_fraction / 2 * (1 + math.cos(math.pi * step / self.cfg.update_end_step))
        grown = int(fraction * update.k_backward)
        kept = shard_topk_bits(update.theta, update.offset, update.numel, update.k_backward - grown, update.comm,
                               candidates=update.old_bits)
        new = shard_topk_bits(uniform_hash(update.positions(), update.seed), update.offset, update.numel, grown,
                              update.comm, candidates=torch.bitwise_not(kept))
        return kept | new


def test_a_registered_algorithm_trains_like_its_reference(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTERED", dict(registry._REGISTERED))  # the other tests see the built-ins only
    register(ToyRegrowth)
    register(ToyRegrowth)  # the same class again is fine
    assert "toy_regrowth" in algorithms.names()
    with pytest.raises(ValueError, match="registered already"):
        register(type("Other", (ToyRegrowth,), {}))
    with pytest.raises(TopKASTConfigError, match="mask_init applies to algorithm static / rigl / set only"):
        TopKASTConfig.from_section({"algorithm": "toy_regrowth", "update_end_step": 7, "mask_init": "random"})
    with pytest.raises(TopKASTConfigError, match="toy_regrowth needs update_end_step"):
        TopKASTConfig.from_section({"algorithm": "toy_regrowth"})
    section = dict(algorithm="toy_regrowth", forward_sparsity=0.8, drop_fraction=0.5, update_end_step=7, seed=3)
    model = tiny_gpt2()
    reference_model = clone(model)
    cfg = ds_config(stage=0, lr=LR, weight_decay=WD, refresh_interval=2, **section)
    del cfg["topkast"]["backward_sparsity"]  # the toy's own default: A = B
    cfg["optimizer"]["params"]["eps"] = EPS
    engine, *_ = ds_topkast.initialize(model=model, config=cfg)
    layers = {n: (engine.topkast.state.forward_targets[n], l.k_backward, l.source_type == "Conv1D")
              for n, l in sparse_layers(engine.module).items()}
    ref = ReferenceMasked(reference_model, layers, algorithm="set", interval=2, drop_fraction=0.5, end_step=7,
                          start_step=0, random_init=False, seed=3, lr=LR, eps=EPS, weight_decay=WD)
    for batch in batches(STEPS):
        loss = engine(input_ids=batch, labels=batch).loss
        assert_forward_sets_equal(engine, ref)
        engine.backward(loss)
        engine.step()
        ref.train_step([batch], lm_loss)
        assert_weights_equal(engine, ref)
    history = engine.topkast.refresher.history
    assert [d.step for d in history] == [2, 4, 6] and history[0].backward_changed > 0
