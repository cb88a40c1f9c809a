"""End to end: the training command on 2 CPU ranks under the real deepspeed launcher, both model families."""
import json
import shutil
from pathlib import Path

import pytest
from launcher import REPO, deepspeed_launch

from ds_topkast.lm.cli import main as train_main

GPT = {"type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2}
TXL = {"type": "transformer_xl", "preset": "tiny"}


def write_config(path: Path, base: str, model: dict, steps: int, topkast: dict | None = None, **train) -> Path:
    """A shipped config cut down to a test's size; `topkast` and `train` entries override its sections."""
    cfg = json.loads((REPO / "configs" / base).read_text())
    cfg["train"].update({"steps": steps, "eval_interval": 3, "eval_batches": 2, "seq_len": 16, "log_interval": 1,
                         "model": model, "data": {"max_bytes": 100_000}, **train})
    cfg["train_micro_batch_size_per_gpu"] = 2
    cfg["topkast"].update({"refresh_interval": 2, **(topkast or {})})
    path.write_text(json.dumps(cfg))
    return path


def launch(*args: str):
    return deepspeed_launch(2, "--module", "ds_topkast.train", *args)


def records(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_gpt_trains_on_two_ranks_then_resumes_on_its_schedule(tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path / "cfg.json", "tiny_gpt2.json", GPT, steps=6)
    cfg = json.loads(config.read_text())
    cfg["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path / "monitor"), "job_name": "gpt"}
    cfg["scheduler"]["params"]["warmup_num_steps"] = 2
    config.write_text(json.dumps(cfg))
    first = launch("--config", str(config), "--out", str(out), "--steps", "4")
    assert "sparsified layers total" in first.stdout, "the memory report is printed at start"
    assert "eval bpb" in first.stdout + first.stderr
    assert (out / "latest").read_text().strip() == "global_step4"
    assert {p.name for p in (out / "global_step4").glob("topkast_rank*.pt")} == \
        {"topkast_rank00000.pt", "topkast_rank00001.pt"}
    assert [r["step"] for r in records(out, "refresh")] == [2, 4]
    assert not records(out, "test"), "a run stopped before train.steps is not over: no test yet"
    data, = records(out, "data")
    assert {split: part["tokens"] for split, part in data["splits"].items()} == \
        {"train": 90_000, "valid": 5_000, "test": 5_000}
    assert data["splits"]["train"]["files"][0].endswith("__future__.py")
    assert (out / "training.png").stat().st_size > 10_000
    monitored = {p.name for p in (tmp_path / "monitor" / "gpt").glob("*.csv")}
    assert {"train_loss.csv", "train_tokens_per_s.csv", "eval_eval_bpb.csv", "TopKAST_ever_in_backward.csv",
            "TopKAST_refresh_seconds.csv"} <= \
        monitored, monitored

    with pytest.raises(SystemExit, match="already holds a run"):  # refused before any rank starts
        train_main(["--config", str(config), "--out", str(out)])
    with pytest.raises(SystemExit, match="schedule ends at step 6, past which WarmupCosineLR"):
        train_main(["--config", str(config), "--out", str(out), "--steps", "8", "--resume"])
    with pytest.raises(SystemExit, match="started with world 2 \\(now 1\\).*--init-from"):  # this process is one rank
        train_main(["--config", str(config), "--out", str(out), "--resume"])

    resumed = launch("--config", str(config), "--out", str(out), "--resume")
    assert "Resuming at step 4 to step 6 on a learning-rate schedule of 6 steps" in resumed.stdout
    assert (out / "latest").read_text().strip() == "global_step6"
    assert [r["step"] for r in records(out, "refresh")] == [2, 4, 6]
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [3, 4, 6]
    assert all(0 < r["eval_bpb"] < 8.5 for r in evals)
    test, = records(out, "test")
    assert test["step"] == 6 and test["tokens"] == (5_000 - 1) // 15 * 15 and 0 < test["bpb"] < 8.5
    assert records(out, "train")[-1]["lr"] == pytest.approx(3e-3 * 0.1), "the cosine ended at step 6, not 4"


def test_transformer_xl_on_two_ranks_resumes_exactly_with_its_memory(tmp_path):
    """Steps 4-6 resumed from the step-3 checkpoint equal the uninterrupted run's, memory included.

    The resumed run logs every 3 steps: its record is the mean of the three steps' losses.
    """
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    config = write_config(tmp_path / "cfg.json", "tiny_transformer_xl.json", TXL, steps=6, checkpoint_interval=3)
    launch("--config", str(config), "--out", str(whole))
    assert {p.name for p in (whole / "global_step3").glob("train_state_rank*.pt")} == \
        {"train_state_rank00000.pt", "train_state_rank00001.pt"}, "each rank's memory is checkpointed"
    assert [r["step"] for r in records(whole, "refresh")] == [2, 4, 6]
    test, = records(whole, "test")
    assert test["protocol"] == {"tgt_len": 16, "mem_len": 32, "clamp_len": None, "same_length": False,
                                "streams": 10, "segments": "all"}

    shutil.copytree(whole / "global_step3", resumed / "global_step3")
    (resumed / "latest").write_text("global_step3")
    every_third = write_config(tmp_path / "every_third.json", "tiny_transformer_xl.json", TXL, steps=6,
                               checkpoint_interval=3, log_interval=3)
    launch("--config", str(every_third), "--out", str(resumed), "--resume")
    expected = [r["loss"] for r in records(whole, "train") if r["step"] > 3]
    assert [r["step"] for r in records(resumed, "train")] == [6]
    assert records(resumed, "train")[0]["loss"] == pytest.approx(sum(expected) / 3, rel=1e-12)
    assert records(resumed, "eval")[-1]["eval_loss"] == records(whole, "eval")[-1]["eval_loss"]
    assert records(resumed, "test")[0]["loss"] == test["loss"]

    launch("--config", str(config), "--out", str(whole), "--evaluate", "test")
    assert [r["loss"] for r in records(whole, "test")] == [test["loss"]] * 2, "--evaluate scores the checkpoint"


def test_the_console_script_prepares_and_trains_in_one_process_without_a_launcher(tmp_path):
    import os
    import subprocess
    import sys

    script = Path(sys.executable).parent / "ds-topkast-train"
    config = write_config(tmp_path / "cfg.json", "tiny_gpt2.json", GPT, steps=2, plot=False)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    prepared = subprocess.run([str(script), "--config", str(config), "--prepare-only"], env=env, capture_output=True,
                              text=True, check=True)
    assert json.loads(prepared.stdout)["splits"]["valid"]["tokens"] == 5_000
    subprocess.run([str(script), "--config", str(config), "--out", str(tmp_path / "run")], env=env,
                   capture_output=True, text=True, check=True)
    assert records(tmp_path / "run", "test")[0]["step"] == 2


def test_transformer_xl_with_an_adaptive_softmax_trains_the_same_under_zero3(tmp_path):
    """The tied softmax reads its tables outside their modules' forward: ZeRO-3 must gather them (and hook the
    model's NamedTuple output for backward), or ranks disagree on collectives; the numbers equal ZeRO-2's."""
    model = {**TXL, "cutoffs": [40, 120], "div_val": 2}
    losses = {}
    for stage in (2, 3):
        config = write_config(tmp_path / f"z{stage}.json", "tiny_transformer_xl.json", model, steps=3, plot=False,
                              data={"max_bytes": 50_000, "tokenizer": "words"})
        cfg = json.loads(config.read_text())
        cfg["zero_optimization"] = {"stage": stage}
        config.write_text(json.dumps(cfg))
        launch("--config", str(config), "--out", str(tmp_path / f"z{stage}"))
        losses[stage] = [r["loss"] for r in records(tmp_path / f"z{stage}", "train")] + \
            [records(tmp_path / f"z{stage}", "test")[0]["loss"]]
    assert losses[3] == pytest.approx(losses[2], rel=1e-5)
