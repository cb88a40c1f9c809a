"""What the Trainer saves with TopKASTCallback: every save strategy's checkpoints hold the store and sets of their
step, load_best_model_at_end brings back the best checkpoint's, the callback's log entries reach TensorBoard, and a
forgotten callback is warned about."""
import os
import warnings

import pytest
import torch
from hf_trainer_worker import TOPKAST, Windows, deepspeed_trainer_config
from models import tiny_gpt2

import ds_topkast
from ds_topkast.core.layers import sparse_layers
from ds_topkast.runtime.checkpoint import checkpoint_file


def trainer(out, *, deepspeed: bool, rows: int = 16, callbacks=None, **arguments):
    """A Trainer of the sparsified tiny GPT-2 (ZeRO-2 fp32 or no DeepSpeed), one micro-batch of 2 per step."""
    from transformers import Trainer, TrainingArguments
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    config = deepspeed_trainer_config(gas=1, stage=2) if deepspeed else {"topkast": dict(TOPKAST)}
    defaults = dict(output_dir=str(out), per_device_train_batch_size=2, per_device_eval_batch_size=4,
                    learning_rate=1e-2, lr_scheduler_type="constant", max_grad_norm=0.0, optim="adamw_torch",
                    train_sampling_strategy="sequential", logging_steps=1, report_to="none", seed=0, use_cpu=True,
                    deepspeed=config if deepspeed else None, disable_tqdm=True)
    if not deepspeed:  # an earlier in-process DeepSpeed Trainer leaves both set
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        unset_hf_deepspeed_config()
    args = TrainingArguments(**{**defaults, **arguments})
    model = ds_topkast.sparsify(tiny_gpt2(), config)
    callbacks = [ds_topkast.TopKASTCallback()] if callbacks is None else callbacks
    return Trainer(model=model, args=args, train_dataset=Windows(rows), eval_dataset=Windows(8, seed=2),
                   callbacks=callbacks)


def saved_state(folder) -> dict:
    return torch.load(checkpoint_file(folder, 0), weights_only=True)


def module_sets(folder, step: int) -> dict:
    """The sparse layers' bitmaps in DeepSpeed's own checkpoint of the module."""
    module = torch.load(folder / f"global_step{step}" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    return {key: tensor for key, tensor in module.items() if key.endswith("_bits")}


STRATEGIES = {
    "steps": dict(save_strategy="steps", save_steps=2, max_steps=6),
    "epoch": dict(save_strategy="epoch", num_train_epochs=2),  # 16 rows in micro-batches of 2: 8 steps an epoch
    "best": dict(save_strategy="best", eval_strategy="steps", eval_steps=2, max_steps=6,
                 metric_for_best_model="eval_loss", greater_is_better=True),
}


def new_bests(log_history: list[dict]) -> list[int]:
    """Steps whose eval loss was higher than every earlier one (greater_is_better=True): where "best" saves."""
    steps, best = [], float("-inf")
    for entry in log_history:
        if "eval_loss" in entry and entry["eval_loss"] > best:
            steps.append(entry["step"])
            best = entry["eval_loss"]
    return steps


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_save_strategy_writes_the_store_and_sets_of_its_step(tmp_path, strategy):
    run = trainer(tmp_path, deepspeed=True, **STRATEGIES[strategy])
    run.train()
    folders = sorted(tmp_path.glob("checkpoint-*"), key=lambda f: int(f.name.split("-")[1]))
    expected = {"steps": [2, 4, 6], "epoch": [8, 16], "best": new_bests(run.state.log_history)}[strategy]
    assert [int(f.name.split("-")[1]) for f in folders] == expected
    for folder, step in zip(folders, expected):
        state = saved_state(folder)
        assert [d["step"] for d in state["history"]] == list(range(2, step + 1, 2)), "refreshes up to this step"
        ours = {f"{name}.{key}": bits for name, sets in state["sets"].items() for key, bits in sets.items()}
        assert ours.keys() == module_sets(folder, step).keys()
        for key, bits in module_sets(folder, step).items():
            assert torch.equal(ours[key], bits), f"{folder.name}: {key}"


@pytest.mark.parametrize("deepspeed", [False, True], ids=["no_deepspeed", "deepspeed_zero2"])
def test_load_best_model_at_end_restores_the_best_checkpoints_store_sets_and_values(tmp_path, deepspeed):
    run = trainer(tmp_path, deepspeed=deepspeed, save_strategy="steps", save_steps=2, eval_strategy="steps",
                  eval_steps=2, max_steps=6, load_best_model_at_end=True, metric_for_best_model="eval_loss")
    run.train()
    best_step = int(run.state.best_model_checkpoint.rsplit("-", 1)[1])
    assert best_step < 6, "the test needs a best checkpoint that is not the last one"
    best = saved_state(tmp_path / f"checkpoint-{best_step}")
    store = run.model.topkast_state.store
    for name, layer in sparse_layers(run.model).items():
        assert torch.equal(layer.backward_bits.cpu(), best["sets"][name]["backward_bits"]), name
        assert torch.equal(layer.forward_bits.cpu(), best["sets"][name]["forward_bits"]), name
        assert torch.equal(store.read(name), best["store"][name]), name
    callback = next(c for c in run.callback_handler.callbacks if isinstance(c, ds_topkast.TopKASTCallback))
    assert [d.step for d in callback.history] == list(range(2, best_step + 1, 2)), "the best checkpoint's history"
    if not deepspeed:  # the values come back from the Top-KAST file (the model file is the plain model)
        for name, layer in sparse_layers(run.model).items():
            assert torch.equal(layer.values.detach(), best["values"][name]), name


def test_a_sparsified_model_trained_without_the_callback_is_warned_about_at_the_first_step(tmp_path):
    run = trainer(tmp_path, deepspeed=False, callbacks=[], max_steps=2, save_strategy="no")
    with pytest.warns(UserWarning, match="without a Top-KAST runtime.*TopKASTCallback"):
        run.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer(tmp_path / "with", deepspeed=False, max_steps=2, save_strategy="no").train()


def test_refreshes_and_the_memory_report_reach_tensorboard(tmp_path, monkeypatch):
    """The Trainer puts its reporting integrations before the user's callbacks; the callback's entries reach them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    run = trainer(tmp_path, deepspeed=True, max_steps=4, save_strategy="no", report_to="tensorboard")
    run.train()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("train/topkast/backward_changed")] == [2, 4], tags
    assert 0 < events.Scalars("train/topkast/memory_ratio")[0].value < 1


def test_store_files_of_another_step_than_the_trainer_resumed_from_are_refused(tmp_path):
    """The callback restores the step the Trainer loaded, never another checkpoint's store next to it."""
    trainer(tmp_path, deepspeed=True, max_steps=4, save_strategy="steps", save_steps=2).train()
    resumed = trainer(tmp_path, deepspeed=True, max_steps=4, save_strategy="no",
                      callbacks=[ds_topkast.TopKASTCallback(resume_from=str(tmp_path / "checkpoint-2"))])
    with pytest.raises(ds_topkast.CheckpointError, match="holds the Top-KAST state of step 2.*resumes at step 4"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
