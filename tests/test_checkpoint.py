"""A run stopped and resumed from a checkpoint continues exactly as the uninterrupted run."""
import pytest
import torch
from models import batches, ds_config, gpt2_engine
from test_engine import train

from ds_topkast.core.layers import sparse_layers
from ds_topkast.runtime.checkpoint import CheckpointError, checkpoint_file

STEPS = 8


def snapshot(engine):
    adapter = engine.topkast.refresher.adapter
    return {name: (layer.indices.clone(), layer.forward_mask.clone(), adapter.get_master(layer.values).clone())
            for name, layer in sparse_layers(engine.module).items()}


@pytest.mark.parametrize("stage,bf16,save_at", [(0, False, 4), (2, False, 3), (3, False, 4), (1, True, 5)])
def test_resume_equals_uninterrupted(tmp_path, stage, bf16, save_at):
    cfg = ds_config(stage=stage, bf16=bf16, lr=1e-2, refresh_interval=3, forward_interval=2, exploration_l2=1e-3)
    data = batches(STEPS)

    whole = gpt2_engine(cfg)
    expected_losses = train(whole, STEPS, data)
    expected = snapshot(whole)

    first = gpt2_engine(cfg)
    losses = train(first, save_at, data)
    first.save_checkpoint(str(tmp_path))
    assert checkpoint_file(tmp_path / f"global_step{save_at}", 0).is_file()

    resumed = gpt2_engine(cfg)
    load_path, _ = resumed.load_checkpoint(str(tmp_path))
    assert load_path is not None and resumed.global_steps == save_at
    losses += train(resumed, STEPS - save_at, data[save_at:])

    assert losses == pytest.approx(expected_losses, rel=1e-6)
    got = snapshot(resumed)
    for name, (indices, forward_mask, values) in expected.items():
        assert torch.equal(got[name][0], indices), f"B of {name}"
        assert torch.equal(got[name][1], forward_mask), f"A of {name}"
        torch.testing.assert_close(got[name][2], values, rtol=1e-6, atol=1e-7)
    assert [d.step for d in resumed.topkast.refresher.history] == [3, 6]


def test_changed_sparsity_is_refused_on_load(tmp_path):
    engine = gpt2_engine(ds_config(refresh_interval=2))
    train(engine, 2)
    engine.save_checkpoint(str(tmp_path))
    other = gpt2_engine(ds_config(refresh_interval=2, forward_sparsity=0.7))
    with pytest.raises(Exception, match="forward_sparsity: 0.8 -> 0.7"):
        other.load_checkpoint(str(tmp_path))


def test_missing_topkast_file_is_refused(tmp_path):
    engine = gpt2_engine(ds_config(refresh_interval=2))
    train(engine, 2)
    engine.save_checkpoint(str(tmp_path), tag="t")
    checkpoint_file(tmp_path / "t", 0).unlink()
    with pytest.raises(CheckpointError, match="has no topkast_rank00000.pt"):
        gpt2_engine(ds_config(refresh_interval=2)).load_checkpoint(str(tmp_path), tag="t")
