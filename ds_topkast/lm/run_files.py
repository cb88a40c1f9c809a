"""What a run keeps in its folder so that a resume continues it exactly: the learning-rate schedule's length and the
batch layout (run.json), and each rank's loop state file next to every checkpoint."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ds_topkast.errors import TrainConfigError
from ds_topkast.lm.train_config import TrainConfig

RUN_FILE = "run.json"  # what a resume must keep: the learning-rate schedule's length


SCHEDULES_WITH_LENGTH = ("WarmupCosineLR", "WarmupDecayLR")


def schedule_length(ds_config: dict[str, Any], out: Path, cfg: TrainConfig, stop: int, args) -> int | None:
    """The length DeepSpeed's warm-up/decay scheduler gets, unless the config sets its own; None when none applies.

    A new run's schedule spans train.steps, whatever --steps stops it at. A resumed run
    keeps the length it started with (run.json), unless --reschedule asks for one ending
    at `stop`. Training past the schedule's end is refused: the cosine would climb back up.
    """
    scheduler = ds_config.get("scheduler", {})
    if scheduler.get("type") not in SCHEDULES_WITH_LENGTH or "total_num_steps" in scheduler.get("params", {}):
        return None
    if args.reschedule:
        return stop
    run_file = out / RUN_FILE
    kept = args.resume and run_file.is_file()
    length = (json.loads(run_file.read_text()).get("schedule_steps") if kept else None) or cfg.steps
    if stop > length:
        where = "the run's learning-rate schedule" if kept else f"train.steps ({cfg.steps}), the schedule's length,"
        fix = f"add --reschedule to stretch it to {stop}" if args.resume else "raise train.steps instead"
        asked = f"--steps {stop}" if args.steps else f"train.steps {stop}"
        raise SystemExit(f"{asked}: {where} ends at step {length}, past which {scheduler['type']} does not "
                         f"decay; {fix}.")
    return length


def micro_batch_per_rank(ds_config: dict[str, Any], world: int) -> int:
    """train_micro_batch_size_per_gpu, or train_batch_size / (gradient_accumulation_steps * world) as DeepSpeed does."""
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    if isinstance(micro, int):
        return micro
    total, accumulation = ds_config.get("train_batch_size"), ds_config.get("gradient_accumulation_steps", 1)
    if isinstance(total, int) and isinstance(accumulation, int) and total % (accumulation * world) == 0:
        return total // (accumulation * world)
    raise TrainConfigError(
        f"The training command needs train_micro_batch_size_per_gpu, or a train_batch_size ({total}) divisible by "
        f"gradient_accumulation_steps ({accumulation}) x ranks ({world}), as numbers in the DeepSpeed config; "
        "set one of them.")


def accumulation_steps(ds_config: dict[str, Any], world: int) -> int:
    """gradient_accumulation_steps, or train_batch_size / (micro batch x ranks) as DeepSpeed derives it."""
    accumulation = ds_config.get("gradient_accumulation_steps")
    if isinstance(accumulation, int):
        return accumulation
    total, micro = ds_config.get("train_batch_size"), ds_config.get("train_micro_batch_size_per_gpu")
    if isinstance(total, int) and isinstance(micro, int) and micro * world and total % (micro * world) == 0:
        return total // (micro * world)
    return 1


def run_layout(ds_config: dict[str, Any]) -> dict[str, int]:
    """What a resumed run must keep: ranks, rows per micro-batch, micro-batches per step (they fix the streams)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    return {"world": world, "micro_batch_per_rank": micro_batch_per_rank(ds_config, world),
            "gradient_accumulation_steps": accumulation_steps(ds_config, world)}


def check_resumed_layout(out: Path, layout: dict[str, int]) -> None:
    """Every rank refuses, before any collective, a resume under another layout than the run's (run.json)."""
    run_file = out / RUN_FILE
    saved = json.loads(run_file.read_text()) if run_file.is_file() else {}
    changed = {key: (saved[key], value) for key, value in layout.items() if key in saved and saved[key] != value}
    if changed:
        raise SystemExit("--resume: this run was started with " + ", ".join(
            f"{key} {was} (now {now})" for key, (was, now) in changed.items()) + "; its per-rank state (random "
            "generators, Transformer-XL memories) fits only that layout. Resume with it, or start a new run from "
            f"its weights with --init-from {out}.")


def train_state_path(out: Path, steps: int, rank: int) -> Path:
    return out / f"global_step{steps}" / f"train_state_rank{rank:05d}.pt"
