"""examples/run_clm.py, our script that drives the Trainer as transformers' run_clm.py does, with its three Top-KAST
lines: every ZeRO stage on 1 and 2 ranks under the deepspeed launcher (gradient checkpointing in one of each stage's
two), resumed from a checkpoint outside output_dir equal to the whole run, and the saved model loading with plain
from_pretrained to the run's own eval loss."""
import json
import math
import os
import sys

import pytest
import torch
from launcher import REPO, accelerate_launch, deepspeed_launch
from safetensors.torch import load_file

sys.path.insert(0, str(REPO / "examples"))
import run_clm  # noqa: E402

from ds_topkast.lm.data.corpus_sources import default_corpus_bytes  # noqa: E402

BLOCK = 32
# (ZeRO stage, ranks, gradient checkpointing): each stage on both rank counts, checkpointing in one of the two
LAUNCHES = [(0, 1, False), (1, 1, True), (2, 1, False), (3, 1, True),
            (0, 2, True), (1, 2, False), (2, 2, True), (3, 2, False)]


def write_corpus(folder) -> tuple[str, str]:
    """Train and validation text files cut from the embedded corpus (the standard library's source)."""
    text = default_corpus_bytes(80_000).decode("utf-8", errors="ignore")
    train, validation = folder / "train.txt", folder / "validation.txt"
    train.write_text(text[:70_000])
    validation.write_text(text[70_000:])
    return str(train), str(validation)


def write_deepspeed_config(folder, stage: int) -> str:
    """configs/hf_trainer_zero2.json at this stage, refreshing every 2 steps, with the regulariser on."""
    cfg = json.loads((REPO / "configs" / "hf_trainer_zero2.json").read_text())
    cfg["zero_optimization"] = {"stage": stage}
    if stage == 3:
        cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    cfg["topkast"].update(refresh_interval=2, exploration_l2=1e-3)
    path = folder / f"ds_zero{stage}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def script_arguments(tmp_path, stage: int, checkpointing: bool) -> list[str]:
    train, validation = write_corpus(tmp_path)
    return ["--deepspeed", write_deepspeed_config(tmp_path, stage), "--model_type", "gpt2",
            "--config_overrides", f"n_layer=2,n_embd=32,n_head=2,n_positions={2 * BLOCK}", "--tokenizer_name", "bytes",
            "--train_file", train, "--validation_file", validation, "--block_size", str(BLOCK),
            "--do_train", "--do_eval", "--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--per_device_eval_batch_size", "4", "--max_eval_samples", "16",
            "--learning_rate", "1e-2", "--logging_steps", "1", "--report_to", "none", "--seed", "0", "--use_cpu",
            "--disable_tqdm", "True", *(["--bf16"] if stage > 0 else []),  # ZeRO-0 bf16 is refused: fp32 there
            *(["--gradient_checkpointing"] if checkpointing else [])]


def assert_same_files(got, expected, ranks: int) -> None:
    """The plain model and every rank's Top-KAST file (store, sets, history) of two checkpoint folders are equal."""
    got_model, expected_model = load_file(got / "model.safetensors"), load_file(expected / "model.safetensors")
    assert got_model.keys() == expected_model.keys()
    for key, tensor in expected_model.items():
        assert torch.equal(got_model[key], tensor), key
    assert_same_topkast_files(got, expected, ranks)


def assert_same_topkast_files(got, expected, ranks: int) -> None:
    """Every rank's Top-KAST file (store, sets, history) of two checkpoint folders is equal."""
    for rank in range(ranks):
        name = f"topkast_rank{rank:05d}.pt"
        got_state, expected_state = (torch.load(f / name, weights_only=True) for f in (got, expected))
        assert got_state["history"] == expected_state["history"]
        for key in ("store", "ever_in_backward"):
            for layer, tensor in expected_state[key].items():
                assert torch.equal(got_state[key][layer], tensor), f"rank {rank}: {key} of {layer}"
        for layer, sets in expected_state["sets"].items():
            for key, bits in sets.items():
                assert torch.equal(got_state["sets"][layer][key], bits), f"rank {rank}: {key} of {layer}"


def plain_eval_loss(folder, train_file: str, validation_file: str) -> float:
    """The saved model's eval loss on the script's validation blocks, loaded and evaluated with no ds_topkast code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)  # an earlier in-process DeepSpeed Trainer test leaves it set
    unset_hf_deepspeed_config()
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not any("TopKAST" in type(m).__name__ for m in model.modules())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    args = TrainingArguments(output_dir=str(folder / "plain_eval"), per_device_eval_batch_size=4, use_cpu=True,
                             report_to="none")
    raw = run_clm.load_texts(run_clm.DataTrainingArguments(train_file=train_file, validation_file=validation_file))
    blocks = run_clm.grouped_blocks(raw, tokenizer, BLOCK)["validation"].select(range(16))
    trainer = Trainer(model=model, args=args, eval_dataset=blocks, data_collator=default_data_collator)
    return trainer.evaluate()["eval_loss"]


@pytest.mark.parametrize("stage,ranks,checkpointing", LAUNCHES,
                         ids=[f"zero{s}-{r}rank{'-gc' if c else ''}" for s, r, c in LAUNCHES])
def test_run_clm_trains_saves_a_plain_model_and_resumes_exactly(tmp_path, stage, ranks, checkpointing):
    arguments = script_arguments(tmp_path, stage, checkpointing)
    deepspeed_launch(ranks, "tests/run_clm_worker.py", "--out", str(tmp_path), "--", *arguments, env=data_env(tmp_path))
    check_runs(tmp_path, ranks, stage)


def test_run_clm_under_accelerate_launch_with_a_deepspeed_config_file_resumes_exactly(tmp_path):
    """accelerate's DeepSpeed plugin instead of --deepspeed: the script's sparsify(model, training_args.deepspeed)
    gets None and takes the config file accelerate was given."""
    arguments = script_arguments(tmp_path, 2, False)
    at = arguments.index("--deepspeed")
    config = arguments[at + 1]
    del arguments[at:at + 2]
    accelerate_launch("tests/run_clm_worker.py", "--out", str(tmp_path), "--", *arguments,
                      launcher_flags=("--use_deepspeed", "--deepspeed_config_file", config), env=data_env(tmp_path))
    check_runs(tmp_path, 2, 2)


def data_env(tmp_path) -> dict[str, str]:
    return {"HF_DATASETS_CACHE": str(tmp_path / "datasets_cache"), "HF_HUB_OFFLINE": "1"}


def check_runs(tmp_path, ranks: int, stage: int) -> None:
    """The resumed run equals the whole one, the logs hold the refreshes, and the saved model loads plainly."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert_same_files(resumed / "checkpoint-4", whole / "checkpoint-4", ranks)
    assert_same_files(resumed, whole, 0)  # the final save_model() output: the plain model only
    eval_loss = json.loads((whole / "eval_results.json").read_text())["eval_loss"]
    assert json.loads((resumed / "eval_results.json").read_text())["eval_loss"] == eval_loss

    history = json.loads((whole / "trainer_state.json").read_text())["log_history"]
    refreshes = [entry["topkast/refresh_step"] for entry in history if "topkast/refresh_step" in entry]
    assert refreshes == [2, 4], "each refresh's mask dynamics reach the Trainer's logs"
    assert all(entry["topkast/refresh_seconds"] > 0 for entry in history if "topkast/refresh_step" in entry)
    assert any(0 < entry.get("topkast/memory_ratio", 0) < 1 for entry in history)

    loss = plain_eval_loss(whole, str(tmp_path / "train.txt"), str(tmp_path / "validation.txt"))
    assert math.isclose(loss, eval_loss, rel_tol=1e-3 if stage > 0 else 1e-5), (loss, eval_loss)
