"""Ranks killed with SIGKILL, and a long run, on 2 CPU ranks under the real deepspeed launcher.

One uninterrupted run of the training command is the reference and the soak: a refresh
every 2 steps and a checkpoint every 4, with each rank's resident memory recorded after
every refresh and a CRC of its parameters at every checkpoint. A second run of the same
config is killed three times (mid-training, mid-refresh, mid-checkpoint-write), each time
resumed with `--resume` from whatever `latest` names, and must end with the reference's
losses, evaluations, masks and dense store, bit for bit.
"""
import json
import os
from pathlib import Path

import torch
from launcher import deepspeed_launch
from test_train_cli import write_config as cli_config

STEPS = int(os.environ.get("TOPKAST_SOAK_STEPS", 120))
FAULTS = [  # (point, step, rank, the checkpoint `latest` must name after the kill)
    ("train", 6, 1, "global_step4"),
    ("refresh", 10, 0, "global_step8"),
    ("checkpoint", 12, 1, "global_step8"),
]


def write_config(path: Path) -> Path:
    return cli_config(path, "tiny_gpt2.json", {"type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2}, STEPS,
                      topkast={"exploration_l2": 1e-4}, eval_interval=STEPS // 2, checkpoint_interval=4, plot=False)


def train(config: Path, out: Path, *extra: str, env=None, check=True):
    return deepspeed_launch(2, "tests/train_worker.py", "--config", str(config), "--out", str(out), *extra,
                            env=env, check=check, timeout=300)


def metrics(out: Path) -> dict[str, dict[int, dict]]:
    by_kind: dict[str, dict[int, dict]] = {}
    for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        by_kind.setdefault(record.pop("kind"), {})[record["step"]] = record
    return by_kind


def final_topkast_state(out: Path, rank: int) -> dict:
    return torch.load(out / f"global_step{STEPS}" / f"topkast_rank{rank:05d}.pt", weights_only=True)


def test_a_long_run_and_a_run_killed_three_times_end_the_same(tmp_path):
    """One test, so that the reference run is made once whichever pytest-xdist worker runs it."""
    folder = tmp_path / "reference"
    folder.mkdir()
    config = write_config(folder / "config.json")
    train(config, folder / "run", env={"TOPKAST_WATCH": str(folder)})
    check_soak(folder)
    check_killed_runs_resume_exactly(config, folder, tmp_path / "killed")


def check_soak(folder: Path) -> None:
    """Flat host memory over many refreshes and checkpoints; the ranks never drift apart."""
    for rank in (0, 1):
        rss = [int(line.split()[1]) for line in (folder / f"rss_rank{rank}.txt").read_text().splitlines()]
        assert len(rss) == STEPS // 2, "a record after every refresh"
        settled, last = rss[len(rss) // 4: len(rss) // 2], rss[-len(rss) // 4:]
        growth = sum(last) / len(last) - sum(settled) / len(settled)
        assert growth < 16 * 2**20, f"rank {rank} host memory grew {growth / 2**20:.1f} MiB over {len(rss)} refreshes"
    crcs = [(folder / f"params_rank{rank}.txt").read_text().splitlines() for rank in (0, 1)]
    assert len(crcs[0]) == STEPS // 4 and crcs[0] == crcs[1], "the ranks' parameters drifted apart"
    # (the masks: every refresh checks that the ranks hold the same sets, and stops the run otherwise)


def check_killed_runs_resume_exactly(config: Path, folder: Path, out: Path) -> None:
    """Killed mid-step, mid-refresh and mid-checkpoint-write, resumed each time: the reference's every number."""
    for attempt, (point, step, rank, latest) in enumerate(FAULTS):
        resume = ("--resume",) if attempt else ()
        killed = train(config, out, *resume, env={"TOPKAST_FAULT": f"{point}:{step}:{rank}"}, check=False)
        assert killed.returncode != 0, f"the launcher did not report the rank killed in {point}"
        assert (out / "latest").read_text().strip() == latest, f"after the kill in {point}"
    assert (out / "global_step12").is_dir(), "the killed checkpoint write had begun, and was not taken as latest"
    train(config, out, "--resume")

    expected, got = metrics(folder / "run"), metrics(out)
    measured = ("tokens_per_s", "peak_memory_bytes")  # of the machine, not of the training
    for kind in ("train", "eval", "refresh"):
        assert {s: {k: v for k, v in r.items() if k not in measured} for s, r in got[kind].items()} == \
            {s: {k: v for k, v in r.items() if k not in measured} for s, r in expected[kind].items()}, kind
    for rank in (0, 1):
        want, have = final_topkast_state(folder / "run", rank), final_topkast_state(out, rank)
        for name in want["sets"]:
            for key in ("backward_bits", "forward_bits"):  # this rank's part of the sets
                assert torch.equal(have["sets"][name][key], want["sets"][name][key]), f"{key} of {name}"
            assert torch.equal(have["store"][name], want["store"][name]), f"rank {rank}'s store of {name}"
