"""The Hugging Face Trainer with TopKASTCallback: equal to ds_topkast.initialize, on 2 ranks, resumed exactly."""

import pytest
import torch
from hf_trainer_worker import TOPKAST, Windows, snapshot, train
from launcher import accelerate_launch as launch
from launcher import deepspeed_launch
from models import ds_config, tiny_gpt2

import ds_topkast

STEPS = 6


def assert_same_run(got: dict, expected: dict, exact: bool = False) -> None:
    for key in ("indices", "forward_mask"):
        for name in expected[key]:
            assert torch.equal(got[key][name], expected[key][name]), f"{key} of {name}"
    tolerance = {"rtol": 0, "atol": 0} if exact else {}
    for key in ("values", "store"):
        for name in expected[key]:
            torch.testing.assert_close(got[key][name], expected[key][name], **tolerance, msg=f"{key} of {name}")


RIGL = {"algorithm": "rigl", "forward_sparsity": 0.8, "refresh_interval": 2, "update_end_step": 100,
        "drop_fraction": 0.5}


@pytest.mark.parametrize("topkast", [TOPKAST, RIGL], ids=["topkast", "rigl"])
def test_trainer_without_deepspeed_equals_ds_topkast_initialize(tmp_path, topkast):
    """Same seed, data and fp32 AdamW: the Trainer path (callback) = the engine path, regulariser included; RigL's
    dense gradient reaches the callback's runtime from the Trainer's backward as it does the engine's."""
    model, callback = train(tmp_path, steps=STEPS, gas=1, micro=4, deepspeed=False, save_steps=None, topkast=topkast)
    trainer_run = snapshot(model, callback)
    assert trainer_run["refresh_steps"] == [2, 4, 6]

    config = ds_config(stage=0, micro_batch=4, lr=1e-2)
    config["topkast"] = dict(topkast)
    engine, *_ = ds_topkast.initialize(model=tiny_gpt2(), config=config)
    data = Windows(64).data
    for step in range(STEPS):
        batch = data[4 * step:4 * step + 4]
        # the Trainer normalises the summed loss by the batch's label count (unshifted), and so do we here
        engine.backward(engine(input_ids=batch, labels=batch, num_items_in_batch=torch.tensor(batch.numel())).loss)
        engine.step()

    class Engine:  # snapshot() reads the callback's runtime; the engine has the same one
        runtime, history = engine.topkast, engine.topkast.refresher.history

    assert_same_run(trainer_run, snapshot(engine.module, Engine))


@pytest.mark.parametrize("stage,bf16,arguments_first", [(1, False, False), (1, True, False), (3, False, False),
                                                        (3, True, False), (3, True, True)])
def test_trainer_with_deepspeed_zero_stages_refreshes_on_optimizer_steps(tmp_path, stage, bf16, arguments_first):
    """arguments_first: TrainingArguments with a ZeRO-3 config exist before the model, so it is built in zero.Init."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    try:
        model, callback = train(tmp_path, steps=4, gas=2, deepspeed=True, save_steps=None, stage=stage, bf16=bf16,
                                arguments_first=arguments_first)
    finally:
        unset_hf_deepspeed_config()  # ZeRO-3 TrainingArguments would partition later tests' models at construction
    history = callback.history
    assert [d.step for d in history] == [2, 4] and history[0].backward_changed > 0
    if stage == 3:  # partitioned values: a clear error that says what to do instead
        with pytest.raises(ValueError, match="does not gather ZeRO-3 partitioned parameters.*save_model"):
            ds_topkast.export(model)
    store = callback.runtime.state.store
    assert all(torch.isfinite(store.read(name)).all() for name in store.names())


def check_two_rank_results(out) -> None:
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    for run in ("whole", "resumed"):
        for key in ("indices", "forward_mask"):
            for name, tensor in ranks[0][run][key].items():
                assert torch.equal(tensor, ranks[1][run][key][name]), f"{run}: {key} of {name} differs across ranks"
    for rank in ranks:
        assert rank["whole"]["refresh_steps"] == [2, 4], "4 optimizer steps of 2 micro-batches each: refresh at 2, 4"
        assert rank["resumed"]["refresh_steps"] == [2, 4], "the history is restored with the store"
        assert_same_run(rank["resumed"], rank["whole"], exact=True)
    for step in (2, 4):
        saved = {p.name for p in (out / "whole" / f"checkpoint-{step}").glob("topkast_rank*.pt")}
        assert saved == {"topkast_rank00000.pt", "topkast_rank00001.pt"}


def test_trainer_with_deepspeed_zero2_bf16_on_two_ranks_refreshes_on_optimizer_steps_and_resumes(tmp_path):
    deepspeed_launch(2, "tests/hf_trainer_worker.py", "--out", str(tmp_path), "--deepspeed")
    check_two_rank_results(tmp_path)


@pytest.mark.parametrize("deepspeed", [False, True], ids=["ddp", "deepspeed_zero2_bf16"])
def test_trainer_on_two_ranks_through_accelerate_launch(tmp_path, deepspeed):
    accelerate_launch(tmp_path, *["--deepspeed"] * deepspeed)
    check_two_rank_results(tmp_path)


def accelerate_launch(out, *worker_args: str) -> None:
    """`accelerate launch --multi_gpu` of the Trainer worker on 2 ranks, DDP without --mixed_precision."""
    launch("tests/hf_trainer_worker.py", "--out", str(out), *worker_args,
           launcher_flags=("--multi_gpu", "--mixed_precision", "no"))


def expected_regulariser_gradient(values: dict, l2: float) -> dict:
    """2λ·v on A and 2λ·v/D on B\\A, once per optimizer step, D each layer's own forward density."""
    from ds_topkast.core.layers import sparse_layers

    layers = sparse_layers(ds_topkast.sparsify(tiny_gpt2(), {"topkast": TOPKAST}))
    return {name: 2 * l2 * values[name] * torch.where(layer.forward_mask, 1.0, 1 / layer.forward_density)
            for name, layer in layers.items()}


def test_trainer_regulariser_gradient_is_exactly_lambda_on_one_and_two_ranks(tmp_path):
    """The regulariser is applied in the layers' backward: the same λ per optimizer step on any number of ranks
    (added to the loss, DDP's mean made it N times too large), with gradient accumulation 2."""
    from hf_trainer_worker import regulariser_gradient

    l2 = 0.05
    one_rank = regulariser_gradient(tmp_path / "one", l2)
    accelerate_launch(tmp_path / "two", "--regulariser", str(l2))
    two_ranks = [torch.load(tmp_path / "two" / f"regulariser_rank{r}.pt", weights_only=True) for r in range(2)]
    for run in (one_rank, *two_ranks):
        expected = expected_regulariser_gradient(run["values"], l2)
        for name, gradient in run["gradient"].items():
            torch.testing.assert_close(gradient, expected[name], rtol=1e-4, atol=1e-6, msg=name)
            torch.testing.assert_close(gradient, one_rank["gradient"][name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_model_sparsified_with_another_section_is_refused(tmp_path):
    from hf_trainer_worker import deepspeed_trainer_config, training_args
    from transformers import Trainer

    model = ds_topkast.sparsify(tiny_gpt2(), {"topkast": TOPKAST})
    other = deepspeed_trainer_config(gas=1)
    other["topkast"]["forward_sparsity"] = 0.9
    args = training_args(tmp_path, steps=1, gas=1, micro=2, deepspeed=other, save_steps=None)
    trainer = Trainer(model=model, args=args, train_dataset=Windows(8), callbacks=[ds_topkast.TopKASTCallback()])
    with pytest.raises(ds_topkast.TopKASTConfigError, match="different \"topkast\" section"):
        trainer.train()


def test_zero3_without_gathered_saves_is_refused_at_start(tmp_path):
    """The Trainer would save a ZeRO-3 model without its sparse layers' weights: say which key to set."""
    from hf_trainer_worker import deepspeed_trainer_config, training_args
    from transformers import Trainer
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    config = deepspeed_trainer_config(gas=1, stage=3)
    del config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]

    try:
        model = ds_topkast.sparsify(tiny_gpt2(), config)
        args = training_args(tmp_path, steps=1, gas=1, micro=2, deepspeed=config, save_steps=None)
        trainer = Trainer(model=model, args=args, train_dataset=Windows(8), callbacks=[ds_topkast.TopKASTCallback()])
        with pytest.raises(ds_topkast.TopKASTConfigError, match="stage3_gather_16bit_weights_on_model_save"):
            trainer.train()
    finally:
        unset_hf_deepspeed_config()
