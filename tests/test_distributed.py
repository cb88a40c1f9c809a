"""Data parallelism with real ranks: 2 ranks on a global batch train exactly like 1 rank on it."""
import pytest
import torch
from dist_worker import build, state_of, train
from launcher import deepspeed_launch
from models import ds_config, tiny_gpt2

import ds_topkast
from ds_topkast.runtime.checkpoint import CheckpointError
from ds_topkast.store.cpu import shard_range

STAGES = [0, 1, 2, 3]
STEPS = 5


def one_rank(stage, steps=STEPS):
    engine = build(stage, world=1)
    return state_of(engine, train(engine, 0, steps))


def assert_same_training(got, expected, what):
    assert got["losses"] == pytest.approx(expected["losses"], rel=1e-5), what
    assert got["history"] == expected["history"], what
    for name in expected["indices"]:
        assert torch.equal(got["indices"][name], expected["indices"][name]), f"{what}: B of {name}"
        assert torch.equal(got["forward_mask"][name], expected["forward_mask"][name]), f"{what}: A of {name}"
    for group in ("compact", "params"):
        for name, value in expected[group].items():
            error = (got[group][name] - value).abs().max().item()
            assert error <= 1e-5 * value.abs().max().item(), f"{what}: {name} differs by {error:.3g}"


def load_ranks(out, prefix, world=2):
    return [torch.load(out / f"{prefix}_rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    deepspeed_launch(2, "tests/dist_worker.py", "equivalence", "--out", str(out), "--steps", str(STEPS),
                     "--stages", *map(str, STAGES))
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_match_one_rank_on_the_same_global_batch(two_rank_runs, stage):
    expected = one_rank(stage)
    ranks = load_ranks(two_rank_runs, f"equivalence_stage{stage}")
    assert [d["step"] for d in expected["history"]] == [2, 4]
    for rank, got in enumerate(ranks):
        assert_same_training(got, expected, f"ZeRO-{stage} rank {rank}")
        for name, (offset, held, numel) in got["store"].items():
            assert (offset, offset + held) == shard_range(numel, rank, 2), f"rank {rank} holds n/world of {name}"
    for name in expected["indices"]:  # bitwise identical masks on both ranks
        assert torch.equal(ranks[0]["indices"][name], ranks[1]["indices"][name])
        assert torch.equal(ranks[0]["forward_mask"][name], ranks[1]["forward_mask"][name])


@pytest.mark.parametrize("mode,message", [
    ("perturb", "layer 'transformer.h.0.attn.c_attn' on rank(s) [1]: its dense-store shard changed"),
    ("diverge", "masks differ across ranks at step 4 in layers ['transformer.h.0.attn.c_attn']"),
])
def test_a_store_or_masks_changed_on_one_rank_stop_every_rank(tmp_path, mode, message):
    result = deepspeed_launch(2, "tests/dist_worker.py", mode, "--out", str(tmp_path), check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in output, output[-3000:]
    assert "perturbation was not caught" not in output


def test_a_zero3_save_on_one_rank_stops_with_the_call_to_make_and_writes_nothing(tmp_path):
    result = deepspeed_launch(2, "tests/dist_worker.py", "one_rank_save", "--out", str(tmp_path), "--stages", "3",
                              check=False, env={"DS_TOPKAST_JOIN_TIMEOUT": "3"})
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "save_16bit_model is a collective under ZeRO-3" in output and "only 1 of 2 ranks" in output, output[-3000:]
    assert "not caught" not in output and not (tmp_path / "plain").exists()


def test_two_rank_checkpoint_resumes_on_two_ranks(tmp_path):
    deepspeed_launch(2, "tests/dist_worker.py", "roundtrip", "--out", str(tmp_path), "--start", "3", "--steps", "6",
                     "--stages", "1", "3")
    for stage in (1, 3):
        expected = one_rank(stage, steps=6)
        expected["losses"] = expected["losses"][3:]
        ranks = load_ranks(tmp_path, f"roundtrip_stage{stage}")
        for rank, got in enumerate(ranks):
            assert_same_training(got, expected, f"ZeRO-{stage} 2 ranks saved and resumed, rank {rank}")
        assert (tmp_path / f"ckpt_stage{stage}" / "global_step3" / "topkast_rank00001.pt").is_file()
        assert_plain_model(ranks, expected, tmp_path / f"plain_stage{stage}" / "pytorch_model.bin", stage)


def assert_plain_model(ranks: list[dict], expected: dict, saved, stage: int) -> None:
    """plain_state_dict (under ZeRO-3 on rank 0 only, the others empty; else on every rank) and save_16bit_model's
    file: α of every sparse layer, in the replaced Conv1D's layout, and every other parameter, as the 1-rank run
    trained them; loadable into the plain model with nothing missing or unexpected."""
    from reference_topkast import dense_alpha

    plain, other = ranks[0]["plain"], ranks[1]["plain"]
    if stage == 3:
        assert other == {}, "under ZeRO-3 only rank 0 receives the plain state dict"
    else:
        assert other.keys() == plain.keys() and all(torch.equal(other[k], plain[k]) for k in plain)
    result = tiny_gpt2().load_state_dict(plain, strict=False)
    assert not result.missing_keys and not result.unexpected_keys, f"ZeRO-{stage}: {result}"
    for name, indices in expected["indices"].items():
        shape = plain[f"{name}.weight"].t().shape  # GPT-2's Conv1D holds (in, out)
        alpha = dense_alpha(expected["compact"][name], indices, expected["forward_mask"][name], shape).t()
        torch.testing.assert_close(plain[f"{name}.weight"].float(), alpha, rtol=1e-5, atol=1e-6, msg=name)
    for name, value in expected["params"].items():
        torch.testing.assert_close(plain[name].float().reshape(-1), value, rtol=1e-5, atol=1e-6, msg=name)
    from_file = torch.load(saved, weights_only=True)
    assert from_file.keys() == plain.keys() and all(torch.equal(from_file[k], plain[k]) for k in plain)


# DeepSpeed itself refuses to load ZeRO-partitioned optimizer state on another world size
# ("not currently supported"; its universal-checkpoint conversion is the way there), so the
# resharding of ds_topkast's own store is tested where DeepSpeed's side can follow: stage 0.
RESHARD_STAGES = [0]


@pytest.mark.parametrize("stage", RESHARD_STAGES)
def test_resume_two_ranks_checkpoint_on_one_rank(tmp_path, stage):
    deepspeed_launch(2, "tests/dist_worker.py", "save", "--out", str(tmp_path), "--steps", "3",
                     "--stages", str(stage))
    engine = build(stage, world=1)
    engine.load_checkpoint(str(tmp_path / f"ckpt_stage{stage}"))
    resumed = state_of(engine, train(engine, 3, 6))
    expected = one_rank(stage, steps=6)
    expected["losses"] = expected["losses"][3:]
    assert_same_training(resumed, expected, f"ZeRO-{stage} 2 -> 1 ranks")


@pytest.mark.parametrize("stage", RESHARD_STAGES)
def test_resume_one_rank_checkpoint_on_two_ranks(tmp_path, stage):
    engine = build(stage, world=1)
    train(engine, 0, 3)
    engine.save_checkpoint(str(tmp_path / f"ckpt_stage{stage}"))
    deepspeed_launch(2, "tests/dist_worker.py", "resume", "--out", str(tmp_path), "--start", "3", "--steps", "6",
                     "--stages", str(stage))
    expected = one_rank(stage, steps=6)
    expected["losses"] = expected["losses"][3:]
    for rank, got in enumerate(load_ranks(tmp_path, f"resume_stage{stage}")):
        assert_same_training(got, expected, f"ZeRO-{stage} 1 -> 2 ranks, rank {rank}")


def test_a_zero2_checkpoint_on_another_world_size_is_refused_with_the_way_out(tmp_path):
    deepspeed_launch(2, "tests/dist_worker.py", "save", "--out", str(tmp_path), "--steps", "2", "--stages", "2")
    engine = build(2, world=1)
    with pytest.raises(CheckpointError, match="written by 2 data-parallel ranks under ZeRO stage 2.*Resume on 2 "
                                              "ranks, or start a new run from its weights"):
        engine.load_checkpoint(str(tmp_path / "ckpt_stage2"))
    model = ds_topkast.load_dense_weights(tiny_gpt2(seed=1), tmp_path / "ckpt_stage2")
    engine, *_ = ds_topkast.initialize(model=model, config=ds_config(stage=2, refresh_interval=2))
    assert engine.topkast.refresher.history == []


@pytest.mark.parametrize("algorithm", ["rigl", "set"])
def test_rigl_and_set_grow_the_same_entries_on_two_ranks_as_on_one(tmp_path_factory, algorithm):
    """RigL's growth reads the dense gradient summed over ranks, SET's a seeded draw: both must match 1 rank."""
    out = tmp_path_factory.getbasetemp() / "algorithms"
    if not out.exists():  # one launch serves both algorithms and both stages
        out.mkdir()
        deepspeed_launch(2, "tests/dist_worker.py", "algorithms", "--out", str(out), "--steps", str(STEPS),
                         "--stages", "2", "3")
    for stage in (2, 3):
        engine = build(stage, world=1, algorithm=algorithm)
        expected = state_of(engine, train(engine, 0, STEPS))
        assert [d["step"] for d in expected["history"]] == [2, 4] and expected["history"][0]["backward_changed"] > 0
        for rank, got in enumerate(load_ranks(out, f"{algorithm}_stage{stage}")):
            assert_same_training(got, expected, f"{algorithm} ZeRO-{stage} rank {rank}")
