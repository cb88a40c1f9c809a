"""A run changes its sparsity by starting anew from a checkpoint's dense weights (`--init-from`)."""
import deepspeed
import pytest
import torch
from models import ds_config, tiny_gpt2
from test_engine import train
from test_train_cli import GPT, write_config

import ds_topkast
from ds_topkast.runtime.checkpoint import CheckpointError


def saved_sparse_run(folder):
    engine, *_ = ds_topkast.initialize(model=tiny_gpt2(seed=0), config=ds_config(stage=2, refresh_interval=2))
    train(engine, 3)  # B's values have moved on since the refresh at step 2 wrote the store
    engine.save_checkpoint(str(folder))
    return ds_topkast.export(engine, weights="theta").state_dict()


def test_dense_weights_are_the_store_with_the_latest_values_of_b(tmp_path):
    expected = saved_sparse_run(tmp_path)
    model = ds_topkast.load_dense_weights(tiny_gpt2(seed=1), tmp_path)
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    engine, *_ = ds_topkast.initialize(model=model, config=ds_config(refresh_interval=2, forward_sparsity=0.9,
                                                                      backward_sparsity=0.8))
    assert all(l == l for l in train(engine, 2)), "the new sparsity trains"


def test_a_dense_deepspeed_checkpoint_starts_a_sparse_run(tmp_path):
    dense = tiny_gpt2(seed=0)
    cfg = ds_config(stage=1)
    del cfg["topkast"]
    engine, *_ = deepspeed.initialize(model=dense, model_parameters=dense.parameters(), config=cfg)
    train(engine, 2)
    engine.save_checkpoint(str(tmp_path))
    model = ds_topkast.load_dense_weights(tiny_gpt2(seed=1), tmp_path)
    for key, value in dense.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_wrong_folders_and_models_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="is neither a checkpoint folder"):
        ds_topkast.load_dense_weights(tiny_gpt2(), tmp_path)
    saved_sparse_run(tmp_path)
    with pytest.raises(CheckpointError, match="has 3072 weights in .* and 6912 in the model"):
        ds_topkast.load_dense_weights(tiny_gpt2(n_embd=48), tmp_path)
    with pytest.raises(CheckpointError, match="do not fit this model"):
        ds_topkast.load_dense_weights(tiny_gpt2(n_layer=3), tmp_path)


def test_the_training_command_takes_init_from(tmp_path):
    from ds_topkast.lm.cli import main

    write_config(tmp_path / "first.json", "tiny_gpt2.json", GPT, 2, plot=False)
    main(["--config", str(tmp_path / "first.json"), "--out", str(tmp_path / "first")])
    write_config(tmp_path / "second.json", "tiny_gpt2.json", GPT, 2,
                 topkast={"forward_sparsity": 0.9, "backward_sparsity": 0.8}, plot=False)
    with pytest.raises(SystemExit, match="give one of them"):
        main(["--config", str(tmp_path / "second.json"), "--out", str(tmp_path / "x"), "--resume",
              "--init-from", str(tmp_path / "first")])
    main(["--config", str(tmp_path / "second.json"), "--out", str(tmp_path / "second"), "--init-from",
          str(tmp_path / "first")])
    assert (tmp_path / "second" / "latest").read_text() == "global_step2"
