"""End to end: the training command under the real deepspeed launcher, then --resume."""
import json
from pathlib import Path

from launcher import REPO, deepspeed_launch


def write_config(path: Path, steps: int) -> Path:
    cfg = json.loads((REPO / "configs" / "tiny_gpt2.json").read_text())
    cfg["train"].update(steps=steps, eval_interval=3, eval_batches=2, seq_len=32,
                        model={"type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2},
                        data={"max_bytes": 100_000})
    cfg["train_micro_batch_size_per_gpu"] = 2
    cfg["topkast"]["refresh_interval"] = 2
    path.write_text(json.dumps(cfg))
    return path


def launch(*args: str):
    return deepspeed_launch(1, "--module", "ds_topkast.train", *args)


def records(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_train_then_resume(tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path / "cfg.json", steps=4)
    first = launch("--config", str(config), "--out", str(out))
    assert "sparsified layers total" in first.stdout, "the memory report is printed at start"
    assert "eval bits/byte" in first.stdout + first.stderr
    assert (out / "latest").read_text().strip() == "global_step4"
    assert (out / "global_step4" / "topkast_rank00000.pt").is_file()
    assert [r["step"] for r in records(out, "refresh")] == [2, 4]

    launch("--config", str(config), "--out", str(out), "--steps", "6", "--resume")
    assert (out / "latest").read_text().strip() == "global_step6"
    assert [r["step"] for r in records(out, "refresh")] == [2, 4, 6]
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [3, 4, 6]
    assert all(0 < r["eval_bpb"] < 8.5 for r in evals)
