"""examples/run_clm_no_trainer.py, our custom accelerate loop with its three Top-KAST lines, under `accelerate launch`
on 2 ranks: with DeepSpeed at ZeRO 0-3 (ZeRO-3's model built inside zero.Init) and with DDP, without DeepSpeed. Each
launch trains 4 steps saving state at step 2, then resumes from that save_state folder; the resumed run equals the
whole one (step losses, eval loss, the saved model, every rank's store and sets), the refreshes ran, and the model the
script saves loads into plain transformers with nothing missing or unexpected and gives the run's eval loss."""
import json
import math

import pytest
import torch
from launcher import REPO, accelerate_launch
from test_run_clm import BLOCK, assert_same_files, assert_same_topkast_files, data_env, run_clm, write_corpus

# (name, accelerate launch flags after the DeepSpeed config file, ZeRO stage or None without DeepSpeed)
BF16 = ("--mixed_precision", "bf16")  # ZeRO-0 with bf16 is refused (DeepSpeed's FP16_Optimizer): fp32 there
LAUNCHES = [("zero0", ("--mixed_precision", "no"), 0), ("zero1", BF16, 1), ("zero2", BF16, 2),
            ("zero3", (*BF16, "--zero3_init_flag", "true"), 3), ("ddp", (), None)]


def write_config(folder, stage: int | None) -> str:
    """configs/accelerate_zero2.json at this stage, refreshing every 2 steps, with the regulariser on."""
    cfg = json.loads((REPO / "configs" / "accelerate_zero2.json").read_text())
    cfg["zero_optimization"] = {"stage": stage or 0}
    if stage == 3:  # every layer really partitioned between passes, as a large model's are
        cfg["zero_optimization"].update(stage3_gather_16bit_weights_on_model_save=True,
                                        stage3_param_persistence_threshold=0, stage3_max_reuse_distance=0,
                                        stage3_max_live_parameters=0)
    cfg["topkast"].update(refresh_interval=2, exploration_l2=1e-3)
    path = folder / "ds_config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize("name,flags,stage", LAUNCHES, ids=[launch[0] for launch in LAUNCHES])
def test_a_custom_accelerate_loop_trains_resumes_exactly_and_saves_the_plain_model(tmp_path, name, flags, stage):
    train, validation = write_corpus(tmp_path)
    config = write_config(tmp_path, stage)
    launcher_flags = (("--use_deepspeed", "--deepspeed_config_file", config, "--gradient_accumulation_steps", "2",
                       *flags) if stage is not None else ("--multi_gpu",))
    accelerate_launch(
        "tests/run_clm_worker.py", "--script", "run_clm_no_trainer", "--out", str(tmp_path), "--",
        "--topkast_config", config, "--model_type", "gpt2",
        "--config_overrides", f"n_layer=2,n_embd=32,n_head=2,n_positions={2 * BLOCK}", "--train_file", train,
        "--validation_file", validation, "--block_size", str(BLOCK), "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "2", "--per_device_eval_batch_size", "4", "--max_eval_samples", "16",
        "--learning_rate", "1e-2", "--max_train_steps", "4", "--checkpointing_steps", "2",
        launcher_flags=launcher_flags, env=data_env(tmp_path))

    whole, resumed = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("whole", "resumed"))
    assert [r["step"] for r in whole["refreshes"]] == [2, 4], "the loop's steps drive the refreshes"
    assert resumed["step_losses"] == {step: whole["step_losses"][step] for step in ("3", "4")}
    assert resumed["eval_loss"] == whole["eval_loss"]
    assert_same_files(tmp_path / "resumed", tmp_path / "whole", 0)  # the plain model the script saved
    state = "step_4/pytorch_model" if stage is not None else "step_4"  # DeepSpeed's checkpoint, or accelerate's
    assert_same_topkast_files(tmp_path / "resumed" / state, tmp_path / "whole" / state, 2)

    loss = plain_eval_loss(tmp_path / "whole", train, validation)
    assert math.isclose(loss, whole["eval_loss"], rel_tol=1e-5), (loss, whole)


def plain_eval_loss(folder, train_file: str, validation_file: str) -> float:
    """The script's evaluation (the mean loss of the first 16 validation blocks, 4 at a time) of the model it saved,
    loaded by plain transformers, which must find every weight it expects and nothing else."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not any("TopKAST" in type(m).__name__ for m in model.modules())
    raw = run_clm.load_texts(run_clm.DataTrainingArguments(train_file=train_file, validation_file=validation_file))
    blocks = run_clm.grouped_blocks(raw, AutoTokenizer.from_pretrained(folder), BLOCK)["validation"]
    batches = [default_data_collator([blocks[i] for i in range(start, start + 4)]) for start in range(0, 16, 4)]
    with torch.no_grad():
        return sum(model.eval()(**batch).loss.float().item() for batch in batches) / len(batches)

